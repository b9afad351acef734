#!/usr/bin/env bash
# The scale-out benchmark on the GPU machine, in stages (STAGES, default "gpu cpu"):
#   gpu  one `api` + one GPU `worker` behind Redis against one `--role all` process: latency of
#        one request at a time (p50/p99) and throughput of 4 concurrent clients, full-size
#        random-weight SD1.5 at 512², 20 steps (the model written by `sdkube bench --save-model`)
#   cpu  1, 2 and 3 CPU workers (4 threads each) with the fixture model: throughput and scaling
# Needs, carried from the build machine: .gpu/sdkube.xz (the CUDA build) and .gpu/redis (Debian's
# redis-server and the libraries it links: the GPU machine has no Redis and no network).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-out}
mkdir -p "$out"
bin=/tmp/sdkube-bench
[ -x "$bin" ] || { xz -dc .gpu/sdkube.xz >"$bin"; chmod +x "$bin"; }
. benches/gpu_env.sh
redis_libs=$PWD/.gpu/redis
if LD_LIBRARY_PATH=$redis_libs ldd .gpu/redis/redis-server | grep -q 'not found'; then
  redis_libs=$redis_libs:$PWD/.gpu/redis/more
fi
cat >/tmp/redis-server <<WRAP
#!/bin/sh
LD_LIBRARY_PATH=$redis_libs exec $PWD/.gpu/redis/redis-server "\$@"
WRAP
chmod +x /tmp/redis-server
export REDIS_SERVER=/tmp/redis-server PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/machine.txt"
for stage in ${STAGES:-gpu cpu}; do
  case $stage in
    gpu)
      [ -d /tmp/sd15 ] || "$bin" bench --what txt2img-sd15 --device cuda --precision fp16 \
        --save-model /tmp/sd15 >"$out/save-model.log" 2>&1
      python3 benches/scale_out.py --bin "$bin" --device cuda --model /tmp/sd15 --size 512 \
        --steps 20 --what latency --latency-requests 20 | tee "$out/gpu.jsonl"
      python3 benches/scale_out.py --bin "$bin" --device cuda --model /tmp/sd15 --size 512 \
        --steps 20 --what throughput --workers 1 --requests 16 --clients 4 | tee -a "$out/gpu.jsonl"
      ;;
    cpu)
      python3 benches/scale_out.py --bin "$bin" --device cpu --threads 4 --workers 1,2,3 \
        --size 128 --steps 10 --requests 24 --clients 6 --what throughput | tee "$out/cpu.jsonl"
      ;;
  esac
done
