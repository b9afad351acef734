#!/usr/bin/env bash
# Installs what the tests need that cargo does not fetch by itself. Idempotent and quick when
# everything is present already.
set -euo pipefail
cd "$(dirname "$0")/.."
need_pip=()
for spec in $(grep -v '^#' scripts/test-requirements.txt); do
  mod=${spec%%[=<>]*}
  python3 -m pip show -q "$mod" >/dev/null 2>&1 || need_pip+=("$spec")
done
if [ ${#need_pip[@]} -gt 0 ]; then
  python3 -m pip install -q "${need_pip[@]}"
fi
