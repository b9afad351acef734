"""Reference for sdkube_pipeline::latent_upscale: PyTorch's interpolate (align_corners=False) in
the six modes of A1111's "Latent" hires-fix upscalers (bilinear, bicubic, each with and without
antialias, nearest, nearest-exact), up and down in size. Writes
fixtures/sd/refs/latent_upscale.safetensors: `input`, and `<mode>.<h>x<w>` for each case."""
import torch
from safetensors.torch import save_file

MODES = {  # A1111's shared.latent_upscale_modes
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
g = torch.Generator().manual_seed(0)
x = torch.randn(2, 4, 5, 7, generator=g)
out = {"input": x}
for name, (mode, aa) in MODES.items():
    for h, w in [(12, 9), (10, 14), (3, 4)]:
        kw = {} if mode.startswith("nearest") else {"align_corners": False, "antialias": aa}
        out[f"{name}.{h}x{w}"] = torch.nn.functional.interpolate(x, size=(h, w), mode=mode, **kw)
save_file(out, "fixtures/sd/refs/latent_upscale.safetensors")
