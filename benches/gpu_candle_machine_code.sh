#!/usr/bin/env bash
# candle's kernels as machine code (crates/nn/src/cuda/candle_machine_code.rs) against their PTX,
# one build, SDKUBE_CANDLE_KERNELS picking: the same image from both, and `sdkube serve` from
# process start to /readyz with an empty CUDA JIT cache (a pod on a new node), then its first image.
#   bash benches/gpu_candle_machine_code.sh [MODEL]     (MODEL: fixtures/sd/sd1 by default)
set -uo pipefail
. "$(dirname "$0")/gpu_env.sh"; unpack_builds
model=${1:-fixtures/sd/sd1} bin=.gpu/sdkube
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; date -u +%FT%TZ
echo "cuModuleLoadData imported from the driver (0: the executable's own comes first): $(nm -D $bin | grep -c ' U cuModuleLoadData$')"
for k in ptx machine-code; do
  /usr/bin/time -f "generate, $k, JIT cache off: %e s" env SDKUBE_CANDLE_KERNELS=$k CUDA_CACHE_DISABLE=1 \
    SDKUBE_LOG=sdkube_nn=debug,info $bin generate --model "$model" --device cuda --precision fp16 \
    --prompt "a lighthouse" --negative-prompt blurry --steps 8 --width 64 --height 64 --seed 3 \
    --sampler "DPM++ 2M Karras" --out /tmp/mc-img-$k > /tmp/mc-gen-$k.log 2>&1
  tail -1 /tmp/mc-gen-$k.log; echo "  modules loaded as machine code: $(grep -c 'loaded as machine code' /tmp/mc-gen-$k.log)"
done
cmp /tmp/mc-img-ptx/*.png /tmp/mc-img-machine-code/*.png && echo "the same PNG bytes"
for k in ptx machine-code machine-code; do
  rm -rf /tmp/mc-out /tmp/mc-store /tmp/mc-jit
  t0=$(date +%s.%N)
  SDKUBE_CANDLE_KERNELS=$k CUDA_CACHE_PATH=/tmp/mc-jit $bin --log-json serve --model "$model" --device cuda \
    --listen 127.0.0.1:7862 --warm-up on --outputs /tmp/mc-out --store /tmp/mc-store > /tmp/mc-serve.log 2>&1 &
  pid=$!
  until curl -sf localhost:7862/readyz > /dev/null; do
    kill -0 $pid 2>/dev/null || { tail -5 /tmp/mc-serve.log; break; }; sleep 0.02
  done
  t1=$(date +%s.%N)
  curl -sf -o /dev/null localhost:7862/sdapi/v1/txt2img -H 'content-type: application/json' \
    -d '{"prompt": "a lighthouse", "steps": 8, "width": 64, "height": 64, "seed": 1}'
  t2=$(date +%s.%N)
  kill -TERM $pid; wait $pid 2>/dev/null
  echo "serve, $k, empty JIT cache: ready in $(awk "BEGIN{print $t1 - $t0}") s, first image $(awk "BEGIN{print $t2 - $t1}") s"
done
date -u +%FT%TZ
