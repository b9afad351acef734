"""diffusers reference for the CPU benchmark: one SD 1.5 UNet step (512x512, batch 2, fp32,
random weights), same shapes as crates/pipeline/examples/bench_cpu.rs. Needs torch + diffusers."""
import time

import torch
from diffusers import UNet2DConditionModel

torch.manual_seed(0)
torch.set_num_threads(torch.get_num_threads())
unet = UNet2DConditionModel(
    in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768,
    attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
).eval()
x = torch.randn(2, 4, 64, 64)
ctx = torch.randn(2, 77, 768)
t = torch.tensor([500.0])
with torch.no_grad():
    unet(x, t, ctx)
    steps = 3
    start = time.perf_counter()
    for _ in range(steps):
        unet(x, t, ctx)
    step = (time.perf_counter() - start) / steps
print(f"diffusers {__import__('diffusers').__version__} / torch {torch.__version__}: SD1.5 UNet step, 512x512 batch 2, fp32: {step:.2f} s/step ({torch.get_num_threads()} threads)")
