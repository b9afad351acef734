#!/usr/bin/env python3
"""Writes the parameter tables of deploy/helm/sdkube/README.md from the `## @param` lines of
values.yaml (the one place each value is documented). `--check` fails when the README is stale.

    python3 deploy/helm/params_table.py          # rewrite the README section
    python3 deploy/helm/params_table.py --check  # used by tests/python/test_helm_values.py
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import yaml

CHART = Path(__file__).resolve().parent / "sdkube"
BEGIN, END = "<!-- params:begin -->", "<!-- params:end -->"


def _default(values: dict, path: str):
    node = values
    for part in path.split("."):
        node = node[part]
    return node


def tables() -> str:
    text = (CHART / "values.yaml").read_text()
    values = yaml.safe_load(text)
    out: list[str] = []
    for line in text.splitlines():
        section = re.match(r"^## @section (.+)", line)
        param = re.match(r"^\s*## @param (\S+) (.+)", line)
        if section:
            out += ["", f"### {section.group(1)}", "", "| Key | Description | Default |", "|---|---|---|"]
        elif param:
            path, description = param.groups()
            default = json.dumps(_default(values, path), separators=(", ", ": "))
            cell = description.replace("|", "\\|")
            out.append(f"| `{path}` | {cell} | `{default}` |")
    return "\n".join(out).strip() + "\n"


def main() -> int:
    readme_path = CHART / "README.md"
    readme = readme_path.read_text()
    start, stop = readme.index(BEGIN) + len(BEGIN), readme.index(END)
    fresh = readme[:start] + "\n" + tables() + readme[stop:]
    if "--check" in sys.argv:
        if fresh != readme:
            print(f"{readme_path} is stale: run python3 deploy/helm/params_table.py", file=sys.stderr)
            return 1
        return 0
    readme_path.write_text(fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
