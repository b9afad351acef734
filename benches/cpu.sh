#!/usr/bin/env bash
# CPU benchmark, sdkube and diffusers in the same run (compare ratios, not absolute times).
set -euo pipefail
cd "$(dirname "$0")/.."
# dev profile: dependencies (candle) are built with opt-level 3 there, and it avoids a second
# full build; our crates only orchestrate tensor ops.
cargo run -q -p sdkube-pipeline --example bench_cpu
python3 benches/cpu_reference.py
