"""Writes the torch checkpoints the sdkube-weights tests read (run once; outputs are committed).

    python3 crates/weights/tests/make_fixtures.py            # (re)write tests/fixtures/*
    python3 crates/weights/tests/make_fixtures.py --check F  # torch.load(F, weights_only=True) and print

Every checkpoint is paired with `expected.safetensors`, which holds the same tensors (made
contiguous) under the dotted keys our `flatten` produces, so the Rust test compares values
without hard-coding any.
"""

import collections
import os
import sys

import torch
from safetensors.torch import save_file

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


class Evil:
    """What a hostile checkpoint looks like: unpickling it would run a shell command."""

    def __reduce__(self):
        return (os.system, ("echo sdkube-was-pwned > /tmp/sdkube-pwned",))


class EvalEvil:
    def __reduce__(self):
        return (eval, ("__import__('os').system('echo pwned')",))


def tree():
    g = torch.Generator().manual_seed(5)
    base = torch.randn(4, 6, generator=g)
    sd = collections.OrderedDict()
    sd["conv.weight"] = torch.randn(3, 2, 3, 3, generator=g)
    sd["conv.bias"] = torch.randn(3, generator=g).half()
    sd["norm.weight"] = torch.randn(5, generator=g).bfloat16()
    sd["norm.num_batches_tracked"] = torch.tensor(7, dtype=torch.int64)
    sd["ids"] = torch.arange(10, dtype=torch.int64).reshape(2, 5)
    sd["f64"] = torch.randn(3, generator=g, dtype=torch.float64)
    sd["param"] = torch.nn.Parameter(torch.randn(2, 2, generator=g))
    return {
        "state_dict": sd,
        "nested": {"list": [torch.ones(2), torch.zeros(1, 3)], "count": 3, "name": "abc"},
        # Views share `base`'s storage: offsets, strides and a transpose.
        "base": base,
        "rows": base[1:3],
        "strided": base[1:, ::2],
        "transposed": base.t(),
        "scalar": torch.tensor(2.5),
        "global_step": 1234,
    }


def expected(t):
    out = {}

    def walk(prefix, v):
        if isinstance(v, torch.Tensor):
            out[prefix] = v.detach().contiguous().clone()
        elif isinstance(v, dict):
            for k, x in v.items():
                walk(f"{prefix}.{k}" if prefix else str(k), x)
        elif isinstance(v, (list, tuple)):
            for i, x in enumerate(v):
                walk(f"{prefix}.{i}", x)

    walk("", t)
    return out


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--check":
        obj = torch.load(sys.argv[2], weights_only=True)
        for k, v in obj.items():
            print(k, tuple(v.shape), v.dtype, float(v.double().sum()))
        return
    os.makedirs(HERE, exist_ok=True)
    t = tree()
    torch.save(t, os.path.join(HERE, "nested_zip.pt"))
    torch.save(t, os.path.join(HERE, "nested_legacy.pt"), _use_new_zipfile_serialization=False)
    save_file(expected(t), os.path.join(HERE, "expected.safetensors"))
    torch.save({"x": Evil()}, os.path.join(HERE, "malicious_system.pt"))
    torch.save(EvalEvil(), os.path.join(HERE, "malicious_eval_legacy.pt"),
               _use_new_zipfile_serialization=False)
    # An A1111 textual-inversion embedding, as its trainer writes it.
    g = torch.Generator().manual_seed(9)
    emb = {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": torch.randn(2, 8, generator=g, requires_grad=True)},
        "name": "tiny-emb",
        "step": 100,
        "sd_checkpoint": "a1b2c3d4",
        "sd_checkpoint_name": "v1-5-pruned",
    }
    torch.save(emb, os.path.join(HERE, "embedding_a1111.pt"))
    save_file({"string_to_param.*": emb["string_to_param"]["*"].detach()},
              os.path.join(HERE, "embedding_expected.safetensors"))


if __name__ == "__main__":
    main()
