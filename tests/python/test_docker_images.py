"""The Dockerfiles agree with the chart and with each other (read, not built: the builds and
the runs are tests/python/test_image_run.py and test_chart_pod.py, from scripts/test-images.sh).

The chart runs containers as uid/gid 10001 with a read-only root filesystem and calls
`sdkube` by name; the images must provide exactly that, and carry no models.
"""

from __future__ import annotations

import re

import yaml

from helm_chart import CHART_DIR, REPO

DOCKER = REPO / "deploy" / "docker"


def _stages(path):
    """(FROM line, instructions) per stage, with ARG defaults substituted in FROM; continued
    lines are joined."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
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


def _check_runtime(args, runtime, runtime_lines):
    uid, gid = _chart_user()
    assert runtime == f"docker.io/library/debian:{args['DEBIAN']}-slim"
    assert args["UID"] == str(uid) == str(gid)
    users = [line.split()[1] for line in runtime_lines if line.startswith("USER ")]
    assert users == ["${UID}:${UID}"], users
    assert 'ENTRYPOINT ["sdkube"]' in runtime_lines
    assert "COPY --from=build /out/sdkube /usr/local/bin/sdkube" in runtime_lines
    assert any(line.strip().startswith("EXPOSE 7860") for line in runtime_lines)
    # nothing from the build context reaches the runtime image, only the builder's outputs
    assert not [line for line in runtime_lines if line.startswith(("ADD", "COPY")) and "--from=build" not in line]


def _build_run(lines):
    runs = [line for line in lines if line.startswith("RUN") and "cargo build" in line]
    assert len(runs) == 1, runs
    return runs[0]


def test_cpu_image_builds_on_rust_slim_and_runs_on_debian_slim():
    args, stages = _stages(DOCKER / "Dockerfile.cpu")
    (build, build_lines), (runtime, runtime_lines) = stages
    # fully qualified: podman resolves no short names without a prompt or an alias
    assert build == f"docker.io/library/rust:{args['RUST_VERSION']}-slim-{args['DEBIAN']}", "same Debian release for build and run (glibc)"
    assert "cargo build --release --locked -p sdkube" in _build_run(build_lines)
    _check_runtime(args, runtime, runtime_lines)
    copies = [line for line in runtime_lines if line.startswith("COPY")]
    assert copies == ["COPY --from=build /out/sdkube /usr/local/bin/sdkube"], copies


def test_cuda_image_needs_no_nvidia_base_image():
    args, stages = _stages(DOCKER / "Dockerfile")
    (build, build_lines), (runtime, runtime_lines) = stages
    assert build == f"docker.io/library/rust:{args['RUST_VERSION']}-slim-{args['DEBIAN']}"
    assert "cuda" in args["FEATURES"].split(",") and args["CUDA_COMPUTE_CAP"] == "80"
    run = _build_run(build_lines)
    assert '--features "${FEATURES}"' in run
    env = " ".join(line for line in build_lines if line.startswith("ENV"))
    assert "CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP}" in env, "no GPU at build time: the PTX target must be explicit"
    assert "LIBRARY_PATH=" in env and "RUSTFLAGS" not in " ".join(build_lines), "flags shared with the CPU build"
    _check_runtime(args, runtime, runtime_lines)
    copies = sorted(line for line in runtime_lines if line.startswith("COPY"))
    assert copies == sorted([
        "COPY --from=build /out/sdkube /usr/local/bin/sdkube",
        "COPY --from=build /opt/sdkube-cuda/lib /usr/local/lib/sdkube-cuda",
        "COPY --from=build /opt/sdkube-cuda/nodriver/libcuda.so.1 /usr/lib/libcuda.so.1",
    ]), copies


def test_cuda_wheels_are_pinned_with_hashes_at_cuda_13_0():
    pins = [line for line in (DOCKER / "cuda-requirements.txt").read_text().splitlines()
            if line and not line.startswith("#")]
    assert pins and all(re.fullmatch(r"[a-z0-9-]+==[0-9.]+ --hash=sha256:[0-9a-f]{64}", p) for p in pins), pins
    versions = dict(p.split(" ")[0].split("==") for p in pins)
    for toolchain in ("nvidia-cuda-nvcc", "nvidia-nvvm", "nvidia-cuda-crt", "nvidia-cuda-runtime", "nvidia-cuda-nvrtc"):
        assert versions[toolchain].startswith("13.0."), (toolchain, versions[toolchain])


def test_both_builds_share_caches_and_take_the_ca_as_a_secret():
    runs = {name: _build_run(_stages(DOCKER / name)[1][0][1]) for name in ("Dockerfile", "Dockerfile.cpu")}
    for name, run in runs.items():
        assert "--mount=type=secret,id=ca" in run, name
        assert "--mount=type=cache,id=sdkube-cargo-registry,target=/usr/local/cargo/registry" in run, name
        assert "--mount=type=cache,id=sdkube-target,target=/src/target" in run, name
        assert "with-extra-ca cargo" in run, name
    for name in ("Dockerfile", "Dockerfile.cpu"):
        assert "ca-certificates.crt" not in (DOCKER / name).read_text(), "the CA is never copied into a layer"


def test_build_context_excludes_outputs_and_weights():
    ignored = set((REPO / ".dockerignore").read_text().split())
    for pattern in ("target", ".git", "**/*.safetensors", "**/*.ckpt", "out"):
        assert pattern in ignored, pattern
