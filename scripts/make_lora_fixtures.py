#!/usr/bin/env python3
"""LoRA fixtures for `crates/models/tests/lora.rs` and `crates/pipeline/tests/lora.rs`.

Writes, under fixtures/lora/ (tens of KB), random LoRAs for the tiny fixture models
(fixtures/sd/sd1, fixtures/sd/sdxl) in the layouts sdkube reads, and references computed
by diffusers' own loader:

  sd1/kohya-sd1.safetensors    kohya/A1111: lora_te_* + lora_unet_* (diffusers module names
                               with `_`), `alpha` per module, a 1x1-conv proj_in and a 3x3
                               resnet conv (LoCon); `__metadata__` with ss_output_name
  sd1/peft-sd1.safetensors     diffusers/PEFT as `save_lora_weights` writes it:
                               unet.…lora_A/lora_B, text_encoder.…, lora_alpha != r kept in
                               the `lora_adapter_metadata` header entry
  sd1/loha-sd1.safetensors     LyCORIS LoHa (hada_w1_a … hada_w2_b, alpha)
  sd1/lokr-sd1.safetensors     LyCORIS LoKr (lokr_w1 full, lokr_w2_a/_b, alpha)
  sdxl/kohya-sdxl.safetensors  kohya SDXL: lora_te1_*, lora_te2_*, lora_unet_* with the
                               original SGM block names (input_blocks_4_1_…), LoCon conv
  sdxl/peft-sdxl.safetensors   diffusers/PEFT: unet., text_encoder., text_encoder_2.
  bad/unknown-key.safetensors  a kohya LoRA with a module no model has
  refs.safetensors             reference outputs (float32)
  refs.json                    prompts, weights and versions

References (CPU, float32; the fp16 fixture weights upcast):
  {sd1,sdxl}.<case>.hidden     pipeline.encode_prompt(PROMPT) (SDXL: + .pooled)
  {sd1,sdxl}.<case>.unet       unet(unet.x, unet.t, unet.ctx[, added]) output
with <case>: base (no LoRA); kohya (load_lora_weights, weight 1); peft (weight 0.7 via
set_adapters(adapter_weights=…)); both (kohya 0.8 + peft 0.5 at once).
diffusers does not load LyCORIS LoHa/LoKr files: for those the script merges
W + w * alpha/dim * ΔW into a copy of the weights itself (LoHa ΔW = (w1a@w1b)*(w2a@w2b),
LoKr ΔW = kron(w1, w2a@w2b)) and runs the same forward passes: sd1.loha.* at weight 1,
sd1.lokr.* at weight 0.6.

Generation-only dependencies: torch, diffusers, transformers, peft, safetensors.
Run from the repository root: python3 scripts/make_lora_fixtures.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import make_sd_fixtures  # noqa: E402

# The merge list the Rust tokenizer embeds is the BPE file's header + merges.
make_sd_fixtures.find_bpe_vocab = lambda: ROOT / "fixtures" / "tokenizer" / "clip_bpe_merges.txt"

OUT = ROOT / "fixtures" / "lora"
SD = ROOT / "fixtures" / "sd"
PROMPT = "a photo of an astronaut riding a horse"
SDXL_TIME_IDS = [[8.0, 8.0, 0.0, 0.0, 8.0, 8.0]]
W_PEFT = 0.7
W_BOTH = (0.8, 0.5)
W_LOKR = 0.6

SD1_TE = [
    "text_model.encoder.layers.0.self_attn.q_proj",
    "text_model.encoder.layers.1.self_attn.v_proj",
    "text_model.encoder.layers.1.mlp.fc1",
]
SD1_UNET = [
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0",
    "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj",
    "down_blocks.0.attentions.0.proj_in",
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_v",
    "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_v",
    "down_blocks.0.resnets.0.conv1",
]
SDXL_TE = ["text_model.encoder.layers.0.self_attn.k_proj", "text_model.encoder.layers.1.mlp.fc2"]
SDXL_UNET = [
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.2.attentions.1.transformer_blocks.1.attn2.to_k",
    "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0",
    "up_blocks.0.attentions.1.transformer_blocks.0.ff.net.2",
    "up_blocks.1.attentions.2.proj_out",
    "down_blocks.1.resnets.0.conv1",
]
PEFT_UNET = ["to_q", "to_k", "to_v", "to_out.0"]
PEFT_TE = ["q_proj", "v_proj"]


def sgm_name(path: str, lpb: int, up_attn: list[bool]) -> str:
    """diffusers UNet module path -> original SGM/LDM path (as kohya names SDXL modules)."""
    parts = path.split(".")
    resnet = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
              "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}

    def res(rest):
        return ".".join([resnet.get(rest[0], rest[0])] + rest[1:])

    if parts[0] == "down_blocks":
        level, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        n = 1 + level * (lpb + 1) + j
        if kind == "resnets":
            return f"input_blocks.{n}.0.{res(rest)}"
        if kind == "attentions":
            return f"input_blocks.{n}.1." + ".".join(rest)
    if parts[0] == "mid_block":
        kind, j, rest = parts[1], int(parts[2]), parts[3:]
        if kind == "attentions":
            return "middle_block.1." + ".".join(rest)
        return f"middle_block.{2 * j}.{res(rest)}"
    if parts[0] == "up_blocks":
        level, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        n = level * (lpb + 1) + j
        if kind == "resnets":
            return f"output_blocks.{n}.0.{res(rest)}"
        if kind == "attentions":
            return f"output_blocks.{n}.1." + ".".join(rest)
    raise ValueError(path)


def module_key(path: str) -> str:
    """transformers 5 dropped CLIPTextModel's `text_model.` level; kohya names keep it."""
    return path.removeprefix("text_model.")


def factor(gen, *shape, std=0.4):
    return (torch.randn(*shape, generator=gen) * std).float()


def kohya_module(gen, prefix, weight, rank, alpha):
    """lora_down/lora_up/alpha for one module whose weight is `weight`."""
    out, rest = weight.shape[0], list(weight.shape[1:])
    if weight.dim() == 4:
        down = factor(gen, rank, *rest)
        up = factor(gen, out, rank, 1, 1)
    else:
        down = factor(gen, rank, rest[0])
        up = factor(gen, out, rank)
    return {
        f"{prefix}.lora_down.weight": down,
        f"{prefix}.lora_up.weight": up,
        f"{prefix}.alpha": torch.tensor(float(alpha)),
    }


def kohya_file(gen, parts, rank=2, alpha=1.0):
    """parts: [(kohya prefix, module state dict, module paths, name mapper)].
    Returns the file's tensors and [(prefix, module path, tensors)]."""
    sd, modules = {}, []
    for prefix, state, paths, name in parts:
        for p in paths:
            key = f"{prefix}_{name(p).replace('.', '_')}"
            weight = state.get(p + ".weight", state.get(module_key(p) + ".weight"))
            mod = kohya_module(gen, key, weight, rank, alpha)
            sd.update(mod)
            modules.append((prefix, p, {k.split(".", 1)[1]: v for k, v in mod.items()}))
    return sd, modules


def merge_kohya_text(pipe, modules, weight):
    """W += w·alpha/rank·up@down on the text encoders (diffusers 0.42 with transformers 5
    drops kohya text-encoder attention LoRAs: its load report lists them as UNEXPECTED)."""
    nets = {"lora_te": pipe.text_encoder, "lora_te1": pipe.text_encoder,
            "lora_te2": getattr(pipe, "text_encoder_2", None)}
    with torch.no_grad():
        for prefix, path, mod in modules:
            if prefix == "lora_unet":
                continue
            net = nets[prefix]
            try:
                w = net.get_submodule(path).weight
            except AttributeError:
                w = net.get_submodule(module_key(path)).weight
            down, up = mod["lora_down.weight"], mod["lora_up.weight"]
            delta = (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
            w += weight * float(mod["alpha"]) / down.shape[0] * delta


def add_peft(module, targets, rank, alpha, gen):
    """Random PEFT LoRA layers in `module`; returns (adapter config, state dict as saved)."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
    inject_adapter_in_model(config, module, adapter_name="default")
    state = {}
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_" in name:
                p.copy_(factor(gen, *p.shape))
                state[name.replace(".default.", ".")] = p.detach().clone()
    return config.to_dict(), state


def peft_file(pipe_cls, path, sdxl, gen, out_file):
    pipe = load_pipe(pipe_cls, path, sdxl)
    kwargs = {}
    parts = [("unet", pipe.unet, PEFT_UNET, 4), ("text_encoder", pipe.text_encoder, PEFT_TE, 3)]
    if sdxl:
        parts.append(("text_encoder_2", pipe.text_encoder_2, PEFT_TE, 2))
    for name, module, targets, alpha in parts:
        config, state = add_peft(module, targets, 2, alpha, gen)
        kwargs[f"{name}_lora_adapter_metadata"] = config
        kwargs[f"{name}_lora_layers"] = state
    with tempfile.TemporaryDirectory() as tmp:
        pipe_cls.save_lora_weights(tmp, weight_name="l.safetensors", **kwargs)
        out_file.write_bytes((Path(tmp) / "l.safetensors").read_bytes())


TOKENIZERS = {}


def load_pipe(pipe_cls, path, sdxl):
    tok_eos, tok_zero = TOKENIZERS["eos"], TOKENIZERS["zero"]
    if sdxl:
        return pipe_cls.from_pretrained(str(path), torch_dtype=torch.float32, local_files_only=True,
                                        tokenizer=tok_eos, tokenizer_2=tok_zero)
    return pipe_cls.from_pretrained(str(path), torch_dtype=torch.float32, local_files_only=True,
                                    tokenizer=tok_eos, safety_checker=None, feature_extractor=None,
                                    requires_safety_checker=False)


@torch.no_grad()
def outputs(pipe, sdxl, inputs):
    if sdxl:
        hidden, _, pooled, _ = pipe.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        added = {"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]}
    else:
        hidden, _ = pipe.encode_prompt(PROMPT, "cpu", 1, False)
        pooled, added = None, None
    unet = pipe.unet(inputs["x"], inputs["t"], encoder_hidden_states=inputs["ctx"], added_cond_kwargs=added).sample
    out = {"hidden": hidden.contiguous(), "unet": unet.contiguous()}
    if pooled is not None:
        out["pooled"] = pooled.contiguous()
    return out


def lycoris_delta(kind, mod, shape):
    """ΔW·alpha/dim of one LoHa or LoKr module, as LyCORIS and A1111 compute it."""
    if kind == "loha":
        dim = mod["hada_w1_b"].shape[0]
        d = (mod["hada_w1_a"] @ mod["hada_w1_b"]) * (mod["hada_w2_a"] @ mod["hada_w2_b"])
    else:
        dim = mod["lokr_w2_b"].shape[0]
        d = torch.kron(mod["lokr_w1"], mod["lokr_w2_a"] @ mod["lokr_w2_b"])
    return d.reshape(shape) * (float(mod["alpha"]) / dim)


def lycoris_file(gen, kind, te_state, unet_state):
    """A LoHa or LoKr file for sd1's linear layers (text encoder and UNet) and its modules."""
    sd, modules = {}, []
    targets = [("lora_te", "te", te_state, SD1_TE[:2]), ("lora_unet", "unet", unet_state, SD1_UNET[:3])]
    for prefix, part, state, paths in targets:
        for p in paths:
            shape = state[module_key(p) + ".weight"].shape
            out, inp = shape[0], shape[1]
            key = f"{prefix}_{p.replace('.', '_')}"
            if kind == "loha":
                mod = {"hada_w1_a": factor(gen, out, 2), "hada_w1_b": factor(gen, 2, inp),
                       "hada_w2_a": factor(gen, out, 2), "hada_w2_b": factor(gen, 2, inp),
                       "alpha": torch.tensor(1.0)}
            else:
                mod = {"lokr_w1": factor(gen, 2, 2), "lokr_w2_a": factor(gen, out // 2, 2),
                       "lokr_w2_b": factor(gen, 2, inp // 2), "alpha": torch.tensor(4.0)}
            sd.update({f"{key}.{k}": v for k, v in mod.items()})
            modules.append((part, p, mod, shape))
    return sd, modules


def merged_outputs(pipe_cls, kind, modules, weight, inputs):
    pipe = load_pipe(pipe_cls, SD / "sd1", False)
    with torch.no_grad():
        for part, path, mod, shape in modules:
            net = pipe.text_encoder if part == "te" else pipe.unet
            w = net.get_submodule(module_key(path)).weight
            w += weight * lycoris_delta(kind, mod, shape)
    return outputs(pipe, False, inputs)


def main() -> None:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    for sub in ("sd1", "sdxl", "bad"):
        (OUT / sub).mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(17)
    refs = {}
    with tempfile.TemporaryDirectory() as tmp:
        TOKENIZERS["eos"], TOKENIZERS["zero"] = make_sd_fixtures.build_tokenizers(Path(tmp))

        for fam, cls, sdxl in (("sd1", StableDiffusionPipeline, False), ("sdxl", StableDiffusionXLPipeline, True)):
            base = load_pipe(cls, SD / fam, sdxl)
            unet_state = {k: v.float() for k, v in base.unet.state_dict().items()}
            te_state = {k: v.float() for k, v in base.text_encoder.state_dict().items()}
            cfg = base.unet.config
            inputs = {
                "x": factor(gen, 1, cfg.in_channels, 8, 8, std=1.0),
                "t": torch.tensor([500.0]),
                "ctx": factor(gen, 1, 77, cfg.cross_attention_dim, std=1.0),
            }
            if sdxl:
                inputs["text_embeds"] = factor(gen, 1, 8, std=1.0)
                inputs["time_ids"] = torch.tensor(SDXL_TIME_IDS)
                te2_state = {k: v.float() for k, v in base.text_encoder_2.state_dict().items()}
                up_attn = ["CrossAttn" in t for t in cfg.up_block_types]
                lpb = cfg.layers_per_block
                kohya, kohya_modules = kohya_file(gen, [
                    ("lora_te1", te_state, SDXL_TE, lambda p: p),
                    ("lora_te2", te2_state, SDXL_TE, lambda p: p),
                    ("lora_unet", unet_state, SDXL_UNET, lambda p: sgm_name(p, lpb, up_attn)),
                ], rank=2, alpha=1.0)
            else:
                kohya, kohya_modules = kohya_file(gen, [
                    ("lora_te", te_state, SD1_TE, lambda p: p),
                    ("lora_unet", unet_state, SD1_UNET, lambda p: p),
                ], rank=2, alpha=1.0)
            kohya_path = OUT / fam / f"kohya-{fam}.safetensors"
            save_file(kohya, str(kohya_path), metadata={
                "ss_output_name": f"kohya-{fam}-alias", "ss_network_dim": "2", "ss_network_alpha": "1.0",
                "ss_base_model_version": "sdxl_base_v1-0" if sdxl else "sd_v1",
            })
            peft_path = OUT / fam / f"peft-{fam}.safetensors"
            peft_file(cls, SD / fam, sdxl, gen, peft_path)
            for k, v in inputs.items():
                refs[f"{fam}.unet.{k}"] = v
            for k, v in outputs(base, sdxl, inputs).items():
                refs[f"{fam}.base.{k}"] = v

            # UNet references: diffusers' loader for both layouts and the weighted mix.
            pipe = load_pipe(cls, SD / fam, sdxl)
            pipe.load_lora_weights(str(kohya_path), adapter_name="kohya")
            refs[f"{fam}.kohya.unet"] = outputs(pipe, sdxl, inputs)["unet"]
            pipe.load_lora_weights(str(peft_path), adapter_name="peft")
            pipe.set_adapters(["peft"], adapter_weights=[W_PEFT])
            for k, v in outputs(pipe, sdxl, inputs).items():
                refs[f"{fam}.peft.{k}"] = v
            pipe.set_adapters(["kohya", "peft"], adapter_weights=list(W_BOTH))
            refs[f"{fam}.both.unet"] = outputs(pipe, sdxl, inputs)["unet"]
            # Text references with the kohya file: its deltas merged here (see merge_kohya_text).
            pipe = load_pipe(cls, SD / fam, sdxl)
            merge_kohya_text(pipe, kohya_modules, 1.0)
            for k, v in outputs(pipe, sdxl, inputs).items():
                if k != "unet":
                    refs[f"{fam}.kohya.{k}"] = v
            pipe = load_pipe(cls, SD / fam, sdxl)
            pipe.load_lora_weights(str(peft_path), adapter_name="peft")
            pipe.set_adapters(["peft"], adapter_weights=[W_BOTH[1]])
            merge_kohya_text(pipe, kohya_modules, W_BOTH[0])
            for k, v in outputs(pipe, sdxl, inputs).items():
                if k != "unet":
                    refs[f"{fam}.both.{k}"] = v

            if not sdxl:
                for kind, weight in (("loha", 1.0), ("lokr", W_LOKR)):
                    sd, modules = lycoris_file(gen, kind, te_state, unet_state)
                    save_file(sd, str(OUT / "sd1" / f"{kind}-sd1.safetensors"))
                    inputs_sd1 = {k: refs[f"sd1.unet.{k}"] for k in ("x", "t", "ctx")}
                    for k, v in merged_outputs(cls, kind, modules, weight, inputs_sd1).items():
                        refs[f"sd1.{kind}.{k}"] = v

    bad = {"lora_unet_not_a_layer.lora_down.weight": factor(gen, 2, 8),
           "lora_unet_not_a_layer.lora_up.weight": factor(gen, 8, 2)}
    bad.update(kohya_module(gen, "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
                            torch.zeros(8, 8), 2, 1.0))
    save_file(bad, str(OUT / "bad" / "unknown-key.safetensors"))
    save_file({k: v.contiguous() for k, v in refs.items()}, str(OUT / "refs.safetensors"))

    import diffusers
    import peft
    import transformers

    (OUT / "refs.json").write_text(json.dumps({
        "prompt": PROMPT,
        "weights": {"kohya": 1.0, "peft": W_PEFT, "both": {"kohya": W_BOTH[0], "peft": W_BOTH[1]},
                    "loha": 1.0, "lokr": W_LOKR},
        "diffusers": diffusers.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__, "torch": torch.__version__,
        "note": "kohya text-encoder references merge the deltas in the script: diffusers "
                "0.42 with transformers 5 drops kohya text-encoder attention LoRAs "
                "(UNEXPECTED to_q_lora keys in its load report); UNet references and every "
                "PEFT reference come from load_lora_weights/set_adapters",
    }, indent=2) + "\n")
    print("wrote", OUT)


if __name__ == "__main__":
    main()
