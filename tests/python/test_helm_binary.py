"""The rendered containers' command, args and environment reach the real `sdkube` binary.

The seed's chart set CLI_FLAGS while its image read CLI_ARGS, so every flag was silently
dropped. Here the main container's command line and environment (ConfigMap and Secret
references resolved as the kubelet would) are handed to `target/debug/sdkube` with
`--print-config`, and the settings it parsed are compared with the values.
Needs `cargo build -p sdkube` first (scripts/test-all.sh does it).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
from pathlib import Path

import pytest

from helm_chart import REPO, render
from test_helm_render import CASES, PROXY


def _binary() -> Path:
    explicit = os.environ.get("SDKUBE_BIN")
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    path = Path(explicit) if explicit else target / "debug" / "sdkube"
    if not path.is_file():
        pytest.fail(f"{path} is missing: run `cargo build -p sdkube` first")
    return path


def _run(container: dict, env: dict[str, str], *extra: str) -> subprocess.CompletedProcess:
    """Run the container's command as the image would, the binary standing in for `sdkube`."""
    command = container["command"] + container.get("args", [])
    assert command[0] == "sdkube", command
    clean_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env}  # nothing else leaks in
    return subprocess.run(
        [str(_binary()), *command[1:], *extra], env=clean_env, capture_output=True, text=True, timeout=60
    )


def _served_config(values: dict) -> dict:
    r = render(copy.deepcopy(values))
    main = r.container("sdkube")
    done = _run(main, r.resolved_env(main), "--print-config")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_defaults_reach_the_binary():
    config = _served_config({})
    assert config == {
        # the single server with its queue in memory (queue.backend: memory)
        "role": "all",
        "queue": "memory",
        "queue_prefix": "sdkube",
        "queue_password": None,
        "visibility_timeout": 60,
        "result_ttl": 3600,
        "gallery_keep": 500,
        "max_deliveries": 3,
        "model": "sd-1.5",
        "config": None,
        "store": "/data/models",
        "outputs": "/data/outputs",
        "embeddings": "/data/embeddings",
        "lora_dirs": ["/data/loras"],
        "controlnet_dirs": ["/data/controlnet"],
        "training": "/data/training",
        "listen": "0.0.0.0:7860",
        "device": "cuda",
        "precision": "auto",
        "vram": "high",
        "warm_up": "auto",
        "queue_size": 32,
        "cors_origins": [],
        "max_size": 2048,
        "max_steps": 150,
        "max_batch": 8,
        "api_key": None,
        "basic_auth": None,
        "catalog": None,
        "checkpoint_dirs": [],
        "upscaler_dirs": [],
        "face_restorer": "gfpgan-1.4",
        "face_detector": "retinaface-resnet50",
        "max_body_mb": 64,
        "max_prompt_tokens": 1000,
        "max_connections": 4096,
        "header_timeout": 15,
        "shutdown_grace": 50,  # terminationGracePeriodSeconds 60 minus 10
    }


def test_every_server_value_reaches_the_binary():
    values = {
        "models": ["sdxl-base", "realesrgan-x4plus"],
        "server": {
            "model": "sdxl-base",
            "device": "cuda:1",
            "precision": "bf16",
            "vram": "low",
            "warmUp": "off",
            "queueSize": 5,
            "corsOrigins": ["https://a.example", "https://b.example"],
            "maxSize": 1024,
            "maxSteps": 40,
            "maxBatch": 2,
            "logJson": False,
            "apiKey": "k3y",
            "basicAuth": "admin:pw",
        },
        "gpu": {"count": 2},
        "persistence": {"subPaths": {"models": "store/m", "outputs": "out", "embeddings": "ti", "loras": "lora/sd",
                                     "controlnet": "cn/sd15"}},
        "workload": {"terminationGracePeriodSeconds": 300},
    }
    config = _served_config(values)
    assert config["shutdown_grace"] == 290
    assert config["model"] == "sdxl-base"
    assert config["device"] == "cuda:1"
    assert (config["precision"], config["vram"], config["warm_up"]) == ("bf16", "low", "off")
    assert config["queue_size"] == 5
    assert config["cors_origins"] == ["https://a.example", "https://b.example"]
    assert (config["max_size"], config["max_steps"], config["max_batch"]) == (1024, 40, 2)
    assert config["api_key"] == "<set>" and config["basic_auth"] == "<set>"
    assert (config["store"], config["outputs"], config["embeddings"]) == ("/data/store/m", "/data/out", "/data/ti")
    assert config["lora_dirs"] == ["/data/lora/sd"]
    assert config["controlnet_dirs"] == ["/data/cn/sd15"]


def test_cpu_mode_reaches_the_binary():
    assert _served_config({"gpu": {"count": 0}})["device"] == "cpu"


def test_extra_args_reach_the_binary_and_win_over_env():
    assert _served_config({"server": {"extraArgs": ["--max-steps", "60"]}})["max_steps"] == 60


def test_a_mistyped_flag_fails_loudly():
    r = render({"server": {"extraArgs": ["--max-stepz", "60"]}})
    main = r.container("sdkube")
    done = _run(main, r.resolved_env(main), "--print-config")
    assert done.returncode == 2 and "--max-stepz" in done.stderr


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_matrix_case_starts_the_binary(case):
    """Each case's environment parses, including SDKUBE_LOG_JSON and the proxy variables."""
    r = render(copy.deepcopy(CASES[case]))
    main = r.container("sdkube")
    env = r.resolved_env(main)
    done = _run(main, env, "--print-config")
    assert done.returncode == 0, f"{case}: {done.stderr}"
    if case == "seed":
        assert env["HTTPS_PROXY"] == PROXY
        assert json.loads(done.stdout)["vram"] == "low"


def test_fetch_init_container_matches_the_fetch_cli():
    help_text = subprocess.run([str(_binary()), "fetch", "--help"], capture_output=True, text=True).stdout
    if "--store" not in help_text or "--progress" not in help_text:
        pytest.skip("`sdkube fetch` has no --store/--progress yet (being implemented in crates/sdkube/src/cmd/fetch.rs)")
    r = render({"models": ["sd-1.5", "gfpgan-1.4"], "proxy": {"https": PROXY}, "hfEndpoint": "https://hf-mirror.com"})
    init = r.container("fetch-models")
    # --help after the real arguments: clap parses (and rejects) every argument before it
    done = _run(init, r.resolved_env(init), "--help")
    assert done.returncode == 0, done.stderr


def test_notes_doctor_command_matches_the_doctor_cli():
    help_text = subprocess.run([str(_binary()), "doctor", "--help"], capture_output=True, text=True).stdout
    if "--release" not in help_text:
        pytest.skip("this build of `sdkube doctor` has no --release yet (crates/sdkube/src/cmd/doctor.rs)")
    notes = render().notes
    (line,) = [line.strip() for line in notes.splitlines() if line.strip().startswith("sdkube doctor")]
    done = subprocess.run([str(_binary()), *line.split()[1:], "--help"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
