"""Writes fixtures/esrgan: tiny random-weight RealESRGAN networks built by the reference
implementations (PyPI basicsr 1.4.2 / realesrgan 0.3.0), inputs, and their outputs.

    pip install --no-deps basicsr==1.4.2 realesrgan==0.3.0 && pip install opencv-python-headless
    python3 scripts/make_esrgan_fixtures.py

basicsr's package __init__ pulls in training code, torchvision and compiled ops that
inference never touches; the shim below registers empty stand-ins for those modules and
imports only the architecture files and `realesrgan.utils.RealESRGANer` from the installed
packages (nothing of theirs is copied here).
"""

import importlib.util
import os
import sys
import types

import numpy as np
import torch
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "esrgan")


def shim_reference():
    site = os.path.dirname(importlib.util.find_spec("basicsr").origin)
    site = os.path.dirname(site)

    def package(name, path=None):
        m = types.ModuleType(name)
        m.__path__ = [path] if path else []
        sys.modules[name] = m
        return m

    class Registry:
        def register(self, obj=None):
            return obj if obj is not None else (lambda o: o)

    package("torchvision")
    package("basicsr", os.path.join(site, "basicsr"))
    package("basicsr.archs", os.path.join(site, "basicsr", "archs"))
    utils = package("basicsr.utils")
    utils.get_root_logger = lambda *a, **k: None
    registry = package("basicsr.utils.registry")
    registry.ARCH_REGISTRY = Registry()
    download = package("basicsr.utils.download_util")
    download.load_file_from_url = None
    dcn = package("basicsr.ops.dcn")
    dcn.ModulatedDeformConvPack = object
    dcn.modulated_deform_conv = None
    package("realesrgan", os.path.join(site, "realesrgan"))
    package("realesrgan.archs", os.path.join(site, "realesrgan", "archs"))
    import basicsr.archs.rrdbnet_arch as rrdb
    import realesrgan.archs.srvgg_arch as srvgg
    import realesrgan.utils as utils_mod
    return rrdb.RRDBNet, srvgg.SRVGGNetCompact, utils_mod.RealESRGANer


def randomise(net, seed):
    """Reference init, then a seeded perturbation so outputs are far from the input."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return net.eval()


def main():
    RRDBNet, SRVGGNetCompact, RealESRGANer = shim_reference()
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    # Odd sizes exercise x2's mod-pad and partial edge tiles.
    img_u8 = rng.integers(0, 256, size=(15, 19, 3), dtype=np.uint8)
    alpha_u8 = rng.integers(0, 256, size=(15, 19), dtype=np.uint8)
    img = img_u8.astype(np.float32) / 255.0
    x = torch.from_numpy(np.transpose(img, (2, 0, 1))).unsqueeze(0)

    nets = {
        "rrdb_x4": (RRDBNet(3, 3, scale=4, num_feat=8, num_block=2, num_grow_ch=4), 4),
        "rrdb_x2": (RRDBNet(3, 3, scale=2, num_feat=8, num_block=1, num_grow_ch=4), 2),
        "srvgg_x4": (SRVGGNetCompact(3, 3, num_feat=8, num_conv=3, upscale=4, act_type="prelu"), 4),
    }
    tensors = {"input": x.squeeze(0).contiguous(), "input_u8": torch.from_numpy(img_u8),
               "alpha_u8": torch.from_numpy(alpha_u8)}
    for i, (name, (net, scale)) in enumerate(nets.items()):
        randomise(net, i + 1)
        sd = {k: v.detach().clone() for k, v in net.state_dict().items()}
        path = os.path.join(OUT, f"{name}.pth")
        if name == "rrdb_x4":  # as the official releases: zip, params_ema
            torch.save({"params_ema": sd}, path)
        elif name == "rrdb_x2":  # legacy container, `params`
            torch.save({"params": sd}, path, _use_new_zipfile_serialization=False)
        else:
            torch.save({"params": sd}, path)
            save_file(sd, os.path.join(OUT, f"{name}.safetensors"))
        with torch.no_grad():
            if scale == 2:
                pass  # x2 needs even sizes for the bare forward; RealESRGANer pads
            else:
                tensors[f"{name}.forward"] = net(x).squeeze(0).contiguous()
            # RealESRGANer's float path exactly as enhance() runs it, untiled and tiled.
            for tile, label in ((0, "whole"), (7 if scale == 4 else 8, "tiled")):
                up = RealESRGANer(scale=scale, model_path=path, model=net, tile=tile, tile_pad=2,
                                  pre_pad=3, half=False, device=torch.device("cpu"))
                up.pre_process(img)
                if tile:
                    up.tile_process()
                else:
                    up.process()
                out = up.post_process().squeeze(0).clamp(0, 1).contiguous()
                tensors[f"{name}.{label}"] = out
            # The whole enhance() on an RGBA uint8 image (cv2 order: BGRA), default pads.
            up = RealESRGANer(scale=scale, model_path=path, model=net, tile=0, half=False,
                              device=torch.device("cpu"))
            bgra = np.dstack([img_u8[:, :, ::-1], alpha_u8])
            out, mode = up.enhance(bgra)
            assert mode == "RGBA"
            rgba = np.dstack([out[:, :, 2::-1], out[:, :, 3]])
            tensors[f"{name}.enhance_rgba_u8"] = torch.from_numpy(np.ascontiguousarray(rgba))
    save_file(tensors, os.path.join(OUT, "io.safetensors"))
    total = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT))
    print(f"wrote {OUT}: {total} bytes")


if __name__ == "__main__":
    main()
