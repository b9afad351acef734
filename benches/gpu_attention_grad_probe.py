"""Attention forward + backward in PyTorch, per SDPA backend, at the SD1.5 UNet's shapes
(batch 2, 512²): what diffusers' textual-inversion step pays for attention, and whether
PyTorch's cuDNN backend (cudnn-frontend's composed backward graph, the one sdkube builds) runs
each shape on this cuDNN. Run on the GPU machine: python3 benches/gpu_attention_grad_probe.py
"""

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# (query tokens, key tokens, head dim) of SD1.5's self- and cross-attentions, 8 heads.
SHAPES = [(n, m, d) for n, d in [(4096, 40), (1024, 80), (256, 160), (64, 160)] for m in (n, 77)]
BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]


def time_ms(fn, repeat=20):
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeat


print(f"torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, {torch.cuda.get_device_name()}")
for n, m, d in SHAPES:
    q = torch.randn(2, 8, n, d, device="cuda", dtype=torch.half, requires_grad=True)
    k = torch.randn(2, 8, m, d, device="cuda", dtype=torch.half, requires_grad=True)
    v = torch.randn(2, 8, m, d, device="cuda", dtype=torch.half, requires_grad=True)
    grad = torch.randn(2, 8, n, d, device="cuda", dtype=torch.half)
    row = {"queries": n, "keys": m, "head_dim": d}
    for backend in BACKENDS:
        name = backend.name.lower()
        try:
            with sdpa_kernel(backend):
                forward = lambda: F.scaled_dot_product_attention(q, k, v)
                out = forward()
                both = lambda: torch.autograd.grad(forward(), (q, k, v), grad)
                row[f"{name}_fwd_ms"] = round(time_ms(forward), 4)
                row[f"{name}_fwd_bwd_ms"] = round(time_ms(both), 4)
        except Exception as e:  # a backend that does not take the shape
            row[name] = f"refused: {str(e).splitlines()[0][:120]}"
    print(row)
