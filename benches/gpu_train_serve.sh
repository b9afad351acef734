#!/usr/bin/env bash
# Textual-inversion training as a server job on the GPU, against the same job on the CPU: the
# server trains from its engine's weights (on a GPU, the ones read straight onto it), so this
# checks that path end to end. `sdkube serve` on the fixture model (DEVICES, default "cuda cpu"),
# an embedding created and trained through A1111's API (/sdapi/v1/create/embedding, then
# /sdapi/v1/train/embedding: STEPS steps, default 10, at 64², seeded), then a txt2img naming it.
# Prints how far each device's training moved the vectors and the cosine between the GPU's and
# the CPU's moves (the same seeded images, captions, timesteps and noise: near 1 when both
# trained the same thing; fp16 against fp32). Expects .gpu/sdkube (or .xz).
set -uo pipefail
. "$(dirname "$0")/gpu_env.sh"
BIN=${BIN:-.gpu/sdkube}
unpack_builds
MODEL=${MODEL:-fixtures/sd/sd1}
rm -rf /tmp/ts && mkdir -p /tmp/ts/images
"$BIN" generate --model "$MODEL" --device cpu --width 64 --height 64 --steps 2 --batch-size 4 --seed 3 \
  --prompt "a red cat" --out /tmp/ts/images > /tmp/ts/images.log 2>&1 || { tail -3 /tmp/ts/images.log; exit 1; }
failed=0
for dev in ${DEVICES:-cuda cpu}; do
  d=/tmp/ts/$dev
  rm -rf $d && mkdir -p $d/training && cp -r /tmp/ts/images $d/training/cats
  "$BIN" --log-json serve --model "$MODEL" --device $dev --listen 127.0.0.1:7863 --warm-up off \
    --embeddings $d/embeddings --training $d/training --outputs $d/out --store $d/store > $d/serve.log 2>&1 &
  pid=$!
  until curl -sf localhost:7863/readyz > /dev/null; do
    kill -0 $pid 2>/dev/null || { echo "$dev: serve exited"; tail -5 $d/serve.log; failed=1; continue 2; }
    sleep 0.1
  done
  post() { curl -s -w '\n%{http_code}' localhost:7863$1 -H 'content-type: application/json' -d "$2"; }
  echo "$dev create: $(post /sdapi/v1/create/embedding '{"name": "mycat", "num_vectors_per_token": 2, "init_text": "cat"}' | tail -1)"
  cp $d/embeddings/mycat.safetensors $d/initial.safetensors
  t=$(date +%s.%N)
  post /sdapi/v1/train/embedding "{\"embedding_name\": \"mycat\", \"learn_rate\": 0.005, \"data_root\": \"cats\",
    \"training_width\": 64, \"training_height\": 64, \"steps\": ${STEPS:-10}, \"save_embedding_every\": 0,
    \"create_image_every\": 0}" > $d/train.json
  echo "$dev train: $(tail -1 $d/train.json) in $(awk "BEGIN{print $(date +%s.%N) - $t}") s: $(head -n1 $d/train.json | cut -c1-300)"
  post /sdapi/v1/txt2img '{"prompt": "a photo of mycat", "steps": 3, "width": 64, "height": 64, "seed": 1}' > $d/txt2img.json
  code=$(tail -1 $d/txt2img.json)
  echo "$dev txt2img with the embedding: $code $(grep -o 'TI hashes[^,]*' $d/txt2img.json | head -1)"
  [ "$code" = 200 ] || failed=1
  kill -TERM $pid; wait $pid 2>/dev/null
done
python3 - ${DEVICES:-cuda cpu} <<'PY' || failed=1
import json, struct, sys
import numpy as np

def read(path):
    data = open(path, "rb").read()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    out = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        a, b = v["data_offsets"]
        dt = {"F16": np.float16, "F32": np.float32, "BF16": None}[v["dtype"]]
        out[k] = np.frombuffer(data[8 + n + a:8 + n + b], dtype=dt).astype(np.float64).reshape(v["shape"])
    return out

moves = []
for dev in sys.argv[1:]:
    before, after = read(f"/tmp/ts/{dev}/initial.safetensors"), read(f"/tmp/ts/{dev}/embeddings/mycat.safetensors")
    move = np.concatenate([(after[k] - before[k]).ravel() for k in sorted(before)])
    assert np.isfinite(move).all(), f"{dev}: non-finite vectors"
    moves.append(move)
    print(f"{dev}: the vectors moved by {np.linalg.norm(move):.4f} (largest element {np.abs(move).max():.4f})")
if len(moves) == 2:
    a, b = moves
    cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    print(f"cosine between the two devices' moves: {cos:.4f}")
    sys.exit(0 if cos > 0.9 and min(np.linalg.norm(a), np.linalg.norm(b)) > 0 else 1)
PY
exit $failed
