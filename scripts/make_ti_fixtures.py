#!/usr/bin/env python3
"""Textual-inversion fixtures for `crates/pipeline/tests/embeddings.rs`.

Writes, under fixtures/ti/ (a few KB), one random 2-vector embedding for the tiny SD1
fixture model (fixtures/sd/sd1, text width 8) in every layout sdkube reads, an SDXL pair
for fixtures/sd/sdxl, some bad files, and the reference conditioning computed by
diffusers' own `load_textual_inversion` + `encode_prompt`:

  sd1/tiembed.safetensors          A1111 .safetensors  {"emb_params": [2, 8]}
  formats/ti-pt.pt                 A1111 .pt  {"string_to_param": {"*": Parameter}, name, step, ...}
  formats/ti-diffusers.bin         diffusers learned_embeds.bin  {"<ti-diffusers>": [2, 8]}
  formats/ti-diffusers.safetensors diffusers learned_embeds.safetensors
  formats/ti-single.bin            diffusers single vector  {"<ti-single>": [8]}  (= row 0)
  sdxl/tixl.safetensors            SDXL pair  {"clip_l": [2, 8], "clip_g": [2, 8]}
  bad/evil.pt                      a pickle naming `fractions.Fraction` (not tensor data)
  bad/two-tensors.safetensors      two unrelated tensors: no embedding
  bad/wide.safetensors             [1, 12]: the wrong width for the 8-wide fixture model
  refs.safetensors                 vectors + reference text-encoder outputs (float32)
  refs.json                        prompts and notes

References (diffusers 0.42, transformers 5.24, CPU, float32):
  sd1.hidden           StableDiffusionPipeline.encode_prompt(PROMPT) after
                       load_textual_inversion(sd1/tiembed.safetensors, token="tiembed")
  sd1.hidden_weighted  PROMPT_WEIGHTED "(tiembed:1.3)": diffusers does not parse A1111
                       emphasis, so this is sd1.hidden with A1111's "Original" emphasis
                       applied here (x1.3 on the two vector positions, then the chunk's
                       mean restored), as modules/sd_hijack_clip.py does
  sdxl.hidden, sdxl.pooled
                       StableDiffusionXLPipeline.encode_prompt(PROMPT_XL) after loading
                       clip_l into text_encoder/tokenizer and clip_g into
                       text_encoder_2/tokenizer_2 (diffusers' documented SDXL recipe)

Generation-only dependencies: torch, diffusers, transformers, safetensors (not needed by
the Rust tests). Run from the repository root: python3 scripts/make_ti_fixtures.py
"""

from __future__ import annotations

import fractions
import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from make_sd_fixtures import build_tokenizers  # noqa: E402

OUT = ROOT / "fixtures" / "ti"
SD = ROOT / "fixtures" / "sd"
PROMPT = "a photo of tiembed riding a horse"
PROMPT_WEIGHTED = "a photo of (tiembed:1.3) riding a horse"
PROMPT_XL = "a photo of tixl riding a horse"
WEIGHT = 1.3


def main() -> None:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    torch.manual_seed(6)
    vectors = (torch.randn(2, 8) * 0.5).float()
    xl_l = (torch.randn(2, 8) * 0.5).float()
    xl_g = (torch.randn(2, 8) * 0.5).float()
    for sub in ("sd1", "formats", "sdxl", "bad"):
        (OUT / sub).mkdir(parents=True, exist_ok=True)

    save_file({"emb_params": vectors}, str(OUT / "sd1" / "tiembed.safetensors"))
    torch.save(
        {
            "string_to_token": {"*": 265},
            "string_to_param": {"*": torch.nn.Parameter(vectors.clone())},
            "name": "ti-pt",
            "step": 0,
            "sd_checkpoint": None,
            "sd_checkpoint_name": None,
        },
        OUT / "formats" / "ti-pt.pt",
    )
    torch.save({"<ti-diffusers>": vectors.clone()}, OUT / "formats" / "ti-diffusers.bin")
    save_file({"<ti-diffusers>": vectors.clone()}, str(OUT / "formats" / "ti-diffusers.safetensors"))
    torch.save({"<ti-single>": vectors[0].clone()}, OUT / "formats" / "ti-single.bin")
    save_file({"clip_l": xl_l, "clip_g": xl_g}, str(OUT / "sdxl" / "tixl.safetensors"))
    torch.save({"string_to_param": {"*": vectors.clone()}, "evil": fractions.Fraction(1, 3)}, OUT / "bad" / "evil.pt")
    save_file({"a": torch.zeros(2, 8), "b": torch.zeros(3)}, str(OUT / "bad" / "two-tensors.safetensors"))
    save_file({"emb_params": torch.randn(1, 12)}, str(OUT / "bad" / "wide.safetensors"))

    with tempfile.TemporaryDirectory() as tmp:
        tok_eos, tok_zero = build_tokenizers(Path(tmp))

        pipe = StableDiffusionPipeline.from_pretrained(
            str(SD / "sd1"), torch_dtype=torch.float32, local_files_only=True, tokenizer=tok_eos,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipe.load_textual_inversion(str(OUT / "sd1" / "tiembed.safetensors"), token="tiembed")
        with torch.no_grad():
            hidden, _ = pipe.encode_prompt(PROMPT, "cpu", 1, False)
        ids = pipe.tokenizer(pipe.maybe_convert_prompt(PROMPT, pipe.tokenizer)).input_ids
        new_ids = [i for i in ids if i >= 49408]
        assert len(new_ids) == 2, ids
        positions = [ids.index(i) for i in new_ids]
        multipliers = torch.ones(1, 77, 1)
        multipliers[0, positions, 0] = WEIGHT
        original_mean = hidden.mean()
        weighted = hidden * multipliers
        weighted = weighted * (original_mean / weighted.mean())

        xl = StableDiffusionXLPipeline.from_pretrained(
            str(SD / "sdxl"), torch_dtype=torch.float32, local_files_only=True, tokenizer=tok_eos, tokenizer_2=tok_zero
        )
        xl.load_textual_inversion({"tixl": xl_l}, token="tixl", text_encoder=xl.text_encoder, tokenizer=xl.tokenizer)
        xl.load_textual_inversion({"tixl": xl_g}, token="tixl", text_encoder=xl.text_encoder_2, tokenizer=xl.tokenizer_2)
        with torch.no_grad():
            xl_hidden, _, xl_pooled, _ = xl.encode_prompt(PROMPT_XL, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)

    save_file(
        {
            "vectors": vectors,
            "sdxl.clip_l": xl_l,
            "sdxl.clip_g": xl_g,
            "sd1.hidden": hidden.contiguous(),
            "sd1.hidden_weighted": weighted.contiguous(),
            "sdxl.hidden": xl_hidden.contiguous(),
            "sdxl.pooled": xl_pooled.contiguous(),
        },
        str(OUT / "refs.safetensors"),
    )
    import diffusers
    import transformers

    (OUT / "refs.json").write_text(
        json.dumps(
            {
                "prompt": PROMPT,
                "prompt_weighted": PROMPT_WEIGHTED,
                "prompt_xl": PROMPT_XL,
                "weight": WEIGHT,
                "vector_positions": positions,
                "diffusers": diffusers.__version__,
                "transformers": transformers.__version__,
                "torch": torch.__version__,
            },
            indent=2,
        )
        + "\n"
    )
    print("wrote", OUT)


if __name__ == "__main__":
    main()
