#!/usr/bin/env bash
# Step caching on the GPU, in one call: sdkube's UNet runs under it (20 CFG steps, intervals 1 =
# off, 2, 3, 5; per step) beside DeepCache's helper around diffusers' UNet on the same shapes,
# eager (and with COMPILE=1 also with the blocks it caches compiled: minutes, so a call of its
# own within the 600 s a call may take); then the tiny fixture's image under step caching with
# CUDA graphs on and off (the graphs' own replay check is logged; the PNGs are compared).
#   [COMPILE=1] bash benches/gpu_step_cache.sh [BRANCH]     (carry .gpu with the CUDA build,
#                                                .whl with diffusers' and DeepCache's wheels)
set -uo pipefail
. "$(dirname "$0")/gpu_env.sh"; unpack_builds
branch=${1:-0}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; date -u +%FT%TZ
[ -d /tmp/site ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site
for family in sd15 sdxl; do
  .gpu/sdkube bench --device cuda --precision fp16 --what "step-cache-$family" --steps 20 \
    --repeat 3 --step-cache-branch "$branch" 2>&1 | grep '"bench"'
  python3 benches/step_cache_reference.py --family=$family --branch="$branch" --steps=20 --repeat=3
  [ "${COMPILE:-0}" = 1 ] && timeout 240 python3 benches/step_cache_reference.py \
    --family=$family --branch="$branch" --steps=20 --repeat=3 --compile 2>&1 | grep '"reference"'
done
for graphs in on off; do
  SDKUBE_CUDA_GRAPHS=$graphs SDKUBE_LOG=sdkube_nn=info,info .gpu/sdkube generate \
    --model fixtures/sd/sd1 --device cuda --precision fp16 --prompt "a lighthouse" --steps 12 \
    --width 64 --height 64 --seed 3 --step-cache-interval 3 --step-cache-branch 1 \
    --out /tmp/sc-$graphs > /tmp/sc-$graphs.log 2>&1 || tail -3 /tmp/sc-$graphs.log
  echo "graphs $graphs: $(grep -c 'captured and checked' /tmp/sc-$graphs.log) graphs checked," \
    "$(grep -c 'differs from the eager pass' /tmp/sc-$graphs.log) replays differing"
done
cmp -s /tmp/sc-on/*.png /tmp/sc-off/*.png && echo "graphs on and off: the same PNG bytes" ||
python3 - /tmp/sc-on /tmp/sc-off <<'PY'
import glob, sys
from PIL import Image
a, b = (Image.open(glob.glob(f"{d}/*.png")[0]).convert("RGB") for d in sys.argv[1:])
print("graphs on vs off, largest pixel difference:",
      max(abs(p - q) for x, y in zip(a.getdata(), b.getdata()) for p, q in zip(x, y)))
PY
date -u +%FT%TZ
