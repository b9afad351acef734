"""The reference for `sdkube bench --what x4plus,gfpgan` on the GPU: RealESRGAN x4plus through
realesrgan's RealESRGANer (pre-process, whole-image or tiled process, post-process) on a 512²
image and GFPGANv1Clean (v1.4's architecture) on one aligned 512² face, fp32, random weights
(timings do not depend on weight values), with torch's peak memory. One JSON line each.

Needs basicsr 1.4.2, realesrgan 0.3.0 and gfpgan 1.3.8 importable (wheels, --no-deps); their
package __init__s pull in training code, so only the architecture files are loaded, through the
same shim as the fixture scripts.
Usage: python3 benches/gpu_restore_reference.py [--device=cpu --size=64] (a quick check off the GPU)
"""
import importlib.util
import json
import os
import sys
import time
import types

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts"))
from make_esrgan_fixtures import shim_reference  # noqa: E402

try:  # basicsr's arch_util imports distutils, gone from Python 3.12 (used only by DCN layers)
    import distutils.version  # noqa: F401
except ImportError:
    for name in ("distutils", "distutils.version"):
        sys.modules[name] = types.ModuleType(name)
    sys.modules["distutils.version"].LooseVersion = str

args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
dev, size = args.get("device", "cuda"), int(args.get("size", 512))
cuda = dev == "cuda"
IMPL = f"basicsr 1.4.2 / realesrgan 0.3.0 / gfpgan 1.3.8, torch {torch.__version__}"


def timed(name, shape, fn, repeat):
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    with torch.no_grad():
        fn()  # warm-up: cuDNN picks its algorithms here
        sync()
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        sync()
    s = (time.perf_counter() - start) / repeat
    line = {"bench": name, "shape": shape, "ms": s * 1e3, "device": dev, "impl": IMPL}
    if cuda:
        line["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        line["peak_reserved_mib"] = torch.cuda.max_memory_reserved() / 2**20
    print(json.dumps(line), flush=True)


RRDBNet, _, RealESRGANer = shim_reference()
net = RRDBNet(num_in_ch=3, num_out_ch=3, num_feat=64, num_block=23, num_grow_ch=32, scale=4)
weights = "/tmp/x4plus-random.pth"
torch.save({"params_ema": net.state_dict()}, weights)
image = np.random.default_rng(0).random((size, size, 3), dtype=np.float32)
for tile in (0, size // 2):
    up = RealESRGANer(scale=4, model_path=weights, model=net, tile=tile, tile_pad=10, pre_pad=10,
                      half=False, device=torch.device(dev))

    def run():
        # `enhance` without its uint8/BGR conversions: what `Esrgan::upscale_tensor` does
        up.pre_process(image)
        up.tile_process() if tile else up.process()
        up.post_process()

    timed("x4plus", f"{size}x{size} tile {tile}", run, repeat=3)
del up, net
torch.cuda.empty_cache()

# gfpgan's arch files, loaded without gfpgan/__init__ (basicsr's stand-ins are in place)
arch_dir = os.path.join(importlib.util.find_spec("gfpgan").submodule_search_locations[0], "archs")
for name, path in (("gfpgan", os.path.dirname(arch_dir)), ("gfpgan.archs", arch_dir)):
    sys.modules[name] = types.ModuleType(name)
    sys.modules[name].__path__ = [path]
for name in ["stylegan2_clean_arch", "gfpganv1_clean_arch"]:
    spec = importlib.util.spec_from_file_location(f"gfpgan.archs.{name}", os.path.join(arch_dir, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[f"gfpgan.archs.{name}"] = module
    spec.loader.exec_module(module)
GFPGANv1Clean = sys.modules["gfpgan.archs.gfpganv1_clean_arch"].GFPGANv1Clean
gfpgan = GFPGANv1Clean(out_size=512, num_style_feat=512, channel_multiplier=2, decoder_load_path=None,
                       fix_decoder=False, num_mlp=8, input_is_latent=True, different_w=True, narrow=1,
                       sft_half=True).to(dev).eval()
face = torch.randn(1, 3, 512, 512, device=dev)  # the network's fixed input size
timed("gfpgan", "1 face 512x512", lambda: gfpgan(face, return_rgb=False, randomize_noise=False), repeat=10)
