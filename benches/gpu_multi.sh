#!/usr/bin/env bash
# Several GPUs on a two-GPU machine (nvidia-h100-x2 / nvidia-h200-x2), in one call: writes the
# full-size random-weight SD1.5 and SDXL models, then `benches/multi_gpu.py` for each (one
# process with two workers against one; two worker processes behind Redis against one; one of
# them killed mid-load). Carry .gpu/sdkube.xz (the CUDA build) and .gpu/redis (see
# benches/gpu_scale_out.sh). Results: $OUT/multi-{sd15,sdxl}.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-out}
mkdir -p "$out"
STAGES=none OUT=$out bash benches/gpu_scale_out.sh >/dev/null  # unpacks the binary, Redis wrapper
export REDIS_SERVER=/tmp/redis-server PYTHONUNBUFFERED=1
. benches/gpu_env.sh
bin=/tmp/sdkube-bench
nvidia-smi --query-gpu=index,name,driver_version --format=csv,noheader | tee "$out/machine.txt"
for model in sd15:512 sdxl:1024; do
  name=${model%%:*} size=${model##*:}
  [ -d "/tmp/$name" ] || "$bin" bench --what "txt2img-$name" --device cuda --precision fp16 \
    --save-model "/tmp/$name" >"$out/save-$name.log" 2>&1
  python3 benches/multi_gpu.py --bin "$bin" --model "/tmp/$name" --size "$size" --steps 20 \
    --requests 32 --clients 8 | tee "$out/multi-$name.jsonl"
done
