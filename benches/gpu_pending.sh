#!/usr/bin/env bash
# The checks and figures the branch pending-gpu (a single file's UNet and text encoders read
# straight onto the GPU) needs before it merges, against main, on one GPU machine. Carry
# .gpu/main.xz and .gpu/pending.xz (stripped CUDA builds of main and of this branch) and .whl.
# PARTS (default "load cold") narrows a run; each fits one call.
set -uo pipefail
. "$(dirname "$0")/gpu_env.sh"
unpack_builds
part() { [[ " ${PARTS:-load cold} " == *" $1 "* ]]; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; date -u
# 1. Reading onto the GPU must not change a weight: the same PNG bytes as main on every fixture,
#    single files (with their folder's configs) and folders, with candle's kernels. (`serve` takes
#    no --config, so the tiny single files cannot be served: the textual-inversion job is
#    checked on a folder by benches/gpu_train_serve.sh.)
part load && BINS=".gpu/main .gpu/pending" timeout 200 bash benches/gpu_load_parity.sh
# 2. Cold start of single files, main against this branch, diffusers in the same call.
part cold && BINS=".gpu/main .gpu/pending" MODELS="sd15-single sdxl-single" WARM=on JIT=kept \
  CACHES="warm cold" timeout 560 bash benches/gpu_cold_start.sh
date -u
