"""The Dockerfiles agree with the chart (no docker daemon here, so they are read, not built).

The chart runs containers as uid/gid 10001 with a read-only root filesystem and calls
`sdkube` by name; the images must provide exactly that, and carry no models.
"""

from __future__ import annotations

import re

import yaml

from helm_chart import CHART_DIR, REPO

DOCKER = REPO / "deploy" / "docker"


def _stages(path):
    """(FROM line, instructions) per stage, with ARG defaults substituted in FROM."""
    text = path.read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, flags=re.M))
    stages = []
    for line in text.splitlines():
        if line.startswith("FROM "):
            image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], line.split()[1])
            stages.append((image, []))
        elif stages and line and not line.startswith("#"):
            stages[-1][1].append(line)
    return args, stages


def _chart_user():
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    return values["podSecurityContext"]["runAsUser"], values["podSecurityContext"]["fsGroup"]


def _check_runtime(args, runtime_lines):
    uid, gid = _chart_user()
    assert args["UID"] == str(uid) == str(gid)
    users = [line.split()[1] for line in runtime_lines if line.startswith("USER ")]
    assert users == ["${UID}:${UID}"], users
    assert 'ENTRYPOINT ["sdkube"]' in runtime_lines
    assert any("COPY --from=build /out/sdkube /usr/local/bin/sdkube" == line for line in runtime_lines)
    copies = [line for line in runtime_lines if line.startswith(("COPY", "ADD"))]
    assert len(copies) == 1, f"the runtime stage copies only the binary: {copies}"
    assert any(line.strip().startswith("EXPOSE 7860") for line in runtime_lines)


def test_cuda_image_builds_on_devel_and_runs_on_matching_runtime():
    args, stages = _stages(DOCKER / "Dockerfile")
    (build, build_lines), (runtime, runtime_lines) = stages
    assert build == f"nvidia/cuda:{args['CUDA_VERSION']}-cudnn-devel-{args['UBUNTU']}"
    assert runtime == f"nvidia/cuda:{args['CUDA_VERSION']}-cudnn-runtime-{args['UBUNTU']}"
    assert args["CUDA_VERSION"].startswith("13.0")
    assert "cuda" in args["FEATURES"].split(",")
    build_cmd = " ".join(build_lines)
    assert "cargo build --release --locked -p sdkube" in build_cmd and '--features "${FEATURES}"' in build_cmd
    assert "CUDA_COMPUTE_CAP" in build_cmd, "no GPU at build time: the PTX target must be explicit"
    _check_runtime(args, runtime_lines)


def test_cpu_image_runs_on_debian_slim():
    args, stages = _stages(DOCKER / "Dockerfile.cpu")
    (build, _), (runtime, runtime_lines) = stages
    assert build.startswith("rust:") and runtime == f"debian:{args['DEBIAN']}-slim"
    assert build.endswith(f"-slim-{args['DEBIAN']}"), "same Debian release for build and run (glibc)"
    _check_runtime(args, runtime_lines)


def test_build_context_excludes_outputs_and_weights():
    ignored = set((REPO / ".dockerignore").read_text().split())
    for pattern in ("target", ".git", "**/*.safetensors", "**/*.ckpt"):
        assert pattern in ignored, pattern
