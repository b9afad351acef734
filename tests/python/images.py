"""Shared by the tests that run the built images (scripts/test-images.sh builds them first).

They need podman and the two images, so they run only when SDKUBE_IMAGE_TESTS=1 (set by
scripts/test-images.sh, which .ci/run calls); scripts/test-all.sh alone skips them.
"""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request

import pytest

from helm_chart import REPO

ENABLED = os.environ.get("SDKUBE_IMAGE_TESTS") == "1"
requires_images = pytest.mark.skipif(
    not ENABLED, reason="runs from scripts/test-images.sh (SDKUBE_IMAGE_TESTS=1), after the image builds"
)

REGISTRY = os.environ.get("SDKUBE_REGISTRY", "ghcr.io/sdkube")
FIXTURE_MODEL = REPO / "fixtures" / "sd" / "sd1"


def _app_version() -> str:
    import yaml

    return str(yaml.safe_load((REPO / "deploy" / "helm" / "sdkube" / "Chart.yaml").read_text())["appVersion"])


def image(kind: str) -> str:
    """The image scripts/build-images.sh tagged: `cpu` or `cuda`, under the chart's names."""
    tag = os.environ.get("SDKUBE_IMAGE_TAG") or _app_version()
    return f"{REGISTRY}/{'sdkube-cpu' if kind == 'cpu' else 'sdkube'}:{tag}"


def http_get(url: str, timeout: float = 5) -> tuple[int | None, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, TimeoutError, ConnectionError):
        return None, b""


def wait_for(url: str, want: int = 200, seconds: float = 180) -> bytes:
    deadline = time.monotonic() + seconds
    last: tuple[int | None, bytes] = (None, b"")
    while time.monotonic() < deadline:
        last = http_get(url)
        if last[0] == want:
            return last[1]
        time.sleep(0.5)
    raise TimeoutError(f"{url}: wanted {want}, last answer {last[0]} {last[1][:300]!r}")
