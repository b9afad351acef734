"""diffusers reference for `sdkube bench --what controlnet-sd15` on the GPU: one CFG step
(batch 2, 512², fp16, random weights) of the SD 1.5 UNet steered by one ControlNet
(`ControlNetModel.from_unet`, as StableDiffusionControlNetPipeline calls the two each step),
and the UNet's step alone. Eager, then under torch.compile (each module compiled with
`--mode`, default max-autotune-no-cudagraphs; "reduce-overhead" adds CUDA graphs), each
configuration printed beside its figure. One JSON line per measurement.
Usage: python3 benches/gpu_controlnet_reference.py [--no-compile | --compile-only] [--mode=reduce-overhead]
       [--unet-only]"""
import json
import sys
import time

import torch
from diffusers import ControlNetModel, UNet2DConditionModel

dev, dt = "cuda", torch.float16
REPEAT = 20
torch.backends.cuda.matmul.allow_tf32 = True
SD15 = dict(layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
mode = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--mode=")), "max-autotune-no-cudagraphs")
VERSIONS = f"diffusers {__import__('diffusers').__version__} torch {torch.__version__}"


def timed(name, impl, fn):
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        for _ in range(3):  # warm-up (and compiling)
            fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(REPEAT):
            fn()
        torch.cuda.synchronize()
    s = (time.perf_counter() - start) / REPEAT
    print(json.dumps({"bench": name, "shape": "512x512 batch 2", "ms": s * 1e3,
                      "peak_mib": torch.cuda.max_memory_allocated() / 2**20,
                      "impl": f"{VERSIONS} {impl}"}), flush=True)


unet = UNet2DConditionModel(**SD15).to(dev, dt).eval()
controlnet = ControlNetModel.from_unet(unet).to(dev, dt).eval()
x = torch.randn(2, 4, 64, 64, device=dev, dtype=dt)
ctx = torch.randn(2, 77, 768, device=dev, dtype=dt)
cond = torch.rand(2, 3, 512, 512, device=dev, dtype=dt)
t = torch.tensor([500.0], device=dev)


# CUDA graphs (reduce-overhead) replay into static buffers: each step starts a new graph step.
graphs = mode == "reduce-overhead"


def plain(u):
    def step():
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        return u(x, t, ctx).sample
    return step


def steered(u, cn):
    def step():
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        down, mid = cn(x, t, encoder_hidden_states=ctx, controlnet_cond=cond, return_dict=False)
        return u(x, t, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
    return step


unet_only = "--unet-only" in sys.argv  # the UNet's step alone (no ControlNet to compile)
if "--compile-only" not in sys.argv:
    timed("unet-sd15", "eager", plain(unet))
    if not unet_only:
        timed("controlnet-sd15", "eager", steered(unet, controlnet))
if "--no-compile" not in sys.argv:
    unet_c = torch.compile(unet.to(memory_format=torch.channels_last), mode=mode, fullgraph=True)
    impl = f"compile mode={mode} fullgraph channels_last"
    timed("unet-sd15", impl, plain(unet_c))
    if not unet_only:
        cn_c = torch.compile(controlnet.to(memory_format=torch.channels_last), mode=mode, fullgraph=True)
        timed("controlnet-sd15", impl, steered(unet_c, cn_c))
