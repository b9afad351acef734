"""Whether the UNet's cross-attention key/value projections are worth batching (issue 19).

Every cross-attention projects the same text context [B*77, Cc] to its keys and values: SD1.5
has 16 cross-attentions (32 small matmuls), SDXL 70 (140). Timed as a CUDA graph replays them
(the way a UNet step runs): each projection as its own matmul, against one strided-batched
matmul per output width with the context broadcast (batch stride 0). Random fp16 operands.
"""
import json
import torch

from graph_timing import replay_ms

dev, dt = "cuda", torch.float16

for name, widths, ctx_dim in [
    ("sd15", [320] * 5 + [640] * 5 + [1280] * 6, 768),
    ("sdxl", [640] * 10 + [1280] * 60, 2048),
]:
    for batch in (1, 2):
        ctx = torch.randn(batch * 77, ctx_dim, device=dev, dtype=dt)
        ws = [torch.randn(c, ctx_dim, device=dev, dtype=dt) for c in widths for _ in (0, 1)]
        stacks = [torch.stack([w for w in ws if w.shape[0] == c]) for c in sorted(set(widths))]
        separate = replay_ms(lambda: [ctx @ w.t() for w in ws])
        batched = replay_ms(lambda: [torch.matmul(ctx.expand(s.shape[0], -1, -1), s.transpose(1, 2)) for s in stacks])
        print(json.dumps({"probe": "context k/v", "unet": name, "batch": batch, "matmuls": len(ws),
                          "separate_ms": round(separate, 4), "batched_ms": round(batched, 4),
                          "batched_launches": len(stacks)}))
