#!/usr/bin/env bash
# ControlNet on the GPU machine, one call (carry .gpu/sdkube.xz and .whl): the fixture check on CPU vs GPU,
# a ControlNet-steered generation on the GPU vs the CPU, then sdkube's and diffusers'
# ControlNet step timed in the same call.
set -uo pipefail
. "$(dirname "$0")/gpu_env.sh"
rm -f .gpu/sdkube
python3 -c "import lzma,shutil; shutil.copyfileobj(lzma.open('.gpu/sdkube.xz'), open('.gpu/sdkube','wb'))"
chmod +x .gpu/sdkube
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
STAGES="check" WHAT="" bash benches/gpu_run.sh 2>&1 | tail -4
python3 - <<'PY'
from PIL import Image, ImageDraw
im = Image.new("RGB", (64, 64)); d = ImageDraw.Draw(im); d.ellipse((12, 12, 52, 52), fill=(255, 255, 255)); im.save("/tmp/hint.png")
PY
for dev in cpu cuda; do
  .gpu/sdkube generate --model fixtures/sd/sd1 --device $dev --precision fp32 --prompt "a lighthouse" \
    --steps 8 --width 64 --height 64 --seed 3 --sampler "DPM++ 2M Karras" \
    --controlnet-dirs fixtures/controlnet --controlnet sd1 --control-image /tmp/hint.png \
    --control-weight 0.8 --control-mode "My prompt is more important" --out /tmp/cn-$dev 2>&1 | tail -1
done
.gpu/sdkube generate --model fixtures/sd/sd1 --device cuda --precision fp32 --prompt "a lighthouse" \
    --steps 8 --width 64 --height 64 --seed 3 --sampler "DPM++ 2M Karras" --out /tmp/cn-none 2>&1 | tail -1
python3 - <<'PY'
import numpy as np, glob
from PIL import Image
load = lambda d: np.asarray(Image.open(glob.glob(d + "/*.png")[0]), dtype=np.float32)
cpu, gpu, none = load("/tmp/cn-cpu"), load("/tmp/cn-cuda"), load("/tmp/cn-none")
print(f"controlnet cuda fp32 vs cpu fp32: max abs {np.abs(gpu - cpu).max():.1f}, mean {np.abs(gpu - cpu).mean():.3f} (8-bit levels); vs no unit: mean {np.abs(gpu - none).mean():.2f}")
PY
.gpu/sdkube bench --device cuda --precision fp16 --what controlnet-sd15 --repeat 20 2>&1 | grep -v ' INFO '
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
PYTHONPATH=/tmp/site timeout 360 python3 benches/gpu_controlnet_reference.py 2>&1 | grep -v -i warn | tail -8
.gpu/sdkube bench --device cuda --precision fp16 --what controlnet-sd15 --repeat 20 2>&1 | grep -v ' INFO '
