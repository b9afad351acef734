"""The chart's own pod, run for real: the bare-metal example's rendering (local
volume, proxy, init fetch), run with podman by tests/python/podman_pod.py as a kubelet would.

The init container's `sdkube fetch` downloads a model from a hub-like server on a loopback
address of this machine, which the pod can reach only through the proxy (Debian's tinyproxy,
HTTPS through CONNECT, the hub's CA given by the chart's caBundle), into the volume; the
server then passes the probes the chart declares and answers a webuiapi txt2img. A second run
on the kept volume downloads nothing. Bad input (a model the catalog lacks, a setting sdkube
refuses, a volume it may not write) stops the pod with a clear message in the container log,
and `sdkube doctor`, reading the result through a loopback API server, names the cause.

Limits (see podman_pod.py): no GPU here, so the pod is rendered with `gpu.count: 0` (the CUDA
image then runs its CPU path); no scheduler, Service or restarts.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from fake_hub import FakeHub, TinyProxy
from fake_kube import FakeKube, snapshot_of
from helm_chart import NAMESPACE, REPO, render
from images import FIXTURE_MODEL, image, requires_images
from podman_pod import PodRun

pytestmark = requires_images

REPO_ID = "sdkube-test/tiny-sd1"
MODEL = "tiny-sd1"
UID = 10001
# The catalog entry of the fixture model, as an operator would add a model of their own.
CATALOG = f"""
[[model]]
name = "{MODEL}"
kind = "checkpoint"
description = "tiny SD 1.x test model (diffusers layout)"
[[model.file]]
hub = "{REPO_ID}"
revision = "main"
pattern = "*"
"""


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    """The hub on 127.0.0.2 (HTTPS, a CA of its own) and tinyproxy on every address."""
    work = tmp_path_factory.mktemp("network")
    hub = FakeHub(work / "tls")
    hub.add_folder(REPO_ID, FIXTURE_MODEL)
    hub.start()
    proxy = TinyProxy(work / "proxy")
    yield hub, proxy
    proxy.stop()
    hub.stop()


def bare_metal_values(kind: str, hub: FakeHub, proxy: TinyProxy) -> dict:
    """deploy/helm/examples/bare-metal.yaml with this machine's hub, proxy and image."""
    values = yaml.safe_load((REPO / "deploy" / "helm" / "examples" / "bare-metal.yaml").read_text())
    repository, tag = image(kind).rsplit(":", 1)
    values["image"] = {"repository": repository, "tag": tag}
    values["models"] = [MODEL]
    values["server"] = {**values["server"], "model": MODEL, "device": "cpu"}
    values["gpu"] = {"count": 0}  # no GPU on this machine (see the module's limits)
    url = f"http://host.containers.internal:{proxy.port}"
    values["proxy"] = {**values["proxy"], "http": url, "https": url}
    values["hfEndpoint"] = hub.endpoint
    values["caBundle"] = {"configMap": "hub-ca", "key": "ca.pem"}
    # the catalog file lives on the volume, beside the models
    values["fetch"] = {"extraArgs": ["--catalog", "/data/catalog.toml"]}
    values["server"]["extraEnv"] = [{"name": "SDKUBE_CATALOG", "value": "/data/catalog.toml"}]
    return values


def hub_ca(hub: FakeHub) -> dict:
    """`kubectl create configmap hub-ca --from-file=ca.pem`, which the values refer to."""
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "hub-ca", "namespace": NAMESPACE},
            "data": {"ca.pem": Path(hub.ca).read_text()}}


def prepare_node(root: Path, owner: int | None = UID) -> Path:
    """The example's one-time node setup: mkdir /srv/sdkube && chown 10001:10001, plus the catalog."""
    path = root / "srv" / "sdkube"
    path.mkdir(parents=True)
    (path / "catalog.toml").write_text(CATALOG)
    if owner is not None:
        for p in (path, path / "catalog.toml"):
            os.chown(p, owner, owner)
    return path


def json_lines(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("kind", ["cpu", "cuda"])
def test_bare_metal_pod_fetches_through_the_proxy_then_serves(kind, network, tmp_path):
    import webuiapi

    hub, proxy = network
    rendered = render(bare_metal_values(kind, hub, proxy))
    node = tmp_path / "node"
    volume = prepare_node(node)
    for attempt in (1, 2):
        hub.log.clear()
        connects_before = len(proxy.connects())
        run = PodRun(rendered, node_root=node, work=tmp_path / f"run{attempt}", name=f"sdkube-{kind}-{attempt}",
                     cluster=[hub_ca(hub)])
        try:
            run.start()
            fetch = run.container("fetch-models")
            log = fetch.logs()
            assert fetch.exit_code == 0, log
            plan = [e for e in json_lines(log) if e.get("event") == "plan"]
            assert plan, log
            if attempt == 1:
                # every file came from the hub, through the proxy's CONNECT tunnels
                assert plan[0]["files_to_download"] == 8, plan
                got = {e.path.split("/resolve/main/")[-1] for e in hub.downloads() if e.server == "hub"}
                assert got == {p.relative_to(FIXTURE_MODEL).as_posix() for p in FIXTURE_MODEL.rglob("*") if p.is_file()}
                tunnels = proxy.connects()[connects_before:]
                assert any(f"CONNECT {hub.ip}:" in line for line in tunnels), tunnels
                for f in FIXTURE_MODEL.rglob("*"):
                    if f.is_file():
                        stored = volume / "models" / MODEL / f.relative_to(FIXTURE_MODEL)
                        assert sha256(stored) == sha256(f), stored
                        assert stored.stat().st_uid == UID
            else:
                # the kept volume: verified files, not one byte requested again
                assert plan[0]["files_to_download"] == 0 and plan[0]["files_present"] == 8, plan
                assert hub.downloads() == [], hub.downloads()
            seen = run.wait_until_ready("sdkube")
            print(f"\n{kind} run {attempt}: plan {plan[0]}; probes {seen}; hub requests {len(hub.log)}, "
                  f"proxy tunnels {len(proxy.connects()) - connects_before}")
            # the probes answer as declared: their path and port, within their timeout
            for probe in ("startup", "liveness", "readiness"):
                code, seconds = run.probe_once("sdkube", probe)
                declared = run.spec["containers"][0][f"{probe}Probe"]
                assert code == 200 and seconds < declared["timeoutSeconds"], (probe, code, seconds)
            startup = run.spec["containers"][0]["startupProbe"]
            assert seen["startup"]["attempts"] <= startup["failureThreshold"], seen
            port = run.ports["sdkube/http"]
            result = webuiapi.WebUIApi(host="127.0.0.1", port=port).txt2img(
                prompt="a red fox in snow", width=64, height=64, steps=4, seed=7, sampler_name="Euler a")
            assert result.image.size == (64, 64)
            if attempt == 2:
                assert hub.downloads() == [], "the server fetched again"
        finally:
            run.stop()


def doctor(run: PodRun, tmp_path: Path) -> list[dict]:
    """`sdkube doctor` (from the image under test) on what the run left, through kube-rs."""
    objects, logs = snapshot_of(run, NAMESPACE)
    kube = FakeKube(objects, logs)
    try:
        config = kube.kubeconfig(tmp_path / "kubeconfig", NAMESPACE)
        result = subprocess.run(
            ["podman", "run", "--rm", "--network", "host", "--volume", f"{config}:/kube/config:ro",
             "--env", "KUBECONFIG=/kube/config", image("cpu"), "doctor", "--release", "demo", "--output", "json"],
            capture_output=True, text=True, timeout=120)
    finally:
        kube.stop()
    assert result.returncode == 1, result.stderr  # findings
    return json.loads(result.stdout)["findings"]


BAD_INPUT = {
    # a model name the catalog lacks (beside the served one: the chart refuses a server.model
    # that nothing fetches)
    "unknown-model": ({"models": [MODEL, "sd-9"]}, "unknown model \"sd-9\"", "init-unknown-model"),
    # a value sdkube refuses (the flag given through the chart's fetch.extraArgs)
    "bad-setting": ({"fetch": {"extraArgs": ["--catalog", "/data/catalog.toml", "--connections", "0"]}},
                    "invalid value '0' for '--connections", "init-bad-setting"),
    # a hostPath directory the kubelet creates as root (fsGroup never applies to hostPath)
    "unwritable-volume": ({"persistence": {"localVolume": {"type": "hostPath"}}},
                          "Permission denied (os error 13): /data belongs to uid 0", "init-store-not-writable"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_stops_the_init_container_with_a_clear_message_doctor_names(case, network, tmp_path):
    hub, proxy = network
    override, message, code = BAD_INPUT[case]
    values = bare_metal_values("cpu", hub, proxy)
    for key, value in override.items():
        values[key] = _merge(values.get(key), value)
    node = tmp_path / "node"
    # unwritable: the operator made /srv/sdkube (root, 0755) and put the catalog there, but did
    # not give it to uid 10001; the kubelet applies no fsGroup to a hostPath volume
    prepare_node(node, owner=None if case == "unwritable-volume" else UID)
    run = PodRun(render(values), node_root=node, work=tmp_path / "run", name=f"sdkube-bad-{case}",
                 cluster=[hub_ca(hub)])
    try:
        run.start()
        fetch = run.container("fetch-models")
        log = fetch.logs()
        assert fetch.exit_code == 2, log  # usage or environment
        assert message in log, log
        assert not run.main, "the server must not start after a failed init container"
        findings = doctor(run, tmp_path)
        errors = [f for f in findings if f["severity"] == "error"]
        assert [f["code"] for f in errors] == [code], findings
        if case == "unwritable-volume":
            assert "sudo chown -R 10001:10001 /srv/sdkube   # on node z-k8s-n-1" in errors[0]["fix"]["commands"], errors[0]
    finally:
        run.stop()


def test_a_wrong_sdkube_variable_stops_the_server_naming_the_variable(network, tmp_path):
    hub, proxy = network
    values = bare_metal_values("cpu", hub, proxy)
    values["server"]["extraEnv"].append({"name": "SDKUBE_QUEUE_SIZE", "value": "lots"})
    node = tmp_path / "node"
    prepare_node(node)
    run = PodRun(render(values), node_root=node, work=tmp_path / "run", name="sdkube-bad-env",
                 cluster=[hub_ca(hub)])
    try:
        run.start()
        assert run.container("fetch-models").exit_code == 0
        main = run.container("sdkube")
        for _ in range(60):
            if run.exited("sdkube"):
                break
            time.sleep(0.5)
        log = main.logs()
        assert run.exited("sdkube"), log
        assert "invalid value 'lots' for '--queue-size" in log, log
        assert 'its value comes from the environment variable SDKUBE_QUEUE_SIZE="lots"' in log, log
    finally:
        run.stop()


def _merge(base, override):
    if isinstance(base, dict) and isinstance(override, dict):
        merged = copy.deepcopy(base)
        for k, v in override.items():
            merged[k] = _merge(merged.get(k), v)
        return merged
    return override
