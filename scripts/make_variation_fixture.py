"""Reference for sdkube_pipeline::variation: the starting noise of one image with A1111's
variations, computed with A1111's formula (stable-diffusion-webui `modules/rng.py`:
`ImageRNG.first` and `slerp`, written out here) on torch's CPU `randn`.

For each case it stores the draws the formula starts from (the seed's stream's first draw at
the real size, and fresh draws of the seed and the variation seed at the noise size) and the
result, so the Rust test can feed the same draws to `variation::initial_noise` and compare.
Writes fixtures/samplers/variations.safetensors. Run with torch installed:

    python scripts/make_variation_fixture.py
"""
import torch
from safetensors.torch import save_file

C = 4


def randn(seed, shape):
    """A1111's `randn(seed, shape)` with `randn_source` CPU: a fresh generator's first draw."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def slerp(val, low, high):
    # As A1111: norms along dim 1 of a (C, H, W) tensor, i.e. the height.
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * val + high * (1 - val)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low + (
        torch.sin(val * omega) / so
    ).unsqueeze(1) * high


def first(shape, seed, subseed, strength, resize_w, resize_h):
    """ImageRNG.first for one image (shape = (C, H, W) of the latent)."""
    noise_shape = shape if resize_h <= 0 or resize_w <= 0 else (shape[0], resize_h // 8, resize_w // 8)
    subnoise = randn(subseed, noise_shape) if strength != 0 else None
    noise = randn(seed, noise_shape)  # equals the stream's first draw when the shapes agree
    if subnoise is not None:
        noise = slerp(strength, noise, subnoise)
    if noise_shape != shape:
        x = randn(seed, shape)
        dx = (shape[2] - noise_shape[2]) // 2
        dy = (shape[1] - noise_shape[1]) // 2
        w = noise_shape[2] if dx >= 0 else noise_shape[2] + 2 * dx
        h = noise_shape[1] if dy >= 0 else noise_shape[1] + 2 * dy
        tx = 0 if dx < 0 else dx
        ty = 0 if dy < 0 else dy
        dx = max(-dx, 0)
        dy = max(-dy, 0)
        x[:, ty:ty + h, tx:tx + w] = noise[:, dy:dy + h, dx:dx + w]
        noise = x
    return noise


# (name, latent H, latent W, seed, subseed, strength, resize from (w, h) in pixels)
CASES = [
    ("slerp", 8, 8, 1234, 98765, 0.3, (0, 0)),
    ("slerp_wide", 8, 12, 7, 8, 0.5, (0, 0)),
    ("slerp_full", 8, 8, 3, 4000000000, 1.0, (0, 0)),
    ("same_seed_lerp", 8, 8, 55, 55, 0.3, (0, 0)),
    ("resize_larger", 8, 8, 42, 0, 0.0, (96, 80)),
    ("resize_odd", 8, 8, 42, 0, 0.0, (88, 72)),
    ("resize_smaller_slerp", 8, 8, 9, 10, 0.25, (40, 56)),
    ("resize_same", 8, 8, 11, 0, 0.0, (64, 64)),
]

out = {}
for name, h, w, seed, subseed, strength, (rw, rh) in CASES:
    shape = (C, h, w)
    noise_shape = shape if rh <= 0 or rw <= 0 else (C, rh // 8, rw // 8)
    out[f"{name}.params"] = torch.tensor([seed, subseed, strength, rw, rh], dtype=torch.float64)
    out[f"{name}.full"] = randn(seed, shape)
    if noise_shape != shape:
        out[f"{name}.seed_noise"] = randn(seed, noise_shape)
    if strength != 0:
        out[f"{name}.sub_noise"] = randn(subseed, noise_shape)
    out[f"{name}.expected"] = first(shape, seed, subseed, strength, rw, rh)

save_file({k: v.contiguous() for k, v in out.items()}, "fixtures/samplers/variations.safetensors")
print(f"{len(CASES)} cases written")
