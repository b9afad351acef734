"""diffusers reference for `sdkube bench` on the GPU: same shapes, fp16, random weights (speed
does not depend on weight values), eager and (optionally) torch.compile. One JSON line per
measurement, with torch's peak allocated and reserved memory. Usage: python3 benches/gpu_reference.py [--compile]"""
import json
import sys
import time

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

dev, dt = "cuda", torch.float16
REPEAT = 10
torch.backends.cuda.matmul.allow_tf32 = True


def timed(name, shape, fn, repeat=REPEAT):
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        torch.cuda.synchronize()
    s = (time.perf_counter() - start) / repeat
    print(json.dumps({"bench": name, "shape": shape, "ms": s * 1e3, "per_s": 1 / s,
                      "peak_mib": torch.cuda.max_memory_allocated() / 2**20,
                      # what the caching allocator held: the figure nvidia-smi sees, less the context
                      "peak_reserved_mib": torch.cuda.max_memory_reserved() / 2**20, "impl": IMPL}), flush=True)


SD15 = dict(layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SDXL = dict(layers_per_block=2, cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
            block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
compile_ = "--compile" in sys.argv
IMPL = f"diffusers {__import__('diffusers').__version__} torch {torch.__version__}" + (" compile" if compile_ else " eager")

for name, cfg, side, ctx_dim in [("unet-sd15", SD15, 64, 768), ("unet-sdxl", SDXL, 128, 2048)]:
    unet = UNet2DConditionModel(**cfg).to(dev, dt).eval()
    if compile_:
        unet = torch.compile(unet)
    for batch in (1, 2):
        x = torch.randn(batch, 4, side, side, device=dev, dtype=dt)
        ctx = torch.randn(batch, 77, ctx_dim, device=dev, dtype=dt)
        t = torch.tensor([500.0], device=dev)
        kw = {}
        if "addition_embed_type" in cfg:
            kw["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, 1280, device=dev, dtype=dt),
                                       "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * batch, device=dev, dtype=dt)}
        timed(name, f"{side * 8}x{side * 8} batch {batch}", lambda: unet(x, t, ctx, **kw))
    del unet
    torch.cuda.empty_cache()

vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                    latent_channels=4).to(dev, dt).eval()
for side in (64, 128):
    z = torch.randn(1, 4, side, side, device=dev, dtype=dt)
    timed("vae-decode", f"{side * 8}x{side * 8}", lambda: vae.decode(z), repeat=5)
    img = torch.randn(1, 3, side * 8, side * 8, device=dev, dtype=dt)
    timed("vae-encode", f"{side * 8}x{side * 8}", lambda: vae.encode(img), repeat=5)

# Whole txt2img, 20 Euler steps with CFG (batch 2 per step) + VAE decode; text encoding is left
# out (a few ms), so this slightly favours diffusers.
for name, cfg, side, ctx_dim in [("txt2img-sd15", SD15, 64, 768), ("txt2img-sdxl", SDXL, 128, 2048)]:
    unet = UNet2DConditionModel(**cfg).to(dev, dt).eval()
    if compile_:
        unet = torch.compile(unet)
    ctx = torch.randn(2, 77, ctx_dim, device=dev, dtype=dt)
    kw = {}
    if "addition_embed_type" in cfg:
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 1280, device=dev, dtype=dt),
                                   "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * 2, device=dev, dtype=dt)}

    def run():
        x = torch.randn(1, 4, side, side, device=dev, dtype=dt)
        for i in range(20):
            out = unet(torch.cat([x, x]), torch.tensor([999.0 - 50 * i], device=dev), ctx, **kw).sample
            u, c = out.chunk(2)
            x = x - 0.05 * (u + 7 * (c - u))
        vae.decode(x)
    timed(name, f"{side * 8}x{side * 8} 20 steps", run, repeat=2)
    del unet
    torch.cuda.empty_cache()
