#!/usr/bin/env python3
"""Reference token ids for `crates/pipeline/tests/tokenizer.rs`.

Builds transformers' `CLIPTokenizer` from the committed OpenAI CLIP BPE merge list
(`fixtures/tokenizer/clip_bpe_merges.txt`, the first 48,894 merges of
`bpe_simple_vocab_16e6.txt`, exactly the ones CLIP uses) the way the Hugging Face
`openai/clip-vit-large-patch14` vocab.json/merges.txt were derived from it:

  ids 0..255    the 256 byte symbols in GPT-2 `bytes_to_unicode` order,
  ids 256..511  the same symbols with the end-of-word suffix `</w>`,
  ids 512..     one token per merge, in merge order,
  49406, 49407  `<|startoftext|>`, `<|endoftext|>`.

and writes `fixtures/tokenizer/tokens.json`: a corpus of tricky prompts and their ids
with `add_special_tokens=False`.

Generation-only dependency: `transformers` (with `tokenizers`).
Run from the repository root: `python3 scripts/make_tokenizer_fixtures.py`.
"""

import json
import random
from pathlib import Path

import transformers
from transformers import CLIPTokenizer

ROOT = Path(__file__).resolve().parent.parent
MERGES = ROOT / "fixtures" / "tokenizer" / "clip_bpe_merges.txt"
OUT = ROOT / "fixtures" / "tokenizer" / "tokens.json"


def bytes_to_unicode():
    """GPT-2's reversible byte -> printable character table (same order as CLIP)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def build_tokenizer():
    lines = MERGES.read_text(encoding="utf-8").split("\n")
    assert "#version" in lines[0], lines[0]  # the original file starts "bpe_simple_vocab_16e6.txt#version: 0.2"
    merges = [tuple(line.split()) for line in lines[1:] if line]
    assert len(merges) == 49152 - 256 - 2, len(merges)
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    encoder = {tok: i for i, tok in enumerate(vocab)}
    assert len(encoder) == 49408
    tok = CLIPTokenizer(vocab=encoder, merges=merges)
    assert tok.bos_token_id == 49406 and tok.eos_token_id == 49407
    return tok


def corpus():
    prompts = [
        "",
        " ",
        "a photo of a cat",
        "A Photo Of A CAT",
        "masterpiece, best quality, 1girl, solo, looking at viewer",
        "hello world!!!",
        "it's John's car, isn't it? they're here, we've gone, I'm ok, you'll see, he'd go",
        "IT'S THEY'RE WE'VE I'M YOU'LL HE'D DON'T",
        "rock'n'roll o'clock ''quoted'' 's 't",
        "it’s a curly apostrophe",
        "café naïve résumé Ångström Straße ΟΔΟΣ Σίσυφος",
        "cafe\u0301 (decomposed e + acute accent)",
        "İstanbul ǅ ﬁ ligature",
        "東京タワー、夜景、高画質",
        "中文提示词：一只猫坐在窗台上",
        "한국어 프롬프트 고양이",
        "Москва зимой, снег",
        "مرحبا بالعالم",
        "नमस्ते दुनिया",
        "emoji 😀🐱‍👤 👩🏽‍🚀 ❤️ 🇯🇵 and ✨sparkles✨",
        "numbers 1234567890 3.14159 1,000,000 1e-5 ½ ² ٣",
        "punctuation runs ...!!!??? --- *** ### @@@ $$$ %%% ^^^ &&& ~~~",
        "<lora:detail:0.8> <hypernet:x:1>",
        "html &amp; &lt;tag&gt; &quot;quoted&quot; &#39;",
        "multiple   spaces\tand\ttabs\nand\n\nnewlines\r\nand\u00a0nbsp\u3000ideographic\u2009thin",
        "zero\u200bwidth\u200cjoiner\u200dspace\ufeffbom",
        "   leading and trailing   ",
        "supercalifragilisticexpialidocious " * 3,
        "pneumonoultramicroscopicsilicovolcanoconiosis" * 4,
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        "(word:1.3) [word] (word) ((double)) [[down]] \\(escaped\\) (a:0.5), (b:1.2)",
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        "one BREAK two",
        "<|startoftext|>a<|endoftext|>",
        "x <|endoftext|> y <|ENDOFTEXT|> z",
        "tabs\tinside\twords_with_underscores and-hyphens and/slashes",
        "control\x00chars\x07here\x1bend",
        "\u0301 leading combining mark",
        "mixed123abc456 a1b2c3 v2.0 4k 8k uhd",
        "𝕸𝖆𝖙𝖍 𝓼𝓬𝓻𝓲𝓹𝓽 ＦＵＬＬＷＩＤＴＨ",
        "quotes \"double\" 'single' `back`",
    ]
    words = (
        "masterpiece best quality ultra detailed photorealistic portrait of a woman "
        "wearing a red dress standing in a field of sunflowers at golden hour "
        "cinematic lighting bokeh 85mm lens sharp focus intricate details"
    ).split()
    rng = random.Random(1234)
    long_prompt = ", ".join(
        " ".join(rng.choice(words) for _ in range(rng.randint(1, 4))) for _ in range(110)
    )
    prompts.append(long_prompt)
    # Random strings over a mix of scripts, symbols and whitespace.
    alphabet = (
        "abcXYZ019 ,.!?'()[]:\\-_\t\n"
        "éüßñçÅ東京猫한국ыжЯαβΣ\u0301\u0308\u00a0\u3000😀🐱✨️\u200d"
    )
    for _ in range(60):
        n = rng.randint(1, 40)
        prompts.append("".join(rng.choice(alphabet) for _ in range(n)))
    for _ in range(20):
        n = rng.randint(1, 20)
        prompts.append("".join(chr(rng.randint(0x20, 0x2FFF)) for _ in range(n)))
    # Any scalar value, all planes: exercises the Unicode classes (letter, digit, space).
    for _ in range(150):
        n = rng.randint(1, 24)
        chars = []
        while len(chars) < n:
            c = rng.randint(0, 0x10FFFF if rng.random() < 0.3 else 0xFFFF)
            if not 0xD800 <= c <= 0xDFFF:
                chars.append(chr(c))
        prompts.append("".join(chars))
    # Every whitespace-like character between two words.
    spaces = [chr(c) for c in range(0x3000 + 1) if chr(c).isspace() or c in (0x200B, 0x2060, 0xFEFF, 0x180E)]
    prompts.append("a" + "b".join(spaces) + "c")
    prompts += [
        "abc<|startoftext|>def",
        "<|endoftext|><|endoftext|>",
        "<|endof<|endoftext|>text|>",
        "<|EndOfText|> <|startoftext",
    ]
    return prompts


def main():
    tok = build_tokenizer()
    cases = []
    for text in corpus():
        ids = tok(text, add_special_tokens=False)["input_ids"]
        cases.append({"text": text, "ids": ids})
    # Token strings the Rust side looks up by name.
    named = {name: tok.convert_tokens_to_ids(name) for name in [",</w>", "cat</w>", "a</w>", "!", "<|endoftext|>"]}
    doc = {
        "generator": "scripts/make_tokenizer_fixtures.py",
        "transformers": transformers.__version__,
        "bos": tok.bos_token_id,
        "eos": tok.eos_token_id,
        "named_tokens": named,
        "cases": cases,
    }
    OUT.write_text(json.dumps(doc, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {len(cases)} cases to {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
