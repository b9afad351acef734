"""Cold start, the diffusers side (benches/gpu_cold_start.sh runs it beside `sdkube serve`).

  make DIR sd15|sdxl   writes a random-weight fp16 pipeline folder (diffusers layout, text
                       encoders included, no tokenizers: neither side needs them to load), the
                       one both sides load
  load DIR             in this fresh process: diffusers' StableDiffusion[XL]Pipeline
                       .from_pretrained(DIR, torch_dtype=float16).to("cuda") timed to a
                       synchronised GPU, then two txt2img calls at the native size (20 steps,
                       Euler, CFG 7, embeddings given: no tokenizer); one JSON line
  single DIR FILE      writes DIR's pipeline as one A1111-style checkpoint (LDM keys, fp16), with
                       the key mapping of scripts/make_sd_fixtures.py
  load-single FILE DIR the same as `load` through diffusers' from_single_file(FILE, config=DIR)

Its best configuration for loading: safetensors files, fp16 as stored, the whole pipeline moved
at once (diffusers' defaults, `low_cpu_mem_usage` on). Settings are printed beside the figures.
"""

import json
import sys
import time

T0 = time.perf_counter()

import torch  # noqa: E402


def make(folder, family):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    sdxl = family == "sdxl"
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        if sdxl:
            unet = UNet2DConditionModel(
                sample_size=128, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
                cross_attention_dim=2048, attention_head_dim=(5, 10, 20), use_linear_projection=True,
                addition_embed_type="text_time", addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816)
        else:
            unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
            sample_size=1024 if sdxl else 512, scaling_factor=0.13025 if sdxl else 0.18215)
        clip_l = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                              num_attention_heads=12, projection_dim=768))
        clip_g = None
        if sdxl:
            clip_g = CLIPTextModelWithProjection(CLIPTextConfig(
                hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                hidden_act="gelu", projection_dim=1280))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1)
    parts = dict(vae=vae.half(), text_encoder=clip_l.half(), tokenizer=None, unet=unet.half(), scheduler=scheduler)
    if sdxl:
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline(text_encoder_2=clip_g.half(), tokenizer_2=None, **parts)
    else:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False, **parts)
    pipe.save_pretrained(folder, safe_serialization=True)


def single(folder, out):
    """The folder's weights under the keys of an A1111 checkpoint (`model.diffusion_model.`,
    `first_stage_model.`, `cond_stage_model.` or SDXL's `conditioner.embedders.N.`)."""
    import os
    from types import SimpleNamespace

    from safetensors.torch import load_file, save_file

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts"))
    import make_sd_fixtures as fx

    def part(name):
        files = [f for f in os.listdir(f"{folder}/{name}") if f.endswith(".safetensors")]
        cfg = json.load(open(f"{folder}/{name}/config.json"))
        return load_file(f"{folder}/{name}/{files[0]}"), cfg

    def clip(name):
        sd, cfg = part(name)
        return SimpleNamespace(state_dict=lambda: sd, config=SimpleNamespace(**cfg))

    unet, unet_cfg = part("unet")
    vae, _ = part("vae")
    ldm = {"model.diffusion_model." + k: v for k, v in fx.unet_to_ldm(unet, unet_cfg).items()}
    ldm.update({"first_stage_model." + k: v for k, v in fx.vae_to_ldm(vae, 4).items()})
    if os.path.isdir(f"{folder}/text_encoder_2"):
        ldm.update(fx.clip_hf_to_ldm(clip("text_encoder"), "conditioner.embedders.0.transformer."))
        g = clip("text_encoder_2")
        proj = g.state_dict()["text_projection.weight"].T.contiguous()
        ldm.update(fx.clip_to_open_clip(g, "conditioner.embedders.1.model.", None, proj))
    else:
        ldm.update(fx.clip_hf_to_ldm(clip("text_encoder"), "cond_stage_model.transformer."))
    save_file(fx.fp16_state(ldm), out, metadata={"format": "pt"})


def load(folder, single_file=None):
    import diffusers

    t_import = time.perf_counter() - T0
    sdxl = "StableDiffusionXL" in open(f"{folder}/model_index.json").read()
    cls = diffusers.StableDiffusionXLPipeline if sdxl else diffusers.StableDiffusionPipeline
    # The parts the folder has no files for (no tokenizers: neither side needs them here).
    extra = {"tokenizer": None, "image_encoder": None, "feature_extractor": None}
    extra.update({"tokenizer_2": None} if sdxl else {"safety_checker": None})
    t = time.perf_counter()
    if single_file:
        pipe = cls.from_single_file(single_file, config=folder, torch_dtype=torch.float16,
                                    local_files_only=True, **extra).to("cuda")
    else:
        pipe = cls.from_pretrained(folder, torch_dtype=torch.float16, **extra).to("cuda")
    torch.cuda.synchronize()
    t_load = time.perf_counter() - t
    side = 1024 if sdxl else 512
    ids = torch.zeros((1, 77), dtype=torch.long, device="cuda")
    with torch.no_grad():
        kwargs = {}
        if sdxl:
            a = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
            g = pipe.text_encoder_2(ids, output_hidden_states=True)
            emb = torch.cat([a, g.hidden_states[-2]], -1)
            kwargs = dict(pooled_prompt_embeds=g.text_embeds, negative_pooled_prompt_embeds=g.text_embeds)
        else:
            emb = pipe.text_encoder(ids)[0]
    runs = []
    for _ in range(2):
        torch.cuda.synchronize()
        t = time.perf_counter()
        pipe(prompt_embeds=emb, negative_prompt_embeds=emb, num_inference_steps=20, guidance_scale=7.0,
             height=side, width=side, output_type="pil", **kwargs)
        torch.cuda.synchronize()
        runs.append(time.perf_counter() - t)
    print(json.dumps({
        "bench": "cold start diffusers", "model": "sdxl" if sdxl else "sd15",
        "import_s": round(t_import, 3), "from_pretrained_to_cuda_s": round(t_load, 3),
        "process_to_loaded_s": round(t_import + t_load, 3), "single_file": bool(single_file),
        "first_image_s": round(runs[0], 3), "second_image_s": round(runs[1], 3),
        "settings": f"diffusers {diffusers.__version__} torch {torch.__version__} fp16 safetensors "
                    + ("from_single_file(...)" if single_file else "from_pretrained(...)")
                    + ".to('cuda'), eager, 20 steps Euler, CFG 7",
    }), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "make":
        make(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "single":
        single(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "load-single":
        load(sys.argv[3], single_file=sys.argv[2])
    else:
        load(sys.argv[2])
