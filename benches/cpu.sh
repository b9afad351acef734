#!/usr/bin/env bash
# CPU benchmark, sdkube and diffusers in the same run (compare ratios, not absolute times).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo run --release -q -p sdkube-pipeline --example bench_cpu
python3 benches/cpu_reference.py
