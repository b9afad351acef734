#!/usr/bin/env bash
# A compiled reference whose compiling outlasts one device call (max-autotune took 20 minutes for
# SD1.5's UNet on an H100): sdkube's UNet step, then compiled diffusers started in the background,
# where it outlives the call while the machine stays warm, waited for up to WAIT_S, then sdkube
# again once it is done. Call again (within the machine's idle time) until it prints its figure.
#   bash benches/gpu_compile_long.sh unet-sd15 540 [MODE]     (MODE: max-autotune by default)
set -uo pipefail
. "$(dirname "$0")/gpu_env.sh"; unpack_builds
what=$1 wait_s=$2 mode=${3:-max-autotune}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; date -u +%FT%TZ
.gpu/sdkube bench --device cuda --precision fp16 --what "$what" --repeat 20 2>&1 | grep '"bench"'
[ -d /tmp/site ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site
log=/tmp/compile-$mode-$what.log
[ -f "$log" ] || setsid nohup timeout 3000 python3 benches/gpu_reference.py --compile="$mode" \
  --only="$what" --batch=2 > "$log" 2>&1 < /dev/null &
compiling() { pgrep -f -- "--compile=$mode --only=$what" > /dev/null; }
for _ in $(seq 1 $((wait_s / 5))); do compiling || break; sleep 5; done
grep -E '"bench"|with compiling' "$log"; echo "$(grep -c 'AUTOTUNE benchmarking' "$log") shapes autotuned so far"
if compiling; then echo "still compiling: call again"
else .gpu/sdkube bench --device cuda --precision fp16 --what "$what" --repeat 20 2>&1 | grep '"bench"'; fi
date -u +%FT%TZ
