#!/usr/bin/env bash
# Host memory of a serving process: `sdkube serve --model MODEL` started with each binary of
# BINS (default "target/debug/sdkube"), its VmRSS and VmHWM (peak) once `/readyz` says ready,
# RUNS times each, alternating. DEVICE (default cpu) and PRECISION (default fp16: on the CPU an
# fp16 engine built from fp32 files converts its weights, so what the process keeps beside them
# shows) pass through. MODEL: a diffusers folder, e.g. from `sdkube bench --device cpu --what
# txt2img-sd15 --save-model /tmp/sd15-random` (the default).
set -uo pipefail
model=${MODEL:-/tmp/sd15-random}
[ -d "$model" ] || { echo "no model folder $model (see the header)"; exit 2; }
for r in $(seq "${RUNS:-2}"); do
  for bin in ${BINS:-target/debug/sdkube}; do
    rm -rf /tmp/hm-out /tmp/hm-store
    "$bin" serve --model "$model" --device "${DEVICE:-cpu}" --precision "${PRECISION:-fp16}" \
      --listen 127.0.0.1:7871 --warm-up off --outputs /tmp/hm-out --store /tmp/hm-store \
      > /tmp/hm.log 2>&1 &
    pid=$!
    until curl -sf localhost:7871/readyz > /dev/null; do
      kill -0 $pid 2>/dev/null || { tail -3 /tmp/hm.log; break; }
      sleep 0.2
    done
    echo "$r $bin: $(grep -E 'VmRSS|VmHWM' /proc/$pid/status | tr -s ' \t\n' ' ')"
    kill -TERM $pid; wait $pid 2>/dev/null
  done
done
