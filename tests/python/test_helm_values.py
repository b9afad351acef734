"""values.schema.json and the chart's own checks reject bad values at install time.

The seed's chart silently ignored a mistyped key (`cliFlags` never reached the app); here a
typo or a wrong type fails `helm install` with the path of the offending key, and
combinations that can only end in a Pending pod fail with the fix in the message.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import helm_python as helm
import pytest
import yaml

from helm_chart import CHART_DIR, chart, render

BAD_VALUES = {
    "top-level typo": ({"persistance": {"enabled": True}}, "persistance"),
    "nested typo": ({"persistence": {"storageclass": "manual"}}, "storageclass"),
    "seed's key that never reached the app": ({"cliFlags": "--no-half"}, "cliFlags"),
    "local volume typo": ({"persistence": {"localVolume": {"nodename": "n1"}}}, "nodename"),
    "proxy typo": ({"proxy": {"httpsProxy": "http://p:3128"}}, "httpsProxy"),
    "gpu count as string": ({"gpu": {"count": "1"}}, "/gpu/count"),
    "negative gpu count": ({"gpu": {"count": -1}}, "/gpu/count"),
    "queue size as string": ({"server": {"queueSize": "32"}}, "/server/queueSize"),
    "models as a string": ({"models": "sd-1.5"}, "/models"),
    "unknown precision": ({"server": {"precision": "half"}}, "/server/precision"),
    "unknown vram mode": ({"server": {"vram": "medium"}}, "/server/vram"),
    "size with a space": ({"persistence": {"size": "8 GB"}}, "/persistence/size"),
    "storageClass as number": ({"persistence": {"storageClass": 5}}, "/persistence/storageClass"),
    "bad access mode": ({"persistence": {"accessModes": ["ReadWrite"]}}, "/persistence/accessModes"),
    "bad pull policy": ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    "bad workload kind": ({"workload": {"kind": "DaemonSet"}}, "/workload/kind"),
    "proxy without scheme": ({"proxy": {"https": "192.168.6.200:3128"}}, "/proxy/https"),
    "basic auth without password": ({"server": {"basicAuth": "admin"}}, "/server/basicAuth"),
    "bad path type": (
        {"ingress": {"hosts": [{"host": "a.b", "paths": [{"path": "/", "pathType": "prefix"}]}]}},
        "pathType",
    ),
    "relative local path": ({"persistence": {"localVolume": {"path": "data/sd"}}}, "/persistence/localVolume/path"),
    "bad device": ({"server": {"device": "gpu"}}, "/server/device"),
    "port out of range": ({"service": {"port": 70000}}, "/service/port"),
    "logJson as string": ({"server": {"logJson": "yes"}}, "/server/logJson"),
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_schema_rejects(case):
    values, where = BAD_VALUES[case]
    with pytest.raises(helm.HelmValuesError) as err:
        chart().validate_schema(values)
    assert where in str(err.value), str(err.value)
    # and the install itself refuses (render validates like `helm install`)
    with pytest.raises(helm.HelmValuesError):
        render(values)


def test_lint_reports_schema_errors():
    report = helm.lint(CHART_DIR, {"gpu": {"count": "one"}}, strict=True)
    assert any("/gpu/count" in e for e in report["errors"]), report


BAD_COMBINATIONS = {
    "CA bundle from both a ConfigMap and a Secret": (
        {"caBundle": {"configMap": "corp-ca", "secret": "corp-ca"}},
        "set either configMap or secret",
    ),
    "local volume and existing claim": (
        {"persistence": {"existingClaim": "x", "localVolume": {"enabled": True, "path": "/d", "nodeName": "n"}}},
        "unset persistence.existingClaim",
    ),
    "local volume without path": (
        {"persistence": {"localVolume": {"enabled": True, "nodeName": "n"}}},
        "persistence.localVolume.path is required",
    ),
    "local type without node": (
        {"persistence": {"localVolume": {"enabled": True, "path": "/d"}}},
        "persistence.localVolume.nodeName is required",
    ),
    "class mismatch with the local PV": (
        {"persistence": {"storageClass": "standard", "localVolume": {"enabled": True, "path": "/d", "nodeName": "n"}}},
        "would never bind",
    ),
    "replicas sharing a RWO claim": ({"workload": {"replicas": 2}}, "workload.kind=StatefulSet"),
    "autoscaled Deployment on a RWO claim": ({"autoscaling": {"enabled": True}}, "ReadWriteMany"),
    "cuda without GPU": ({"gpu": {"count": 0}, "server": {"device": "cuda"}}, "gpu.count is 0"),
    "served model not fetched": ({"models": ["sdxl-base"]}, "add it to models"),
    "token beside an existing Secret": ({"existingSecret": "creds", "hfToken": "hf_x"}, "hfToken is ignored"),
    "API key beside an existing Secret": ({"existingSecret": "creds", "server": {"apiKey": "k"}}, "server.apiKey is ignored"),
    "HPA without metric": (
        {"workload": {"kind": "StatefulSet"}, "autoscaling": {"enabled": True, "targetCPUUtilizationPercentage": None}},
        "needs a metric",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_COMBINATIONS))
def test_chart_rejects_combinations_with_the_fix(case):
    values, fix = BAD_COMBINATIONS[case]
    chart().validate_schema(values)  # each value is fine alone
    with pytest.raises(helm.HelmRenderError) as err:
        render(values)
    assert fix in str(err.value), str(err.value)


def test_all_problems_reported_at_once():
    values = {"persistence": {"localVolume": {"enabled": True}}, "gpu": {"count": 0}, "server": {"device": "cuda:1"}}
    with pytest.raises(helm.HelmRenderError) as err:
        render(values)
    message = str(err.value)
    for fix in ("localVolume.path is required", "localVolume.nodeName is required", "gpu.count is 0"):
        assert fix in message, message


def test_seed_like_values_pass():
    render({"persistence": {"storageClass": "manual", "localVolume": {"enabled": True, "path": "/d", "nodeName": "n"}}})


def _leaf_paths(value, prefix=""):
    """Dotted paths of the values: leaves, and maps/lists that are values in themselves."""
    if isinstance(value, dict) and value:
        for key, inner in value.items():
            yield from _leaf_paths(inner, f"{prefix}.{key}" if prefix else key)
    else:
        yield prefix


def _schema_node(schema, path):
    node = schema
    for part in path.split("."):
        props = node.get("properties", {})
        if part in props:
            node = props[part]
        elif isinstance(node.get("additionalProperties"), dict):
            return node  # a free-form map (labels, nodeSelector): any key below is covered
        else:
            return None
    return node


FREE_FORM = {"podSecurityContext", "securityContext", "affinity", "resources", "fetch.resources"}


def test_every_value_is_documented_and_in_the_schema():
    text = (CHART_DIR / "values.yaml").read_text()
    documented = set(re.findall(r"^\s*## @param (\S+) \S", text, flags=re.M))
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    defaults = yaml.safe_load(text)
    missing_doc, missing_schema = [], []
    for path in _leaf_paths(defaults):
        if not any(path == d or path.startswith(d + ".") for d in documented):
            missing_doc.append(path)
        if not any(path == f or path.startswith(f + ".") for f in FREE_FORM) and _schema_node(schema, path) is None:
            missing_schema.append(path)
    assert not missing_doc, f"values without a `## @param` line: {missing_doc}"
    assert not missing_schema, f"values missing from values.schema.json: {missing_schema}"
    stale = [d for d in documented if _schema_node(schema, d) is None]
    assert not stale, f"documented but not in the schema: {stale}"


def test_schema_closes_every_object():
    """additionalProperties: false on each of the chart's own objects, so typos fail."""

    def walk(node, path):
        if node.get("type") == "object" and "properties" in node:
            assert node.get("additionalProperties") is False, f"{path or '<root>'} accepts unknown keys"
            for key, inner in node["properties"].items():
                walk(inner, f"{path}.{key}" if path else key)
        if isinstance(node.get("items"), dict):
            walk(node["items"], path + "[]")

    walk(json.loads((CHART_DIR / "values.schema.json").read_text()), "")


def test_doctor_contract_keys_exist():
    """`sdkube doctor` cites these keys in its fixes; renaming one breaks its advice."""
    defaults = chart().values
    for path in (
        "persistence.storageClass",
        "persistence.existingClaim",
        "persistence.localVolume.enabled",
        "persistence.localVolume.path",
        "persistence.localVolume.nodeName",
        "persistence.localVolume.storageClass",
        "gpu.count",
        "nodeSelector",
        "tolerations",
        "proxy.http",
        "proxy.https",
        "proxy.noProxy",
        "hfEndpoint",
        "hfToken",
        "existingSecret",
    ):
        node = defaults
        for part in path.split("."):
            assert isinstance(node, dict) and part in node, f"values.yaml lost {path}"
            node = node[part]


def test_readme_parameter_tables_are_fresh():
    done = subprocess.run(
        [sys.executable, str(CHART_DIR.parent / "params_table.py"), "--check"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
