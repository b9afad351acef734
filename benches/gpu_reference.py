"""diffusers reference for `sdkube bench` on the GPU: same shapes, fp16, random weights (speed
does not depend on weight values), eager and (optionally) torch.compile. One JSON line per
measurement, with torch's peak allocated and reserved memory.
Usage: python3 benches/gpu_reference.py [--compile[=MODE]] [--only=unet-sdxl,...] [--batch=2] [--profile]
--compile: the UNets (and the VAE decoder) under torch.compile(fullgraph=True, mode=MODE), MODE
  reduce-overhead (CUDA graphs; the default), max-autotune or default, channels_last, static
  shapes, a new graph step marked before each call, three untimed calls per shape (compile,
  then the graph's warm-up and recording);
--only: those items alone: unet-sd15, unet-sdxl, grad-sd15, vae, txt2img-sd15, txt2img-sdxl.
--batch=2: the UNet steps at those batch sizes alone (default 1,2);
--profile: after timing each UNet shape, GPU time per kind of kernel for one more call;
--fuse-qkv: the UNets' attention projections fused first (`fuse_qkv_projections()`);
--inductor-guide: with --compile, the inductor settings of diffusers' "accelerate inference"
  guide (conv_1x1_as_mm, coordinate_descent_tuning, coordinate_descent_check_all_directions,
  epilogue_fusion off). Both together are the recipe diffusers documents for its fastest SDXL;
  its coordinate-descent tuning compiles for many minutes (SD1.5 alone did not finish in 480 s
  on an H200, 2026-12-07), so each can be tried on its own."""
import json
import subprocess
import sys
import threading
import time

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from unet_configs import SD15, SDXL

dev, dt = "cuda", torch.float16
REPEAT = 10
torch.backends.cuda.matmul.allow_tf32 = True


class SmiPeak:
    """The GPU's memory.used as nvidia-smi reports it (what `gpu_run.sh` samples for sdkube),
    highest value while the `with` block runs, sampled every 50 ms."""

    def __enter__(self):
        self.peak, self.done = 0, threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def sample(self):
        while True:  # at least one sample, however short the block
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True).stdout
            self.peak = max([self.peak] + [int(v) for v in out.split()[:1] if v.isdigit()])
            if self.done.wait(0.05):
                break

    def __exit__(self, *_):
        self.done.set()
        self.thread.join()


def timed(name, shape, fn, repeat=REPEAT, grad=False):
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    with torch.set_grad_enabled(grad):
        # Compiled graphs and autograd's first passes (backward algorithm choices) settle over
        # a few calls: one warm-up left the gradient step's batch 1 slower than its batch 2.
        for _ in range(3 if mode or grad else 1):
            graph_step()
            fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeat):
            graph_step()
            fn()
        torch.cuda.synchronize()
        s = (time.perf_counter() - start) / repeat
        # nvidia-smi only after the timed calls: each run of it initialises NVML while the GPU
        # works, which the timing must not include (the memory the process holds stays put).
        with SmiPeak() as smi:
            for _ in range(2):
                graph_step()
                fn()
            torch.cuda.synchronize()
    print(json.dumps({"bench": name, "shape": shape, "ms": s * 1e3, "per_s": 1 / s,
                      "peak_mib": torch.cuda.max_memory_allocated() / 2**20,
                      # what the caching allocator held: the figure nvidia-smi sees, less the context
                      "peak_reserved_mib": torch.cuda.max_memory_reserved() / 2**20,
                      # the whole process as nvidia-smi sees it (context, kernels, cuBLAS/cuDNN)
                      "smi_peak_mib": smi.peak, "impl": IMPL}), flush=True)


mode = next((a.partition("=")[2] or "reduce-overhead" for a in sys.argv if a.startswith("--compile")), None)
compile_ = mode is not None
only = [w for a in sys.argv if a.startswith("--only=") for w in a.split("=", 1)[1].split(",")]
batches = [int(b) for a in sys.argv if a.startswith("--batch=") for b in a.split("=", 1)[1].split(",")] or [1, 2]
fuse_qkv = "--fuse-qkv" in sys.argv
inductor_guide = compile_ and "--inductor-guide" in sys.argv
IMPL = f"diffusers {__import__('diffusers').__version__} torch {torch.__version__}" + (
    f" compile(mode={mode}, fullgraph=True, dynamic=False) channels_last" if compile_ else " eager") + (
    " fuse_qkv_projections" if fuse_qkv else "") + (" + the guide's inductor settings" if inductor_guide else "")
if inductor_guide:
    import torch._inductor.config as inductor

    inductor.conv_1x1_as_mm = True
    inductor.coordinate_descent_tuning = True
    inductor.epilogue_fusion = False
    inductor.coordinate_descent_check_all_directions = True
wanted = lambda name: not only or name in only


def compiled(module):
    """The module as the reference runs it: under torch.compile in its best settings, or eager.
    Static shapes (`dynamic=False`): each shape gets a graph specialised to it. Without it the
    second shape of a module (batch 2 after batch 1, 1024² after 512²) recompiles it for symbolic
    shapes."""
    if fuse_qkv and hasattr(module, "fuse_qkv_projections"):
        module.fuse_qkv_projections()
    if not compile_:
        return module
    return torch.compile(module.to(memory_format=torch.channels_last), mode=mode, fullgraph=True,
                         dynamic=False)


def graph_step():
    """Under CUDA graphs (reduce-overhead), tells torch a new step begins: the previous call's
    outputs are done with, so its graph may replay into the same buffers."""
    if mode == "reduce-overhead":
        torch.compiler.cudagraph_mark_step_begin()


# Kernel names by kind, first match wins (cuDNN's and cuBLAS's names both contain "xmma").
KINDS = [("conv", ("fprop", "dgrad", "conv", "implicit", "nhwckrsc", "winograd")),
         ("attention", ("flash", "fmha", "attention", "sdpa")),
         ("linear", ("gemm", "cutlass", "cublas", "matmul")),
         ("fused (inductor)", ("triton",)),
         ("norm", ("norm",)),
         ("layout", ("nchwtonhwc", "nhwctonchw", "transpose", "copy"))]


def kernel_profile(name, shape, fn):
    """`--profile`: GPU time per kind of kernel for one more call of `fn` (torch.profiler, CUDA
    activity: kernels replayed inside CUDA graphs included), as `sdkube bench --profile` reports
    its own; then the ten longest kernels."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        graph_step()
        fn()
        torch.cuda.synchronize()
    kernels = [(e.name, e.time_range.elapsed_us()) for e in prof.events() if e.device_type == DeviceType.CUDA]
    if not kernels:
        print(json.dumps({"profile": name, "shape": shape, "note": "no kernels recorded", "impl": IMPL}))
        return
    by_kind = {}
    for kernel, us in kernels:
        kind = next((k for k, keys in KINDS if any(key in kernel.lower() for key in keys)), "other")
        ms, calls = by_kind.get(kind, (0.0, 0))
        by_kind[kind] = (ms + us / 1e3, calls + 1)
    for kind, (ms, calls) in sorted(by_kind.items(), key=lambda kv: -kv[1][0]):
        print(json.dumps({"profile": name, "shape": shape, "kind": kind, "calls": calls, "ms": ms, "impl": IMPL}))
    print(json.dumps({"profile": name, "shape": shape, "kind": "total", "calls": len(kernels),
                      "ms": sum(us for _, us in kernels) / 1e3, "impl": IMPL}))
    longest = {}
    for kernel, us in kernels:
        longest[kernel] = longest.get(kernel, 0.0) + us / 1e3
    for kernel, ms in sorted(longest.items(), key=lambda kv: -kv[1])[:10]:
        print(json.dumps({"profile": name, "shape": shape, "kernel": kernel[:160], "ms": ms}))


unets = {}  # compiled UNets, kept for txt2img (compiling them again costs minutes)

for name, cfg, side, ctx_dim in [("unet-sd15", SD15, 64, 768), ("unet-sdxl", SDXL, 128, 2048)]:
    if not wanted(name):
        continue
    unet = compiled(UNet2DConditionModel(**cfg).to(dev, dt).eval())
    for batch in batches:
        x = torch.randn(batch, 4, side, side, device=dev, dtype=dt)
        ctx = torch.randn(batch, 77, ctx_dim, device=dev, dtype=dt)
        t = torch.tensor([500.0], device=dev)
        kw = {}
        if "addition_embed_type" in cfg:
            kw["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, 1280, device=dev, dtype=dt),
                                       "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * batch, device=dev, dtype=dt)}
        start = time.perf_counter()
        timed(name, f"{side * 8}x{side * 8} batch {batch}", lambda: unet(x, t, ctx, **kw))
        if "--profile" in sys.argv:
            kernel_profile(name, f"{side * 8}x{side * 8} batch {batch}", lambda: unet(x, t, ctx, **kw))
        if compile_:  # the first call of each shape compiles (inside `timed`'s warm-up)
            print(f"{name} batch {batch}: {time.perf_counter() - start:.0f} s with compiling", flush=True)
    if compile_:
        unets[name] = unet
    del unet
    torch.cuda.empty_cache()

# The UNet's part of a textual-inversion step (`sdkube bench --what grad-sd15`): forward, then
# the gradient of the denoising loss with respect to the conditioning, every weight frozen.
if not compile_ and wanted("grad-sd15"):
    unet = UNet2DConditionModel(**SD15).to(dev, dt).eval().requires_grad_(False)
    for batch in (1, 2):
        x = torch.randn(batch, 4, 64, 64, device=dev, dtype=dt)
        noise = torch.randn(batch, 4, 64, 64, device=dev)
        ctx = torch.randn(batch, 77, 768, device=dev, requires_grad=True)
        t = torch.tensor([500.0], device=dev)

        def step():
            pred = unet(x, t, ctx.to(dt)).sample
            torch.nn.functional.mse_loss(pred.float(), noise).backward()
            assert ctx.grad is not None
            ctx.grad = None

        timed("grad-sd15", f"512x512 batch {batch}", step, repeat=20, grad=True)
    del unet
    torch.cuda.empty_cache()

vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                    latent_channels=4).to(dev, dt).eval()
if compile_:
    vae.decode = torch.compile(vae.to(memory_format=torch.channels_last).decode, mode=mode, fullgraph=True,
                               dynamic=False)
for side in (64, 128):
    if not wanted("vae"):
        break
    z = torch.randn(1, 4, side, side, device=dev, dtype=dt)
    timed("vae-decode", f"{side * 8}x{side * 8}", lambda: vae.decode(z), repeat=5)
    if not compile_:
        img = torch.randn(1, 3, side * 8, side * 8, device=dev, dtype=dt)
        timed("vae-encode", f"{side * 8}x{side * 8}", lambda: vae.encode(img), repeat=5)

# The text encoders, as the pipelines hold them on the GPU (random weights), where transformers
# is installed; without it text encoding is left out (a few ms, and their memory), which favours
# diffusers.
try:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
except ImportError:
    CLIPTextModel = None
    print("transformers not installed: txt2img without text encoders", file=sys.stderr)


def text_encoders(sdxl):
    try:
        return make_text_encoders(sdxl)
    except Exception as e:  # a transformers version that builds them differently
        print(f"text encoders not built ({e!r}): txt2img without them", file=sys.stderr)
        return []


def make_text_encoders(sdxl):
    if CLIPTextModel is None:
        return []
    clip_l = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                  num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")
    if not sdxl:
        return [CLIPTextModel(CLIPTextConfig(**clip_l)).to(dev, dt).eval()]
    clip_g = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                  num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
    return [CLIPTextModel(CLIPTextConfig(**clip_l)).to(dev, dt).eval(),
            CLIPTextModelWithProjection(CLIPTextConfig(**clip_g)).to(dev, dt).eval()]


# Whole txt2img, 20 Euler steps with CFG (batch 2 per step) + VAE decode, after encoding the
# prompt and the negative prompt.
for name, cfg, side, ctx_dim in [("txt2img-sd15", SD15, 64, 768), ("txt2img-sdxl", SDXL, 128, 2048)]:
    if not wanted(name):
        continue
    unet = unets.pop(name.replace("txt2img", "unet"), None)
    if unet is None:  # (not `or`: a compiled module's truth value asks for its len())
        unet = compiled(UNet2DConditionModel(**cfg).to(dev, dt).eval())
    encoders = text_encoders(name == "txt2img-sdxl")
    ctx = torch.randn(2, 77, ctx_dim, device=dev, dtype=dt)
    kw = {}
    if "addition_embed_type" in cfg:
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 1280, device=dev, dtype=dt),
                                   "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * 2, device=dev, dtype=dt)}

    def run():
        ids = torch.randint(0, 49408, (2, 77), device=dev)
        for encoder in encoders:  # their outputs would make ctx; the shapes are what count
            encoder(input_ids=ids, output_hidden_states=True)
        x = torch.randn(1, 4, side, side, device=dev, dtype=dt)
        for i in range(20):
            graph_step()
            out = unet(torch.cat([x, x]), torch.tensor([999.0 - 50 * i], device=dev), ctx, **kw).sample
            u, c = out.chunk(2)
            x = x - 0.05 * (u + 7 * (c - u))
        graph_step()
        vae.decode(x)
    timed(name, f"{side * 8}x{side * 8} 20 steps", run, repeat=2)
    del unet, encoders
    torch.cuda.empty_cache()
