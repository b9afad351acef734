"""A1111's scripts through `script_name`/`script_args` (issue 17.5): X/Y/Z plot, prompt
matrix and SD upscale on a real `sdkube serve` with the tiny fixture model, checked against
what A1111 1.10 returns: grids first, then the single images, each with its infotext, and
each single image the same as a plain txt2img with its parameters."""

from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image

from cluster import Sdkube, call


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    server = Sdkube(tmp_path_factory.mktemp("scripts"), "scripts", "all", "memory").wait_ready()
    yield server.base
    server.stop()


def post(url: str, payload: dict):
    return call("POST", url, payload, timeout=300)


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


BASE = {"prompt": "a red cat", "negative_prompt": "blurry", "seed": 1234, "steps": 2,
        "width": 64, "height": 64, "sampler_name": "Euler"}


def xyz_args(x_type, x_values, y_type=0, y_values="", **flags):
    args = [x_type, x_values, [], y_type, y_values, [], 0, "", [],
            flags.get("draw_legend", True), flags.get("include_lone_images", True),
            False, False, False, False, False, 0, False]
    return args


def test_xyz_steps_by_cfg_gives_a_grid_then_the_images_of_plain_txt2img(base_url):
    body = dict(BASE, script_name="x/y/z plot",
                script_args=xyz_args(4, "2,3", 6, "5,7.5", draw_legend=False))
    status, r = post(f"{base_url}/sdapi/v1/txt2img", body)
    assert status == 200, r
    info = json.loads(r["info"])
    assert len(r["images"]) == 1 + 4
    grid = decode(r["images"][0])
    assert grid.size == (128, 128)
    assert [decode(i).size for i in r["images"][1:]] == [(64, 64)] * 4
    assert len(info["infotexts"]) == 5
    assert info["index_of_first_image"] == 1
    assert info["all_seeds"] == [1234] * 4
    assert len(info["all_prompts"]) == 4
    assert "sdkube_ignored_fields" in info and "script_name" not in info["sdkube_ignored_fields"]
    # x fastest: (steps, cfg) = (2, 5), (3, 5), (2, 7.5), (3, 7.5)
    swept = [(t.split("Steps: ")[1].split(",")[0], t.split("CFG scale: ")[1].split(",")[0])
             for t in info["infotexts"][1:]]
    assert swept == [("2", "5"), ("3", "5"), ("2", "7.5"), ("3", "7.5")], swept
    assert "Script: X/Y/Z plot" in info["infotexts"][0]
    assert "X Type: Steps" in info["infotexts"][0] and "Y Type: CFG Scale" in info["infotexts"][0]
    assert "Script" not in info["infotexts"][1]
    # Each single image is what a plain txt2img with its parameters makes, and the grid
    # holds them in place.
    for k, (steps, cfg) in enumerate([(2, 5), (3, 5), (2, 7.5), (3, 7.5)]):
        status, plain = post(f"{base_url}/sdapi/v1/txt2img", dict(BASE, steps=steps, cfg_scale=cfg))
        assert status == 200
        want = decode(plain["images"][0]).convert("RGB")
        got = decode(r["images"][1 + k]).convert("RGB")
        assert got.tobytes() == want.tobytes(), (steps, cfg)
        x, y = (k % 2) * 64, (k // 2) * 64
        assert grid.convert("RGB").crop((x, y, x + 64, y + 64)).tobytes() == want.tobytes()


def test_xyz_legend_prompt_sr_and_labels(base_url):
    body = dict(BASE, script_name="X/Y/Z plot",
                script_args=xyz_args("Prompt S/R", "red, blue", include_lone_images=True))
    status, r = post(f"{base_url}/sdapi/v1/txt2img", body)
    assert status == 200, r
    info = json.loads(r["info"])
    assert info["all_prompts"] == ["a red cat", "a blue cat"]
    assert info["infotexts"][2].startswith("a blue cat\n")
    grid = decode(r["images"][0])
    # The legend adds room above the two columns (no row labels: Y is Nothing).
    assert grid.size[0] == 128 and grid.size[1] > 64


def test_xyz_img2img_denoising_axis(base_url):
    init = Image.radial_gradient("L").resize((64, 64)).convert("RGB")
    buf = io.BytesIO()
    init.save(buf, format="PNG")
    body = dict(BASE, init_images=[base64.b64encode(buf.getvalue()).decode()],
                script_name="x/y/z plot", script_args=xyz_args("Denoising", "0.5, 1.0"))
    status, r = post(f"{base_url}/sdapi/v1/img2img", body)
    assert status == 200, r
    info = json.loads(r["info"])
    assert len(r["images"]) == 3
    assert "Denoising strength: 0.5" in info["infotexts"][1]
    assert "Denoising strength: 1," in info["infotexts"][2]


def test_prompt_matrix_makes_every_combination(base_url):
    body = dict(BASE, prompt="a cat|red|hat", script_name="prompt matrix",
                script_args=[False, False, "positive", "comma", 0])
    status, r = post(f"{base_url}/sdapi/v1/txt2img", body)
    assert status == 200, r
    info = json.loads(r["info"])
    assert len(r["images"]) == 1 + 4
    assert info["all_prompts"] == ["a cat", "a cat, red", "a cat, hat", "a cat, red, hat"]
    assert [t.split("\n")[0] for t in info["infotexts"][1:]] == info["all_prompts"]
    grid = decode(r["images"][0])
    # 2 × 2 cells, labels above and left.
    assert grid.size[0] > 128 and grid.size[1] > 128


def test_sd_upscale_returns_the_init_image_scaled(base_url):
    init = Image.radial_gradient("L").resize((48, 40)).convert("RGB")
    buf = io.BytesIO()
    init.save(buf, format="PNG")
    body = dict(BASE, init_images=[base64.b64encode(buf.getvalue()).decode()],
                denoising_strength=0.3, script_name="SD upscale",
                script_args=["", 16, 1, 2])
    status, r = post(f"{base_url}/sdapi/v1/img2img", body)
    assert status == 200, r
    assert len(r["images"]) == 1
    assert decode(r["images"][0]).size == (96, 80)
    info = json.loads(r["info"])
    assert "SD upscale overlap: 16, SD upscale upscaler: Lanczos" in info["infotexts"][0]


@pytest.mark.parametrize("script_name,script_args,needle", [
    ("x/y/z plot", ["Eta", "0.1"], "Eta"),
    ("x/y/z plot", [4, "ten"], "ten"),
    ("x/y/z plot", [4, "1-30", [], 6, "1-30"], "limit"),
    ("x/y/z plot", ["Prompt S/R", "purple, blue"], "purple"),
    ("x/y/z plot", [4, "2", [], 0, "", [], 0, "", [], "yes"], "draw_legend"),
    ("prompt matrix", [False, False, "sideways"], "prompt_type"),
    ("x/y/z plot", ["Sampler", "Euler,Nope", [], 0, "", [], 0, "", [], True, False, False,
                    False, False, False, False, 0, True], "Nope"),
], ids=["unsupported-axis", "bad-value", "too-many-cells", "prompt-sr-missing", "bad-flag",
        "bad-prompt-type", "unknown-sampler"])
def test_bad_script_args_are_a_400_naming_the_problem(base_url, script_name, script_args, needle):
    body = dict(BASE, script_name=script_name, script_args=script_args)
    status, r = post(f"{base_url}/sdapi/v1/txt2img", body)
    assert status in (400, 404), (status, r)
    assert needle in json.dumps(r), r


def test_sd_upscale_on_txt2img_is_a_400(base_url):
    status, r = post(f"{base_url}/sdapi/v1/txt2img", dict(BASE, script_name="sd upscale"))
    assert status == 400 and "img2img" in json.dumps(r), r


def test_unknown_script_is_accepted_and_reported(base_url):
    status, r = post(f"{base_url}/sdapi/v1/txt2img", dict(BASE, script_name="loopback"))
    assert status == 200
    assert "script_name" in json.loads(r["info"])["sdkube_ignored_fields"]


def test_script_listings(base_url):
    status, r = call("GET", f"{base_url}/sdapi/v1/scripts")
    assert status == 200 and "x/y/z plot" in r["txt2img"] and "sd upscale" in r["img2img"]
    status, r = call("GET", f"{base_url}/sdapi/v1/script-info")
    assert status == 200
    xyz = next(s for s in r if s["name"] == "x/y/z plot" and s["is_img2img"])
    assert len(xyz["args"]) == 18
    assert "Denoising" in xyz["args"][0]["choices"]
