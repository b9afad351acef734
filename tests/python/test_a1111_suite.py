"""AUTOMATIC1111's own API tests (stable-diffusion-webui 1.9, `test/test_txt2img.py`,
`test_img2img.py`, `test_extras.py`, `test_utils.py`): the same endpoints, payloads and
assertions, written here against `sdkube serve` with the tiny fixture model. They are what
A1111 checks its own API with, so clients written against it must get the same answers.
"""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from cluster import Sdkube, call

# A1111's test files are a photo and a mask; any image of the same kind serves.


def _png_b64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


IMG2IMG_BASIC = _png_b64(Image.radial_gradient("L").resize((64, 64)).convert("RGB"))
# A white square in the middle of the mask (the area to repaint).
_mask = Image.new("L", (64, 64), 0)
_mask.paste(255, (16, 16, 48, 48))
MASK_BASIC = _png_b64(_mask)


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    server = Sdkube(tmp_path_factory.mktemp("a1111"), "a1111", "all", "memory").wait_ready()
    yield server.base
    server.stop()


def post(url: str, payload: dict) -> int:
    return call("POST", url, payload, timeout=300)[0]


def get(url: str) -> int:
    return call("GET", url)[0]


# --- test_txt2img.py ---------------------------------------------------------------------------

@pytest.fixture()
def txt2img_request():
    return {"batch_size": 1, "cfg_scale": 7, "denoising_strength": 0, "enable_hr": False,
            "eta": 0, "firstphase_height": 0, "firstphase_width": 0, "height": 64, "n_iter": 1,
            "negative_prompt": "", "prompt": "example prompt", "restore_faces": False,
            "s_churn": 0, "s_noise": 1, "s_tmax": 0, "s_tmin": 0, "sampler_index": "Euler a",
            "seed": -1, "seed_resize_from_h": -1, "seed_resize_from_w": -1, "steps": 3,
            "styles": [], "subseed": -1, "subseed_strength": 0, "tiling": False, "width": 64}


def test_txt2img_simple(base_url, txt2img_request):
    assert post(f"{base_url}/sdapi/v1/txt2img", txt2img_request) == 200


@pytest.mark.parametrize("change", [
    {"negative_prompt": "example negative prompt"},
    {"prompt": "((emphasis)), (emphasis1:1.1), [to:1], [from::2], [from:to:0.3], [alt|alt1]"},
    {"height": 128},
    {"enable_hr": True},
    {"tiling": True},
    {"restore_faces": True},
    {"sampler_index": "PLMS"},
    {"sampler_index": "DDIM"},
    {"sampler_index": "UniPC"},
    {"n_iter": 2},
    {"batch_size": 2},
], ids=["negative-prompt", "complex-prompt", "not-square", "hires-fix", "tiling",
        "restore-faces", "plms", "ddim", "unipc", "n-iter", "batch"])
def test_txt2img_variants(base_url, txt2img_request, change):
    txt2img_request.update(change)
    assert post(f"{base_url}/sdapi/v1/txt2img", txt2img_request) == 200


# --- test_img2img.py ---------------------------------------------------------------------------

@pytest.fixture()
def img2img_request():
    return {"batch_size": 1, "cfg_scale": 7, "denoising_strength": 0.75, "eta": 0, "height": 64,
            "include_init_images": False, "init_images": [IMG2IMG_BASIC],
            "inpaint_full_res": False, "inpaint_full_res_padding": 0, "inpainting_fill": 0,
            "inpainting_mask_invert": False, "mask": None, "mask_blur": 4, "n_iter": 1,
            "negative_prompt": "", "override_settings": {}, "prompt": "example prompt",
            "resize_mode": 0, "restore_faces": False, "s_churn": 0, "s_noise": 1, "s_tmax": 0,
            "s_tmin": 0, "sampler_index": "Euler a", "seed": -1, "seed_resize_from_h": -1,
            "seed_resize_from_w": -1, "steps": 3, "styles": [], "subseed": -1,
            "subseed_strength": 0, "tiling": False, "width": 64}


@pytest.mark.parametrize("change", [
    {},
    {"mask": MASK_BASIC},
    {"mask": MASK_BASIC, "inpainting_mask_invert": True},
    {"script_name": "sd upscale", "script_args": ["", 8, "Lanczos", 2.0]},
], ids=["simple", "inpainting", "inverted-mask", "sd-upscale-script"])
def test_img2img_variants(base_url, img2img_request, change):
    img2img_request.update(change)
    assert post(f"{base_url}/sdapi/v1/img2img", img2img_request) == 200


# --- test_extras.py ----------------------------------------------------------------------------

def test_simple_upscaling(base_url):
    payload = {"resize_mode": 0, "show_extras_results": True, "gfpgan_visibility": 0,
               "codeformer_visibility": 0, "codeformer_weight": 0, "upscaling_resize": 2,
               "upscaling_resize_w": 128, "upscaling_resize_h": 128, "upscaling_crop": True,
               "upscaler_1": "Lanczos", "upscaler_2": "None", "extras_upscaler_2_visibility": 0,
               "image": IMG2IMG_BASIC}
    assert post(f"{base_url}/sdapi/v1/extra-single-image", payload) == 200


def test_png_info(base_url):
    assert post(f"{base_url}/sdapi/v1/extra-single-image", {"image": IMG2IMG_BASIC}) == 200


def test_interrogate(base_url):
    payload = {"image": IMG2IMG_BASIC, "model": "clip"}
    assert post(f"{base_url}/sdapi/v1/extra-single-image", payload) == 200


# --- test_utils.py -----------------------------------------------------------------------------

def test_options_write(base_url):
    url = f"{base_url}/sdapi/v1/options"
    status, options = call("GET", url)
    assert status == 200
    before = options["send_seed"]
    assert post(url, {"send_seed": not before}) == 200
    status, options = call("GET", url)
    assert status == 200
    assert options["send_seed"] == (not before)
    post(url, {"send_seed": before})


@pytest.mark.parametrize("path", [
    "sdapi/v1/cmd-flags", "sdapi/v1/samplers", "sdapi/v1/upscalers", "sdapi/v1/sd-models",
    "sdapi/v1/hypernetworks", "sdapi/v1/face-restorers", "sdapi/v1/realesrgan-models",
    "sdapi/v1/prompt-styles", "sdapi/v1/embeddings",
])
def test_get_api_url(base_url, path):
    assert get(f"{base_url}/{path}") == 200
