#!/usr/bin/env python3
"""Generate tiny random-weight Stable Diffusion pipelines and their reference outputs.

The Rust networks and loaders are tested against these files.

For every family (sd1, sd2v, sdxl, sd1-inpaint) this writes, under fixtures/sd/:
  <family>/                 diffusers layout (model_index.json, scheduler/, unet/, vae/,
                            text_encoder/[, text_encoder_2/]); no tokenizer folders
  <family>.safetensors      the same weights as one A1111/LDM single-file checkpoint
                            (not for sd1-inpaint)
  vae-sd1-alt.safetensors   a standalone A1111-style VAE file (LDM VAE keys, no prefix)
  refs/<family>.safetensors float32 reference tensors (names in refs/<family>.json)
  refs/<family>.json        every scalar, prompt and config used

Weights are stored as float16; every reference is computed in float32 from the
fp16-rounded weights, so a float32 load of the fp16 files reproduces the references.

The diffusers -> LDM key mapping is written here from the layouts (see `unet_to_ldm`,
`vae_to_ldm`, `clip_hf_to_ldm`, `clip_to_open_clip`). Each single file is checked by
loading it with diffusers' `from_single_file` (offline, config= the folder) and comparing
its outputs with the folder's.

Sampling follows A1111's "Euler": k-diffusion's `get_sigmas`, `CompVisDenoiser` /
`CompVisVDenoiser` and `sample_euler`, reimplemented below (about 40 lines of math; the
`k-diffusion` package is not used).

Usage: python3 scripts/make_sd_fixtures.py [--out fixtures/sd] [--only sd1,sd2v,...]
       python3 scripts/make_sd_fixtures.py --fp64-report   (float64 vs stored refs; writes nothing)
       python3 scripts/make_sd_fixtures.py --inpaint-img2img
           (refs/sd1-inpaint-img2img.*: img2img on the committed 9-channel model without a
           mask, conditioned by diffusers' inpainting pipeline under an all-white mask)
Deterministic: fixed seeds, CPU, float32.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

PROMPT = "a photo of an astronaut riding a horse"
NEGATIVE_PROMPT = "blurry, low quality"
CFG_SCALE = 7.0
STEPS = 4
IMG2IMG_STRENGTH = 0.5
MAX_LENGTH = 77
EOS_ID = 49407
BOS_ID = 49406

# The schedule every SD family here was trained with (LDM "linear" = diffusers "scaled_linear").
LINEAR_START = 0.00085
LINEAR_END = 0.012
NUM_TRAIN_TIMESTEPS = 1000

SDXL_TIME_IDS = [(64.0, 64.0, 0.0, 0.0, 64.0, 64.0), (48.0, 64.0, 4.0, 2.0, 64.0, 64.0)]
SDXL_RUN_TIME_IDS = (64.0, 64.0, 0.0, 0.0, 64.0, 64.0)

FAMILIES = ["sd1", "sd1-inpaint", "sd2v", "sdxl", "vae-sd1-alt"]


# --------------------------------------------------------------------------- tokenizer


def bytes_to_unicode() -> list[str]:
    """The byte -> printable-character table of GPT-2/CLIP BPE, in vocabulary order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return [chr(c) for c in cs]


def find_bpe_vocab() -> Path:
    pattern = os.path.expanduser(
        "~/.cargo/registry/src/*/instant-clip-tokenizer-0.1.0/bpe_simple_vocab_16e6.txt"
    )
    hits = sorted(glob.glob(pattern))
    if not hits:
        sys.exit(f"error: CLIP BPE vocabulary not found ({pattern}); run `cargo fetch` first")
    return Path(hits[0])


def build_tokenizers(tmp: Path):
    """CLIPTokenizers derived from OpenAI's bpe_simple_vocab_16e6.txt.

    vocab.json/merges.txt relate to the BPE file as in OpenAI's SimpleTokenizer: the
    first 48894 merges, vocabulary = 256 byte chars, the same with "</w>", one token
    per merge, then <|startoftext|>, <|endoftext|> (49408 ids).
    Returns (eos-padded tokenizer as SD1/clip_l use, "!"=0-padded as OpenCLIP/SD2/clip_g).
    """
    from transformers import CLIPTokenizer

    lines = find_bpe_vocab().read_text(encoding="utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    vocab = bytes_to_unicode()
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m.split(" ")) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408
    (tmp / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    eos_pad = CLIPTokenizer(str(tmp / "vocab.json"), str(tmp / "merges.txt"), pad_token="<|endoftext|>", model_max_length=MAX_LENGTH)
    zero_pad = CLIPTokenizer(str(tmp / "vocab.json"), str(tmp / "merges.txt"), pad_token="!", model_max_length=MAX_LENGTH)
    return eos_pad, zero_pad


def token_ids(tok, text: str) -> torch.Tensor:
    ids = tok(text, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt")
    return ids.input_ids.to(torch.int64)


# --------------------------------------------------------------------------- weights


@torch.no_grad()
def randomize_affine(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Move norm scales/shifts and biases off their 1/0 init so a swapped or missing
    weight changes the output (default init would hide it)."""
    norm_types = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    for m in module.modules():
        if isinstance(m, norm_types):
            if m.weight is not None:
                m.weight.copy_(1.0 + 0.2 * torch.randn(m.weight.shape, generator=gen))
            if m.bias is not None:
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
        elif isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and m.bias is not None:
            m.bias.add_(0.05 * torch.randn(m.bias.shape, generator=gen))


@torch.no_grad()
def round_to_fp16(module: torch.nn.Module) -> torch.nn.Module:
    """Round weights to float16 and back, so references match the stored fp16 files."""
    module.half().float()
    module.eval()
    return module


def fp16_state(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(torch.float16).contiguous() for k, v in sd.items()}


# --------------------------------------------------------------------------- models


def clip_config(hidden_act: str, projection_dim: int = 8):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=8,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MAX_LENGTH,
        hidden_act=hidden_act,
        projection_dim=projection_dim,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=1,
    )


def make_clip(seed: int, hidden_act: str, with_projection: bool = False):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    model = cls(clip_config(hidden_act))
    gen = torch.Generator().manual_seed(seed + 1)
    randomize_affine(model, gen)
    return round_to_fp16(model)


def make_vae(seed: int, scaling_factor: float):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        act_fn="silu",
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=scaling_factor,
    )
    randomize_affine(vae, torch.Generator().manual_seed(seed + 1))
    return round_to_fp16(vae)


def make_unet(seed: int, **cfg):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**cfg)
    randomize_affine(unet, torch.Generator().manual_seed(seed + 1))
    return round_to_fp16(unet)


SD1_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(8, 16),
    layers_per_block=1,
    cross_attention_dim=8,
    attention_head_dim=2,
    norm_num_groups=4,
)

SD2V_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(8, 16),
    layers_per_block=1,
    cross_attention_dim=8,
    attention_head_dim=[2, 4],
    use_linear_projection=True,
    upcast_attention=True,
    norm_num_groups=4,
)

SDXL_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(8, 16, 16),
    layers_per_block=2,
    transformer_layers_per_block=(1, 1, 2),
    cross_attention_dim=16,
    attention_head_dim=[1, 2, 2],
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=4,
    projection_class_embeddings_input_dim=8 + 6 * 4,
    norm_num_groups=4,
)


def sd1_scheduler():
    from diffusers import PNDMScheduler

    return PNDMScheduler(
        beta_start=LINEAR_START,
        beta_end=LINEAR_END,
        beta_schedule="scaled_linear",
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
    )


def sd2v_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=LINEAR_START,
        beta_end=LINEAR_END,
        beta_schedule="scaled_linear",
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction",
    )


def sdxl_scheduler():
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        beta_start=LINEAR_START,
        beta_end=LINEAR_END,
        beta_schedule="scaled_linear",
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        steps_offset=1,
        timestep_spacing="leading",
        interpolation_type="linear",
        prediction_type="epsilon",
    )


# --------------------------------------------------------------------------- diffusers -> LDM keys


def _resnet_unet(prefix_src: str, prefix_dst: str, sd: dict, out: dict) -> None:
    names = {
        "norm1": "in_layers.0",
        "conv1": "in_layers.2",
        "time_emb_proj": "emb_layers.1",
        "norm2": "out_layers.0",
        "conv2": "out_layers.3",
        "conv_shortcut": "skip_connection",
    }
    for key in [k for k in sd if k.startswith(prefix_src + ".")]:
        rest = key[len(prefix_src) + 1 :]
        module, param = rest.split(".", 1)
        out[f"{prefix_dst}.{names[module]}.{param}"] = sd.pop(key)


def _move_prefix(prefix_src: str, prefix_dst: str, sd: dict, out: dict) -> None:
    for key in [k for k in sd if k.startswith(prefix_src + ".")]:
        out[prefix_dst + key[len(prefix_src) :]] = sd.pop(key)


def unet_to_ldm(unet_sd: dict, cfg: dict) -> dict:
    """diffusers UNet2DConditionModel keys -> LDM `openaimodel.UNetModel` keys (no prefix).

    input_blocks: 0 = conv_in; level i, layer j -> 1 + i*(L+1) + j; the level's
    downsampler follows its L layers. output_blocks: level i (diffusers order), layer j
    (L+1 of them) -> i*(L+1) + j; the upsampler rides in the last block of the level,
    after the resnet (and the attention, when the level has one).
    """
    sd = dict(unet_sd)
    out: dict[str, torch.Tensor] = {}
    layers = cfg["layers_per_block"]
    _move_prefix("time_embedding.linear_1", "time_embed.0", sd, out)
    _move_prefix("time_embedding.linear_2", "time_embed.2", sd, out)
    _move_prefix("add_embedding.linear_1", "label_emb.0.0", sd, out)
    _move_prefix("add_embedding.linear_2", "label_emb.0.2", sd, out)
    _move_prefix("conv_in", "input_blocks.0.0", sd, out)
    _move_prefix("conv_norm_out", "out.0", sd, out)
    _move_prefix("conv_out", "out.2", sd, out)
    for i, _ in enumerate(cfg["down_block_types"]):
        for j in range(layers):
            n = 1 + i * (layers + 1) + j
            _resnet_unet(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{n}.0", sd, out)
            _move_prefix(f"down_blocks.{i}.attentions.{j}", f"input_blocks.{n}.1", sd, out)
        n = 1 + i * (layers + 1) + layers
        _move_prefix(f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{n}.0.op", sd, out)
    _resnet_unet("mid_block.resnets.0", "middle_block.0", sd, out)
    _move_prefix("mid_block.attentions.0", "middle_block.1", sd, out)
    _resnet_unet("mid_block.resnets.1", "middle_block.2", sd, out)
    for i, block_type in enumerate(cfg["up_block_types"]):
        has_attn = block_type.startswith("CrossAttn")
        for j in range(layers + 1):
            n = i * (layers + 1) + j
            _resnet_unet(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{n}.0", sd, out)
            _move_prefix(f"up_blocks.{i}.attentions.{j}", f"output_blocks.{n}.1", sd, out)
        n = i * (layers + 1) + layers
        slot = 2 if has_attn else 1
        _move_prefix(f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{n}.{slot}.conv", sd, out)
    if sd:
        raise RuntimeError(f"unmapped UNet keys: {sorted(sd)[:8]}")
    return out


def vae_to_ldm(vae_sd: dict, levels: int) -> dict:
    """diffusers AutoencoderKL keys -> LDM `AutoencoderKL` keys (no prefix).

    Decoder up blocks are numbered in reverse in LDM; the mid attention is a set of
    1x1 convolutions (q, k, v, proj_out) where diffusers has linear layers.
    """
    sd = dict(vae_sd)
    out: dict[str, torch.Tensor] = {}

    def resnet(src: str, dst: str) -> None:
        for key in [k for k in sd if k.startswith(src + ".")]:
            rest = key[len(src) + 1 :].replace("conv_shortcut", "nin_shortcut")
            out[f"{dst}.{rest}"] = sd.pop(key)

    def attention(src: str, dst: str) -> None:
        names = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
        for d_name, l_name in names.items():
            for param in ("weight", "bias"):
                t = sd.pop(f"{src}.{d_name}.{param}")
                if param == "weight" and d_name != "group_norm":
                    t = t.reshape(*t.shape, 1, 1)
                out[f"{dst}.{l_name}.{param}"] = t

    for side in ("encoder", "decoder"):
        _move_prefix(f"{side}.conv_in", f"{side}.conv_in", sd, out)
        _move_prefix(f"{side}.conv_norm_out", f"{side}.norm_out", sd, out)
        _move_prefix(f"{side}.conv_out", f"{side}.conv_out", sd, out)
        resnet(f"{side}.mid_block.resnets.0", f"{side}.mid.block_1")
        resnet(f"{side}.mid_block.resnets.1", f"{side}.mid.block_2")
        attention(f"{side}.mid_block.attentions.0", f"{side}.mid.attn_1")
    for i in range(levels):
        for key in sorted({k.split(".")[4] for k in sd if k.startswith(f"encoder.down_blocks.{i}.resnets.")}):
            resnet(f"encoder.down_blocks.{i}.resnets.{key}", f"encoder.down.{i}.block.{key}")
        _move_prefix(f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv", sd, out)
        ldm_i = levels - 1 - i
        for key in sorted({k.split(".")[4] for k in sd if k.startswith(f"decoder.up_blocks.{i}.resnets.")}):
            resnet(f"decoder.up_blocks.{i}.resnets.{key}", f"decoder.up.{ldm_i}.block.{key}")
        _move_prefix(f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{ldm_i}.upsample.conv", sd, out)
    _move_prefix("quant_conv", "quant_conv", sd, out)
    _move_prefix("post_quant_conv", "post_quant_conv", sd, out)
    if sd:
        raise RuntimeError(f"unmapped VAE keys: {sorted(sd)[:8]}")
    return out


def hf_clip_keys(model) -> dict:
    """State dict of a transformers CLIP text model with the classic `text_model.` prefix
    (transformers >= 5.6 drops it for CLIPTextModel; hub folders and LDM files keep it)."""
    sd = model.state_dict()
    out = {}
    for k, v in sd.items():
        if k.startswith("text_model.") or k.startswith("text_projection."):
            out[k] = v
        else:
            out["text_model." + k] = v
    out.pop("text_model.embeddings.position_ids", None)
    return out


def clip_hf_to_ldm(model, prefix: str) -> dict:
    """HF CLIP text model -> LDM FrozenCLIPEmbedder keys: `<prefix>text_model.*`."""
    return {prefix + k: v for k, v in hf_clip_keys(model).items() if k.startswith("text_model.")}


def clip_to_open_clip(model, prefix: str, extra_layer: dict | None, text_projection: torch.Tensor) -> dict:
    """HF CLIP text model -> OpenCLIP keys (`<prefix>transformer.resblocks.N.*` with fused
    attn.in_proj_weight/bias = cat(q, k, v), ln_final, token_embedding, positional_embedding,
    text_projection [hidden, proj] (x @ text_projection))."""
    sd = hf_clip_keys(model)
    out: dict[str, torch.Tensor] = {}
    tm = "text_model."
    out[prefix + "token_embedding.weight"] = sd.pop(tm + "embeddings.token_embedding.weight")
    out[prefix + "positional_embedding"] = sd.pop(tm + "embeddings.position_embedding.weight")
    out[prefix + "ln_final.weight"] = sd.pop(tm + "final_layer_norm.weight")
    out[prefix + "ln_final.bias"] = sd.pop(tm + "final_layer_norm.bias")
    sd.pop("text_projection.weight", None)
    layers = model.config.num_hidden_layers
    blocks = [{k[len(f"{tm}encoder.layers.{i}.") :]: sd.pop(k) for k in list(sd) if k.startswith(f"{tm}encoder.layers.{i}.")} for i in range(layers)]
    if extra_layer is not None:
        blocks.append(extra_layer)
    if sd:
        raise RuntimeError(f"unmapped CLIP keys: {sorted(sd)}")
    for i, b in enumerate(blocks):
        p = f"{prefix}transformer.resblocks.{i}."
        out[p + "ln_1.weight"] = b["layer_norm1.weight"]
        out[p + "ln_1.bias"] = b["layer_norm1.bias"]
        out[p + "ln_2.weight"] = b["layer_norm2.weight"]
        out[p + "ln_2.bias"] = b["layer_norm2.bias"]
        out[p + "attn.in_proj_weight"] = torch.cat([b[f"self_attn.{x}_proj.weight"] for x in "qkv"], 0)
        out[p + "attn.in_proj_bias"] = torch.cat([b[f"self_attn.{x}_proj.bias"] for x in "qkv"], 0)
        out[p + "attn.out_proj.weight"] = b["self_attn.out_proj.weight"]
        out[p + "attn.out_proj.bias"] = b["self_attn.out_proj.bias"]
        out[p + "mlp.c_fc.weight"] = b["mlp.fc1.weight"]
        out[p + "mlp.c_fc.bias"] = b["mlp.fc1.bias"]
        out[p + "mlp.c_proj.weight"] = b["mlp.fc2.weight"]
        out[p + "mlp.c_proj.bias"] = b["mlp.fc2.bias"]
    out[prefix + "text_projection"] = text_projection
    # OpenCLIP checkpoints carry the contrastive temperature; unused for SD (log(1/0.07)).
    out[prefix + "logit_scale"] = torch.tensor(math.log(1 / 0.07))
    return out


def random_clip_layer(seed: int, hidden_act: str) -> dict:
    """One more encoder layer (same shapes as the others), in HF names."""
    model = make_clip(seed, hidden_act)
    sd = hf_clip_keys(model)
    return {k[len("text_model.encoder.layers.0.") :]: v for k, v in sd.items() if k.startswith("text_model.encoder.layers.0.")}


# --------------------------------------------------------------------------- k-diffusion math


def ldm_alphas_cumprod() -> torch.Tensor:
    """LDM's make_beta_schedule('linear') in float64, stored as float32 (as A1111 sees it)."""
    betas = torch.linspace(LINEAR_START**0.5, LINEAR_END**0.5, NUM_TRAIN_TIMESTEPS, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).to(torch.float32)


class Denoiser:
    """k-diffusion CompVisDenoiser (eps) / CompVisVDenoiser (v) around a diffusers UNet."""

    def __init__(self, unet, v_prediction: bool):
        ac = ldm_alphas_cumprod()
        self.sigmas = ((1 - ac) / ac) ** 0.5
        self.log_sigmas = self.sigmas.log()
        self.unet = unet
        self.v = v_prediction

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        t = t.float()
        low_idx, high_idx, w = t.floor().long(), t.ceil().long(), t.frac()
        log_sigma = (1 - w) * self.log_sigmas[low_idx] + w * self.log_sigmas[high_idx]
        return log_sigma.exp()

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        log_sigma = sigma.log()
        dists = log_sigma - self.log_sigmas[:, None]
        low_idx = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=self.log_sigmas.shape[0] - 2)
        high_idx = low_idx + 1
        low, high = self.log_sigmas[low_idx], self.log_sigmas[high_idx]
        w = ((low - log_sigma) / (low - high)).clamp(0, 1)
        t = (1 - w) * low_idx + w * high_idx
        return t.view(sigma.shape)

    def get_sigmas(self, n: int) -> torch.Tensor:
        t_max = len(self.sigmas) - 1
        t = torch.linspace(t_max, 0, n)
        return torch.cat([self.t_to_sigma(t), torch.zeros(1)])

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **unet_kwargs) -> torch.Tensor:
        sigma = sigma.reshape(-1)
        s = sigma[:, None, None, None]
        t = self.sigma_to_t(sigma)
        if self.v:
            c_skip = 1.0 / (s**2 + 1.0)
            c_out = -s / (s**2 + 1.0) ** 0.5
            c_in = 1.0 / (s**2 + 1.0) ** 0.5
            out = self.unet(x * c_in, t, **unet_kwargs).sample
            return out * c_out + x * c_skip
        c_out = -s
        c_in = 1.0 / (s**2 + 1.0) ** 0.5
        eps = self.unet(x * c_in, t, **unet_kwargs).sample
        return x + eps * c_out


def cfg_model(denoiser: Denoiser, uncond: torch.Tensor, cond: torch.Tensor, scale: float, added=None):
    """A1111 CFG: uncond and cond evaluated as one batch of 2 (uncond first)."""
    ctx = torch.cat([uncond, cond])

    def model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        kwargs = {"encoder_hidden_states": ctx}
        if added is not None:
            kwargs["added_cond_kwargs"] = added
        d = denoiser(torch.cat([x, x]), torch.cat([sigma.reshape(1), sigma.reshape(1)]), **kwargs)
        d_u, d_c = d.chunk(2)
        return d_u + scale * (d_c - d_u)

    return model


def sample_euler(model, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """k-diffusion sample_euler with s_churn = 0 (A1111 "Euler")."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        d = (x - denoised) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x


# --------------------------------------------------------------------------- references


def randn(gen: torch.Generator, *shape) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float32)


@torch.no_grad()
def vae_refs(vae, gen: torch.Generator) -> dict:
    latent = randn(gen, 1, 4, 8, 8)
    image = torch.rand(1, 3, 64, 64, generator=gen) * 2 - 1
    dist = vae.encode(image).latent_dist
    return {
        "vae.latent": latent,
        "vae.decoded": vae.decode(latent).sample,
        "vae.image": image,
        "vae.encoded_mean": dist.mean,
        "vae.encoded_logvar": dist.logvar,
    }


@torch.no_grad()
def unet_refs(unet, gen: torch.Generator, sdxl: bool) -> dict:
    c = unet.config.in_channels
    refs = {
        "unet.x": randn(gen, 2, c, 8, 8),
        "unet.t": torch.tensor([500.0]),
        "unet.ctx": randn(gen, 2, MAX_LENGTH, unet.config.cross_attention_dim),
    }
    added = None
    if sdxl:
        refs["unet.text_embeds"] = randn(gen, 2, 8)
        refs["unet.time_ids"] = torch.tensor(SDXL_TIME_IDS)
        added = {"text_embeds": refs["unet.text_embeds"], "time_ids": refs["unet.time_ids"]}
    refs["unet.out"] = unet(refs["unet.x"], refs["unet.t"], encoder_hidden_states=refs["unet.ctx"], added_cond_kwargs=added).sample
    return refs


@torch.no_grad()
def run_refs(unet, vae, v_prediction: bool, cond, uncond, gen, added=None) -> dict:
    den = Denoiser(unet, v_prediction)
    sigmas = den.get_sigmas(STEPS)
    noise = randn(gen, 1, 4, 8, 8)
    model = cfg_model(den, uncond, cond, CFG_SCALE, added)
    latent = sample_euler(model, noise * sigmas[0], sigmas)
    sf = vae.config.scaling_factor
    return {
        "run.init_noise": noise,
        "run.sigmas": sigmas,
        "run.cond": cond,
        "run.uncond": uncond,
        "run.latent": latent,
        "run.image": vae.decode(latent / sf).sample,
    }, model, den


def tensor_stats(refs: dict) -> dict:
    return {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")} for k, v in refs.items()}


def write_refs(out: Path, family: str, refs: dict, meta: dict) -> None:
    (out / "refs").mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().clone().contiguous() for k, v in refs.items()}
    for k, v in tensors.items():
        if v.dtype not in (torch.float32, torch.int64):
            raise RuntimeError(f"{k}: unexpected dtype {v.dtype}")
        if not torch.isfinite(v.float()).all():
            raise RuntimeError(f"{k}: non-finite values")
    save_file(tensors, str(out / "refs" / f"{family}.safetensors"), metadata={"format": "pt"})
    meta = dict(meta)
    meta["tensors"] = tensor_stats(tensors)
    (out / "refs" / f"{family}.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def jsonable(cfg) -> dict:
    out = json.loads(json.dumps(dict(cfg), default=lambda o: list(o) if isinstance(o, tuple) else str(o)))
    out.pop("_use_default_values", None)  # diffusers bookkeeping (an unordered set)
    return out


def common_meta(family: str) -> dict:
    return {
        "family": family,
        "generator": "scripts/make_sd_fixtures.py",
        "versions": {
            "torch": torch.__version__,
            "diffusers": __import__("diffusers").__version__,
            "transformers": __import__("transformers").__version__,
        },
        "weights_dtype": "float16 on disk; references computed in float32 from the fp16-rounded weights",
        "prompt": PROMPT,
        "negative_prompt": NEGATIVE_PROMPT,
        "max_length": MAX_LENGTH,
    }


def sampler_meta(v_prediction: bool) -> dict:
    return {
        "sampler": "A1111 Euler = k-diffusion sample_euler (s_churn=0), reimplemented in the script",
        "steps": STEPS,
        "cfg_scale": CFG_SCALE,
        "cfg": "D = D_u + cfg_scale*(D_c - D_u); uncond and cond as one batch of 2, uncond first",
        "denoiser": "CompVisVDenoiser (sigma_data=1)" if v_prediction else "CompVisDenoiser",
        "schedule": {
            "beta_schedule": "LDM linear = diffusers scaled_linear",
            "linear_start": LINEAR_START,
            "linear_end": LINEAR_END,
            "num_train_timesteps": NUM_TRAIN_TIMESTEPS,
            "alphas_cumprod": "cumprod(1 - betas) in float64, cast to float32; sigmas = sqrt((1-ac)/ac) in float32",
            "get_sigmas": "t = linspace(999, 0, steps); sigma(t) by linear interpolation of log sigmas; append 0",
            "sigma_to_t": "k-diffusion DiscreteSchedule.sigma_to_t (fractional t fed to the UNet)",
        },
        "run_start": "x = run.init_noise * run.sigmas[0]",
        "width": 64,
        "height": 64,
    }


# --------------------------------------------------------------------------- files


def rewrite_text_encoder_with_prefix(folder: Path, model) -> None:
    """Store text_encoder weights with the `text_model.` prefix, as hub SD folders do."""
    path = folder / "model.safetensors"
    sd = fp16_state(hf_clip_keys(model))
    save_file(sd, str(path), metadata={"format": "pt"})


def save_pipeline(pipe, folder: Path, text_encoders: dict) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    pipe.to(torch.float16)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    pipe.to(torch.float32)
    for name in ("tokenizer", "tokenizer_2", "safety_checker", "feature_extractor"):
        if (folder / name).exists():
            shutil.rmtree(folder / name)
    for sub, model in text_encoders.items():
        rewrite_text_encoder_with_prefix(folder / sub, model)
    for model in text_encoders.values():
        round_to_fp16(model)


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


# --------------------------------------------------------------------------- families


class Ctx:
    def __init__(self, out: Path, tok_eos, tok_zero):
        self.out = out
        self.tok_eos = tok_eos
        self.tok_zero = tok_zero
        self.report: dict[str, dict] = {}


@torch.no_grad()
def family_sd(ctx: Ctx, family: str) -> None:
    """sd1, sd1-inpaint (9-channel UNet, folder only) and sd2v."""
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline

    sd2 = family == "sd2v"
    inpaint = family == "sd1-inpaint"
    base_seed = {"sd1": 1000, "sd1-inpaint": 1000, "sd2v": 2000}[family]
    act = "gelu" if sd2 else "quick_gelu"
    text_encoder = make_clip(base_seed + 10, act)
    # sd1-inpaint and sd2v share sd1's VAE (as the real models do), sd1-inpaint also its text
    # encoder: identical files, stored once by git.
    vae = make_vae(1000 + 20, 0.18215)
    unet_cfg = dict(SD2V_UNET if sd2 else SD1_UNET)
    if inpaint:
        unet_cfg["in_channels"] = 9
    unet = make_unet(base_seed + (40 if inpaint else 30), **unet_cfg)
    tok = ctx.tok_zero if sd2 else ctx.tok_eos
    scheduler = sd2v_scheduler() if sd2 else sd1_scheduler()
    cls = StableDiffusionInpaintPipeline if inpaint else StableDiffusionPipeline
    pipe = cls(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tok,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    gen = torch.Generator().manual_seed(base_seed + 100 + (7 if inpaint else 0))
    refs: dict[str, torch.Tensor] = {}

    refs["text.ids"] = token_ids(tok, PROMPT)
    cond, uncond = pipe.encode_prompt(PROMPT, "cpu", 1, True, NEGATIVE_PROMPT)
    refs["text.hidden"] = cond
    if not sd2:
        hs = text_encoder(refs["text.ids"], output_hidden_states=True).hidden_states[-2]
        final_ln = text_encoder.text_model.final_layer_norm if hasattr(text_encoder, "text_model") else text_encoder.final_layer_norm
        refs["text.hidden_skip2"] = final_ln(hs)
    refs.update(unet_refs(unet, gen, sdxl=False))
    meta = common_meta(family)
    meta["text"] = {
        "tokenizer": "CLIP BPE from bpe_simple_vocab_16e6.txt",
        "pad": "id 0 ('!'), as OpenCLIP/SD2 tokenizers" if sd2 else "EOS 49407, as the SD1 CLIP tokenizer",
        "text.hidden": "encode_prompt output: last_hidden_state (after final_layer_norm) of the diffusers text_encoder",
    }
    if not sd2:
        meta["text"]["text.hidden_skip2"] = "final_layer_norm(hidden_states[-2]) (A1111 clip skip 2)"
    meta["unet_eval"] = {"t": 500.0, "inputs": "unet.x, unet.t, unet.ctx ~ N(0,1) except t"}
    if not inpaint:
        refs.update(vae_refs(vae, gen))
        run, model, den = run_refs(unet, vae, sd2, cond, uncond, gen)
        refs.update(run)
        meta["run"] = sampler_meta(sd2)
        if not sd2:
            sf = vae.config.scaling_factor
            init_latent = vae.encode(refs["vae.image"]).latent_dist.mean * sf
            t_enc = int(IMG2IMG_STRENGTH * STEPS)
            # A1111 sd_samplers_kdiffusion.sample_img2img: sigma_sched = sigmas[steps - t_enc - 1:],
            # i.e. t_enc + 2 sigmas, t_enc + 1 Euler steps.
            sigmas = den.get_sigmas(STEPS)[STEPS - t_enc - 1 :]
            noise = randn(gen, 1, 4, 8, 8)
            latent = sample_euler(model, init_latent + noise * sigmas[0], sigmas)
            refs["img2img.init_latent"] = init_latent
            refs["img2img.noise"] = noise
            refs["img2img.sigmas"] = sigmas
            refs["img2img.latent"] = latent
            refs["img2img.image"] = vae.decode(latent / sf).sample
            meta["img2img"] = {
                "init_image": "vae.image",
                "init_latent": "vae.encode(vae.image).latent_dist.mean * scaling_factor",
                "strength": IMG2IMG_STRENGTH,
                "steps": STEPS,
                "t_enc": t_enc,
                "sigmas": f"A1111 sigma_sched = get_sigmas({STEPS})[steps - t_enc - 1:] (the last t_enc+2 = {t_enc + 2} sigmas, {t_enc + 1} Euler steps)",
                "start": "x = init_latent + img2img.noise * img2img.sigmas[0]",
                "conditioning": "run.cond / run.uncond, cfg as in run",
            }
    meta["configs"] = {
        "unet": jsonable(unet.config),
        "vae": jsonable(vae.config),
        "text_encoder": text_encoder.config.to_dict(),
        "scheduler": jsonable(scheduler.config),
    }
    meta["vae_scaling_factor"] = vae.config.scaling_factor
    meta["prediction_type"] = "v_prediction" if sd2 else "epsilon"

    folder = ctx.out / family
    save_pipeline(pipe, folder, {"text_encoder": text_encoder})

    if not inpaint:
        ldm = {}
        ldm.update({"model.diffusion_model." + k: v for k, v in unet_to_ldm(unet.state_dict(), unet_cfg).items()})
        ldm.update({"first_stage_model." + k: v for k, v in vae_to_ldm(vae.state_dict(), 4).items()})
        if sd2:
            extra = random_clip_layer(base_seed + 11, act)
            proj = round_to_fp16(torch.nn.Linear(8, 8, bias=False)).weight.T.contiguous()
            ldm.update(clip_to_open_clip(text_encoder, "cond_stage_model.model.", extra, proj))
            meta["ldm_text_encoder"] = (
                "OpenCLIP layout with 3 resblocks: resblocks.0-1 = the diffusers text_encoder's 2 layers, "
                "resblocks.2 = an extra random layer that SD2 never uses (penultimate-layer output + ln_final), "
                "like real SD2 files (24 resblocks vs diffusers' 23 layers); text_projection random [8,8], unused"
            )
        else:
            ldm.update(clip_hf_to_ldm(text_encoder, "cond_stage_model.transformer."))
        ldm_path = ctx.out / f"{family}.safetensors"
        save_file(fp16_state(ldm), str(ldm_path), metadata={"format": "pt"})
        ctx.report[family] = verify_sd_single_file(ldm_path, folder, tok, refs, sd2)
        if sd2:
            ctx.report[family]["open_clip_forward_from_ldm_vs_refs_max_abs"] = check_open_clip_semantics(ldm_path, refs, False)
    ctx.report.setdefault(family, {}).update(verify_folder(folder, cls, {"tokenizer": tok}, refs, sdxl=False))
    if not inpaint:
        ctx.report[family]["run_cross_check"] = cross_check_with_diffusers_euler(pipe, refs, sd2, sdxl=False)
    meta["checks"] = ctx.report[family]
    write_refs(ctx.out, family, refs, meta)


@torch.no_grad()
def family_sdxl(ctx: Ctx) -> None:
    from diffusers import StableDiffusionXLPipeline

    base = 3000
    # clip_l is sd1's text encoder (as in the real models); identical files, stored once by git.
    te1 = make_clip(1000 + 10, "quick_gelu")
    te2 = make_clip(base + 12, "gelu", with_projection=True)
    vae = make_vae(base + 20, 0.13025)
    unet = make_unet(base + 30, **SDXL_UNET)
    scheduler = sdxl_scheduler()
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=te1,
        text_encoder_2=te2,
        tokenizer=ctx.tok_eos,
        tokenizer_2=ctx.tok_zero,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )
    gen = torch.Generator().manual_seed(base + 100)
    refs: dict[str, torch.Tensor] = {}
    refs["text.ids"] = token_ids(ctx.tok_eos, PROMPT)
    refs["text.ids_2"] = token_ids(ctx.tok_zero, PROMPT)
    cond, uncond, pooled, pooled_u = pipe.encode_prompt(
        PROMPT, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True, negative_prompt=NEGATIVE_PROMPT
    )
    refs["text.hidden"] = cond
    refs["text.pooled"] = pooled
    refs.update(unet_refs(unet, gen, sdxl=True))
    refs.update(vae_refs(vae, gen))
    time_ids = torch.tensor([SDXL_RUN_TIME_IDS, SDXL_RUN_TIME_IDS])
    added = {"text_embeds": torch.cat([pooled_u, pooled]), "time_ids": time_ids}
    run, _, _ = run_refs(unet, vae, False, cond, uncond, gen, added)
    refs.update(run)
    refs["run.pooled_cond"] = pooled
    refs["run.pooled_uncond"] = pooled_u
    refs["run.time_ids"] = torch.tensor([SDXL_RUN_TIME_IDS])
    meta = common_meta("sdxl")
    meta["text"] = {
        "tokenizer": "CLIP BPE from bpe_simple_vocab_16e6.txt",
        "text.ids": "clip_l (text_encoder), padded with EOS 49407",
        "text.ids_2": "clip_g (text_encoder_2), padded with 0 ('!')",
        "text.hidden": "concat(text_encoder hidden_states[-2], text_encoder_2 hidden_states[-2]) on the last dim (no final_layer_norm)",
        "text.pooled": "text_encoder_2 text_embeds: final_layer_norm(last_hidden_state) at the first EOS (id 49407), times text_projection",
    }
    meta["unet_eval"] = {"t": 500.0, "time_ids": SDXL_TIME_IDS, "time_ids_layout": "(orig_h, orig_w, crop_top, crop_left, target_h, target_w)"}
    meta["run"] = sampler_meta(False)
    meta["run"]["time_ids"] = list(SDXL_RUN_TIME_IDS)
    meta["run"]["added_cond"] = "text_embeds = cat(run.pooled_uncond, run.pooled_cond), time_ids = run.time_ids for both"
    meta["configs"] = {
        "unet": jsonable(unet.config),
        "vae": jsonable(vae.config),
        "text_encoder": te1.config.to_dict(),
        "text_encoder_2": te2.config.to_dict(),
        "scheduler": jsonable(scheduler.config),
    }
    meta["vae_scaling_factor"] = vae.config.scaling_factor
    meta["prediction_type"] = "epsilon"

    folder = ctx.out / "sdxl"
    save_pipeline(pipe, folder, {"text_encoder": te1, "text_encoder_2": te2})

    ldm = {}
    ldm.update({"model.diffusion_model." + k: v for k, v in unet_to_ldm(unet.state_dict(), SDXL_UNET).items()})
    ldm.update({"first_stage_model." + k: v for k, v in vae_to_ldm(vae.state_dict(), 4).items()})
    ldm.update(clip_hf_to_ldm(te1, "conditioner.embedders.0.transformer."))
    proj = te2.text_projection.weight.T.contiguous()
    ldm.update(clip_to_open_clip(te2, "conditioner.embedders.1.model.", None, proj))
    ldm_path = ctx.out / "sdxl.safetensors"
    save_file(fp16_state(ldm), str(ldm_path), metadata={"format": "pt"})
    toks = {"tokenizer": ctx.tok_eos, "tokenizer_2": ctx.tok_zero}
    ctx.report["sdxl"] = verify_sdxl_single_file(ldm_path, folder, toks, refs)
    ctx.report["sdxl"]["open_clip_forward_from_ldm_vs_refs_max_abs"] = check_open_clip_semantics(ldm_path, refs, True)
    ctx.report["sdxl"].update(verify_folder(folder, StableDiffusionXLPipeline, toks, refs, sdxl=True))
    ctx.report["sdxl"]["run_cross_check"] = cross_check_with_diffusers_euler(pipe, refs, False, sdxl=True)
    meta["checks"] = ctx.report["sdxl"]
    write_refs(ctx.out, "sdxl", refs, meta)


@torch.no_grad()
def family_alt_vae(ctx: Ctx) -> None:
    from diffusers import AutoencoderKL

    vae = make_vae(5020, 0.18215)
    gen = torch.Generator().manual_seed(5100)
    refs = vae_refs(vae, gen)
    path = ctx.out / "vae-sd1-alt.safetensors"
    save_file(fp16_state(vae_to_ldm(vae.state_dict(), 4)), str(path), metadata={"format": "pt"})
    loaded = AutoencoderKL.from_single_file(
        str(path), config=str(ctx.out / "sd1"), subfolder="vae", local_files_only=True, torch_dtype=torch.float32
    ).eval()
    check = {
        "vae.decoded": max_abs(loaded.decode(refs["vae.latent"]).sample, refs["vae.decoded"]),
        "vae.encoded_mean": max_abs(loaded.encode(refs["vae.image"]).latent_dist.mean, refs["vae.encoded_mean"]),
    }
    meta = common_meta("vae-sd1-alt")
    for k in ("prompt", "negative_prompt", "max_length"):
        meta.pop(k)
    meta["layout"] = "A1111 VAE file: LDM AutoencoderKL keys without the first_stage_model. prefix; same architecture as sd1/vae, different random weights"
    meta["configs"] = {"vae": jsonable(vae.config)}
    ctx.report["vae-sd1-alt"] = {"from_single_file_vs_refs_max_abs": check}
    meta["checks"] = ctx.report["vae-sd1-alt"]
    write_refs(ctx.out, "vae-sd1-alt", refs, meta)


# --------------------------------------------------------------------------- verification


def open_clip_forward(ldm: dict, prefix: str, ids: torch.Tensor, heads: int) -> list[torch.Tensor]:
    """OpenCLIP's text transformer run straight from LDM keys (as LDM/sgm do), independent
    of transformers and of diffusers' converter. Returns the input and each resblock output."""
    w = {k[len(prefix) :]: v.float() for k, v in ldm.items() if k.startswith(prefix)}
    x = w["token_embedding.weight"][ids] + w["positional_embedding"]
    n, d = x.shape[1], x.shape[2]
    mask = torch.full((n, n), float("-inf")).triu(1)
    outs = [x]
    i = 0
    while f"transformer.resblocks.{i}.ln_1.weight" in w:
        p = f"transformer.resblocks.{i}."
        h = torch.nn.functional.layer_norm(x, (d,), w[p + "ln_1.weight"], w[p + "ln_1.bias"])
        q, k, v = (h @ w[p + "attn.in_proj_weight"].T + w[p + "attn.in_proj_bias"]).chunk(3, dim=-1)
        q, k, v = (t.reshape(1, n, heads, d // heads).transpose(1, 2) for t in (q, k, v))
        att = ((q @ k.transpose(-1, -2)) / math.sqrt(d // heads) + mask).softmax(-1)
        a = (att @ v).transpose(1, 2).reshape(1, n, d)
        x = x + a @ w[p + "attn.out_proj.weight"].T + w[p + "attn.out_proj.bias"]
        h = torch.nn.functional.layer_norm(x, (d,), w[p + "ln_2.weight"], w[p + "ln_2.bias"])
        h = torch.nn.functional.gelu(h @ w[p + "mlp.c_fc.weight"].T + w[p + "mlp.c_fc.bias"])
        x = x + h @ w[p + "mlp.c_proj.weight"].T + w[p + "mlp.c_proj.bias"]
        outs.append(x)
        i += 1
    return outs


def ln_final(ldm: dict, prefix: str, x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.layer_norm(
        x, (x.shape[-1],), ldm[prefix + "ln_final.weight"].float(), ldm[prefix + "ln_final.bias"].float()
    )


@torch.no_grad()
def check_open_clip_semantics(ldm_path: Path, refs: dict, sdxl: bool) -> dict:
    """SD2: ln_final(penultimate resblock output) must equal text.hidden.
    SDXL: clip_g's half of text.hidden = penultimate output (no ln_final); text.pooled =
    ln_final(last output) at argmax(ids) @ text_projection."""
    ldm = load_file(str(ldm_path))
    if not sdxl:
        prefix = "cond_stage_model.model."
        outs = open_clip_forward(ldm, prefix, refs["text.ids"], heads=2)
        return {"text.hidden": max_abs(ln_final(ldm, prefix, outs[-2]), refs["text.hidden"]), "resblocks": len(outs) - 1}
    prefix = "conditioner.embedders.1.model."
    ids = refs["text.ids_2"]
    outs = open_clip_forward(ldm, prefix, ids, heads=2)
    last = ln_final(ldm, prefix, outs[-1])
    pooled = last[torch.arange(1), ids.argmax(dim=-1)] @ ldm[prefix + "text_projection"].float()
    return {
        "text.hidden[..., 8:]": max_abs(outs[-2], refs["text.hidden"][..., 8:]),
        "text.pooled": max_abs(pooled, refs["text.pooled"]),
        "resblocks": len(outs) - 1,
    }


@torch.no_grad()
def cross_check_with_diffusers_euler(pipe, refs: dict, v_prediction: bool, sdxl: bool) -> dict:
    """Rerun txt2img with diffusers' own EulerDiscreteScheduler (linspace spacing gives the
    same 4 sigmas as k-diffusion's get_sigmas(4)) and compare with run.latent.

    An independent check of the reimplemented sampler math; differences come from
    diffusers feeding integer t (999, 666, 333) where k-diffusion feeds sigma_to_t(sigma)
    and from its float32 beta schedule.
    """
    from diffusers import EulerDiscreteScheduler

    old = pipe.scheduler
    pipe.scheduler = EulerDiscreteScheduler.from_config(
        old.config,
        timestep_spacing="linspace",
        use_karras_sigmas=False,
        interpolation_type="linear",
        prediction_type="v_prediction" if v_prediction else "epsilon",
    )
    kwargs = dict(
        prompt=PROMPT,
        negative_prompt=NEGATIVE_PROMPT,
        num_inference_steps=STEPS,
        guidance_scale=CFG_SCALE,
        height=64,
        width=64,
        latents=refs["run.init_noise"].clone(),
        output_type="latent",
    )
    if sdxl:
        kwargs.update(original_size=(64, 64), target_size=(64, 64), crops_coords_top_left=(0, 0))
    latent = pipe(**kwargs).images
    pipe.scheduler = old
    sigmas = EulerDiscreteScheduler.from_config(old.config, timestep_spacing="linspace")
    sigmas.set_timesteps(STEPS)
    scale = float(refs["run.latent"].abs().max())
    return {
        "diffusers_euler_vs_run.latent_max_abs": max_abs(latent, refs["run.latent"]),
        "run.latent_max_abs_value": scale,
        "diffusers_sigmas_vs_run.sigmas_max_abs": max_abs(sigmas.sigmas, refs["run.sigmas"]),
    }


def _check_pipe(pipe, refs: dict, sdxl: bool) -> dict:
    pipe.to(torch.float32)
    res = {}
    if sdxl:
        cond, _, pooled, _ = pipe.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True, negative_prompt=NEGATIVE_PROMPT)
        res["text.pooled"] = max_abs(pooled, refs["text.pooled"])
        added = {"text_embeds": refs["unet.text_embeds"], "time_ids": refs["unet.time_ids"]}
    else:
        cond, _ = pipe.encode_prompt(PROMPT, "cpu", 1, True, NEGATIVE_PROMPT)
        added = None
    res["text.hidden"] = max_abs(cond, refs["text.hidden"])
    out = pipe.unet(refs["unet.x"], refs["unet.t"], encoder_hidden_states=refs["unet.ctx"], added_cond_kwargs=added).sample
    res["unet.out"] = max_abs(out, refs["unet.out"])
    if "vae.latent" in refs:
        res["vae.decoded"] = max_abs(pipe.vae.decode(refs["vae.latent"]).sample, refs["vae.decoded"])
        res["vae.encoded_mean"] = max_abs(pipe.vae.encode(refs["vae.image"]).latent_dist.mean, refs["vae.encoded_mean"])
    return res


@torch.no_grad()
def verify_folder(folder: Path, cls, tokenizers: dict, refs: dict, sdxl: bool) -> dict:
    kwargs = dict(tokenizers)
    if not sdxl:
        kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = cls.from_pretrained(str(folder), torch_dtype=torch.float32, local_files_only=True, **kwargs)
    return {"diffusers_folder_vs_refs_max_abs": _check_pipe(pipe, refs, sdxl)}


@torch.no_grad()
def verify_sd_single_file(path: Path, folder: Path, tok, refs: dict, sd2: bool) -> dict:
    from diffusers import StableDiffusionPipeline

    note = None
    src = path
    if sd2:
        # diffusers' converter only skips resblocks.23 (the real SD2 depth); our extra layer is
        # resblocks.2, so hand it a copy without that layer (the rest of the file is as written).
        sd = load_file(str(path))
        drop = [k for k in sd if k.startswith("cond_stage_model.model.transformer.resblocks.2.")]
        for k in drop:
            sd.pop(k)
        tmp = Path(tempfile.mkdtemp()) / "sd2v-no-extra-layer.safetensors"
        save_file(sd, str(tmp))
        src = tmp
        note = f"verified with the {len(drop)} resblocks.2.* keys removed (diffusers skips only resblocks.23)"
    pipe = StableDiffusionPipeline.from_single_file(
        str(src),
        config=str(folder),
        local_files_only=True,
        torch_dtype=torch.float32,
        tokenizer=tok,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    res = {"from_single_file_vs_refs_max_abs": _check_pipe(pipe, refs, sdxl=False)}
    if note:
        res["note"] = note
    return res


@torch.no_grad()
def verify_sdxl_single_file(path: Path, folder: Path, toks: dict, refs: dict) -> dict:
    from diffusers import StableDiffusionXLPipeline

    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    # diffusers tells clip_l from clip_g by hidden size (768 vs 1280); here both are 8, so
    # its from_single_file would load clip_l into text_encoder_2. Convert clip_g with
    # diffusers' own OpenCLIP converter and hand that encoder in instead.
    checkpoint = load_file(str(path))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(str(folder / "text_encoder_2")))
    converted = convert_open_clip_checkpoint(te2, checkpoint, prefix="conditioner.embedders.1.model.")
    missing, unexpected = te2.load_state_dict({k: v.float() for k, v in converted.items()}, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise RuntimeError(f"clip_g conversion: missing {missing}, unexpected {unexpected}")
    pipe = StableDiffusionXLPipeline.from_single_file(
        str(path), config=str(folder), local_files_only=True, torch_dtype=torch.float32, text_encoder_2=te2.eval(), **toks
    )
    return {
        "from_single_file_vs_refs_max_abs": _check_pipe(pipe, refs, sdxl=True),
        "note": "text_encoder_2 converted with diffusers' convert_open_clip_checkpoint and passed in "
        "(from_single_file picks clip_l by hidden size, equal to clip_g's here)",
    }


# --------------------------------------------------------------------------- float64 report


@torch.no_grad()
def fp64_report(out: Path, tok_eos, tok_zero) -> dict:
    """Recompute the references in float64 from the stored weights and inputs: the gap to
    the float32 references is the rounding noise a correct float32 port should expect."""
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    f64 = torch.float64
    report = {}
    for family in ("sd1", "sd1-inpaint", "sd2v", "sdxl"):
        if not (out / "refs" / f"{family}.safetensors").exists():
            continue
        refs = load_file(str(out / "refs" / f"{family}.safetensors"))
        d = {k: v.to(f64) if v.is_floating_point() else v for k, v in refs.items()}
        sdxl = family == "sdxl"
        if sdxl:
            pipe = StableDiffusionXLPipeline.from_pretrained(
                str(out / family), torch_dtype=f64, local_files_only=True, tokenizer=tok_eos, tokenizer_2=tok_zero
            )
            cond, _, pooled, _ = pipe.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True, negative_prompt=NEGATIVE_PROMPT)
            added = {"text_embeds": d["unet.text_embeds"], "time_ids": d["unet.time_ids"]}
        else:
            cls = StableDiffusionInpaintPipeline if family == "sd1-inpaint" else StableDiffusionPipeline
            tok = tok_zero if family == "sd2v" else tok_eos
            pipe = cls.from_pretrained(
                str(out / family), torch_dtype=f64, local_files_only=True, tokenizer=tok,
                safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            )
            cond, _ = pipe.encode_prompt(PROMPT, "cpu", 1, True, NEGATIVE_PROMPT)
            added = None
        got = {"text.hidden": cond}
        if sdxl:
            got["text.pooled"] = pooled
        got["unet.out"] = pipe.unet(d["unet.x"], d["unet.t"], encoder_hidden_states=d["unet.ctx"], added_cond_kwargs=added).sample
        if "vae.latent" in d:
            got["vae.decoded"] = pipe.vae.decode(d["vae.latent"]).sample
            got["vae.encoded_mean"] = pipe.vae.encode(d["vae.image"]).latent_dist.mean
        if "run.latent" in d:
            den = Denoiser(pipe.unet, family == "sd2v")
            den.sigmas, den.log_sigmas = den.sigmas.to(f64), den.log_sigmas.to(f64)
            run_added = None
            if sdxl:
                run_added = {
                    "text_embeds": torch.cat([d["run.pooled_uncond"], d["run.pooled_cond"]]),
                    "time_ids": torch.cat([d["run.time_ids"], d["run.time_ids"]]),
                }
            model = cfg_model(den, d["run.uncond"], d["run.cond"], CFG_SCALE, run_added)
            sigmas = d["run.sigmas"]
            got["run.latent"] = sample_euler(model, d["run.init_noise"] * sigmas[0], sigmas)
            got["run.image"] = pipe.vae.decode(got["run.latent"] / pipe.vae.config.scaling_factor).sample
            if "img2img.latent" in d:
                sig = d["img2img.sigmas"]
                got["img2img.latent"] = sample_euler(model, d["img2img.init_latent"] + d["img2img.noise"] * sig[0], sig)
        report[family] = {
            k: {"max_abs": max_abs(v, refs[k]), "max_abs_ref": float(refs[k].abs().max())} for k, v in got.items()
        }
    return report


# --------------------------------------------------------------------------- inpainting img2img


class WithImageCond:
    """A 9-channel UNet seen as a 4-channel one: the image conditioning (mask, masked-image
    latent) concatenated to its input, as diffusers' inpainting pipeline does every step."""

    def __init__(self, unet, cond):
        self.unet = unet
        self.cond = cond

    def __call__(self, x_in, t, **kwargs):
        cond = self.cond.expand(x_in.shape[0], -1, -1, -1)
        return self.unet(torch.cat([x_in, cond], dim=1), t, **kwargs)


@torch.no_grad()
def inpaint_img2img_refs(out: Path) -> None:
    """img2img on sd1-inpaint without a mask, as A1111 runs it: the whole image "to be
    painted". The conditioning is diffusers' (StableDiffusionInpaintPipeline's image and mask
    processors and prepare_mask_latents) under an all-white mask; the masked image latent is
    the encoder's mean (diffusers samples it with a generator; sdkube, like its img2img init
    latent, takes the mean). Text conditioning, init image and sampler follow the sd1 refs
    (sd1-inpaint shares sd1's text encoder and VAE)."""
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint as inpaint_mod
    from diffusers import AutoencoderKL, StableDiffusionInpaintPipeline, UNet2DConditionModel

    sd1 = load_file(str(out / "refs" / "sd1.safetensors"))
    folder = out / "sd1-inpaint"
    unet = UNet2DConditionModel.from_pretrained(str(folder / "unet"), torch_dtype=torch.float32)
    vae = AutoencoderKL.from_pretrained(str(folder / "vae"), torch_dtype=torch.float32)
    pipe = StableDiffusionInpaintPipeline(
        vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=None,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    real = inpaint_mod.retrieve_latents
    inpaint_mod.retrieve_latents = lambda enc, generator=None, sample_mode="sample": real(enc, generator, "argmax")
    try:
        image = sd1["vae.image"]  # [1, 3, 64, 64] in [-1, 1]
        white = torch.ones(1, 1, 64, 64)
        mask = pipe.mask_processor.preprocess(white, height=64, width=64)
        masked_image = image * (mask < 0.5)
        mask_lat, masked_lat = pipe.prepare_mask_latents(
            mask, masked_image, 1, 64, 64, torch.float32, torch.device("cpu"), None, False
        )
    finally:
        inpaint_mod.retrieve_latents = real
    image_cond = torch.cat([mask_lat, masked_lat], dim=1)
    sf = vae.config.scaling_factor
    init_latent = vae.encode(image).latent_dist.mean * sf
    den = Denoiser(WithImageCond(unet, image_cond), False)
    model = cfg_model(den, sd1["run.uncond"], sd1["run.cond"], CFG_SCALE)
    t_enc = int(IMG2IMG_STRENGTH * STEPS)
    sigmas = den.get_sigmas(STEPS)[STEPS - t_enc - 1 :]
    noise = randn(torch.Generator().manual_seed(4242), 1, 4, 8, 8)
    latent = sample_euler(model, init_latent + noise * sigmas[0], sigmas)
    refs = {
        "image_cond": image_cond,
        "init_latent": init_latent,
        "noise": noise,
        "sigmas": sigmas,
        "latent": latent,
        "image": vae.decode(latent / sf).sample,
    }
    meta = {
        "what": inpaint_img2img_refs.__doc__,
        "init_image": "refs/sd1.safetensors vae.image",
        "text": "refs/sd1.safetensors run.cond / run.uncond",
        "strength": IMG2IMG_STRENGTH,
        "steps": STEPS,
        "cfg_scale": CFG_SCALE,
        "sigmas": "as sd1's img2img refs",
    }
    write_refs(out, "sd1-inpaint-img2img", refs, meta)
    print(f"wrote refs/sd1-inpaint-img2img: {list(refs)}")


# --------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "fixtures" / "sd"))
    ap.add_argument("--only", default=",".join(FAMILIES), help=f"comma list of {FAMILIES}")
    ap.add_argument(
        "--fp64-report",
        action="store_true",
        help="write nothing; recompute the stored references in float64 and print the differences",
    )
    ap.add_argument("--inpaint-img2img", action="store_true", help="write refs/sd1-inpaint-img2img only")
    args = ap.parse_args()
    if args.inpaint_img2img:
        torch.set_num_threads(1)
        inpaint_img2img_refs(Path(args.out))
        return 0
    only = [f for f in args.only.split(",") if f]
    unknown = [f for f in only if f not in FAMILIES]
    if unknown:
        print(f"error: unknown family {unknown}; expected some of {FAMILIES}", file=sys.stderr)
        return 2
    if "vae-sd1-alt" in only and "sd1" not in only and not (Path(args.out) / "sd1" / "vae").exists():
        print("error: vae-sd1-alt needs the sd1 folder (its vae config)", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tok_eos, tok_zero = build_tokenizers(Path(tmp))
        if args.fp64_report:
            print(json.dumps(fp64_report(out, tok_eos, tok_zero), indent=1))
            return 0
        ctx = Ctx(out, tok_eos, tok_zero)
        for family in FAMILIES:
            if family not in only:
                continue
            print(f"== {family}", flush=True)
            if family == "sdxl":
                family_sdxl(ctx)
            elif family == "vae-sd1-alt":
                family_alt_vae(ctx)
            else:
                family_sd(ctx, family)
            print(json.dumps(ctx.report.get(family, {}), indent=1), flush=True)
    worst = 0.0
    worst_cross = 0.0
    for rep in ctx.report.values():
        for key, val in rep.items():
            if key.endswith("_vs_refs_max_abs"):
                worst = max([worst] + [v for v in val.values() if isinstance(v, float)])
            elif key == "run_cross_check":
                rel = val["diffusers_euler_vs_run.latent_max_abs"] / max(val["run.latent_max_abs_value"], 1.0)
                worst_cross = max(worst_cross, rel)
    print(f"worst reload max abs error: {worst:g}; worst sampler cross-check relative error: {worst_cross:g}")
    if worst > 1e-5 or worst_cross > 1e-4:
        print("error: a reloaded model or the diffusers sampler does not reproduce the references", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
