#!/usr/bin/env bash
# Two builds load the same models and must make the same image: `sdkube generate` (3 steps,
# seed 7) with each binary of BINS (default ".gpu/before .gpu/after"), candle's kernels only
# (`SDKUBE_GPU_KERNELS=candle`: no per-process kernel choices, so equal weights give equal
# bytes), then the PNGs compared byte for byte. MODELS defaults to the tiny fixtures, single
# files and folders; a random-weight folder of `benches/cold_start_reference.py make` works too
# (SIDE sets the size, default 64). For a change in how weights are read or uploaded.
set -uo pipefail
. "$(dirname "$0")/gpu_env.sh"
unpack_builds
read -r -a bins <<< "${BINS:-.gpu/before .gpu/after}"
fixtures="fixtures/sd/sd1.safetensors fixtures/sd/sd2v.safetensors fixtures/sd/sdxl.safetensors fixtures/sd/sd1 fixtures/sd/sdxl"
failed=0
for model in ${MODELS:-$fixtures}; do
  name=$(basename "$model")
  # The tiny fixtures' single files need their folder's configs (4 norm groups, which a
  # checkpoint's shapes do not tell; real SD's 32 are inferred).
  config=(); [ -f "$model" ] && [ -d "${model%.safetensors}" ] && config=(--config "${model%.safetensors}")
  for i in "${!bins[@]}"; do
    rm -rf "/tmp/parity-$name-$i"
    SDKUBE_GPU_KERNELS=candle SDKUBE_CUDA_GRAPHS=off timeout 120 "${bins[$i]}" --log-json generate \
      --model "$model" "${config[@]}" --prompt "a lighthouse" --steps 3 --seed 7 --width "${SIDE:-64}" \
      --height "${SIDE:-64}" --device cuda --precision fp16 --out "/tmp/parity-$name-$i" \
      > "/tmp/parity-$name-$i.log" 2>&1 || {
        # the error line, not the backtrace's last frames
        echo "$name: ${bins[$i]} failed: $(grep -m1 -E '^error|ERROR|panicked' "/tmp/parity-$name-$i.log" | cut -c1-300)"
        failed=1; continue 2; }
  done
  for i in "${!bins[@]}"; do
    [ "$i" = 0 ] && continue
    if cmp -s /tmp/parity-"$name"-0/*.png /tmp/parity-"$name"-"$i"/*.png; then
      echo "$name: the same PNG bytes from ${bins[0]} and ${bins[$i]}"
    else
      echo "$name: DIFFERENT images from ${bins[0]} and ${bins[$i]}"; failed=1
    fi
  done
done
exit $failed
