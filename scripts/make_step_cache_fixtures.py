#!/usr/bin/env python3
"""References for the UNet's step caching (sdkube_models::unet::StepCache): DeepCache's own
helper (PyPI `DeepCache` 0.1.1, `DeepCacheSDHelper`, uniform mode) wrapped around diffusers'
UNet2DConditionModel of the committed tiny fixtures (fixtures/sd/<family>/unet, made by
make_sd_fixtures.py), called as a sampler calls it: one call per step, new latents and a new
timestep each time.

DeepCache numbers its branches `block * 3 + layer` (SD's down blocks have 2 layers and a
downsampler). sdkube numbers a branch by the skip connection it ends at, which is the same
number wherever a block makes 3 skip connections (SD 1.x, 2.x, SDXL). The sd1 fixture has one
layer per block (2 skip connections per block), so its cases give DeepCache's id for each
branch beside sdkube's.

It also samples the sd1 and sdxl fixtures' 4-step A1111 Euler runs (refs/<family>.safetensors,
with make_sd_fixtures.py's k-diffusion Euler and CFG) through the helper: `run.<family>.latent`.

Writes fixtures/sd/refs/step_cache.safetensors (float32; names in step_cache.json). Run with
torch, diffusers 0.42.1 and DeepCache installed (`pip install --no-deps DeepCache==0.1.1`):

    python scripts/make_step_cache_fixtures.py
"""
import json
from pathlib import Path
from types import SimpleNamespace

import torch
from diffusers import UNet2DConditionModel
from DeepCache import DeepCacheSDHelper
from safetensors.torch import load_file, save_file

from make_sd_fixtures import Denoiser, cfg_model, sample_euler

ROOT = Path(__file__).resolve().parent.parent
SD = ROOT / "fixtures" / "sd"
TIMESTEPS = [999.0, 857.0, 714.0, 571.0, 428.0, 285.0, 142.0]
BATCH = 2  # a CFG step: unconditional and conditional
TOKENS = 77

# (name, family, sdkube's branch, DeepCache's cache_branch_id, interval)
CASES = [
    ("sd1-b0-i3", "sd1", 0, 0, 3),
    ("sd1-b1-i3", "sd1", 1, 1, 3),
    ("sd1-b2-i2", "sd1", 2, 3, 2),
    ("sd1-b3-i3", "sd1", 3, 4, 3),
    ("sdxl-b0-i3", "sdxl", 0, 0, 3),
    ("sdxl-b2-i3", "sdxl", 2, 2, 3),
    ("sdxl-b4-i2", "sdxl", 4, 4, 2),
    ("sdxl-b8-i4", "sdxl", 8, 8, 4),
]


def conditioning(unet, family, gen):
    cfg = unet.config
    ctx = torch.randn((BATCH, TOKENS, cfg.cross_attention_dim), generator=gen)
    if family != "sdxl":
        return ctx, None
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    added = {
        "text_embeds": torch.randn((BATCH, pooled), generator=gen),
        "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * BATCH),
    }
    return ctx, added


# (family, sdkube's branch = DeepCache's id here, interval) of the sampled runs
RUNS = [("sd1", 1, 2), ("sdxl", 2, 3)]


@torch.no_grad()
def sampled_run(unet, family, branch, interval):
    """make_sd_fixtures.py's Euler run of `family`, its UNet under DeepCache."""
    r = load_file(SD / "refs" / f"{family}.safetensors")
    added = None
    if family == "sdxl":
        added = {
            "text_embeds": torch.cat([r["run.pooled_uncond"], r["run.pooled_cond"]]),
            "time_ids": r["run.time_ids"].reshape(1, 6).repeat(2, 1),
        }
    sigmas = r["run.sigmas"]
    den = Denoiser(None, v_prediction=False)
    # The helper finds a call's step by its timestep (a scalar): the timesteps the run feeds.
    timesteps = torch.cat([den.sigma_to_t(s.reshape(1)) for s in sigmas[:-1]])
    pipe = SimpleNamespace(unet=unet, scheduler=SimpleNamespace(timesteps=timesteps))
    den.unet = lambda x, t, **kwargs: unet(x, t[0], **kwargs)
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    model = cfg_model(den, r["run.uncond"], r["run.cond"], 7.0, added)
    latent = sample_euler(model, r["run.init_noise"] * sigmas[0], sigmas)
    helper.disable()
    plain = sample_euler(cfg_model(den, r["run.uncond"], r["run.cond"], 7.0, added),
                         r["run.init_noise"] * sigmas[0], sigmas)
    assert (plain - r["run.latent"]).abs().max() < 1e-4, "the fixture's own run"
    return latent


def main():
    tensors, cases = {}, []
    unets = {}
    for name, family, branch, reference_id, interval in CASES:
        if family not in unets:
            unets[family] = UNet2DConditionModel.from_pretrained(SD / family / "unet").float().eval()
        unet = unets[family]
        gen = torch.Generator().manual_seed(len(cases) + 1)
        ctx, added = conditioning(unet, family, gen)
        tensors[f"{name}.ctx"] = ctx
        if added:
            tensors[f"{name}.text_embeds"] = added["text_embeds"]
            tensors[f"{name}.time_ids"] = added["time_ids"]
        timesteps = torch.tensor(TIMESTEPS)
        pipe = SimpleNamespace(unet=unet, scheduler=SimpleNamespace(timesteps=timesteps))
        helper = DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=interval, cache_branch_id=reference_id)
        helper.enable()
        with torch.no_grad():
            for i, t in enumerate(timesteps):
                x = torch.randn((BATCH, unet.config.in_channels, 8, 8), generator=gen)
                kwargs = {"encoder_hidden_states": ctx}
                if added:
                    kwargs["added_cond_kwargs"] = added
                out = pipe.unet(x, t, **kwargs).sample
                tensors[f"{name}.x.{i}"] = x
                tensors[f"{name}.out.{i}"] = out
        helper.disable()
        cases.append(
            {
                "name": name,
                "family": family,
                "branch": branch,
                "deepcache_branch_id": reference_id,
                "interval": interval,
                "timesteps": TIMESTEPS,
            }
        )
    runs = []
    for family, branch, interval in RUNS:
        if family not in unets:
            unets[family] = UNet2DConditionModel.from_pretrained(SD / family / "unet").float().eval()
        tensors[f"run.{family}.latent"] = sampled_run(unets[family], family, branch, interval)
        runs.append({"family": family, "branch": branch, "interval": interval, "steps": 4})
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, SD / "refs" / "step_cache.safetensors")
    meta = {"deepcache": "0.1.1", "cases": cases, "runs": runs}
    (SD / "refs" / "step_cache.json").write_text(json.dumps(meta, indent=1) + "\n")


if __name__ == "__main__":
    main()
