"""Rendering the sdkube chart with the real Helm engine, for the chart tests.

`helm-python-sdk` (PyPI) binds Helm's Go SDK as a shared library, so the templates, the
values schema and lint run exactly as `helm install` / `helm lint` would, with no helm binary
and no cluster.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART_DIR = REPO / "deploy" / "helm" / "sdkube"
RELEASE = "demo"
NAMESPACE = "sd"
FULLNAME = f"{RELEASE}-sdkube"

_chart: helm.Chart | None = None


def chart() -> helm.Chart:
    """The chart, loaded once per test session (loading parses every template)."""
    global _chart
    if _chart is None:
        _chart = helm.Chart.load(CHART_DIR)
    return _chart


@dataclass
class Rendered:
    """One release rendered offline: its Kubernetes objects and its NOTES.txt."""

    objects: list[dict[str, Any]]
    notes: str
    sources: dict[str, str] = field(repr=False)

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict[str, Any]:
        found = [o for o in self.all(kind) if name is None or o["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name or ''}, found {[o['metadata']['name'] for o in found]}"
        return found[0]

    def has(self, kind: str) -> bool:
        return bool(self.all(kind))

    def component(self, component: str) -> dict[str, Any]:
        """The Deployment or StatefulSet of one component: `server` (queue.backend memory), or
        `api`, `worker`, `redis` (queue.backend redis)."""
        found = [
            o
            for o in self.objects
            if o["kind"] in ("Deployment", "StatefulSet")
            and o["metadata"]["labels"].get("app.kubernetes.io/component") == component
        ]
        assert len(found) == 1, f"expected one {component} workload, found {[o['metadata']['name'] for o in found]}"
        return found[0]

    @property
    def workload(self) -> dict[str, Any]:
        """The GPU workload: the single server, or the workers beside the api."""
        found = [
            o
            for o in self.objects
            if o["kind"] in ("Deployment", "StatefulSet")
            and o["metadata"]["labels"].get("app.kubernetes.io/component") in ("server", "worker")
        ]
        assert len(found) == 1, f"expected one GPU workload, found {len(found)}"
        return found[0]

    @property
    def pod_spec(self) -> dict[str, Any]:
        return self.workload["spec"]["template"]["spec"]

    def container(self, name: str, workload: dict[str, Any] | None = None) -> dict[str, Any]:
        """A container (init or main) of `workload`'s pods, the GPU workload's by default."""
        spec = (workload or self.workload)["spec"]["template"]["spec"]
        every = spec.get("initContainers", []) + spec["containers"]
        found = [c for c in every if c["name"] == name]
        assert len(found) == 1, f"no container {name!r} in {[c['name'] for c in every]}"
        return found[0]

    def resolved_env(
        self, container: dict[str, Any], secrets: dict[str, dict[str, str]] | None = None
    ) -> dict[str, str]:
        """The environment the kubelet would give `container`: envFrom, then env (later wins),
        with configMapKeyRef / secretKeyRef looked up in the rendered ConfigMaps and Secrets
        (and in `secrets`, standing in for Secrets that live in the cluster), and `$(VAR)` in
        a value replaced by a variable defined before it (`$$` escapes, an undefined one stays
        as written). An optional reference to a missing key is left out, as the kubelet does."""
        env: dict[str, str] = {}
        if secrets is None:
            secrets = {}
        for source in container.get("envFrom", []):
            prefix = source.get("prefix", "")
            if "configMapRef" in source:
                env.update({prefix + k: v for k, v in self._config_map(source["configMapRef"]["name"]).items()})
            if "secretRef" in source:
                env.update({prefix + k: v for k, v in self._secret(source["secretRef"]["name"]).items()})
        for var in container.get("env", []):
            if "value" in var:
                env[var["name"]] = _expand(var["value"], env)
                continue
            ref = var["valueFrom"]
            if "secretKeyRef" in ref:
                name = ref["secretKeyRef"]["name"]
                key_ref, data = ref["secretKeyRef"], {**secrets.get(name, {}), **self._secret(name)}
            elif "configMapKeyRef" in ref:
                key_ref, data = ref["configMapKeyRef"], self._config_map(ref["configMapKeyRef"]["name"])
            else:
                raise AssertionError(f"unsupported valueFrom in {var}")
            if key_ref["key"] in data:
                env[var["name"]] = data[key_ref["key"]]
            else:
                assert key_ref.get("optional"), f"{var['name']}: required key {key_ref['key']} missing"
        return env

    def _config_map(self, name: str) -> dict[str, str]:
        return self.one("ConfigMap", name).get("data") or {}

    def _secret(self, name: str) -> dict[str, str]:
        found = [o for o in self.all("Secret") if o["metadata"]["name"] == name]
        if not found:
            return {}  # an existingSecret lives in the cluster, not in the chart
        secret = found[0]
        data = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
        data.update(secret.get("stringData") or {})
        return data


def _expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' dependent environment variables: `$(NAME)` of a variable defined earlier
    becomes its value, `$$(NAME)` stays a literal `$(NAME)`, an undefined one is left as is."""
    return re.sub(
        r"\$(\$|\(([A-Za-z_][A-Za-z0-9_.-]*)\))",
        lambda m: "$" if m.group(1) == "$" else env.get(m.group(2), m.group(0)),
        value,
    )


def render(values: dict[str, Any] | None = None, *, name: str = RELEASE, namespace: str = NAMESPACE) -> Rendered:
    """Render the chart as `helm template` would; raises helm errors unchanged."""
    sources = chart().render(values or {}, name=name, namespace=namespace, is_install=True)
    objects: list[dict[str, Any]] = []
    notes = ""
    for path, text in sorted(sources.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                objects.append(doc)
    return Rendered(objects=objects, notes=notes, sources=sources)
