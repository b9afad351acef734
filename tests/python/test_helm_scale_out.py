"""The chart's scale-out shape: `queue.backend: redis` renders an `api`
Deployment, the GPU `worker`s, a bundled Redis (or the address of yours) and, with
`autoscaling.keda.enabled`, KEDA's ScaledObject and TriggerAuthentication.

Every object is validated strictly: Kubernetes kinds against the API schemas (as in
test_helm_render.py), KEDA's kinds against the fields of KEDA's CRDs (keda.sh/v1alpha1, written
out below from kedacore/keda config/crd/bases: no cluster and no KEDA here). Then what decides
whether the shape works is asserted: which pods each Service and budget selects, that no
password is in a pod spec, what reaches the real binary, and that the bundled Redis's start
script and probes work with Debian's redis-server.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest

from cluster import call, free_port, wait_for
from helm_chart import CHART_DIR, FULLNAME, NAMESPACE, RELEASE, chart, render
from test_helm_render import KUBE_VERSIONS

RWX = {"accessModes": ["ReadWriteMany"]}
REDIS = f"{FULLNAME}-redis"
API = f"{FULLNAME}-api"
WORKER = f"{FULLNAME}-worker"
STREAM = f"{FULLNAME}:queue"
PASSWORD = "s3cret-Pass.word_~42"
# Secrets that live in the cluster, not in the chart (queue.redis.existingSecret)
CLUSTER_SECRETS = {"redis-cred": {"redis-password": PASSWORD, "password": PASSWORD}}

CASES = {
    # one worker: a ReadWriteOnce model claim is fine
    "bundled": {"queue": {"backend": "redis"}},
    "bundled-keda": {"queue": {"backend": "redis"}, "persistence": RWX, "autoscaling": {"keda": {"enabled": True}}},
    "keda-statefulset-workers": {
        "queue": {"backend": "redis", "redis": {"bundled": {"persistence": {"storageClass": "fast-ssd", "size": "4Gi"}}}},
        "workload": {"kind": "StatefulSet", "terminationGracePeriodSeconds": 300},
        "autoscaling": {"keda": {"enabled": True, "minReplicaCount": 1, "maxReplicaCount": 8, "activationJobs": 3}},
    },
    "external": {
        "queue": {"backend": "redis", "prefix": "team-a", "redis": {"url": "redis://redis.data.svc:6380/2", "existingSecret": "redis-cred"}},
        "persistence": RWX,
        "autoscaling": {"keda": {"enabled": True}},
    },
    "external-no-password": {
        "queue": {"backend": "redis", "redis": {"url": "redis://10.0.0.5"}},
        "autoscaling": {"keda": {"enabled": True, "maxReplicaCount": 1}},
    },
    "external-tls-user": {
        "queue": {"backend": "redis", "redis": {"url": "rediss://sdkube@redis.example.com:6379/0",
                                                  "existingSecret": "redis-cred", "existingSecretKey": "password"}},
        "workload": {"replicas": 3, "kind": "StatefulSet"},
    },
    "hpa": {
        "queue": {"backend": "redis"},
        "persistence": RWX,
        "autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 3, "targetCPUUtilizationPercentage": None,
                        "queueDepth": {"enabled": True}},
    },
    "extras": {
        "queue": {"backend": "redis", "redis": {"password": PASSWORD,
                                                  "bundled": {"persistence": {"storageClass": "-", "annotations": {"a": "b"}}}}},
        "persistence": RWX,
        "autoscaling": {"keda": {"enabled": True, "operatorNamespace": "keda-system"}},
        "existingSecret": "sd-credentials",
        "hfEndpoint": "https://hf-mirror.com",
        "proxy": {"https": "http://192.168.6.200:3128"},
        "server": {"precision": "bf16", "corsOrigins": ["https://a.example"], "extraEnv": [{"name": "RUST_LOG", "value": "info"}]},
        "networkPolicy": {"enabled": True, "from": [{"namespaceSelector": {"matchLabels": {"team": "ml"}}}]},
        "podDisruptionBudget": {"enabled": True},
        "serviceMonitor": {"enabled": True},
        "ingress": {"enabled": True, "className": "nginx",
                    "hosts": [{"host": "sd.example.com", "paths": [{"path": "/", "pathType": "Prefix"}]}]},
        "runtimeClassName": "nvidia",
        "api": {"replicas": 3, "nodeSelector": {"pool": "cpu"}},
    },
    "redis-without-volume": {
        "queue": {"backend": "redis", "redis": {"bundled": {"persistence": {"enabled": False}}}},
        "persistence": {"enabled": False},
        "models": [],
        "gpu": {"count": 0},
        "image": {"repository": "ghcr.io/sdkube/sdkube-cpu"},
    },
    "redis-existing-claim": {
        "queue": {"backend": "redis", "redis": {"bundled": {"persistence": {"existingClaim": "redis-on-manual-pv"}}}},
    },
}

# --- KEDA's CRDs (keda.sh/v1alpha1), the parts the chart may write --------------------------------

_INT32 = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}
_STR = {"type": "string"}
_META = {"type": "object", "required": ["name"], "properties": {"name": _STR, "labels": {"type": "object"}}}
KEDA_SCHEMAS = {
    "ScaledObject": {
        "type": "object",
        "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "keda.sh/v1alpha1"},
            "kind": {"const": "ScaledObject"},
            "metadata": _META,
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "required": ["scaleTargetRef", "triggers"],
                "properties": {
                    "scaleTargetRef": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["name"],
                        "properties": {"apiVersion": _STR, "kind": _STR, "name": _STR, "envSourceContainerName": _STR},
                    },
                    **{k: _INT32 for k in ("pollingInterval", "cooldownPeriod", "initialCooldownPeriod",
                                           "idleReplicaCount", "minReplicaCount", "maxReplicaCount")},
                    "advanced": {"type": "object"},
                    "fallback": {"type": "object"},
                    "triggers": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["type", "metadata"],
                            "properties": {
                                "type": _STR,
                                "name": _STR,
                                "metadata": {"type": "object", "additionalProperties": _STR},
                                "authenticationRef": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "required": ["name"],
                                    "properties": {"name": _STR, "kind": {"enum": ["TriggerAuthentication", "ClusterTriggerAuthentication"]}},
                                },
                                "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                                "useCachedMetrics": {"type": "boolean"},
                            },
                        },
                    },
                },
            },
        },
    },
    "TriggerAuthentication": {
        "type": "object",
        "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "keda.sh/v1alpha1"},
            "kind": {"const": "TriggerAuthentication"},
            "metadata": _META,
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "secretTargetRef": {"type": "array", "items": {
                        "type": "object", "additionalProperties": False, "required": ["parameter", "name", "key"],
                        "properties": {"parameter": _STR, "name": _STR, "key": _STR}}},
                    "env": {"type": "array", "items": {
                        "type": "object", "additionalProperties": False, "required": ["parameter", "name"],
                        "properties": {"parameter": _STR, "name": _STR, "containerName": _STR}}},
                },
            },
        },
    },
}
# Metadata of KEDA's redis-streams trigger (pkg/scalers/redis_streams_scaler.go, redis_scaler.go).
REDIS_STREAMS_METADATA = {
    "address", "host", "port", "addressFromEnv", "hostFromEnv", "portFromEnv", "usernameFromEnv", "passwordFromEnv",
    "stream", "consumerGroup", "pendingEntriesCount", "streamLength", "lagCount", "activationLagCount",
    "databaseIndex", "enableTLS", "unsafeSsl",
}
# What the Prometheus Operator's ServiceMonitor may hold where the chart writes.
OTHER_CRDS = {"ServiceMonitor"}


def validate(obj: dict, kube: str) -> None:
    """Strict validation of one rendered object, Kubernetes' or KEDA's."""
    if obj["kind"] in KEDA_SCHEMAS:
        jsonschema.validate(obj, KEDA_SCHEMAS[obj["kind"]])
        for trigger in obj["spec"].get("triggers", []):
            assert trigger["type"] == "redis-streams"
            unknown = set(trigger["metadata"]) - REDIS_STREAMS_METADATA
            assert not unknown, f"not redis-streams metadata: {unknown}"
    elif obj["kind"] not in OTHER_CRDS:
        kubernetes_validate.validate(obj, kube, strict=True)


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    return request.param, render(copy.deepcopy(CASES[request.param]))


def test_lint_strict_passes_for_every_case():
    for name, values in CASES.items():
        for kube in KUBE_VERSIONS:
            report = helm.lint(CHART_DIR, copy.deepcopy(values), strict=True, kube_version=f"v{kube}", namespace=NAMESPACE)
            problems = [m for m in report["messages"] if m["severity"] >= 2]
            assert not problems and not report["errors"], f"{name} on {kube}: {problems or report['errors']}"


@pytest.mark.parametrize("kube", KUBE_VERSIONS)
def test_every_object_is_valid(case, kube):
    name, r = case
    for obj in r.objects:
        try:
            validate(obj, kube)
        except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as err:
            pytest.fail(f"{name}: {obj['kind']}/{obj['metadata']['name']} invalid on {kube}: {str(err).splitlines()[0]}")


def _matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _selects(selector: dict, labels: dict) -> bool:
    """A LabelSelector (matchLabels and matchExpressions with In) against labels."""
    ok = _matches(selector.get("matchLabels", {}), labels)
    for e in selector.get("matchExpressions", []):
        assert e["operator"] == "In", e
        ok = ok and labels.get(e["key"]) in e["values"]
    return ok


def _pod_labels(r) -> dict[str, dict]:
    """Labels of every pod the release may run, by workload name (plus the test pod)."""
    pods = {o["metadata"]["name"]: o["spec"]["template"]["metadata"]["labels"]
            for o in r.objects if o["kind"] in ("Deployment", "StatefulSet")}
    pods.update({o["metadata"]["name"]: o["metadata"]["labels"] for o in r.all("Pod")})
    return pods


def _pod_specs(r) -> list[dict]:
    return [o["spec"]["template"]["spec"] for o in r.objects if o["kind"] in ("Deployment", "StatefulSet")]


def _env_names(container: dict) -> list[str]:
    return [e["name"] for e in container.get("env", [])]


def test_scale_out_invariants(case):
    """api, workers and Redis: each selects only its own pods, and each has what it needs."""
    name, r = case
    values = CASES[name]
    api, worker = r.component("api"), r.component("worker")
    assert api["kind"] == "Deployment" and api["metadata"]["name"] == API
    assert worker["metadata"]["name"] == WORKER
    assert worker["kind"] == values.get("workload", {}).get("kind", "Deployment")
    assert not [o for o in r.objects if o["metadata"]["labels"].get("app.kubernetes.io/component") == "server"]

    pods = _pod_labels(r)
    for obj in r.objects:
        labels = obj["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/instance") == RELEASE and labels.get("app.kubernetes.io/name") == "sdkube"
        if obj["kind"] in ("Deployment", "StatefulSet"):
            selector = obj["spec"]["selector"]["matchLabels"]
            selected = [p for p, l in pods.items() if _matches(selector, l)]
            assert selected == [obj["metadata"]["name"]], f"{obj['metadata']['name']} would adopt {selected}"

    # the Service, the Ingress and `helm test` reach the api
    svc = r.one("Service", FULLNAME)
    assert [p for p, l in pods.items() if _matches(svc["spec"]["selector"], l)] == [API]
    for ing in r.all("Ingress"):
        assert ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["name"] == FULLNAME
    (test_pod,) = r.all("Pod")
    assert test_pod["spec"]["containers"][0]["command"][-1] == f"http://{FULLNAME}:7860/healthz"

    # api: no GPU, no model volume, no download, probes, off the GPU nodes
    api_spec = api["spec"]["template"]["spec"]
    main = r.container("sdkube", api)
    assert "initContainers" not in api_spec
    assert [v["name"] for v in api_spec["volumes"]] == ["tmp"]
    assert not any(k.startswith("nvidia.com/") for k in main["resources"].get("limits", {}))
    assert "nodeSelector" not in api_spec or "nvidia.com/gpu.present" not in api_spec["nodeSelector"]
    assert "tolerations" not in api_spec and "runtimeClassName" not in api_spec
    assert main["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert main["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert main["ports"] == [{"name": "http", "containerPort": 7860, "protocol": "TCP"}]
    assert api["spec"]["replicas"] == values.get("api", {}).get("replicas", 2)

    # workers: today's GPU pod, with the queue
    worker_main = r.container("sdkube")
    gpus = values.get("gpu", {}).get("count", 1)
    assert worker_main["resources"].get("limits", {}).get("nvidia.com/gpu", 0) == gpus
    if values.get("models", ["sd-1.5"]):
        assert r.pod_spec["initContainers"][0]["name"] == "fetch-models"
    mounts = {m["mountPath"]: m["name"] for m in worker_main["volumeMounts"]}
    assert mounts["/data"] == "data"
    assert worker_main["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert worker_main["startupProbe"]["httpGet"]["path"] == "/healthz"
    grace = values.get("workload", {}).get("terminationGracePeriodSeconds", 60)
    assert r.pod_spec["terminationGracePeriodSeconds"] == grace
    assert r.resolved_env(worker_main, CLUSTER_SECRETS)["SDKUBE_SHUTDOWN_GRACE"] == str(grace - 10)
    if values.get("runtimeClassName"):
        assert r.pod_spec["runtimeClassName"] == values["runtimeClassName"]

    # roles and the queue, in both
    for container, role in ((main, "api"), (worker_main, "worker")):
        names = _env_names(container)
        env = {e["name"]: e for e in container["env"]}
        assert env["SDKUBE_ROLE"]["value"] == role
        queue = env["SDKUBE_QUEUE"]["value"]
        assert queue.startswith(("redis://", "rediss://"))
        assert "@" not in queue.split("://")[1] or ":" not in queue.split("@")[0].split("://")[1], \
            "no password in the URL"
        if "SDKUBE_QUEUE_PASSWORD" in env:
            assert "secretKeyRef" in env["SDKUBE_QUEUE_PASSWORD"]["valueFrom"]
        resolved = r.resolved_env(container, CLUSTER_SECRETS)
        assert resolved["SDKUBE_QUEUE_PREFIX"] == values["queue"].get("prefix", FULLNAME)

    # every pod of the release runs as non-root with a read-only root filesystem
    for spec in _pod_specs(r):
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["automountServiceAccountToken"] is False
        for c in spec.get("initContainers", []) + spec["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, c["name"]
            assert sc["capabilities"]["drop"] == ["ALL"] and sc["runAsNonRoot"] is True, c["name"]
            assert c.get("resources"), c["name"]

    assert "sdkube doctor --namespace sd --release demo" in r.notes
    assert "Scale-out" in r.notes and "api pod(s)" in r.notes


def _password_ref(r, container: dict) -> dict | None:
    for e in container.get("env", []):
        # sdkube's containers read SDKUBE_QUEUE_PASSWORD, the bundled Redis REDIS_PASSWORD
        if e["name"] in ("SDKUBE_QUEUE_PASSWORD", "REDIS_PASSWORD"):
            return e["valueFrom"]["secretKeyRef"]
    return None


def test_bundled_redis():
    """A one-pod StatefulSet with its headless Service, AOF on, a generated password."""
    r = render(copy.deepcopy(CASES["bundled"]))
    sts = r.component("redis")
    assert sts["kind"] == "StatefulSet" and sts["metadata"]["name"] == REDIS
    assert sts["spec"]["replicas"] == 1 and sts["spec"]["serviceName"] == REDIS
    svc = r.one("Service", REDIS)
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["ports"] == [{"name": "redis", "port": 6379, "targetPort": "redis", "protocol": "TCP"}]
    assert _matches(svc["spec"]["selector"], sts["spec"]["template"]["metadata"]["labels"])

    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data"
    assert "storageClassName" not in claim["spec"], "unset storageClass: the default class"
    assert claim["spec"]["resources"]["requests"]["storage"] == "8Gi"
    assert sts["spec"]["persistentVolumeClaimRetentionPolicy"] == {"whenDeleted": "Retain", "whenScaled": "Retain"}

    spec = sts["spec"]["template"]["spec"]
    (redis,) = spec["containers"]
    assert redis["image"] == "docker.io/library/redis:7.2-alpine"
    script = redis["args"][0]
    for flag in ("--appendonly yes", "--appendfsync everysec", "--dir /data", "--save ''", "--maxmemory 1gb",
                 "--maxmemory-policy noeviction"):
        assert flag in script, flag
    assert "requirepass" in script and "$REDIS_PASSWORD" in script
    assert spec["securityContext"]["runAsUser"] == 999 and spec["securityContext"]["fsGroup"] == 999
    assert redis["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["name"] for m in redis["volumeMounts"]}
    assert mounts == {"/data": "data", "/run/redis": "run"}
    run = next(v for v in spec["volumes"] if v["name"] == "run")
    assert run["emptyDir"]["medium"] == "Memory", "the config file with the password never touches a disk"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert "redis-cli ping" in redis[probe]["exec"]["command"][-1], probe
    assert redis["resources"]["limits"]["memory"] == "2Gi"
    assert "tolerations" not in spec and "nodeSelector" not in spec, "Redis stays off the GPU nodes"

    # the generated password: one Secret, read by Redis, its probes, the api and the workers
    secret = r.one("Secret", REDIS)
    password = base64.b64decode(secret["data"]["redis-password"]).decode()
    assert re.fullmatch(r"[A-Za-z0-9]{32}", password)
    want = {"name": REDIS, "key": "redis-password"}
    for container in (redis, r.container("sdkube", r.component("api")), r.container("sdkube")):
        assert _password_ref(r, container) == want
    assert {e["name"]: e["valueFrom"]["secretKeyRef"] for e in redis["env"]}["REDISCLI_AUTH"] == want
    env = r.resolved_env(r.container("sdkube"))
    assert env["SDKUBE_QUEUE"] == f"redis://{REDIS}.{NAMESPACE}.svc:6379/0"
    assert env["SDKUBE_QUEUE_PASSWORD"] == password
    for workload in (sts, r.component("api"), r.workload):
        assert "checksum/redis-secret" in workload["spec"]["template"]["metadata"]["annotations"], "a new password rolls them"
    # one worker by default: the ReadWriteOnce model claim is fine, and no autoscaler
    assert r.workload["spec"]["replicas"] == 1
    assert not r.has("ScaledObject") and not r.has("HorizontalPodAutoscaler")
    assert "redis-cli XLEN demo-sdkube:queue" in r.notes


def test_no_password_in_any_pod_spec():
    """A password given in the values lives in the Secret only; pods reference it."""
    r = render(copy.deepcopy(CASES["extras"]))
    secret = r.one("Secret", REDIS)
    assert base64.b64decode(secret["data"]["redis-password"]).decode() == PASSWORD
    for obj in r.objects:
        if obj["kind"] != "Secret":
            assert PASSWORD not in json.dumps(obj), f"{obj['kind']}/{obj['metadata']['name']} shows the password"
    assert PASSWORD not in r.notes


def test_redis_storage_class_conventions():
    def claim(persistence):
        r = render({"queue": {"backend": "redis", "redis": {"bundled": {"persistence": persistence}}}})
        return r.component("redis")["spec"].get("volumeClaimTemplates")

    assert claim({"storageClass": "-"})[0]["spec"]["storageClassName"] == ""
    assert claim({"storageClass": "fast-ssd"})[0]["spec"]["storageClassName"] == "fast-ssd"
    assert claim({"accessModes": ["ReadWriteOncePod"]})[0]["spec"]["accessModes"] == ["ReadWriteOncePod"]
    assert claim({"enabled": False}) is None
    r = render(copy.deepcopy(CASES["redis-without-volume"]))
    volumes = {v["name"]: v for v in r.component("redis")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["data"] == {"name": "data", "emptyDir": {}}
    assert "lost when the Redis pod restarts" in r.notes
    r = render(copy.deepcopy(CASES["redis-existing-claim"]))
    sts = r.component("redis")
    assert "volumeClaimTemplates" not in sts["spec"]
    volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"] == {"claimName": "redis-on-manual-pv"}


def test_external_redis_with_existing_secret():
    r = render(copy.deepcopy(CASES["external"]))
    assert not r.has("StatefulSet") and not r.has("Secret"), "no bundled Redis, no password kept by the chart"
    assert not [o for o in r.objects if o["metadata"]["name"] == REDIS]
    ref = {"name": "redis-cred", "key": "redis-password"}
    for container in (r.container("sdkube", r.component("api")), r.container("sdkube")):
        assert _password_ref(r, container) == ref
        env = r.resolved_env(container, {"redis-cred": {"redis-password": "pw"}})
        assert env["SDKUBE_QUEUE"] == "redis://redis.data.svc:6380/2"
        assert env["SDKUBE_QUEUE_PASSWORD"] == "pw"
        assert env["SDKUBE_QUEUE_PREFIX"] == "team-a"
    (trigger,) = r.one("ScaledObject")["spec"]["triggers"]
    assert trigger["metadata"]["address"] == "redis.data.svc:6380"
    assert trigger["metadata"]["databaseIndex"] == "2"
    assert trigger["metadata"]["stream"] == "team-a:queue"
    auth = r.one("TriggerAuthentication")
    assert auth["spec"]["secretTargetRef"] == [{"parameter": "password", **ref}]

    r = render(copy.deepcopy(CASES["external-no-password"]))
    env = r.resolved_env(r.container("sdkube"))
    assert env["SDKUBE_QUEUE"] == "redis://10.0.0.5:6379/0", "no password: none in the URL, the port filled in"
    assert "SDKUBE_QUEUE_PASSWORD" not in env
    assert not r.has("TriggerAuthentication")
    assert "authenticationRef" not in r.one("ScaledObject")["spec"]["triggers"][0]

    r = render(copy.deepcopy(CASES["external-tls-user"]))
    env = r.resolved_env(r.container("sdkube"), {"redis-cred": {"password": "pw"}})
    assert env["SDKUBE_QUEUE"] == "rediss://sdkube@redis.example.com:6379/0"
    assert env["REDIS_USERNAME"] == "sdkube"
    assert r.workload["spec"]["replicas"] == 3, "fixed workers without an autoscaler"


def test_keda_scaled_object():
    r = render(copy.deepcopy(CASES["bundled-keda"]))
    so = r.one("ScaledObject")
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    assert so["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": WORKER}
    assert (so["spec"]["minReplicaCount"], so["spec"]["maxReplicaCount"]) == (0, 4), "no GPU held while idle"
    assert so["spec"]["cooldownPeriod"] == 300 and so["spec"]["pollingInterval"] == 15
    (trigger,) = so["spec"]["triggers"]
    assert trigger["type"] == "redis-streams"
    # no consumerGroup: KEDA reads XLEN, which counts waiting and running jobs (pending-entries
    # mode would never wake a worker from zero: nothing is pending without a consumer)
    assert trigger["metadata"] == {
        "address": f"{REDIS}.{NAMESPACE}.svc:6379",
        "databaseIndex": "0",
        "stream": STREAM,
        "streamLength": "2",
    }
    auth = r.one("TriggerAuthentication")
    assert trigger["authenticationRef"] == {"name": auth["metadata"]["name"]}
    assert auth["spec"] == {"secretTargetRef": [{"parameter": "password", "name": REDIS, "key": "redis-password"}]}
    assert "replicas" not in r.workload["spec"], "KEDA owns the worker count; an upgrade must not reset it"
    assert r.component("api")["spec"]["replicas"] == 2, "the api is not scaled by KEDA"
    assert not r.has("HorizontalPodAutoscaler")
    assert "Workers: 0 to 4, scaled by KEDA" in r.notes and f"get scaledobject {WORKER}" in r.notes
    assert "waiting for a GPU worker (N queued)" in r.notes

    r = render(copy.deepcopy(CASES["keda-statefulset-workers"]))
    so = r.one("ScaledObject")
    assert so["spec"]["scaleTargetRef"]["kind"] == "StatefulSet"
    assert so["spec"]["triggers"][0]["metadata"]["activationLagCount"] == "3"
    assert r.one("Service", f"{WORKER}-headless")["spec"]["clusterIP"] == "None"
    assert r.workload["spec"]["serviceName"] == f"{WORKER}-headless"
    assert r.workload["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"

    r = render(copy.deepcopy(CASES["external-tls-user"]))
    assert not r.has("ScaledObject"), "KEDA off"


def test_keda_with_a_tls_user():
    values = copy.deepcopy(CASES["external-tls-user"])
    values["autoscaling"] = {"keda": {"enabled": True}}
    r = render(values)
    (trigger,) = r.one("ScaledObject")["spec"]["triggers"]
    assert trigger["metadata"]["enableTLS"] == "true"
    auth = r.one("TriggerAuthentication")["spec"]
    assert auth["secretTargetRef"] == [{"parameter": "password", "name": "redis-cred", "key": "password"}]
    assert auth["env"] == [{"parameter": "username", "name": "REDIS_USERNAME", "containerName": "sdkube"}]
    assert "REDIS_USERNAME" in _env_names(r.container("sdkube")), "KEDA reads it from the scale target's container"


def test_hpa_targets_the_workers_on_the_cluster_wide_queue_depth():
    r = render(copy.deepcopy(CASES["hpa"]))
    hpa = r.one("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": WORKER}
    (metric,) = hpa["spec"]["metrics"]
    # every pod reports the whole queue: an External value divided by the target, not a
    # Pods average multiplied by the replicas
    assert metric == {"type": "External", "external": {
        "metric": {"name": "sdkube_queue_depth", "selector": {"matchLabels": {"service": FULLNAME}}},
        "target": {"type": "AverageValue", "averageValue": "2"}}}
    assert "replicas" not in r.workload["spec"]
    assert f"Workers: 1 to 3, scaled by the HorizontalPodAutoscaler {FULLNAME}." in r.notes


def test_network_policies_let_api_workers_and_keda_reach_redis():
    r = render(copy.deepcopy(CASES["extras"]))
    pods = _pod_labels(r)
    policies = {p["metadata"]["name"]: p for p in r.all("NetworkPolicy")}
    assert set(policies) == {FULLNAME, WORKER, REDIS}
    redis = policies[REDIS]
    assert [p for p, l in pods.items() if _matches(redis["spec"]["podSelector"]["matchLabels"], l)] == [REDIS]
    (rule,) = redis["spec"]["ingress"]
    assert rule["ports"] == [{"port": "redis", "protocol": "TCP"}]
    let_in = [p for p, l in pods.items() if any("podSelector" in peer and _selects(peer["podSelector"], l) for peer in rule["from"])]
    assert sorted(let_in) == sorted([API, WORKER]), "the test pod and Redis itself are not let in"
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "keda-system"}}} in rule["from"]
    # the api keeps today's rule: the peers, and the helm test pod
    api_rule = policies[FULLNAME]["spec"]["ingress"][0]
    assert [p for p, l in pods.items() if _matches(policies[FULLNAME]["spec"]["podSelector"]["matchLabels"], l)] == [API]
    assert any(_matches(peer.get("podSelector", {}).get("matchLabels", {"-": "-"}), pods[f"{FULLNAME}-test-healthz"])
               for peer in api_rule["from"])
    assert [p for p, l in pods.items() if _matches(policies[WORKER]["spec"]["podSelector"]["matchLabels"], l)] == [WORKER]
    for policy in policies.values():
        assert policy["spec"]["policyTypes"] == ["Ingress"], "egress stays open: downloads, and Redis from the pods"


def test_budgets_and_monitoring_per_workload():
    r = render(copy.deepcopy(CASES["extras"]))
    pods = _pod_labels(r)
    budgets = {b["metadata"]["name"]: b for b in r.all("PodDisruptionBudget")}
    assert set(budgets) == {API, WORKER}, "none for the single Redis: it could only block drains"
    for name, budget in budgets.items():
        assert [p for p, l in pods.items() if _matches(budget["spec"]["selector"]["matchLabels"], l)] == [name]
    monitor = r.one("ServiceMonitor")
    scraped = [s["metadata"]["name"] for s in r.all("Service") if _selects(monitor["spec"]["selector"], s["metadata"]["labels"])]
    assert sorted(scraped) == sorted([FULLNAME, f"{WORKER}-metrics"]), "api and workers, each pod once"
    metrics = r.one("Service", f"{WORKER}-metrics")
    assert [p for p, l in pods.items() if _matches(metrics["spec"]["selector"], l)] == [WORKER]


def test_api_overrides_what_would_break_it():
    """bf16 is a GPU precision: on the GPU-less api it would be refused at start, so the api
    gets `auto` while the workers keep the value."""
    r = render(copy.deepcopy(CASES["extras"]))
    assert r.resolved_env(r.container("sdkube", r.component("api")))["SDKUBE_PRECISION"] == "auto"
    assert r.resolved_env(r.container("sdkube"))["SDKUBE_PRECISION"] == "bf16"
    api_env = r.resolved_env(r.container("sdkube", r.component("api")), {"sd-credentials": {"api-key": "k"}})
    assert api_env["SDKUBE_API_KEY"] == "k", "the api enforces the API key"
    assert api_env["RUST_LOG"] == "info" and api_env["SDKUBE_CORS_ORIGINS"] == "https://a.example"
    assert "HTTPS_PROXY" not in api_env, "the api downloads nothing"
    assert r.resolved_env(r.container("sdkube"))["HTTPS_PROXY"] == "http://192.168.6.200:3128"
    assert r.component("api")["spec"]["template"]["spec"]["nodeSelector"] == {"pool": "cpu"}


BAD_COMBINATIONS = {
    "several workers on a ReadWriteOnce claim": (
        {"queue": {"backend": "redis"}, "workload": {"replicas": 2}}, "persistence.accessModes=[ReadWriteMany]"),
    "KEDA's maximum on a ReadWriteOnce claim": (
        {"queue": {"backend": "redis"}, "autoscaling": {"keda": {"enabled": True}}}, "up to 4 workers would share the model claim"),
    "KEDA without a shared queue": ({"autoscaling": {"keda": {"enabled": True, "maxReplicaCount": 1}}}, "set queue.backend=redis"),
    "KEDA and the HPA": (
        {"queue": {"backend": "redis"}, "persistence": RWX, "autoscaling": {"enabled": True, "keda": {"enabled": True}}},
        "enable one"),
    "KEDA minimum above maximum": (
        {"queue": {"backend": "redis"}, "persistence": RWX, "autoscaling": {"keda": {"enabled": True, "minReplicaCount": 5}}},
        "minReplicaCount is larger"),
    "password in the URL": (
        {"queue": {"backend": "redis", "redis": {"url": "redis://:hunter2@redis:6379/0"}}}, "must not carry a password"),
    "not a Redis URL": ({"queue": {"backend": "redis", "redis": {"url": "https://redis:6379"}}}, "must start with redis://"),
    "a path that is no database": (
        {"queue": {"backend": "redis", "redis": {"url": "redis://redis:6379/queue?x=1"}}}, "only the database number"),
    "password beside an existing Secret": (
        {"queue": {"backend": "redis", "redis": {"existingSecret": "r", "password": "p"}}}, "queue.redis.password is ignored"),
    "password that cannot go into a URL": (
        {"queue": {"backend": "redis", "redis": {"password": "p@ss/word"}}}, "only letters, digits and -._~"),
}


@pytest.mark.parametrize("name", sorted(BAD_COMBINATIONS))
def test_chart_refuses_with_the_fix(name):
    values, fix = BAD_COMBINATIONS[name]
    chart().validate_schema(values)  # each value is fine alone
    with pytest.raises(helm.HelmRenderError) as err:
        render(copy.deepcopy(values))
    message = str(err.value)
    assert fix in message, message
    assert "hunter2" not in message and "p@ss" not in message, "a refusal never prints the password"


SCHEMA_REJECTS = {
    "unknown backend": ({"queue": {"backend": "nats"}}, "/queue/backend"),
    "typo under queue": ({"queue": {"backnd": "redis"}}, "backnd"),
    "api replicas zero": ({"api": {"replicas": 0}}, "/api/replicas"),
    "bad fsync policy": ({"queue": {"redis": {"bundled": {"appendfsync": "sometimes"}}}}, "/queue/redis/bundled/appendfsync"),
    "KEDA target as string": ({"autoscaling": {"keda": {"jobsPerWorker": "2"}}}, "/autoscaling/keda/jobsPerWorker"),
    "KEDA typo": ({"autoscaling": {"keda": {"maxReplicas": 3}}}, "maxReplicas"),
    "bad maxmemory": ({"queue": {"redis": {"bundled": {"maxmemory": "1 GB"}}}}, "/queue/redis/bundled/maxmemory"),
    "bad Redis claim size": ({"queue": {"redis": {"bundled": {"persistence": {"size": "8 GB"}}}}}, "/queue/redis/bundled/persistence/size"),
}


@pytest.mark.parametrize("name", sorted(SCHEMA_REJECTS))
def test_schema_rejects_new_keys(name):
    values, where = SCHEMA_REJECTS[name]
    with pytest.raises(helm.HelmValuesError) as err:
        chart().validate_schema(values)
    assert where in str(err.value), str(err.value)


def test_api_mounts_the_ca_bundle_for_a_tls_redis():
    r = render({"queue": {"backend": "redis", "redis": {"url": "rediss://redis.example.com:6380/0"}},
                "caBundle": {"secret": "corp-ca"},
                "server": {"extraEnv": [{"name": "SSL_CERT_FILE", "value": "/etc/sdkube/ca/ca.pem"}]}})
    api = r.component("api")
    volumes = {v["name"]: v for v in api["spec"]["template"]["spec"]["volumes"]}
    assert volumes["ca-bundle"]["secret"]["secretName"] == "corp-ca"
    main = r.container("sdkube", api)
    assert {"name": "ca-bundle", "mountPath": "/etc/sdkube/ca", "readOnly": True} in main["volumeMounts"]
    assert r.resolved_env(main)["SSL_CERT_FILE"] == "/etc/sdkube/ca/ca.pem"


def test_doctor_scale_out_contract_keys_exist():
    """`sdkube doctor` names these keys in its fixes for a shared queue's release
    (crates/doctor/src/analyze/scale_out.rs, containers.rs, storage.rs)."""
    defaults = chart().values
    for path in (
        "queue.backend", "queue.galleryKeep", "queue.resultTTL",
        "queue.redis.url", "queue.redis.existingSecret", "queue.redis.existingSecretKey",
        "queue.redis.bundled.maxmemory", "queue.redis.bundled.resources",
        "queue.redis.bundled.persistence.existingClaim", "queue.redis.bundled.persistence.enabled",
        "queue.redis.bundled.persistence.storageClass", "queue.redis.bundled.tolerations",
        "queue.redis.bundled.nodeSelector", "api.resources", "api.tolerations", "api.nodeSelector",
        "autoscaling.keda.enabled", "autoscaling.keda.operatorNamespace", "workload.replicas",
        "caBundle.secret", "server.extraEnv",
    ):
        node = defaults
        for part in path.split("."):
            assert isinstance(node, dict) and part in node, f"values.yaml lost {path}"
            node = node[part]


def test_memory_backend_renders_no_scale_out_object():
    r = render({"queue": {"redis": {"password": PASSWORD, "url": "redis://x"}}, "autoscaling": {"keda": {"minReplicaCount": 1}}})
    kinds = {(o["kind"], o["metadata"]["labels"].get("app.kubernetes.io/component")) for o in r.objects}
    assert not {k for k in kinds if k[1] in ("api", "worker", "redis")}, kinds
    assert not r.has("ScaledObject") and not r.has("StatefulSet")
    assert "SDKUBE_QUEUE_PREFIX" not in r.one("ConfigMap")["data"]
    assert "env" not in r.container("sdkube"), "the single server's pod is unchanged"


# --- what reaches the binary ---------------------------------------------------------------------


def _binary() -> Path:
    from test_helm_binary import _binary as binary

    return binary()


def _print_config(container: dict, env: dict[str, str]) -> dict:
    command = container["command"] + container.get("args", [])
    clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env}
    done = subprocess.run([str(_binary()), *command[1:], "--print-config"], env=clean,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("name", sorted(CASES))
def test_roles_and_queue_reach_the_binary(name):
    values = copy.deepcopy(CASES[name])
    r = render(values)
    secrets = CLUSTER_SECRETS
    for component, role in (("api", "api"), ("worker", "worker")):
        container = r.container("sdkube", r.component(component))
        config = _print_config(container, r.resolved_env(container, secrets))
        assert config["role"] == role
        assert config["queue"].startswith(("redis://", "rediss://")) and PASSWORD not in config["queue"]
        assert config["queue_prefix"] == values["queue"].get("prefix", FULLNAME)
        assert (config["visibility_timeout"], config["result_ttl"], config["gallery_keep"], config["max_deliveries"]) == (
            60, 3600, 500, 3)
        if role == "worker":
            grace = values.get("workload", {}).get("terminationGracePeriodSeconds", 60)
            assert config["shutdown_grace"] == grace - 10


def test_queue_values_reach_the_binary():
    values = {"queue": {"backend": "redis", "prefix": "sd-prod", "visibilityTimeout": 120, "resultTTL": 600,
                        "galleryKeep": 50, "maxDeliveries": 5}}
    r = render(values)
    container = r.container("sdkube")
    config = _print_config(container, r.resolved_env(container))
    assert (config["queue_prefix"], config["visibility_timeout"], config["result_ttl"], config["gallery_keep"],
            config["max_deliveries"]) == ("sd-prod", 120, 600, 50, 5)


# --- the bundled Redis, run: its start script, its probes, the api against it --------------------


def _local(script: str, workdir: Path, port: int) -> str:
    """The container's script with its paths and port moved into `workdir` (same flags)."""
    return (script.replace("/run/redis", str(workdir / "run")).replace("--dir /data", f"--dir {workdir / 'data'}")
            .replace("--port 6379", f"--port {port} --bind 127.0.0.1"))


@pytest.mark.skipif(not shutil.which("redis-server") or not shutil.which("redis-cli"),
                    reason="needs Debian's redis-server and redis-cli (scripts/install-test-deps.sh)")
def test_bundled_redis_runs_and_the_api_uses_it(tmp_path):
    """The rendered start script under sh with redis-server: the password (with characters
    Redis's config syntax must escape) is required, the AOF is on, the probes pass; then the
    rendered api container, pointed at it, is ready with no worker (jobs would wait)."""
    tricky = 'a"b\\c d'  # quote, backslash and space: what the script escapes
    r = render({"queue": {"backend": "redis"}, "server": {"precision": "bf16"}})
    sts = r.component("redis")
    (redis,) = sts["spec"]["template"]["spec"]["containers"]
    port = free_port()
    (tmp_path / "run").mkdir()
    (tmp_path / "data").mkdir()
    env = {"PATH": os.environ["PATH"], "REDIS_PASSWORD": tricky, "REDISCLI_AUTH": tricky}
    server = subprocess.Popen(["sh", "-c", _local(redis["args"][0], tmp_path, port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    api = None
    try:
        cli = ["redis-cli", "-p", str(port)]

        def ask(*args, auth=True):
            return subprocess.run(cli + list(args), env=env if auth else {"PATH": os.environ["PATH"]},
                                  capture_output=True, text=True, timeout=10).stdout.strip()

        wait_for("redis", lambda: ask("ping") == "PONG", timeout=20)
        assert "NOAUTH" in ask("ping", auth=False), "a password is required"
        assert ask("config", "get", "appendonly").splitlines()[-1] == "yes"
        assert ask("config", "get", "appendfsync").splitlines()[-1] == "everysec"
        assert ask("config", "get", "maxmemory").splitlines()[-1] == str(1024**3)
        assert oct((tmp_path / "run" / "redis.conf").stat().st_mode & 0o777) == "0o600"
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            command = redis[probe]["exec"]["command"]
            done = subprocess.run([*command[:-1], command[-1].replace("redis-cli", f"redis-cli -p {port}")], env=env, timeout=10)
            assert done.returncode == 0, probe

        # the api as rendered (bf16 for the workers: the api must still start), pointed here
        # with the password the chart generated
        container = r.container("sdkube", r.component("api"))
        generated = base64.b64decode(r.one("Secret", REDIS)["data"]["redis-password"]).decode()
        ask("config", "set", "requirepass", generated)
        env["REDISCLI_AUTH"] = generated
        api_env = r.resolved_env(container)
        api_env["SDKUBE_QUEUE"] = api_env["SDKUBE_QUEUE"].replace(f"{REDIS}.{NAMESPACE}.svc:6379", f"127.0.0.1:{port}")
        http = free_port()
        api_env["SDKUBE_LISTEN"] = f"127.0.0.1:{http}"
        api_env["PATH"] = os.environ["PATH"]
        command = container["command"] + container["args"]
        log = tmp_path / "api.log"
        with log.open("w") as out:
            api = subprocess.Popen([str(_binary()), *command[1:]], env=api_env, cwd=tmp_path,
                                   stdout=out, stderr=subprocess.STDOUT)

        def ready():
            assert api.poll() is None, f"the api exited: {log.read_text()}"
            status, body = call("GET", f"http://127.0.0.1:{http}/readyz", timeout=5)
            return body if status == 200 else None

        body = wait_for("the api's /readyz", ready, timeout=60)
        assert "0 worker(s)" in body["message"], body
        _, metrics = call("GET", f"http://127.0.0.1:{http}/metrics")
        assert "sdkube_workers 0" in metrics
        assert ask("exists", STREAM) == "1", "the stream KEDA watches exists under the chart's prefix"
    finally:
        for proc in (api, server):
            if proc and proc.poll() is None:
                proc.terminate()
                proc.wait(10)


def test_helm3_renders_what_helm4_renders(tmp_path):
    """Every case under the Helm 3 binary too (the generated password aside: random)."""
    from test_helm3 import _helm3_template
    import yaml

    def key(o):
        return o["kind"], o["metadata"]["name"]

    def scrub(o):
        o = copy.deepcopy(o)
        if o["kind"] == "Secret" and o["metadata"]["name"] == REDIS:
            o["data"] = {}
        annotations = o.get("spec", {}).get("template", {}).get("metadata", {}).get("annotations", {})
        annotations.pop("checksum/redis-secret", None)
        return o

    for name, values in CASES.items():
        done = _helm3_template(copy.deepcopy(values), tmp_path)
        assert done.returncode == 0, f"{name}: {done.stderr}"
        helm3 = {key(o): scrub(o) for o in yaml.safe_load_all(done.stdout) if o}
        helm4 = {key(o): scrub(o) for o in render(copy.deepcopy(values)).objects}
        assert helm3 == helm4, f"{name}: Helm 3 and Helm 4 differ"
