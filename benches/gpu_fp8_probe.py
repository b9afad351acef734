"""Does an fp8 UNet pay on Hopper? The bound, before writing one (issue: "only if it pays").

fp8 tensor cores run the matrix products of the UNet's transformer blocks (the linear layers:
attention projections, GEGLU, feed-forward, proj_in/out) at twice fp16's rate; the convolutions
stay fp16 (cuDNN has no general fp8 convolution), and so do attention's own products. This times
every distinct linear-layer product of one CFG step (batch 2) of the SD1.5 UNet at 512² and the
SDXL UNet at 1024², in fp16 (torch.mm, cuBLAS) and in fp8 e4m3 with per-tensor scales
(torch._scaled_mm, cuBLASLt, fp16 out), the activation's quantisation (amax, scale, cast) counted
as an fp8 linear layer must do it, the weights quantised ahead. Weighted by how often each
product occurs in a step, the difference is the most an fp8 mode could save per step: compare it
with the step's time (`sdkube bench --what unet-sd15 unet-sdxl`, same call).

    python3 benches/gpu_fp8_probe.py
"""
import json

import torch

dev, f16, f8 = "cuda", torch.float16, torch.float8_e4m3fn
torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = True


def blocks(levels, batch=2, ctx_len=77, ctx_dim=768):
    """{(M, K, N): count} of one step's linear products: levels = [(tokens, C, blocks)]."""
    counts = {}

    def add(m, k, n, times=1):
        counts[(m, k, n)] = counts.get((m, k, n), 0) + times

    for tokens, c, n_blocks in levels:
        m = batch * tokens
        add(m, c, c, n_blocks * 7)  # q, k, v, out (self); q, out (cross); proj_in/out ~ 1 per block
        add(batch * ctx_len, ctx_dim, c, n_blocks * 2)  # cross k, v
        add(m, c, 8 * c, n_blocks)  # GEGLU projection
        add(m, 4 * c, c, n_blocks)  # feed-forward out
    return counts


# (tokens, channels, transformer blocks at that size) over the whole UNet (down, mid, up).
SD15 = blocks([(4096, 320, 5), (1024, 640, 5), (256, 1280, 5), (64, 1280, 1)])
SDXL = blocks([(4096, 640, 10), (1024, 1280, 60)], ctx_dim=2048)


def timed(fn, repeat=50):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeat  # ms


def product_times(m, k, n):
    x = torch.randn(m, k, device=dev, dtype=f16)
    w = torch.randn(n, k, device=dev, dtype=f16) / k**0.5
    w_scale = w.abs().max().float() / 448.0
    w8 = (w / w_scale).to(f8)  # quantised once, as loading would
    one = torch.ones((), device=dev)

    def fp16():
        return x @ w.t()

    def fp8():
        x_scale = x.abs().max().float() / 448.0
        x8 = (x / x_scale).to(f8)
        return torch._scaled_mm(x8, w8.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=f16)

    def fp8_product_only():
        return torch._scaled_mm(x8_fixed, w8.t(), scale_a=one, scale_b=w_scale, out_dtype=f16)

    x8_fixed = (x / (x.abs().max().float() / 448.0)).to(f8)
    err = ((fp8().float() - fp16().float()).abs().max() / fp16().float().abs().max()).item()
    return timed(fp16), timed(fp8), timed(fp8_product_only), err


print(json.dumps({"torch": torch.__version__, "gpu": torch.cuda.get_device_name()}))
for name, counts in (("unet-sd15 512x512 batch 2", SD15), ("unet-sdxl 1024x1024 batch 2", SDXL)):
    total16 = total8 = total8_bare = 0.0
    for (m, k, n), times in sorted(counts.items()):
        t16, t8, t8_bare, err = product_times(m, k, n)
        total16 += times * t16
        total8 += times * t8
        total8_bare += times * t8_bare
        print(json.dumps({"bench": "fp8 probe", "model": name, "m": m, "k": k, "n": n, "count": times,
                          "fp16_ms": round(t16, 4), "fp8_ms": round(t8, 4),
                          "fp8_product_only_ms": round(t8_bare, 4), "rel_max_err": round(err, 4)}))
    print(json.dumps({"bench": "fp8 probe total", "model": name,
                      "linear_fp16_ms": round(total16, 3), "linear_fp8_ms": round(total8, 3),
                      "linear_fp8_product_only_ms": round(total8_bare, 3),
                      "saved_per_step_ms": round(total16 - total8, 3)}))
