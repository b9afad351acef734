"""Reference for sdkube_pipeline::upscale_latent: PyTorch's bilinear interpolate
(align_corners=False), as A1111's "Latent" hires-fix upscaler calls it. Writes
fixtures/sd/refs/latent_upscale.safetensors (input + outputs at two sizes)."""
import torch
from safetensors.torch import save_file

g = torch.Generator().manual_seed(0)
x = torch.randn(2, 4, 5, 7, generator=g)
save_file({
    "input": x,
    "up_12x9": torch.nn.functional.interpolate(x, size=(12, 9), mode="bilinear", align_corners=False),
    "up_10x14": torch.nn.functional.interpolate(x, size=(10, 14), mode="bilinear", align_corners=False),
}, "fixtures/sd/refs/latent_upscale.safetensors")
