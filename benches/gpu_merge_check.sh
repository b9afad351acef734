#!/usr/bin/env bash
# A branch's checks and figures against main before it merges, on one GPU machine: weights
# loaded alike (PNG bytes), memory, speed against compiled diffusers, single files' cold start.
# Written for the merge of 2026-12-07 (single files read onto the GPU, q/k/v stacked in place,
# the GEGLU gate in vectors; README "Latest figures"). Carry .gpu/main.xz and .gpu/pending.xz
# (stripped CUDA builds of main and of the branch) and .whl. PARTS (default "load memory speed
# cold") narrows a run; "load memory" fit one call, "speed" and "cold" one each.
set -uo pipefail
. "$(dirname "$0")/gpu_env.sh"
unpack_builds
part() { [[ " ${PARTS:-load memory speed cold} " == *" $1 "* ]]; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; date -u
# 1. Reading onto the GPU must not change a weight: the same PNG bytes as main on every fixture,
#    single files (with their folder's configs) and folders, with candle's kernels. (`serve` takes
#    no --config, so the tiny single files cannot be served: the textual-inversion job is
#    checked on a folder by benches/gpu_train_serve.sh.)
part load && BINS=".gpu/main .gpu/pending" timeout 200 bash benches/gpu_load_parity.sh
# 2. The fused projections' memory: the pool's reserved peak of the UNet rows (main: +576-640
#    MiB for SDXL over its unfused 6368, from stacks made beside the separate q/k/v), and a
#    served SDXL-sized engine's GPU memory at ready (nvidia-smi), each build.
part memory && for b in main pending; do for what in unet-sd15 unet-sdxl; do
  timeout 60 .gpu/$b bench --device cuda --precision fp16 --what $what --repeat 5 2>&1 | grep '"bench"' \
    | sed "s/}\$/, \"build\": \"$b\"}/"
done; done
if part memory; then
  [ -d /tmp/sdxl-random ] || .gpu/main bench --device cuda --precision fp16 --what txt2img-sdxl \
    --save-model /tmp/sdxl-random > /dev/null 2>&1
  for b in main pending; do
    .gpu/$b serve --model /tmp/sdxl-random --device cuda --listen 127.0.0.1:7869 --warm-up off \
      --store /tmp/mem-store-$b > /tmp/mem-$b.log 2>&1 &
    pid=$!
    for _ in $(seq 600); do curl -sf localhost:7869/readyz > /dev/null && break; sleep 0.1; done
    echo "$b: SDXL served, GPU memory at ready $(nvidia-smi --query-gpu=memory.used --format=csv,noheader)"
    kill $pid; wait $pid 2>/dev/null
  done
fi
# 3. The GEGLU gate alone (ours against candle's op: time and max difference), then the UNet
#    steps of both builds alternating, and compiled diffusers (reduce-overhead) in the same call.
part speed && for b in main pending main pending; do
  timeout 60 .gpu/$b bench --device cuda --precision fp16 --what ops --repeat 10 2>&1 | grep '"geglu gate' \
    | sed "s/}\$/, \"build\": \"$b\"}/"
  for what in unet-sd15 unet-sdxl; do
    timeout 60 .gpu/$b bench --device cuda --precision fp16 --what $what --repeat 20 2>&1 | grep '"bench"' \
      | sed "s/}\$/, \"build\": \"$b\"}/"
  done
done
# Where SDXL's CFG step spends its time, each side by kind of kernel (ours eager per op, theirs
# the replayed graph's kernels).
part speed && timeout 60 .gpu/pending bench --device cuda --precision fp16 --what unet-sdxl --repeat 3 \
  --profile 2>&1 | grep "\"profile\"" | grep "batch 2"
part speed && cp .gpu/pending .gpu/sdkube && STAGES=compile COMPILE_ONLY=unet-sd15,unet-sdxl COMPILE_BATCH=2 \
  COMPILE_TIMEOUT=330 COMPILE_FLAGS=--profile bash benches/gpu_run.sh 2>&1 | grep -E '"bench"|"profile"'
# 4. Cold start of single files, main against this branch, diffusers in the same call.
part cold && BINS=".gpu/main .gpu/pending" MODELS="sd15-single sdxl-single" WARM=on JIT=kept \
  CACHES="warm cold" timeout 560 bash benches/gpu_cold_start.sh
date -u
