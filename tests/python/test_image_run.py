"""The built images run as the chart runs them: uid 10001, read-only root file
system, no capabilities, no privilege escalation; they serve /healthz, /readyz and an A1111
txt2img (the webuiapi client from PyPI) with the fixture model mounted read-only. The CUDA
image, on this machine without a GPU, starts anyway, says so in `doctor --local`, and every
library its binary loads resolves to the image's own copy.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

import pytest

from images import FIXTURE_MODEL, image, requires_images, wait_for
from fake_hub import free_port
from helm_chart import REPO
from podman_pod import podman

pytestmark = requires_images

UID = 10001
# Sizes the images must stay under (uncompressed, as `podman image inspect` counts them).
LIMITS = {"cpu": 150 * 10**6, "cuda": 2500 * 10**6}
CUDA_LIB_DIR = "/usr/local/lib/sdkube-cuda"


def chart_flags() -> list[str]:
    """The chart's securityContext as podman flags (tests/python/podman_pod.py does this from
    the rendered pod for the chart-pod tests; here the image alone is under test)."""
    return ["--user", f"{UID}:{UID}", "--read-only", "--read-only-tmpfs=false", "--cap-drop=ALL",
            "--security-opt", "no-new-privileges"]


@pytest.fixture
def served(request):
    """`sdkube serve` from the image of `request.param` with the fixture model mounted read-only."""
    kind = request.param
    work = Path(tempfile.mkdtemp(prefix=f"sdkube-{kind}-"))
    for d in ("data", "tmp"):
        (work / d).mkdir()
        os.chmod(work / d, 0o777)  # what an emptyDir looks like
    port = free_port()
    name = f"sdkube-test-{kind}-{port}"
    podman("run", "--detach", "--name", name, *chart_flags(), "--publish", f"127.0.0.1:{port}:7860",
           "--volume", f"{work / 'data'}:/data", "--volume", f"{work / 'tmp'}:/tmp",
           "--volume", f"{FIXTURE_MODEL}:/models/sd1:ro", "--env", "SDKUBE_DEVICE=cpu",
           image(kind), "serve", "--model", "/models/sd1")
    try:
        yield name, f"http://127.0.0.1:{port}", port
    finally:
        podman("rm", "--force", "--time", "5", name, check=False)


@pytest.mark.parametrize("served", ["cpu", "cuda"], indirect=True)
def test_image_serves_txt2img_under_the_charts_security_context(served):
    import webuiapi

    name, url, port = served
    assert wait_for(f"{url}/healthz", seconds=60)
    ready = json.loads(wait_for(f"{url}/readyz", seconds=120))
    assert ready["state"] == "ready", ready
    api = webuiapi.WebUIApi(host="127.0.0.1", port=port)
    result = api.txt2img(prompt="a lighthouse at dusk", width=64, height=64, steps=4, seed=21,
                         sampler_name="Euler")
    assert result.image.size == (64, 64)
    assert "Seed: 21" in result.info["infotexts"][0]
    # Who the server runs as, seen from inside: uid/gid 10001, no capabilities at all,
    # no-new-privileges, and a root file system that refuses writes.
    status = podman("exec", name, "cat", "/proc/1/status").stdout
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    assert fields["Uid"].split() == [str(UID)] * 4 and fields["Gid"].split() == [str(UID)] * 4
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(fields[cap], 16) == 0, (cap, fields[cap])
    assert fields["NoNewPrivs"].strip() == "1"
    denied = podman("exec", name, "touch", "/usr/local/bin/x", check=False)
    assert denied.returncode != 0 and "Read-only file system" in denied.stderr
    # the model was mounted read-only and stays untouched; outputs went to the data volume
    denied = podman("exec", name, "touch", "/models/sd1/x", check=False)
    assert denied.returncode != 0 and "Read-only file system" in denied.stderr


def test_cuda_image_without_a_gpu_says_so():
    run = podman("run", "--rm", *chart_flags(), image("cuda"), "doctor", "--local", "--output", "json",
                 "--store", "/tmp/models", check=False)
    assert run.returncode == 1, run.stderr  # findings: no GPU
    report = json.loads(run.stdout)
    by_code: dict[str, list[dict]] = {}
    for finding in report["findings"]:
        by_code.setdefault(finding["code"], []).append(finding)
    gpu = by_code["local-gpu"][0]
    assert gpu["severity"] == "warning" and "No NVIDIA GPU visible" in gpu["title"], gpu
    cuda = {f["title"]: f for f in by_code["local-cuda"]}
    driver = [t for t in cuda if t.startswith("libcuda.so.1")]
    assert driver == ["libcuda.so.1 is sdkube's stand-in: no NVIDIA driver in this container"], cuda
    for lib in ("libcudart.so.13", "libcublas.so.13", "libcublasLt.so.13", "libcurand.so.10",
                "libnvrtc.so.13", "libcudnn.so.9"):
        assert f"{lib} loads" in cuda, (lib, sorted(cuda))
    # generation asks for the GPU and gets a clear refusal, not a loader error
    run = podman("run", "--rm", *chart_flags(), "--volume", f"{FIXTURE_MODEL}:/models/sd1:ro", image("cuda"),
                 "generate", "--model", "/models/sd1", "--device", "cuda", "--prompt", "x", "--steps", "1",
                 "--width", "64", "--height", "64", "--out", "/tmp/out", check=False)
    assert run.returncode != 0
    assert "no NVIDIA driver in this container" in run.stderr, run.stderr


def _ldd(path: str) -> dict[str, str]:
    """soname -> resolved path (or 'not found') as the image's own loader sees it."""
    out = podman("run", "--rm", "--entrypoint", "ldd", image("cuda"), path).stdout
    resolved = {}
    for line in out.splitlines():
        m = re.match(r"\s*(\S+) => (.+?)(?: \(0x[0-9a-f]+\))?$", line)
        if m:
            resolved[m.group(1)] = m.group(2)
    return resolved


def test_cuda_binary_and_libraries_resolve_to_the_images_own_copies():
    libs = podman("run", "--rm", "--entrypoint", "ls", image("cuda"), CUDA_LIB_DIR).stdout.split()
    assert sorted(libs) == sorted([
        "libcudart.so.13", "libcublas.so.13", "libcublasLt.so.13", "libcurand.so.10", "libnvrtc.so.13",
        "libnvrtc-builtins.so.13.0", "libcudnn.so.9", "libcudnn_graph.so.9", "libcudnn_ops.so.9",
        "libcudnn_cnn.so.9", "libcudnn_heuristic.so.9", "libcudnn_engines_precompiled.so.9",
        "libcudnn_engines_runtime_compiled.so.9"])
    binary = _ldd("/usr/local/bin/sdkube")
    # linked; NVRTC and cuDNN's parts are opened at run time (by candle and cuDNN)
    cuda_names = [n for n in binary if re.match(r"lib(cud|cublas|curand|nvrtc)", n)]
    assert sorted(cuda_names) == sorted(["libcuda.so.1", "libcudart.so.13", "libcublas.so.13",
                                         "libcublasLt.so.13", "libcurand.so.10", "libcudnn.so.9"]), binary
    for soname, path in binary.items():
        if soname == "libcuda.so.1":
            # the driver's own library is mounted at run time by the NVIDIA container toolkit
            # (into /usr/lib/x86_64-linux-gnu, searched first); without one, the loader falls
            # back to the stand-in (/lib is /usr/lib on Debian)
            assert path in ("/lib/libcuda.so.1", "/usr/lib/libcuda.so.1"), path
        elif soname in cuda_names:
            assert path == f"{CUDA_LIB_DIR}/{soname}", (soname, path)
        else:
            assert path.startswith(("/lib/x86_64-linux-gnu/", "/usr/lib/x86_64-linux-gnu/")), (soname, path)
    # what the libraries themselves need (cuDNN's parts are opened by name at run time)
    for lib in libs:
        for soname, path in _ldd(f"{CUDA_LIB_DIR}/{lib}").items():
            assert path != "not found", (lib, soname)
            assert path.startswith((CUDA_LIB_DIR, "/lib/x86_64-linux-gnu/", "/usr/lib/x86_64-linux-gnu/")), (lib, soname, path)
    # the stand-in is never what ldconfig lists as libcuda.so.1 (so a mounted driver wins)
    cache = podman("run", "--rm", "--entrypoint", "ldconfig", image("cuda"), "-p").stdout
    assert "libcuda.so.1 " not in cache, cache


@pytest.mark.parametrize("kind", ["cpu", "cuda"])
def test_image_size_and_layers(kind):
    size = int(podman("image", "inspect", image(kind), "--format", "{{.Size}}").stdout)
    history = podman("history", "--format", "{{.Size}}\t{{.CreatedBy}}", image(kind)).stdout
    print(f"\n{image(kind)}: {size / 1e6:.1f} MB\n{history}")
    assert size <= LIMITS[kind], f"{image(kind)} is {size / 1e6:.1f} MB"
    # no build tools, sources or caches in the runtime image
    found = podman("run", "--rm", "--entrypoint", "sh", image(kind), "-c",
                   "ls /src /usr/local/cargo /opt/cuda-venv /run/secrets 2>/dev/null; command -v gcc cargo python3 || true").stdout
    assert found.strip() == "", found


def test_publish_dry_run_pins_the_pushed_digest_in_the_chart(tmp_path):
    """scripts/publish-images.sh, which the release workflow runs, on the archives that
    scripts/build-images.sh saved: OCI layouts instead of a registry (none is reachable)."""
    tag = image("cuda").rsplit(":", 1)[1]
    registry = "registry.example.com/sd"
    run = subprocess.run([str(REPO / "scripts" / "publish-images.sh"), "--registry", registry, "--tag", tag,
                          "--dry-run", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    digests = {}
    for name in ("sdkube", "sdkube-cpu"):
        found = {subprocess.run(["skopeo", "inspect", "--format", "{{.Digest}}", f"oci:{tmp_path}/{name}:{t}"],
                                capture_output=True, text=True, check=True).stdout.strip()
                 for t in (tag, tag.rsplit(".", 1)[0], "latest")}
        assert len(found) == 1, found  # one image, three tags
        digests[name] = found.pop()
    chart = tmp_path / f"sdkube-{tag}.tgz"
    rendered = subprocess.run(["helm", "template", "sd", str(chart)], capture_output=True, text=True, check=True).stdout
    images = set(re.findall(r"image: (\S*sdkube\S*)", rendered))
    assert images == {f"{registry}/sdkube@{digests['sdkube']}"}, images
