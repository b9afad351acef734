"""Writes fixtures/preprocess: reference outputs of sd-webui-controlnet's preprocessors and a
tiny random-weight Depth Anything network, for crates/preprocess's parity tests.

    /work/venv-ref/bin/pip install opencv-python-headless   # plus torch, transformers, safetensors
    python3 scripts/make_preprocess_fixtures.py

The extension (Mikubill/sd-webui-controlnet) cannot be imported outside the web UI, so each
module below is restated from its code (scripts/utils.py `resize_image_with_pad`,
scripts/preprocessor/model_free_preprocessors.py, scripts/preprocessor/legacy/processor.py,
scripts/preprocessor/inpaint.py, annotator/depth_anything.py) as the same calls to cv2 and
numpy. The network is transformers' DepthAnythingForDepthEstimation.

One deliberate difference in `depth_anything`: the extension converts its (RGB) input with
cv2.COLOR_BGR2RGB, so its network sees BGR; here, as in sdkube, it sees RGB.
"""

import json
import os

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "preprocess")


# --- the extension's helpers -------------------------------------------------------------


def hwc3(x):
    if x.ndim == 2:
        x = x[:, :, None]
    if x.shape[2] == 1:
        return np.concatenate([x, x, x], axis=2)
    if x.shape[2] == 4:
        color = x[:, :, 0:3].astype(np.float32)
        alpha = x[:, :, 3:4].astype(np.float32) / 255.0
        return (color * alpha + 255.0 * (1.0 - alpha)).clip(0, 255).astype(np.uint8)
    return x


def pad64(x):
    return int(np.ceil(float(x) / 64.0) * 64 - x)


def resize_image_with_pad(img, resolution):
    img = hwc3(img)
    h_raw, w_raw, _ = img.shape
    k = float(resolution) / float(min(h_raw, w_raw))
    interpolation = cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA
    h = int(np.round(float(h_raw) * k))
    w = int(np.round(float(w_raw) * k))
    img = cv2.resize(img, (w, h), interpolation=interpolation)
    padded = np.pad(img, [[0, pad64(h)], [0, pad64(w)], [0, 0]], mode="edge")
    return padded, lambda x: x[:h, :w]


def canny(img, res, a, b):
    img, remove_pad = resize_image_with_pad(img, res)
    return remove_pad(cv2.cvtColor(cv2.Canny(img, int(a), int(b)), cv2.COLOR_GRAY2RGB))


def threshold(img, res, a):
    img, remove_pad = resize_image_with_pad(img, res)
    result = np.zeros_like(img, dtype=np.uint8)
    result[np.min(img, axis=2) > a] = 255
    return remove_pad(result)


def blur_gaussian(img, res, a):
    img, remove_pad = resize_image_with_pad(img, res)
    return cv2.GaussianBlur(remove_pad(img), (0, 0), float(a))


def scribble_xdog(img, res, a):
    img, remove_pad = resize_image_with_pad(img, res)
    g1 = cv2.GaussianBlur(img.astype(np.float32), (0, 0), 0.5)
    g2 = cv2.GaussianBlur(img.astype(np.float32), (0, 0), 5.0)
    dog = (255 - np.min(g2 - g1, axis=2)).clip(0, 255).astype(np.uint8)
    result = np.zeros_like(img, dtype=np.uint8)
    result[2 * (255 - dog) > a] = 255
    return remove_pad(result)


def tile_resample(img, a):
    img = hwc3(img)
    if a < 1.1:
        return img
    h, w, _ = img.shape
    return cv2.resize(img, (int(float(w) / float(a)), int(float(h) / float(a))), interpolation=cv2.INTER_AREA)


def invert(img):
    return 255 - hwc3(img)


def inpaint(img, mask):
    rgba = np.concatenate([hwc3(img), mask[:, :, None]], axis=2)
    rgba[:, :, 3] = 255 - rgba[:, :, 3] // 2
    return rgba


# --- Depth Anything ----------------------------------------------------------------------


def depth_input_size(w, h, target=518, multiple=14):
    scale = max(target / w, target / h)

    def constrain(x):
        y = int(np.round(x / multiple) * multiple)
        if y < target:
            y = int(np.ceil(x / multiple) * multiple)
        return y

    return constrain(scale * w), constrain(scale * h)


def depth_preprocess(img):
    image = img.astype(np.float64) / 255.0
    w, h = depth_input_size(image.shape[1], image.shape[0])
    image = cv2.resize(image, (w, h), interpolation=cv2.INTER_CUBIC)
    image = (image - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    image = np.ascontiguousarray(np.transpose(image, (2, 0, 1))).astype(np.float32)
    return torch.from_numpy(image)[None]


def depth_detect(model, img):
    h, w = img.shape[:2]
    with torch.no_grad():
        depth = model(pixel_values=depth_preprocess(img)).predicted_depth
    depth = F.interpolate(depth[None], (h, w), mode="bilinear", align_corners=False)[0, 0]
    depth = (depth - depth.min()) / (depth.max() - depth.min()) * 255.0
    return depth.numpy().astype(np.uint8)


def depth_anything(model, img, res):
    img, remove_pad = resize_image_with_pad(img, res)
    return hwc3(remove_pad(depth_detect(model, img)))


def tiny_depth_anything():
    torch.manual_seed(0)
    backbone = Dinov2Config(
        hidden_size=16,
        num_hidden_layers=4,
        num_attention_heads=2,
        mlp_ratio=4,
        image_size=56,
        patch_size=14,
        out_indices=[1, 2, 3, 4],
        reshape_hidden_states=False,
        apply_layernorm=True,
    )
    cfg = DepthAnythingConfig(
        backbone_config=backbone,
        reassemble_hidden_size=16,
        neck_hidden_sizes=[4, 8, 16, 16],
        fusion_hidden_size=8,
        head_hidden_size=4,
    )
    model = DepthAnythingForDepthEstimation(cfg).eval()
    # transformers' init leaves the ReLU head mostly dead; weights of unit-ish gain instead
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn_like(p) / np.sqrt(fan_in))
            elif "lambda1" in name or name.endswith("norm1.weight") or name.endswith("norm2.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
        model.head.conv3.bias.fill_(1.0)
    return cfg, model


def small_config():
    """LiheYoung/depth-anything-small-hf's config.json, restated."""
    backbone = Dinov2Config(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        mlp_ratio=4,
        image_size=518,
        patch_size=14,
        layerscale_value=1.0,
        out_indices=[9, 10, 11, 12],
        reshape_hidden_states=False,
        apply_layernorm=True,
    )
    return DepthAnythingConfig(
        backbone_config=backbone,
        reassemble_hidden_size=384,
        neck_hidden_sizes=[48, 96, 192, 384],
        reassemble_factors=[4, 2, 1, 0.5],
        fusion_hidden_size=64,
        head_hidden_size=32,
    )


def released_key(k):
    """transformers 5 names → the names of the released HF checkpoints."""
    for new, old in [
        ("attention.q_proj", "attention.attention.query"),
        ("attention.k_proj", "attention.attention.key"),
        ("attention.v_proj", "attention.attention.value"),
        ("attention.o_proj", "attention.output.dense"),
    ]:
        k = k.replace(new, old)
    return k


def original_layout(state, layers):
    """The released names → the original repository's DPT_DINOv2 names (the inverse of the
    renaming in transformers' convert_depth_anything_to_hf.py), q/k/v fused into attn.qkv."""
    out = {}
    for k, v in state.items():
        n = k
        for a, b in [
            ("backbone.embeddings.cls_token", "pretrained.cls_token"),
            ("backbone.embeddings.position_embeddings", "pretrained.pos_embed"),
            ("backbone.embeddings.patch_embeddings.projection.", "pretrained.patch_embed.proj."),
            ("backbone.layernorm.", "pretrained.norm."),
            ("backbone.encoder.layer.", "pretrained.blocks."),
            (".layer_scale1.lambda1", ".ls1.gamma"),
            (".layer_scale2.lambda1", ".ls2.gamma"),
            (".attention.output.dense.", ".attn.proj."),
            ("neck.reassemble_stage.layers.", "depth_head.reassemble."),
            ("head.conv1.", "depth_head.scratch.output_conv1."),
            ("head.conv2.", "depth_head.scratch.output_conv2.0."),
            ("head.conv3.", "depth_head.scratch.output_conv2.2."),
        ]:
            n = n.replace(a, b)
        if n.startswith("depth_head.reassemble."):
            i, rest = n[len("depth_head.reassemble."):].split(".", 1)
            kind, rest = rest.split(".", 1)
            n = f"depth_head.{'projects' if kind == 'projection' else 'resize_layers'}.{i}.{rest}"
        elif n.startswith("neck.convs."):
            i, rest = n[len("neck.convs."):].split(".", 1)
            n = f"depth_head.scratch.layer{int(i) + 1}_rn.{rest}"
        elif n.startswith("neck.fusion_stage.layers."):
            j, rest = n[len("neck.fusion_stage.layers."):].split(".", 1)
            for a, b in [
                ("projection.", "out_conv."),
                ("residual_layer1.convolution", "resConfUnit1.conv"),
                ("residual_layer2.convolution", "resConfUnit2.conv"),
            ]:
                rest = rest.replace(a, b)
            n = f"depth_head.scratch.refinenet{4 - int(j)}.{rest}"
        if ".attention.attention." in n:
            continue
        out[n] = v
    for i in range(layers):
        p = f"backbone.encoder.layer.{i}.attention.attention."
        for part in ["weight", "bias"]:
            out[f"pretrained.blocks.{i}.attn.qkv.{part}"] = torch.cat(
                [state[p + f"{n}.{part}"] for n in ["query", "key", "value"]]
            ).contiguous()
    return out


# --- fixtures ----------------------------------------------------------------------------


def test_image(w, h, seed):
    """A photo-like RGB image: smooth gradients, shapes with hard and soft edges, noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([x / w * 200 + 30, y / h * 180 + 40, (x + y) / (w + h) * 120 + 60], axis=2)
    cv2.circle(img, (w // 3, h // 2), h // 4, (230, 60, 40), -1)
    cv2.rectangle(img, (w // 2, h // 6), (w * 5 // 6, h // 2), (20, 40, 200), -1)
    cv2.line(img, (0, h - 10), (w - 1, h // 3), (250, 250, 250), 2)
    cv2.ellipse(img, (w * 2 // 3, h * 3 // 4), (w // 6, h // 8), 30, 0, 360, (90, 200, 90), -1)
    img = cv2.GaussianBlur(img, (0, 0), 0.8)
    img += rng.normal(0, 6, img.shape).astype(np.float32)
    return img.clip(0, 255).astype(np.uint8)


def save_png(name, arr):
    Image.fromarray(arr).save(os.path.join(OUT, name), optimize=True)


def main():
    os.makedirs(OUT, exist_ok=True)
    photo = test_image(160, 128, 0)
    save_png("photo.png", photo)
    rgba = np.concatenate([photo, np.tile(np.linspace(0, 255, 160, dtype=np.float32), (128, 1)).astype(np.uint8)[:, :, None]], axis=2)
    save_png("photo_rgba.png", rgba)
    mask = np.zeros((128, 160), np.uint8)
    cv2.circle(mask, (90, 60), 35, 255, -1)
    save_png("mask.png", mask)

    cases = []

    def case(name, module, out, image="photo.png", **params):
        expected = f"{name}.png"
        if np.array_equal(out, photo):
            expected = "photo.png"  # an unchanged image is not stored twice
        else:
            save_png(expected, out)
        cases.append(dict(name=name, module=module, image=image, expected=expected, **params))

    # resolutions: 256 enlarges (bicubic), 96 shrinks by 4/3 (area), 64 halves (area, 2×2 fast path)
    case("canny_256", "canny", canny(photo, 256, 100, 200), processor_res=256)
    case("canny_96", "canny", canny(photo, 96, 50, 150), processor_res=96, threshold_a=50, threshold_b=150)
    case("canny_64", "canny", canny(photo, 64, 30, 90), processor_res=64, threshold_a=30, threshold_b=90)
    case("threshold_200", "threshold", threshold(photo, 200, 127), processor_res=200)
    case("threshold_90", "threshold", threshold(photo, 90, 100.5), processor_res=90, threshold_a=100.5)
    case("blur_128", "blur_gaussian", blur_gaussian(photo, 128, 9.0), processor_res=128)
    case("blur_256", "blur_gaussian", blur_gaussian(photo, 256, 2.5), processor_res=256, threshold_a=2.5)
    # σ 0.01 is a one-tap kernel: these are resize_image_with_pad alone (bicubic ×2.5, area ÷1.6)
    case("resize_320", "blur_gaussian", blur_gaussian(photo, 320, 0.01), processor_res=320, threshold_a=0.01)
    case("resize_80", "blur_gaussian", blur_gaussian(photo, 80, 0.01), processor_res=80, threshold_a=0.01)
    case("xdog_256", "scribble_xdog", scribble_xdog(photo, 256, 32), processor_res=256)
    case("xdog_100", "scribble_xdog", scribble_xdog(photo, 100, 12), processor_res=100, threshold_a=12)
    case("tile_2_7", "tile_resample", tile_resample(photo, 2.7), threshold_a=2.7)
    case("tile_2", "tile_resample", tile_resample(photo, 2.0), threshold_a=2.0)
    case("tile_4", "tile_resample", tile_resample(photo, 4.0), threshold_a=4.0)
    case("tile_1", "tile_resample", tile_resample(photo, 1.0))
    case("invert", "invert (from white bg & black line)", invert(photo))
    case("invert_rgba", "invert", invert(rgba), image="photo_rgba.png")
    case("none", "none", hwc3(photo))
    case("inpaint", "inpaint_only", inpaint(photo, mask), mask="mask.png")

    # Depth Anything: the network on two inputs (the trained 4×4 grid; a 4×5 grid, whose
    # position embeddings are interpolated), then the whole module on the photo (its 518×686
    # network input is too big to store; the module's output covers it)
    cfg, model = tiny_depth_anything()
    state = {released_key(k): v.contiguous() for k, v in model.state_dict().items() if "mask_token" not in k}
    save_file(state, os.path.join(OUT, "depth_anything_tiny.safetensors"))
    save_file(original_layout(state, 4), os.path.join(OUT, "depth_anything_tiny_original.safetensors"))
    with open(os.path.join(OUT, "depth_anything_tiny.json"), "w") as f:
        f.write(cfg.to_json_string())
    torch.manual_seed(1)
    tensors = {}
    for name, shape in [("square", (1, 3, 56, 56)), ("wide", (1, 3, 56, 70))]:
        x = torch.randn(shape)
        with torch.no_grad():
            tensors[f"{name}.input"] = x
            tensors[f"{name}.depth"] = model(pixel_values=x).predicted_depth.contiguous()
    save_file(tensors, os.path.join(OUT, "depth_anything_tiny_io.safetensors"))
    case("depth_anything_64", "depth_anything", depth_anything(model, photo, 64), processor_res=64)

    # the key names and shapes of the real small checkpoint (its weights are not shipped here)
    with open(os.path.join(OUT, "depth_anything_small.json"), "w") as f:
        f.write(small_config().to_json_string())
    with torch.device("meta"):
        small = DepthAnythingForDepthEstimation(small_config())
    keys = {released_key(k): list(v.shape) for k, v in small.state_dict().items()}
    with open(os.path.join(OUT, "depth_anything_small_keys.json"), "w") as f:
        json.dump(keys, f, indent=0, sort_keys=True)

    with open(os.path.join(OUT, "cases.json"), "w") as f:
        json.dump(cases, f, indent=1)
    print(f"wrote {len(cases)} cases to {OUT}")


if __name__ == "__main__":
    main()
