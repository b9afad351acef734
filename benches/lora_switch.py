#!/usr/bin/env python3
"""LoRA switching on a full-size model (benches/gpu_lora.sh): `make MODEL OUT` writes two random
rank-32 kohya LoRAs over every attention, feed-forward and projection layer of a diffusers SD
folder (UNet and text encoder; numpy only); `requests URL` sends txt2img jobs that switch,
re-weight, add and drop them, printing each job's time and whether an image repeats exactly."""
import json, struct, sys, time, urllib.request
import numpy as np

TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out",
           "q_proj", "k_proj", "v_proj", "out_proj", "mlp.fc1", "mlp.fc2")

def shapes(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        h = json.loads(f.read(n))
    return {k: v["shape"] for k, v in h.items() if k != "__metadata__"}

def save(path, tensors):
    header, offset, blobs = {}, 0, []
    for k, a in tensors.items():
        b = a.tobytes()
        header[k] = {"dtype": "F16" if a.dtype == np.float16 else "F32", "shape": list(a.shape), "data_offsets": [offset, offset + len(b)]}
        offset += len(b); blobs.append(b)
    h = json.dumps(header).encode(); h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h))); f.write(h)
        for b in blobs: f.write(b)

def make(model, out):
    for name, seed in (("big", 1), ("big2", 2)):
        rng = np.random.default_rng(seed)
        t, touched = {}, 0
        for prefix, file in (("lora_unet", "unet/diffusion_pytorch_model.safetensors"), ("lora_te", "text_encoder/model.safetensors")):
            for k, s in shapes(f"{model}/{file}").items():
                m = k[: -len(".weight")] if k.endswith(".weight") else None
                if m is None or len(s) < 2 or not m.endswith(TARGETS):
                    continue
                inner = int(np.prod(s[1:]))
                key = f"{prefix}_{m.replace('.', '_')}"
                down = (rng.standard_normal((32, *s[1:])) * 0.01).astype(np.float16)
                up_shape = (s[0], 32, 1, 1) if len(s) == 4 else (s[0], 32)
                t[f"{key}.lora_down.weight"] = down
                t[f"{key}.lora_up.weight"] = (rng.standard_normal(up_shape) * 0.01).astype(np.float16)
                t[f"{key}.alpha"] = np.array(16.0, dtype=np.float32)
                touched += s[0] * inner
        save(f"{out}/{name}.safetensors", t)
        print(name, len(t) // 3, "modules", touched / 1e6, "M weights touched")


def requests(base):
    def post(prompt):
        body = json.dumps({"prompt": prompt, "steps": 4, "width": 512, "height": 512, "seed": 1, "sampler_name": "Euler"}).encode()
        req = urllib.request.Request(base + "/sdapi/v1/txt2img", body, {"content-type": "application/json"})
        t = time.time(); r = json.loads(urllib.request.urlopen(req, timeout=300).read()); dt = time.time() - t
        info = json.loads(r["info"])["infotexts"][0]
        return dt, r["images"][0][-40:], info.split("Lora hashes: ")[1].split('", ')[0] if "Lora hashes" in info else "-"
    seen = {}
    for p in ["a lighthouse", "a lighthouse", "a lighthouse <lora:big:1>", "a lighthouse <lora:big:1>",
              "a lighthouse <lora:big:0.5>", "a lighthouse <lora:big:0.5> <lora:big2:0.7>", "a lighthouse",
              "a lighthouse <lora:big:1:0>", "a lighthouse"]:
        dt, tail, hashes = post(p)
        same = seen.setdefault(p, tail) == tail
        print(f"{dt*1000:8.1f} ms  {p!r:55} same-as-before={same} hashes={hashes}", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "make":
        make(sys.argv[2], sys.argv[3])
    else:
        requests(sys.argv[2])
