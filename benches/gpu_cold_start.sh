#!/usr/bin/env bash
# Cold start on one GPU: `sdkube serve --model DIR` from process start to /readyz 200, then the
# first and second txt2img at the model's native size (20 steps); diffusers loading the same
# folder (benches/cold_start_reference.py) in the same call. Page cache warm (files read just
# before), then cold (evicted with posix_fadvise DONTNEED). Expects .gpu/sdkube (or .xz) and the
# diffusers wheel in .whl; MODELS (default "sd15 sdxl"; "sd15-single", "sdxl-single": the same
# weights as one A1111-style checkpoint file, against diffusers' from_single_file and its
# from_pretrained of the folder), BINS (default ".gpu/sdkube"; several
# binaries compare builds), WARM ("off on"), CACHES ("warm cold"), JIT and REFERENCE (off: no
# diffusers runs) narrow a run. JIT
# "fresh" starts sdkube with an empty CUDA JIT cache (CUDA_CACHE_PATH), as a newly scheduled pod
# does: its PTX kernels (ours, candle's) are compiled for the GPU then; "kept" reuses the cache the
# run before filled (a cache kept on the node). Default "fresh kept".
set -uo pipefail
. "$(dirname "$0")/gpu_env.sh"
unpack_builds
[ -d /tmp/site ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
python3 -c "import transformers" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader

evict() { python3 - "$1" <<'PY'
import os, sys
top = sys.argv[1]
paths = [top] if os.path.isfile(top) else [os.path.join(r, f) for r, _, fs in os.walk(top) for f in fs]
for path in paths:
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED); os.close(fd)
PY
}
warm() { find "$1" -type f -exec cat {} + > /dev/null; }

# serve BIN DIR WARMUP CACHE JIT: one JSON line of timings
serve() {
  local bin=$1 dir=$2 warmup=$3 cache=$4 jit=${5:-kept} side=512
  [ "$jit" = fresh ] && rm -rf /tmp/cs-jit
  export CUDA_CACHE_PATH=/tmp/cs-jit
  if [ -d "$dir" ]; then grep -q StableDiffusionXL "$dir/model_index.json" && side=1024
  else case $dir in *sdxl*) side=1024 ;; esac; fi
  rm -rf /tmp/cs-out /tmp/cs-store
  # builds from before --warm-up run without it
  local wflag=(--warm-up "$warmup")
  "$bin" serve --help | grep -q -- --warm-up || { [ "$warmup" = off ] || return; wflag=(); }
  local t0=$(date +%s.%N)
  "$bin" --log-json serve --model "$dir" --device cuda --listen 127.0.0.1:7862 "${wflag[@]}" \
    --outputs /tmp/cs-out --store /tmp/cs-store --max-size 1024 > /tmp/cs.log 2>&1 &
  local pid=$!
  until curl -sf localhost:7862/readyz > /dev/null; do
    kill -0 $pid 2>/dev/null || { tail -5 /tmp/cs.log; return; }
    sleep 0.02
  done
  local t1=$(date +%s.%N)
  local body="{\"prompt\": \"a lighthouse\", \"steps\": 20, \"width\": $side, \"height\": $side, \"seed\": 1, \"sampler_name\": \"Euler\"}"
  local a=$(date +%s.%N); curl -sf -o /dev/null localhost:7862/sdapi/v1/txt2img -H 'content-type: application/json' -d "$body"
  local b=$(date +%s.%N); curl -sf -o /dev/null localhost:7862/sdapi/v1/txt2img -H 'content-type: application/json' -d "$body"
  local c=$(date +%s.%N)
  kill -TERM $pid; wait $pid 2>/dev/null
  python3 - "$bin" "$dir" "$warmup" "$cache" "$jit" "$t0" "$t1" "$a" "$b" "$c" <<'PY'
import json, sys
bin_, dir_, warmup, cache, jit, t0, t1, a, b, c = sys.argv[1:6] + [float(x) for x in sys.argv[6:]]
phases = {}
for line in open("/tmp/cs.log"):
    try:
        e = json.loads(line)
    except ValueError:
        continue
    f = e.get("fields", {})
    msg = f.get("message")
    if msg == "weights read":
        phases["read_s"] = round(f["seconds"], 3)
    elif msg == "networks on the device":
        phases["upload_s"] = round(f["uploaded_seconds"], 3)
        phases["build_s"] = round(f["built_seconds"], 3)
    elif msg == "model loaded":
        phases["loaded_s"] = round(f["seconds"], 3)
    elif msg == "warmed up":
        phases["warm_up_s"] = round(f["seconds"], 3)
print(json.dumps({"bench": "cold start sdkube", "binary": bin_, "model": dir_.rsplit("/", 1)[-1],
                  "warm_up": warmup, "page_cache": cache, "jit_cache": jit, "process_to_ready_s": round(t1 - t0, 3),
                  "first_image_s": round(b - a, 3), "second_image_s": round(c - b, 3),
                  "first_over_second": round((b - a) / (c - b), 2), **phases}))
PY
}

for model in ${MODELS:-sd15 sdxl}; do
  folder=/tmp/cs-${model%-single}
  [ -d $folder ] || python3 benches/cold_start_reference.py make $folder ${model%-single}
  dir=$folder
  if [ "$model" != "${model%-single}" ]; then
    dir=$folder.safetensors
    [ -f $dir ] || python3 benches/cold_start_reference.py single $folder $dir
  fi
  du -sh $dir
  for cache in ${CACHES:-warm cold}; do
    for bin in ${BINS:-.gpu/sdkube}; do
      for w in ${WARM:-off on}; do
        for jit in ${JIT:-fresh kept}; do
          if [ $cache = warm ]; then warm $dir; else evict $dir; fi
          serve $bin $dir $w $cache $jit
        done
      done
    done
    [ "${REFERENCE:-on}" = off ] && continue
    if [ $dir != $folder ]; then
      if [ $cache = warm ]; then warm $dir; else evict $dir; fi
      python3 benches/cold_start_reference.py load-single $dir $folder 2>&1 | grep -E '"bench"|Error' | sed "s/}$/, \"page_cache\": \"$cache\"}/"
    fi
    if [ $cache = warm ]; then warm $folder; else evict $folder; fi
    python3 benches/cold_start_reference.py load $folder 2>&1 | grep '"bench"' | sed "s/}$/, \"page_cache\": \"$cache\"}/"
  done
done
