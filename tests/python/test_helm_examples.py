"""The install examples in deploy/helm/examples (quoted in the README) render, lint, validate
and configure what their comments promise."""

from __future__ import annotations

from pathlib import Path

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from helm_chart import CHART_DIR, NAMESPACE, REPO, render
from test_helm_render import CRD_KINDS, KUBE_VERSIONS
from test_helm_scale_out import KEDA_SCHEMAS
from test_helm_scale_out import validate as validate_keda

EXAMPLES = REPO / "deploy" / "helm" / "examples"


def _values(name: str) -> dict:
    return yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text())


@pytest.mark.parametrize("name", ["bare-metal", "cloud", "scale-out"])
def test_example_lints_and_validates(name):
    values = _values(name)
    for kube in KUBE_VERSIONS:
        report = helm.lint(CHART_DIR, values, strict=True, kube_version=f"v{kube}", namespace=NAMESPACE)
        assert not report["errors"] and all(m["severity"] < 2 for m in report["messages"]), report
        for obj in render(values).objects:
            if obj["kind"] in KEDA_SCHEMAS:
                validate_keda(obj, kube)
            elif obj["kind"] not in CRD_KINDS:
                kubernetes_validate.validate(obj, kube, strict=True)


def test_bare_metal_example_needs_no_provisioner():
    r = render(_values("bare-metal"))
    pv, pvc = r.one("PersistentVolume"), r.one("PersistentVolumeClaim")
    assert pv["spec"]["storageClassName"] == pvc["spec"]["storageClassName"] == "manual"
    assert pvc["spec"]["volumeName"] == pv["metadata"]["name"]
    assert pv["spec"]["local"]["path"] == "/srv/sdkube"
    for container in ("fetch-models", "sdkube"):
        env = r.resolved_env(r.container(container))
        assert env["HTTPS_PROXY"] == "http://192.168.6.200:3128", container
    assert r.one("Ingress")["spec"]["ingressClassName"] == "cilium"
    assert r.container("sdkube")["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_cloud_example_selects_the_accelerator_and_scales_on_queue_depth():
    r = render(_values("cloud"))
    assert r.pod_spec["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    sts = r.one("StatefulSet")
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["storageClassName"] == "premium-rwo"
    metrics = r.one("HorizontalPodAutoscaler")["spec"]["metrics"]
    assert [m["type"] for m in metrics] == ["Pods"]
    assert r.one("Ingress")["spec"]["tls"][0]["secretName"] == "sd-example-com-tls"
    assert not r.has("Secret"), "credentials come from the existing Secret"


def test_scale_out_example_runs_api_and_gpu_workers_scaled_by_keda():
    r = render(_values("scale-out"))
    api, worker = r.component("api"), r.component("worker")
    assert api["spec"]["replicas"] == 2 and "replicas" not in worker["spec"]
    so = r.one("ScaledObject")
    assert (so["spec"]["minReplicaCount"], so["spec"]["maxReplicaCount"]) == (0, 4)
    assert so["spec"]["scaleTargetRef"]["name"] == worker["metadata"]["name"]
    assert r.one("TriggerAuthentication")["spec"]["secretTargetRef"][0]["name"] == "sdkube-redis"
    assert not r.has("Secret"), "both passwords come from existing Secrets"
    assert r.one("PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteMany"], "workers share the models"
    assert r.component("redis")["kind"] == "StatefulSet"
    assert r.container("sdkube")["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in r.container("sdkube", api)["resources"].get("limits", {})
    assert r.pod_spec["terminationGracePeriodSeconds"] == 300
    backend = r.one("Ingress")["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["name"]
    assert r.one("Service", backend)["spec"]["selector"]["app.kubernetes.io/component"] == "api"
