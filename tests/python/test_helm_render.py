"""The chart rendered by the real Helm engine for a matrix of values.

Every rendered object is validated strictly against the Kubernetes OpenAPI schemas of the
oldest version the chart supports and the newest one `kubernetes-validate` ships, then the
fields that decide whether the install works are asserted. The seed-like case replays the
field report (seed/000_65ce7a5481f6ce45.txt): no provisioner, a hand-made `manual` PV, a
proxy, an ingress.
"""

from __future__ import annotations

import copy

import helm_python as helm
import kubernetes_validate
import pytest

from helm_chart import CHART_DIR, FULLNAME, NAMESPACE, RELEASE, render

KUBE_VERSIONS = ["1.25.0", "1.37.0"]
# Objects of CRDs have no schema in kubernetes-validate; their fields are asserted below.
CRD_KINDS = {"ServiceMonitor"}
PROXY = "http://192.168.6.200:3128"

SEED = {
    "persistence": {
        "storageClass": "manual",
        "size": "30Gi",
        "localVolume": {
            "enabled": True,
            "type": "hostPath",
            "path": "/var/lib/sdkube",
            "nodeName": "z-k8s-n-1",
            "storageClass": "manual",
        },
    },
    "proxy": {"http": PROXY, "https": PROXY, "noProxy": "localhost,127.0.0.1,.svc,.cluster.local,10.0.0.0/8"},
    "ingress": {
        "enabled": True,
        "className": "cilium",
        "hosts": [{"host": "stable-diffusion.example.lan", "paths": [{"path": "/", "pathType": "Prefix"}]}],
    },
    "server": {"vram": "low", "precision": "fp32"},
}

CASES = {
    "defaults": {},
    "seed": SEED,
    "dash": {"persistence": {"storageClass": "-"}},
    "existing-claim": {"persistence": {"existingClaim": "models-on-nfs"}},
    "ingress-tls": {
        "ingress": {
            "enabled": True,
            "className": "nginx",
            "annotations": {"nginx.ingress.kubernetes.io/proxy-body-size": "20m"},
            "hosts": [{"host": "sd.example.com", "paths": [{"path": "/", "pathType": "Prefix"}]}],
            "tls": [{"secretName": "sd-tls", "hosts": ["sd.example.com"]}],
        }
    },
    "gpu-0": {"gpu": {"count": 0}, "image": {"repository": "ghcr.io/sdkube/sdkube-cpu"}},
    "statefulset": {"workload": {"kind": "StatefulSet", "replicas": 2}, "persistence": {"storageClass": "fast-ssd"}},
    "hpa": {
        "workload": {"kind": "StatefulSet"},
        "autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 3, "queueDepth": {"enabled": True}},
    },
    "extras": {
        "hfEndpoint": "https://hf-mirror.com",
        "hfToken": "hf_secret",
        "models": ["sd-1.5", "realesrgan-x4plus", "gfpgan-1.4"],
        "server": {"apiKey": "k3y", "basicAuth": "admin:pw", "corsOrigins": ["https://a.example", "https://b.example"]},
        "networkPolicy": {"enabled": True, "from": [{"namespaceSelector": {"matchLabels": {"team": "ml"}}}]},
        "podDisruptionBudget": {"enabled": True},
        "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        "runtimeClassName": "nvidia",
        "gpu": {"count": 2},
    },
    "no-persistence": {"persistence": {"enabled": False}, "models": []},
    "ca-bundle": {"caBundle": {"secret": "corp-ca", "key": "proxy-ca.pem"}, "proxy": {"https": PROXY}},
}


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
def test_every_object_is_valid_kubernetes(case, kube):
    name, rendered = case
    assert rendered.objects, name
    for obj in rendered.objects:
        if obj["kind"] in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, kube, strict=True)
        except kubernetes_validate.ValidationError as err:
            first = str(err).splitlines()[0]
            pytest.fail(f"{name}: {obj['kind']}/{obj['metadata']['name']} invalid on {kube}: {first}")


def test_invariants(case):
    """What must hold whatever the values: labels, probes, security, the init container."""
    name, r = case
    for obj in r.objects:
        labels = obj["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/name") == "sdkube", (name, obj["kind"])
        assert labels.get("app.kubernetes.io/instance") == RELEASE, (name, obj["kind"])
    pod = r.pod_spec
    assert r.workload["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["fsGroup"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False

    main = r.container("sdkube")
    assert main["command"] == ["sdkube"] and main["args"][0] == "serve"
    assert main["ports"] == [{"name": "http", "containerPort": 7860, "protocol": "TCP"}]
    assert main["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert main["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert main["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    startup = main["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "startup must allow 10 min of model loading"

    containers = pod.get("initContainers", []) + pod["containers"]
    for c in containers:
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True, c["name"]
        assert sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["capabilities"]["drop"] == ["ALL"], c["name"]
        assert sc["runAsNonRoot"] is True, c["name"]
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert mounts["/data"] == "data" and mounts["/tmp"] == "tmp", c["name"]

    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["shm"]["emptyDir"]["medium"] == "Memory"
    assert {m["mountPath"]: m["name"] for m in main["volumeMounts"]}["/dev/shm"] == "shm"

    svc = r.one("Service", FULLNAME)
    assert svc["spec"]["ports"][0]["name"] == "http" and svc["spec"]["ports"][0]["targetPort"] == "http"
    selector = r.workload["spec"]["selector"]["matchLabels"]
    assert selector == {
        "app.kubernetes.io/name": "sdkube",
        "app.kubernetes.io/instance": RELEASE,
        "app.kubernetes.io/component": "server",
    }
    assert svc["spec"]["selector"] == selector
    assert _matches(selector, r.workload["spec"]["template"]["metadata"]["labels"])
    for bare in r.all("Pod"):  # a matching bare pod would be adopted by the ReplicaSet
        assert not _matches(selector, bare["metadata"]["labels"]), bare["metadata"]["name"]
    for monitor in r.all("ServiceMonitor"):
        selected = [s for s in r.all("Service") if _matches(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
        assert [s["metadata"]["name"] for s in selected] == [FULLNAME], "scrape each pod once"

    values = CASES[name]
    models = values.get("models", ["sd-1.5"])
    if models:
        init = r.container("fetch-models")
        assert pod["initContainers"][0]["name"] == "fetch-models"
        assert init["image"] == main["image"], "the init container runs the same image"
        assert init["command"] == ["sdkube"]
        assert init["args"] == ["fetch", *models, "--store", "/data/models", "--progress", "json"]
        init_env = {e["name"] for e in init["env"]}
        main_env = {e["name"] for e in main["env"]} if "env" in main else set()
        assert "nvidia.com/gpu" not in init["resources"].get("limits", {}), "downloads need no GPU"
        # every network setting reaches both containers
        for var in ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy", "HF_ENDPOINT", "HF_TOKEN"):
            assert (var in init_env) == (var in main_env), f"{name}: {var} in only one container"
    else:
        assert "initContainers" not in pod

    help_pods = [o for o in r.all("Pod") if o["metadata"].get("annotations", {}).get("helm.sh/hook") == "test"]
    assert len(help_pods) == 1
    assert help_pods[0]["spec"]["containers"][0]["command"][-1] == f"http://{FULLNAME}:7860/healthz"
    assert "sdkube doctor" in r.notes


def _matches(selector, labels):
    return all(labels.get(k) == v for k, v in selector.items())


def _limits(r):
    return r.container("sdkube")["resources"].get("limits", {})


def test_defaults():
    r = render()
    assert r.workload["kind"] == "Deployment"
    assert r.workload["spec"]["replicas"] == 1
    assert r.workload["spec"]["strategy"] == {"type": "Recreate"}, "a rolling update would wait for a second GPU"
    assert _limits(r)["nvidia.com/gpu"] == 1
    assert r.pod_spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in r.pod_spec["tolerations"]
    pvc = r.one("PersistentVolumeClaim")
    assert "storageClassName" not in pvc["spec"], "unset storageClass must leave the field out (default class)"
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert pvc["spec"]["resources"]["requests"]["storage"] == "20Gi"
    volumes = {v["name"]: v for v in r.pod_spec["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert not r.has("PersistentVolume") and not r.has("Ingress") and not r.has("Secret")
    assert "runtimeClassName" not in r.pod_spec
    assert "env" not in r.container("sdkube"), "no proxy, no secret: nothing beyond the ConfigMap"
    env = r.resolved_env(r.container("sdkube"))
    assert env["CUDA_CACHE_PATH"] == "/data/cuda-cache", "compiled GPU code kept on the volume for the next pod"
    assert int(env["CUDA_CACHE_MAXSIZE"]) >= 1 << 30
    assert f"port-forward svc/{FULLNAME} 7860:7860" in r.notes
    assert "default StorageClass" in r.notes


def test_seed_like_bare_metal_cluster():
    """The seed's cluster: no provisioner, local disk on z-k8s-n-1, proxy, cilium ingress."""
    r = render(copy.deepcopy(SEED))
    pv = r.one("PersistentVolume")
    pvc = r.one("PersistentVolumeClaim")
    assert pv["spec"]["storageClassName"] == "manual" == pvc["spec"]["storageClassName"]
    assert pvc["spec"]["volumeName"] == pv["metadata"]["name"]
    assert pv["spec"]["claimRef"] == {"namespace": NAMESPACE, "name": pvc["metadata"]["name"]}
    assert pv["spec"]["capacity"]["storage"] == "30Gi" == pvc["spec"]["resources"]["requests"]["storage"]
    assert pv["spec"]["hostPath"] == {"path": "/var/lib/sdkube", "type": "DirectoryOrCreate"}
    assert pv["spec"]["persistentVolumeReclaimPolicy"] == "Retain", "models survive helm uninstall"
    term = pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"][0]["matchExpressions"][0]
    assert term == {"key": "kubernetes.io/hostname", "operator": "In", "values": ["z-k8s-n-1"]}
    assert "namespace" not in pv["metadata"], "a PV is cluster-scoped"

    for container in ("fetch-models", "sdkube"):
        env = r.resolved_env(r.container(container))
        assert env["HTTP_PROXY"] == env["HTTPS_PROXY"] == env["https_proxy"] == PROXY, container
        assert env["NO_PROXY"].endswith("10.0.0.0/8"), container

    ing = r.one("Ingress")
    assert ing["spec"]["ingressClassName"] == "cilium"
    rule = ing["spec"]["rules"][0]
    assert rule["host"] == "stable-diffusion.example.lan"
    assert rule["http"]["paths"][0]["backend"]["service"] == {"name": FULLNAME, "port": {"name": "http"}}
    assert "http://stable-diffusion.example.lan/" in r.notes
    assert "sudo chown 10001:10001 /var/lib/sdkube" in r.notes
    assert "containerd" in r.notes, "image pulls need the proxy on the node, the notes say so"


def test_local_volume_type_local_uses_local_source():
    values = copy.deepcopy(SEED)
    values["persistence"]["localVolume"]["type"] = "local"
    pv = render(values).one("PersistentVolume")
    assert pv["spec"]["local"] == {"path": "/var/lib/sdkube"} and "hostPath" not in pv["spec"]


def test_dash_storage_class_means_empty_class():
    pvc = render({"persistence": {"storageClass": "-"}}).one("PersistentVolumeClaim")
    assert pvc["spec"]["storageClassName"] == ""


def test_named_storage_class():
    pvc = render({"persistence": {"storageClass": "gp3"}}).one("PersistentVolumeClaim")
    assert pvc["spec"]["storageClassName"] == "gp3"


def test_existing_claim():
    r = render({"persistence": {"existingClaim": "models-on-nfs"}})
    assert not r.has("PersistentVolumeClaim")
    volumes = {v["name"]: v for v in r.pod_spec["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == "models-on-nfs"


def test_ingress_tls():
    r = render(copy.deepcopy(CASES["ingress-tls"]))
    ing = r.one("Ingress")
    assert ing["spec"]["tls"] == [{"hosts": ["sd.example.com"], "secretName": "sd-tls"}]
    assert ing["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"] == "20m"
    assert "https://sd.example.com/" in r.notes


def test_gpu_zero_is_cpu_mode():
    r = render({"gpu": {"count": 0}})
    assert "nvidia.com/gpu" not in _limits(r)
    assert "nodeSelector" not in r.pod_spec, "CPU mode must not wait for a GPU node"
    assert r.resolved_env(r.container("sdkube"))["SDKUBE_DEVICE"] == "cpu"
    assert "CUDA_CACHE_PATH" not in r.resolved_env(r.container("sdkube"))


def test_gpu_count_and_custom_selector():
    r = render({"gpu": {"count": 2}, "nodeSelector": {"gpu-type": "a100"}})
    assert _limits(r)["nvidia.com/gpu"] == 2
    assert _limits(r)["memory"] == "16Gi", "the GPU limit is added to, not instead of, the user's limits"
    assert r.pod_spec["nodeSelector"] == {"nvidia.com/gpu.present": "true", "gpu-type": "a100"}


def test_node_selector_removable():
    assert "nodeSelector" not in render({"nodeSelector": None}).pod_spec
    assert "nodeSelector" not in render({"nodeSelector": {"nvidia.com/gpu.present": None}}).pod_spec
    # Helm merges maps: `nodeSelector: {}` keeps the default key, so fixes must say null.
    assert render({"nodeSelector": {}}).pod_spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}


def test_statefulset_has_one_claim_per_replica():
    r = render(copy.deepcopy(CASES["statefulset"]))
    sts = r.one("StatefulSet")
    assert sts["spec"]["replicas"] == 2
    assert sts["spec"]["serviceName"] == f"{FULLNAME}-headless"
    assert r.one("Service", f"{FULLNAME}-headless")["spec"]["clusterIP"] == "None"
    (template,) = sts["spec"]["volumeClaimTemplates"]
    assert template["metadata"]["name"] == "data"
    assert template["spec"]["storageClassName"] == "fast-ssd"
    assert not r.has("PersistentVolumeClaim") and not r.has("Deployment")
    assert "data" not in {v["name"] for v in r.pod_spec["volumes"]}, "the claim template provides it"


def test_statefulset_with_local_volume_reserves_the_first_replicas_claim():
    values = copy.deepcopy(SEED)
    values["workload"] = {"kind": "StatefulSet"}
    r = render(values)
    pv = r.one("PersistentVolume")
    (template,) = r.one("StatefulSet")["spec"]["volumeClaimTemplates"]
    # the StatefulSet controller names the claim <template>-<statefulset>-<ordinal>
    assert pv["spec"]["claimRef"]["name"] == f"{template['metadata']['name']}-{FULLNAME}-0"
    assert template["spec"]["volumeName"] == pv["metadata"]["name"]


def test_hpa():
    r = render(copy.deepcopy(CASES["hpa"]))
    hpa = r.one("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": FULLNAME}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 3)
    kinds = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert kinds["Resource"]["resource"]["target"]["averageUtilization"] == 80
    assert kinds["Pods"]["pods"]["metric"]["name"] == "sdkube_queue_depth"
    assert kinds["Pods"]["pods"]["target"] == {"type": "AverageValue", "averageValue": "2"}
    assert "replicas" not in r.workload["spec"], "the HPA owns the replica count"


def test_extras():
    r = render(copy.deepcopy(CASES["extras"]))
    assert r.pod_spec["runtimeClassName"] == "nvidia"
    secret = r.one("Secret", FULLNAME)
    assert set(secret["data"]) == {"hf-token", "api-key", "basic-auth"}
    for container in ("fetch-models", "sdkube"):
        env = r.resolved_env(r.container(container))
        assert env["HF_TOKEN"] == "hf_secret" and env["HF_ENDPOINT"] == "https://hf-mirror.com", container
        assert "HTTP_PROXY" not in env, "no proxy unless asked"
    main_env = r.resolved_env(r.container("sdkube"))
    assert main_env["SDKUBE_API_KEY"] == "k3y" and main_env["SDKUBE_BASIC_AUTH"] == "admin:pw"
    assert "checksum/secret" in r.workload["spec"]["template"]["metadata"]["annotations"], "secret changes roll pods"
    netpol = r.one("NetworkPolicy")
    assert netpol["spec"]["ingress"][0]["ports"] == [{"port": "http", "protocol": "TCP"}]
    peers = netpol["spec"]["ingress"][0]["from"]
    assert peers[0] == {"namespaceSelector": {"matchLabels": {"team": "ml"}}}
    (test_pod,) = r.all("Pod")
    assert any(_matches(p.get("podSelector", {}).get("matchLabels", {"-": "-"}), test_pod["metadata"]["labels"]) for p in peers), (
        "the helm test pod must get through the policy"
    )
    assert netpol["spec"]["policyTypes"] == ["Ingress"], "egress stays open for downloads"
    assert r.one("PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    sm = r.one("ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert sm["spec"]["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "30s"}]
    assert sm["spec"]["selector"]["matchLabels"] == r.one("Service", FULLNAME)["spec"]["selector"]


def test_ca_bundle_reaches_both_containers():
    """The seed's firewall: a TLS-inspecting proxy's CA, trusted by fetch and server alike."""
    for source, values in [
        ("configMap", {"caBundle": {"configMap": "corp-ca"}}),
        ("secret", {"caBundle": {"secret": "corp-ca", "key": "proxy-ca.pem"}}),
    ]:
        r = render(values)
        key = values["caBundle"].get("key", "ca.pem")
        for name in ("fetch-models", "sdkube"):
            c = r.container(name)
            assert r.resolved_env(c)["SDKUBE_CA_BUNDLE"] == f"/etc/sdkube/ca/{key}", name
            mount = next(m for m in c["volumeMounts"] if m["name"] == "ca-bundle")
            assert mount == {"name": "ca-bundle", "mountPath": "/etc/sdkube/ca", "readOnly": True}
        volume = next(v for v in r.pod_spec["volumes"] if v["name"] == "ca-bundle")
        ref = volume[source]
        assert ref.get("name", ref.get("secretName")) == "corp-ca"
        assert ref["items"] == [{"key": key, "path": key}]
    r = render({})
    assert "SDKUBE_CA_BUNDLE" not in r.resolved_env(r.container("sdkube"))
    assert all(v["name"] != "ca-bundle" for v in r.pod_spec["volumes"])


def test_existing_secret_is_referenced_not_created():
    r = render({"existingSecret": "sd-credentials", "hfToken": ""})
    assert not r.has("Secret")
    for container in ("fetch-models", "sdkube"):
        refs = {
            e["name"]: e["valueFrom"]["secretKeyRef"]
            for e in r.container(container).get("env", [])
            if "valueFrom" in e
        }
        assert refs["HF_TOKEN"] == {"name": "sd-credentials", "key": "hf-token", "optional": True}
    assert "SDKUBE_API_KEY" in {e["name"] for e in r.container("sdkube")["env"]}


def test_no_persistence_warns_in_notes():
    r = render({"persistence": {"enabled": False}})
    volumes = {v["name"]: v for v in r.pod_spec["volumes"]}
    assert volumes["data"] == {"name": "data", "emptyDir": {}}
    assert not r.has("PersistentVolumeClaim")
    assert "downloaded again" in r.notes


def test_image_digest_and_tag():
    assert render().container("sdkube")["image"] == "ghcr.io/sdkube/sdkube:0.1.0"
    digest = "sha256:" + "a" * 64
    r = render({"image": {"tag": "1.2.3", "digest": digest}})
    assert r.container("sdkube")["image"] == f"ghcr.io/sdkube/sdkube@{digest}"


def test_fullname_is_a_dns_label():
    long_release = "a-very-long-release-name-for-a-stable-diffusion-rig"
    r = render(name=long_release)
    for obj in r.objects:
        assert len(obj["metadata"]["name"]) <= 63 + len("-test-healthz"), obj["metadata"]["name"]
    assert len(r.workload["metadata"]["name"]) <= 63


def test_node_port_service():
    r = render({"service": {"type": "NodePort", "port": 80, "nodePort": 30786}})
    (port,) = r.one("Service", FULLNAME)["spec"]["ports"]
    assert port == {"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP", "nodePort": 30786}
    assert "http://<node address>:30786/" in r.notes
