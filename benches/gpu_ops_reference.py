"""torch reference for `sdkube bench --what ops`: the same primitives at the same shapes, fp16,
one JSON line each, so that a whole network's gap to diffusers can be split per op.
Usage: python3 benches/gpu_ops_reference.py"""
import json
import time

import torch
import torch.nn.functional as F

dev, dt, REPEAT = "cuda", torch.float16, 20


def timed(name, shape, fn):
    with torch.no_grad():
        fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(REPEAT):
            fn()
        torch.cuda.synchronize()
    s = (time.perf_counter() - start) / REPEAT
    print(json.dumps({"bench": name, "shape": shape, "ms": s * 1e3, "impl": f"torch {torch.__version__}"}), flush=True)


rand = lambda *s: torch.randn(*s, device=dev, dtype=dt)  # noqa: E731
for label, b, c, side in [("conv3x3 unet 320", 2, 320, 64), ("conv3x3 unet 640", 2, 640, 32),
                          ("conv3x3 unet 1280", 2, 1280, 16), ("conv3x3 sdxl 320", 2, 320, 128),
                          ("conv3x3 sdxl 640", 2, 640, 64), ("conv3x3 sdxl 1280", 2, 1280, 32),
                          ("conv3x3 vae 512", 1, 512, 128),
                          ("conv3x3 vae 256", 1, 256, 256), ("conv3x3 vae 128", 1, 128, 512)]:
    x, w, bias = rand(b, c, side, side), rand(c, c, 3, 3) * 0.05, rand(c)
    timed(label, f"[{b},{c},{side},{side}]", lambda: F.conv2d(x, w, bias, padding=1))
    # the layout torch.compile's reference runs in (channels_last: NHWC in memory)
    xl, wl = x.to(memory_format=torch.channels_last), w.to(memory_format=torch.channels_last)
    timed(label + " channels_last", f"[{b},{c},{side},{side}]", lambda: F.conv2d(xl, wl, bias, padding=1))
for label, b, c, side in [("group_norm + silu unet 320", 2, 320, 64), ("group_norm + silu vae 128", 1, 128, 512)]:
    x, g, beta = rand(b, c, side, side), rand(c), rand(c)
    timed(label, f"[{b},{c},{side},{side}]", lambda: F.silu(F.group_norm(x, 32, g, beta, 1e-5)))
# Attention as diffusers' AttnProcessor2_0 runs it: heads split out, SDPA, heads merged back.
for label, b, heads, n, m, d in [("attention sd15 self 64²", 2, 8, 4096, 4096, 40),
                                 ("attention sd15 cross 64²", 2, 8, 4096, 77, 40),
                                 ("attention sdxl self 64²", 2, 10, 4096, 4096, 64),
                                 ("attention sdxl self 32²", 2, 20, 1024, 1024, 64),
                                 ("attention sdxl cross 32²", 2, 20, 1024, 77, 64),
                                 ("attention vae mid 64²", 1, 1, 4096, 4096, 512)]:
    q, k, v = rand(b, n, heads * d), rand(b, m, heads * d), rand(b, m, heads * d)
    split = lambda t: t.view(b, -1, heads, d).transpose(1, 2)  # noqa: E731
    shape = f"[{b},{n},{heads}x{d}] x {m}"
    timed(label + " naive", shape, lambda: (torch.softmax(split(q) @ split(k).transpose(2, 3) / d ** 0.5, -1)
                                            @ split(v)).transpose(1, 2).reshape(b, n, heads * d))
    timed(label + " sdpa", shape, lambda: F.scaled_dot_product_attention(split(q), split(k), split(v))
          .transpose(1, 2).reshape(b, n, heads * d))
for label, rows, cin, cout in [("linear geglu 320->2560", 2 * 4096, 320, 2560),
                               ("linear sdxl geglu 1280->10240", 2 * 1024, 1280, 10240),
                               ("linear sdxl ff out 5120->1280", 2 * 1024, 5120, 1280),
                               ("linear sdxl attn 1280->1280", 2 * 1024, 1280, 1280)]:
    x, w, bias = rand(1, rows, cin), rand(cout, cin), rand(cout)
    timed(label, f"[{rows},{cin}]", lambda: F.linear(x, w, bias))
h = rand(2, 1024, 10240)
timed("geglu gate sdxl", "[2,1024,10240]", lambda: (lambda a, g: a * F.gelu(g))(*h.chunk(2, -1)))
x, g, beta = rand(2, 1024, 1280), rand(1280), rand(1280)
timed("layer_norm sdxl", "[2,1024,1280]", lambda: F.layer_norm(x, (1280,), g, beta, 1e-5))
x = rand(2, 1280, 32, 32)
timed("nchw to tokens sdxl", "[2,1280,32,32]", lambda: x.permute(0, 2, 3, 1).contiguous())
x = rand(1, 256, 256, 256)
timed("upsample nearest 2x vae", "[1,256,256,256]", lambda: F.interpolate(x, scale_factor=2, mode="nearest"))
