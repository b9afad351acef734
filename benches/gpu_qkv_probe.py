"""Whether fusing each self-attention's query, key and value projections into one product pays
(issue 19): three [rows, C] x [C, C] products against one [rows, C] x [C, 3C], timed as a CUDA
graph replays them (the way a UNet step runs), summed over every self-attention of a CFG step
(batch 2) of SD1.5 at 512² and SDXL at 1024². "fused_and_split" adds the copies that make q, k
and v contiguous again (what an attention that only reads packed rows would need); attention
kernels that take a row stride read them in place. Random fp16 operands.
"""
import json
import torch

from graph_timing import replay_ms

dev, dt = "cuda", torch.float16

# (width, tokens per image, self-attentions of that shape) in one UNet pass
UNETS = {
    "sd15": [(320, 64 * 64, 5), (640, 32 * 32, 5), (1280, 16 * 16, 5), (1280, 8 * 8, 1)],
    "sdxl": [(640, 64 * 64, 10), (1280, 32 * 32, 60)],
}
for name, shapes in UNETS.items():
    total = {"separate": 0.0, "fused": 0.0, "fused_and_split": 0.0}
    for width, tokens, count in shapes:
        x = torch.randn(2 * tokens, width, device=dev, dtype=dt)
        ws = [torch.randn(width, width, device=dev, dtype=dt) / width**0.5 for _ in range(3 * count)]
        fused = [torch.cat(ws[3 * i:3 * i + 3]) for i in range(count)]

        def split(i):
            y = x @ fused[i].t()
            return [t.contiguous() for t in y.split(width, dim=1)]

        times = {
            "separate": replay_ms(lambda: [x @ w.t() for w in ws], reps=100),
            "fused": replay_ms(lambda: [x @ w.t() for w in fused], reps=100),
            "fused_and_split": replay_ms(lambda: [split(i) for i in range(count)], reps=100),
        }
        for k, v in times.items():
            total[k] += v
        print(json.dumps({"probe": "self-attention q/k/v", "unet": name, "width": width, "rows": 2 * tokens,
                          "attentions": count, **{f"{k}_ms": round(v, 4) for k, v in times.items()}}))
    print(json.dumps({"probe": "self-attention q/k/v, whole step", "unet": name,
                      **{f"{k}_ms": round(v, 4) for k, v in total.items()}, "torch": torch.__version__}))
