#!/usr/bin/env python3
"""Tiny random-weight ControlNets for the fixture UNets, and diffusers' outputs for them.

For sd1 and sdxl (the UNets of fixtures/sd/<family>/), this writes under fixtures/controlnet/:
  <family>/                  diffusers layout (config.json, diffusion_pytorch_model.safetensors)
  <family>-ldm.safetensors   sd1 only: the same weights as an lllyasviel single file
                             (`control_model.` + LDM keys: input_blocks, zero_convs,
                             input_hint_block, middle_block_out)
  refs/<family>.safetensors  float32 inputs and diffusers' outputs

Each ControlNet starts as `ControlNetModel.from_unet(unet)` (diffusers' own way to make one),
then every weight is perturbed and the zero convolutions and the conditioning embedding get
random values, so that a loader reading the wrong tensor (or the UNet's) is caught. Weights
are stored as float16; the references are float32 computed from the fp16-rounded weights.

References (names in the file):
  sample, timestep, context, cond [, text_embeds, time_ids]   inputs (cond in [0, 1])
  down.{k}, mid                   ControlNet residuals at conditioning_scale SCALE
  guess.down.{k}, guess.mid       the same with guess_mode=True (A1111's "ControlNet is more
                                  important": scales logspace(-1, 0, n) * SCALE)
  unet                            the UNet's output with the `down`/`mid` residuals added
  unet.plain                      the UNet's output without ControlNet

The single file is checked by loading it with diffusers' `from_single_file` (offline, config=
the folder) and comparing its residuals with the folder's.

Whole runs (refs/sd1-run.safetensors): the 4-step A1111 "Euler" run of fixtures/sd/refs/sd1
(same noise and conditioning; k-diffusion's sampler over diffusers' networks, as
make_sd_fixtures.py writes it) with the sd1 ControlNet steering it, as sd-webui-controlnet
applies a unit; the rules are written here from its description:
  - a unit acts at step i of n unless i/n < guidance_start or i/n > guidance_end;
  - "Balanced": every residual times the weight;
  - "My prompt is more important": residual k times weight * 0.825 ** (12 - k);
  - "ControlNet is more important": the same, and the unconditional half gets none.
  hint                       the control image, [1, 3, 64, 64], values k/255
  <case>.latent              the final latent, for each case of RUN_CASES
                             (refs/sdxl-run.safetensors: the balanced case on the SDXL fixture)
  balanced.diffusers_pipeline.latent   the balanced case through diffusers'
                             StableDiffusionControlNetPipeline itself (EulerDiscreteScheduler,
                             linspace spacing: the same sigmas); refs/sd1-run.json says how far
                             it is from balanced.latent (diffusers feeds integer timesteps)

Usage: /path/to/python scripts/make_controlnet_fixtures.py [--out fixtures/controlnet]
"""
import argparse
import json
import sys
from pathlib import Path

import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_sd_fixtures import fp16_state, round_to_fp16, unet_to_ldm  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SCALE = 0.7
# Three stride-2 convolutions: the VAE's factor of 8, as in the real (16, 32, 96, 256).
COND_CHANNELS = (4, 8, 8, 16)
TOKENS = 7


def make_controlnet(unet, seed: int) -> ControlNetModel:
    cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=COND_CHANNELS)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in cn.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding")):
                p.copy_(noise * 0.2)
            else:
                p.add_(noise * 0.02)
    return round_to_fp16(cn.eval())


def controlnet_to_ldm(cn_sd: dict, unet_cfg: dict) -> dict:
    """diffusers ControlNetModel keys -> lllyasviel's `control_model.*` single-file keys."""
    sd = dict(cn_sd)
    out: dict[str, torch.Tensor] = {}
    for k in [k for k in sd if k.startswith("controlnet_down_blocks.")]:
        _, n, rest = k.split(".", 2)
        out[f"zero_convs.{n}.0.{rest}"] = sd.pop(k)
    for k in [k for k in sd if k.startswith("controlnet_mid_block.")]:
        out["middle_block_out.0." + k.split(".", 1)[1]] = sd.pop(k)
    # input_hint_block: conv, SiLU, conv, SiLU, … : the convolutions sit at even indices.
    blocks = 2 * (len(COND_CHANNELS) - 1)
    for k in [k for k in sd if k.startswith("controlnet_cond_embedding.")]:
        _, part, rest = k.split(".", 2)
        if part == "conv_in":
            idx = 0
        elif part == "conv_out":
            idx = 2 * (blocks + 1)
        else:  # blocks.{i}.weight
            i, rest = rest.split(".", 1)
            idx = 2 * (int(i) + 1)
        out[f"input_hint_block.{idx}.{rest}"] = sd.pop(k)
    # The rest is the UNet's encoder half; the LDM mapping wants a whole UNet's key set.
    unet_cfg = dict(unet_cfg)
    unet_cfg["up_block_types"] = []
    out.update(unet_to_ldm(sd, unet_cfg))
    return {"control_model." + k: v for k, v in out.items()}


def residuals(cn, inputs: dict, guess: bool) -> tuple[list, torch.Tensor]:
    kwargs = {}
    if "text_embeds" in inputs:
        kwargs["added_cond_kwargs"] = {"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]}
    down, mid = cn(
        inputs["sample"],
        inputs["timestep"],
        encoder_hidden_states=inputs["context"],
        controlnet_cond=inputs["cond"],
        conditioning_scale=SCALE,
        guess_mode=guess,
        return_dict=False,
        **kwargs,
    )
    return list(down), mid


def family(name: str, out: Path, seed: int) -> None:
    unet_dir = ROOT / "fixtures" / "sd" / name / "unet"
    unet = UNet2DConditionModel.from_pretrained(unet_dir, torch_dtype=torch.float32).eval()
    cfg = json.loads((unet_dir / "config.json").read_text())
    cn = make_controlnet(unet, seed)
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    cn.save_pretrained(folder, safe_serialization=True)
    # save_pretrained writes fp32 tensors; the fixture keeps the fp16 values they hold.
    save_file(fp16_state(cn.state_dict()), folder / "diffusion_pytorch_model.safetensors")

    gen = torch.Generator().manual_seed(seed + 1)
    b = 2
    inputs = {
        "sample": torch.randn(b, 4, 8, 8, generator=gen),
        "timestep": torch.tensor([501.0, 17.0]),
        "context": torch.randn(b, TOKENS, cfg["cross_attention_dim"], generator=gen),
        "cond": torch.rand(b, 3, 64, 64, generator=gen),
    }
    if cfg.get("addition_embed_type") == "text_time":
        pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
        inputs["text_embeds"] = torch.randn(b, pooled, generator=gen)
        inputs["time_ids"] = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0], [48.0, 64.0, 4.0, 2.0, 64.0, 64.0]])

    refs = dict(inputs)
    with torch.no_grad():
        down, mid = residuals(cn, inputs, guess=False)
        gdown, gmid = residuals(cn, inputs, guess=True)
        unet_kwargs = {}
        if "text_embeds" in inputs:
            unet_kwargs["added_cond_kwargs"] = {"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]}
        refs["unet"] = unet(
            inputs["sample"],
            inputs["timestep"],
            encoder_hidden_states=inputs["context"],
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            **unet_kwargs,
        ).sample
        refs["unet.plain"] = unet(
            inputs["sample"], inputs["timestep"], encoder_hidden_states=inputs["context"], **unet_kwargs
        ).sample
    for k, t in enumerate(down):
        refs[f"down.{k}"] = t
    refs["mid"] = mid
    for k, t in enumerate(gdown):
        refs[f"guess.down.{k}"] = t
    refs["guess.mid"] = gmid
    (out / "refs").mkdir(parents=True, exist_ok=True)
    save_file({k: v.float().contiguous() for k, v in refs.items()}, out / "refs" / f"{name}.safetensors")

    if name == "sd1":
        single = out / f"{name}-ldm.safetensors"
        save_file(fp16_state(controlnet_to_ldm(cn.state_dict(), cfg)), single)
        check = ControlNetModel.from_single_file(str(single), config=str(folder), torch_dtype=torch.float32)
        with torch.no_grad():
            sdown, smid = residuals(check.eval(), inputs, guess=False)
        worst = max((a - b).abs().max().item() for a, b in zip(sdown + [smid], down + [mid]))
        if worst > 1e-5:
            raise RuntimeError(f"{single}: diffusers reads it differently from the folder ({worst})")
    print(f"{name}: {len(down)} down residuals, |mid| {mid.abs().max().item():.3f}, "
          f"|unet - plain| {(refs['unet'] - refs['unet.plain']).abs().max().item():.3f}")


RUN_CASES = {
    # name: (weight, guidance_start, guidance_end, mode)
    "balanced": (0.7, 0.0, 1.0, "balanced"),
    "window": (1.0, 0.25, 0.5, "prompt"),
    "control": (0.9, 0.0, 1.0, "control"),
}


def controlled_unet(unet, cn, hint, weight, start, end, mode, steps):
    """The UNet as the sampler calls it, with one ControlNet unit applied per the rules above."""
    calls = {"n": 0}

    class Wrapped:
        def __call__(self, x, t, encoder_hidden_states, **kwargs):
            step = calls["n"]  # Euler calls the model once per step
            calls["n"] += 1
            done = step / steps
            if done < start or done > end:
                return unet(x, t, encoder_hidden_states=encoder_hidden_states, **kwargs)
            b = x.shape[0]
            down, mid = cn(x, t, encoder_hidden_states=encoder_hidden_states,
                           controlnet_cond=hint.repeat(b, 1, 1, 1), conditioning_scale=1.0,
                           added_cond_kwargs=kwargs.get("added_cond_kwargs"), return_dict=False)
            res = list(down) + [mid]
            if mode == "balanced":
                scales = [weight] * len(res)
            else:
                scales = [weight * 0.825 ** (12 - k) for k in range(len(res))]
            res = [r * sc for r, sc in zip(res, scales)]
            if mode == "control":
                half = b // 2
                res = [torch.cat([torch.zeros_like(r[:half]), r[half:]]) for r in res]
            return unet(x, t, encoder_hidden_states=encoder_hidden_states,
                        down_block_additional_residuals=res[:-1], mid_block_additional_residual=res[-1],
                        **kwargs)

    return Wrapped()


def hint_image() -> torch.Tensor:
    """A control image with structure at every scale: rings and a bar, 8-bit values."""
    ys, xs = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    r = ((ys - 30) ** 2 + (xs - 34) ** 2).sqrt()
    img = torch.stack([(r % 16 < 8) * 255.0, (xs > 40) * 200.0, ((ys + xs) % 32) * 8.0])
    return (img.round() / 255.0)[None]


def sdxl_run(out: Path) -> None:
    """The balanced unit on the SDXL fixture's run (refs/sdxl-run.safetensors)."""
    from make_sd_fixtures import Denoiser, cfg_model, sample_euler
    from safetensors.torch import load_file

    sd_refs = load_file(ROOT / "fixtures" / "sd" / "refs" / "sdxl.safetensors")
    unet = UNet2DConditionModel.from_pretrained(ROOT / "fixtures" / "sd" / "sdxl" / "unet", torch_dtype=torch.float32).eval()
    cn = ControlNetModel.from_pretrained(out / "sdxl", torch_dtype=torch.float32).eval()
    hint = hint_image()
    sigmas = sd_refs["run.sigmas"]
    weight, start, end, mode = RUN_CASES["balanced"]
    den = Denoiser(controlled_unet(unet, cn, hint, weight, start, end, mode, len(sigmas) - 1), v_prediction=False)
    added = {"text_embeds": torch.cat([sd_refs["run.pooled_uncond"], sd_refs["run.pooled_cond"]]),
             "time_ids": sd_refs["run.time_ids"].repeat(2, 1)}
    model = cfg_model(den, sd_refs["run.uncond"], sd_refs["run.cond"], 7.0, added)
    latent = sample_euler(model, sd_refs["run.init_noise"] * sigmas[0], sigmas)
    print(f"sdxl run balanced: final latent differs from the uncontrolled run by "
          f"{(latent - sd_refs['run.latent']).abs().max().item():.3f}")
    save_file({"hint": hint, "balanced.latent": latent.float().contiguous()}, out / "refs" / "sdxl-run.safetensors")


def runs(out: Path) -> None:
    from make_sd_fixtures import Denoiser, cfg_model, sample_euler
    from safetensors.torch import load_file

    sd_refs = load_file(ROOT / "fixtures" / "sd" / "refs" / "sd1.safetensors")
    unet = UNet2DConditionModel.from_pretrained(ROOT / "fixtures" / "sd" / "sd1" / "unet", torch_dtype=torch.float32).eval()
    cn = ControlNetModel.from_pretrained(out / "sd1", torch_dtype=torch.float32).eval()
    hint = hint_image()
    refs = {"hint": hint}
    steps = len(sd_refs["run.sigmas"]) - 1
    for name, (weight, start, end, mode) in RUN_CASES.items():
        den = Denoiser(controlled_unet(unet, cn, hint, weight, start, end, mode, steps), v_prediction=False)
        model = cfg_model(den, sd_refs["run.uncond"], sd_refs["run.cond"], 7.0)
        sigmas = sd_refs["run.sigmas"]
        refs[f"{name}.latent"] = sample_euler(model, sd_refs["run.init_noise"] * sigmas[0], sigmas)
        diff = (refs[f"{name}.latent"] - sd_refs["run.latent"]).abs().max().item()
        print(f"run {name}: final latent differs from the uncontrolled run by {diff:.3f}")
    pipeline_latent = diffusers_pipeline_latent(cn, hint, sd_refs)
    refs["balanced.diffusers_pipeline.latent"] = pipeline_latent
    save_file({k: v.float().contiguous() for k, v in refs.items()}, out / "refs" / "sd1-run.safetensors")
    report = {"balanced": {"latent_max_abs_diff": float((pipeline_latent - refs["balanced.latent"]).abs().max()),
                           "latent_max_abs_value": float(refs["balanced.latent"].abs().max())}}
    (out / "refs" / "sd1-run.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"diffusers StableDiffusionControlNetPipeline vs the balanced run: {report['balanced']}")


def diffusers_pipeline_latent(cn, hint, sd_refs):
    """The balanced case again through diffusers' own StableDiffusionControlNetPipeline with
    its EulerDiscreteScheduler (linspace spacing: the same 4 sigmas): an independent check of
    the reference, which differs as make_sd_fixtures.py's plain run does (diffusers feeds
    integer timesteps, k-diffusion sigma_to_t(sigma))."""
    import tempfile
    from diffusers import EulerDiscreteScheduler, StableDiffusionControlNetPipeline
    from make_sd_fixtures import CFG_SCALE, NEGATIVE_PROMPT, PROMPT, STEPS, build_tokenizers

    with tempfile.TemporaryDirectory() as tmp:
        tok, _ = build_tokenizers(Path(tmp))
        pipe = StableDiffusionControlNetPipeline.from_pretrained(
            str(ROOT / "fixtures" / "sd" / "sd1"), controlnet=cn, tokenizer=tok, safety_checker=None,
            feature_extractor=None, requires_safety_checker=False, torch_dtype=torch.float32,
            local_files_only=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(
        pipe.scheduler.config, timestep_spacing="linspace", use_karras_sigmas=False,
        interpolation_type="linear", prediction_type="epsilon")
    latent = pipe(prompt=PROMPT, negative_prompt=NEGATIVE_PROMPT, image=hint, num_inference_steps=STEPS,
                  guidance_scale=CFG_SCALE, height=64, width=64, controlnet_conditioning_scale=0.7,
                  latents=sd_refs["run.init_noise"].clone(), output_type="latent").images
    return latent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "fixtures" / "controlnet"))
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    out = Path(args.out)
    family("sd1", out, seed=301)
    family("sdxl", out, seed=302)
    runs(out)
    sdxl_run(out)


if __name__ == "__main__":
    main()
