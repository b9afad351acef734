"""DeepCache's reference for `sdkube bench --what step-cache-sd15,step-cache-sdxl`: its helper
(PyPI `DeepCache` 0.1.1, `DeepCacheSDHelper`, uniform mode) around diffusers' UNet with random
weights, the same run of CFG steps (batch 2, a new timestep each) per interval, timed per step.
Interval 1 is the UNet without the helper.

    python3 benches/step_cache_reference.py [--device=cuda|cpu] [--family=sd15|sdxl]
        [--size=PIXELS] [--steps=20] [--branch=0] [--repeat=3] [--compile]

On CUDA: fp16, channels_last, SDPA (diffusers' default attention). `--compile` wraps each
block DeepCache caches in `torch.compile` (its helper replaces their `forward` methods, so the
UNet as a whole cannot be one graph); the settings are printed in every line.
"""
import json
import sys
import time
from types import SimpleNamespace

import torch
from diffusers import UNet2DConditionModel
from DeepCache import DeepCacheSDHelper

from unet_configs import SD15, SDXL

INTERVALS = [1, 2, 3, 5]


def arg(name, default):
    return next((a.split("=", 1)[1] for a in sys.argv if a.startswith(f"--{name}=")), default)


def main():
    device = arg("device", "cuda")
    family = arg("family", "sd15")
    sdxl = family == "sdxl"
    size = int(arg("size", 1024 if sdxl else 512))
    steps = int(arg("steps", 20))
    branch = int(arg("branch", 0))
    repeat = int(arg("repeat", 3))
    compile_ = "--compile" in sys.argv
    dtype = torch.float16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    unet = UNet2DConditionModel(in_channels=4, out_channels=4, **(SDXL if sdxl else SD15)).eval()
    unet = unet.to(device, dtype)
    if device == "cuda":
        unet = unet.to(memory_format=torch.channels_last)
    side = size // 8
    x = torch.randn(2, 4, side, side, device=device, dtype=dtype)
    ctx = torch.randn(2, 77, 2048 if sdxl else 768, device=device, dtype=dtype)
    kwargs = {"encoder_hidden_states": ctx}
    if sdxl:
        ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * 2, device=device, dtype=dtype)
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, 1280, device=device, dtype=dtype), "time_ids": ids}
    timesteps = torch.tensor([999.0 * (1 - i / steps) for i in range(steps)])
    pipe = SimpleNamespace(unet=unet, scheduler=SimpleNamespace(timesteps=timesteps))
    impl = (f"diffusers {__import__('diffusers').__version__} torch {torch.__version__} DeepCache 0.1.1"
            + (" channels_last" if device == "cuda" else "")
            + (" blocks compiled" if compile_ else " eager"))

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def run():
        for t in timesteps:
            unet(x, t.to(device), **kwargs)

    for interval in INTERVALS:
        helper = None
        if interval > 1:
            helper = DeepCacheSDHelper(pipe=pipe)
            helper.set_params(cache_interval=interval, cache_branch_id=branch)
            helper.enable()
            if compile_:
                for key, forward in list(helper.function_dict.items()):
                    if key != "unet_forward":
                        helper.function_dict[key] = torch.compile(forward)
        with torch.no_grad():
            for _ in range(3):  # untimed: kernels, plans, compiling
                run()
            sync()
            start = time.perf_counter()
            for _ in range(repeat):
                run()
            sync()
            seconds = (time.perf_counter() - start) / repeat / steps
        if helper is not None:
            helper.disable()
        shape = f"{size}x{size} batch 2, {steps} steps, interval {interval} branch {branch}"
        print(json.dumps({"reference": f"step-cache-{family}", "shape": shape, "ms": seconds * 1e3,
                          "impl": impl, "device": device}), flush=True)


if __name__ == "__main__":
    main()
