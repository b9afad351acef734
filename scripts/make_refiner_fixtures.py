#!/usr/bin/env python3
"""A tiny random-weight SDXL refiner beside the SDXL fixture, and base+refiner references.

Writes under fixtures/sd/:
  sdxl-refiner/                 diffusers layout as the hub's refiner folder: text_encoder_2/
                                (the SDXL fixture's bigG, as the real refiner shares the base's),
                                unet/ (new, 1-channel-wider time ids: aesthetic score), vae/ (the
                                SDXL fixture's), no text_encoder/ (model_index says null)
  sdxl-refiner.safetensors      the same as one LDM single file
                                (conditioner.embedders.0.model.* = OpenCLIP bigG)
  refs/sdxl-refiner.safetensors float32 references, refs/sdxl-refiner.json their description

References:
  text.*      the refiner pipeline's encode_prompt (bigG penultimate layer, pooled) and the
              time ids it builds (size, crop, aesthetic score 6 / 2.5)
  unet.*      one refiner UNet evaluation
  run.*       the SDXL fixture's 4-step A1111 "Euler" run (refs/sdxl.json) with
              refiner_switch_at = 0.5: the base denoises while (999 - t)/1000 < 0.5, the
              refiner the rest, as A1111's sd_samplers_common.apply_refiner decides;
              run.diffusers_latent: diffusers' own base pipeline with denoising_end=0.5 handing
              its latents to StableDiffusionXLImg2ImgPipeline with denoising_start=0.5
              (EulerDiscreteScheduler, linspace spacing: the same four sigmas)

Usage: /work/venv-ref/bin/python scripts/make_refiner_fixtures.py   (after make_sd_fixtures.py)
Deterministic: fixed seeds, CPU, float32.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_sd_fixtures import (  # noqa: E402
    CFG_SCALE,
    NEGATIVE_PROMPT,
    PROMPT,
    STEPS,
    Denoiser,
    build_tokenizers,
    clip_to_open_clip,
    fp16_state,
    jsonable,
    make_unet,
    max_abs,
    round_to_fp16,
    sample_euler,
    save_pipeline,
    unet_to_ldm,
    vae_to_ldm,
    write_refs,
)

ROOT = Path(__file__).resolve().parent.parent
SD = ROOT / "fixtures" / "sd"
SWITCH_AT = 0.5
AESTHETIC, NEGATIVE_AESTHETIC = 6.0, 2.5

# The refiner's layout, shrunk: four levels, attention in the middle two only, context =
# bigG's width alone, time ids (h, w, top, left, aesthetic) → 5 · 4 wide beside the pooled 8.
REFINER_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(8, 16, 16, 16),
    layers_per_block=2,
    transformer_layers_per_block=2,
    cross_attention_dim=8,
    attention_head_dim=[1, 2, 2, 2],
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=4,
    projection_class_embeddings_input_dim=8 + 5 * 4,
    norm_num_groups=4,
)


def time_ids(h: float, w: float, aesthetic: float) -> list[float]:
    return [h, w, 0.0, 0.0, aesthetic]


@torch.no_grad()
def main() -> int:
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLPipeline,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.set_num_threads(1)
    base_refs = load_file(SD / "refs" / "sdxl.safetensors")
    with tempfile.TemporaryDirectory() as tmp:
        tok_eos, tok_zero = build_tokenizers(Path(tmp))
    f32 = dict(torch_dtype=torch.float32)
    te1 = round_to_fp16(CLIPTextModel.from_pretrained(SD / "sdxl" / "text_encoder", **f32))
    te2 = round_to_fp16(CLIPTextModelWithProjection.from_pretrained(SD / "sdxl" / "text_encoder_2", **f32))
    vae = round_to_fp16(AutoencoderKL.from_pretrained(SD / "sdxl" / "vae", **f32))
    from diffusers import UNet2DConditionModel

    base_unet = UNet2DConditionModel.from_pretrained(SD / "sdxl" / "unet", **f32).eval()
    unet = make_unet(4030, **REFINER_UNET)
    euler = EulerDiscreteScheduler.from_pretrained(SD / "sdxl" / "scheduler")
    euler = EulerDiscreteScheduler.from_config(
        euler.config, timestep_spacing="linspace", use_karras_sigmas=False, interpolation_type="linear"
    )
    refiner = StableDiffusionXLImg2ImgPipeline(
        vae=vae,
        text_encoder=None,
        text_encoder_2=te2,
        tokenizer=None,
        tokenizer_2=tok_zero,
        unet=unet,
        scheduler=euler,
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=True,
    )
    refs: dict[str, torch.Tensor] = {}
    cond, uncond, pooled, pooled_u = refiner.encode_prompt(
        PROMPT, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True, negative_prompt=NEGATIVE_PROMPT
    )
    refs["text.hidden"], refs["text.pooled"] = cond, pooled
    refs["text.hidden_uncond"], refs["text.pooled_uncond"] = uncond, pooled_u
    add_ids, add_neg_ids = refiner._get_add_time_ids(
        (64, 64), (0, 0), (64, 64), AESTHETIC, NEGATIVE_AESTHETIC, (64, 64), (0, 0), (64, 64),
        dtype=torch.float32, text_encoder_projection_dim=te2.config.projection_dim,
    )
    refs["text.time_ids"], refs["text.time_ids_uncond"] = add_ids, add_neg_ids
    assert add_ids.tolist() == [time_ids(64, 64, AESTHETIC)], add_ids
    assert add_neg_ids.tolist() == [time_ids(64, 64, NEGATIVE_AESTHETIC)], add_neg_ids

    gen = torch.Generator().manual_seed(4100)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    added = {"text_embeds": torch.cat([pooled_u, pooled]), "time_ids": torch.cat([add_neg_ids, add_ids])}
    refs["unet.x"] = x
    refs["unet.out"] = unet(x, 500.0, encoder_hidden_states=torch.cat([uncond, cond]), added_cond_kwargs=added).sample

    # The A1111 run: one sampler loop whose denoiser swaps the model at the switch point.
    base_den = Denoiser(base_unet, False)
    ref_den = Denoiser(unet, False)
    sigmas = base_den.get_sigmas(STEPS)
    base_ctx = torch.cat([base_refs["run.uncond"], base_refs["run.cond"]])
    base_added = {
        "text_embeds": torch.cat([base_refs["run.pooled_uncond"], base_refs["run.pooled_cond"]]),
        "time_ids": base_refs["run.time_ids"].repeat(2, 1),
    }
    ref_ctx = torch.cat([uncond, cond])
    switched = []

    def model(xx: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        t = int(torch.argmin((base_den.sigmas - sigma).abs()))
        refining = (999 - t) / 1000 >= SWITCH_AT or bool(switched)
        if refining and not switched:
            switched.append(float(sigma))
        den, ctx, add = (ref_den, ref_ctx, added) if refining else (base_den, base_ctx, base_added)
        d = den(torch.cat([xx, xx]), torch.cat([sigma.reshape(1)] * 2), encoder_hidden_states=ctx, added_cond_kwargs=add)
        d_u, d_c = d.chunk(2)
        return d_u + CFG_SCALE * (d_c - d_u)

    noise = base_refs["run.init_noise"]
    latent = sample_euler(model, noise * sigmas[0], sigmas)
    refs["run.latent"] = latent
    refs["run.image"] = vae.decode(latent / vae.config.scaling_factor).sample

    # diffusers: the base stops at denoising_end, the refiner pipeline starts at denoising_start.
    base = StableDiffusionXLPipeline(
        vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok_eos, tokenizer_2=tok_zero,
        unet=base_unet, scheduler=euler, force_zeros_for_empty_prompt=True,
    )
    common = dict(prompt=PROMPT, negative_prompt=NEGATIVE_PROMPT, num_inference_steps=STEPS, guidance_scale=CFG_SCALE)
    euler.set_timesteps(STEPS)
    # diffusers multiplies given latents by init_noise_sigma (√(σ_max²+1) here); A1111 starts at σ_max.
    start = noise * float(sigmas[0]) / float(euler.init_noise_sigma)
    handed = base(
        **common, height=64, width=64, latents=start, denoising_end=SWITCH_AT, output_type="latent",
        original_size=(64, 64), target_size=(64, 64), crops_coords_top_left=(0, 0),
    ).images
    finished = refiner(
        **common, image=handed, denoising_start=SWITCH_AT, output_type="latent",
        aesthetic_score=AESTHETIC, negative_aesthetic_score=NEGATIVE_AESTHETIC,
    ).images
    refs["run.diffusers_latent"] = finished
    report = {
        "switched_at_sigma": switched[0],
        "diffusers_vs_run.latent_max_abs": max_abs(finished, latent),
        "run.latent_max_abs_value": float(latent.abs().max()),
        "run.latent_vs_base_only_max_abs": max_abs(latent, base_refs["run.latent"]),
    }
    print(json.dumps(report, indent=1))

    folder = SD / "sdxl-refiner"
    save_pipeline(refiner, folder, {"text_encoder_2": te2})
    ldm = {"model.diffusion_model." + k: v for k, v in unet_to_ldm(unet.state_dict(), REFINER_UNET).items()}
    ldm.update({"first_stage_model." + k: v for k, v in vae_to_ldm(vae.state_dict(), 4).items()})
    proj = te2.text_projection.weight.T.contiguous()
    ldm.update(clip_to_open_clip(te2, "conditioner.embedders.0.model.", None, proj))
    save_file(fp16_state(ldm), str(SD / "sdxl-refiner.safetensors"), metadata={"format": "pt"})

    meta = {
        "prompt": PROMPT,
        "negative_prompt": NEGATIVE_PROMPT,
        "steps": STEPS,
        "cfg_scale": CFG_SCALE,
        "size": [64, 64],
        "refiner_switch_at": SWITCH_AT,
        "aesthetic_score": [AESTHETIC, NEGATIVE_AESTHETIC],
        "unet_eval": {"t": 500.0, "rows": "uncond, cond"},
        "run": "refs/sdxl.json's run (same noise, base conditioning), the refiner from the switch on",
        "configs": {"unet": jsonable(unet.config)},
        "checks": report,
    }
    write_refs(SD, "sdxl-refiner", refs, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
