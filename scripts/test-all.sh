#!/usr/bin/env bash
# Runs every test of sdkube on a fresh Debian machine: installs what the tests need, then
# runs the Rust workspace tests and the Python-side tests (Helm chart rendering).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-test-deps.sh
cargo test --workspace
cargo build -p sdkube  # the Python-side tests run the real binary
# Web UI in headless Chromium against the real `sdkube serve` (tests/ui/ui.test.mjs).
node --test tests/ui/ui.test.mjs
if [ -d tests/python ] && ls tests/python/test_*.py >/dev/null 2>&1; then
  python3 -m pytest -q tests/python
fi
