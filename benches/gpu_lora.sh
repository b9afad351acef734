#!/usr/bin/env bash
# One device call: LoRA switching on a full-size SD 1.5 (random weights) in both VRAM modes,
# job times and the server's "LoRAs switched" log lines. Expects the CUDA build at
# .gpu/sdkube.xz (see README "GPU").
set -u; export PYTHONUNBUFFERED=1; o=${OUT:-/tmp/out}; mkdir -p $o
. "$(dirname "$0")/gpu_env.sh"
python3 -c "import lzma,shutil; shutil.copyfileobj(lzma.open('.gpu/sdkube.xz'), open('/tmp/sdkube','wb'))"; chmod +x /tmp/sdkube
nvidia-smi --query-gpu=name --format=csv,noheader
/tmp/sdkube bench --save-model /tmp/sd15 --what txt2img-sd15 --device cuda --precision fp16 2>&1 | tail -1
mkdir -p /tmp/loras; python3 benches/lora_switch.py make /tmp/sd15 /tmp/loras
for vram in high low; do
  SDKUBE_LOG=info /tmp/sdkube serve --model /tmp/sd15 --lora-dirs /tmp/loras --device cuda --precision fp16 --vram $vram \
    --listen 127.0.0.1:7860 --store /tmp/store --outputs /tmp/outputs --max-size 1024 > $o/serve-$vram.log 2>&1 &
  pid=$!
  for i in $(seq 1 300); do curl -sf localhost:7860/readyz >/dev/null && break; sleep 0.5; done
  echo "== vram $vram"; python3 benches/lora_switch.py requests http://127.0.0.1:7860
  kill $pid; wait $pid 2>/dev/null
  grep -E "model loaded|LoRAs switched" $o/serve-$vram.log | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-220
done
