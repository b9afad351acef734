#!/usr/bin/env bash
# The kernels a command runs on the GPU, by name, with each one's GPU time under Nsight Compute
# (`ncu`, on the device machine): which cuDNN/cuBLAS engine each side takes at a shape, where
# `bench --profile` gives only time per kind of op.
#
#   benches/gpu_kernels.sh NAME REGEX COMMAND...   # e.g. ours 'xmma|fprop|conv' .gpu/sdkube bench --what ops
#
# Kernels whose name matches REGEX (all where it is '.'), each timed alone (ncu serialises
# them; caches and clocks left as they are, so a kernel sees what the one before it left in
# L2, as in a real run). Writes $OUT/kernels-NAME.csv (one row per launch: id, name, ns) and
# prints each kernel name's launches and mean time.
set -uo pipefail
[ $# -ge 3 ] || { echo "usage: $0 NAME REGEX COMMAND..." >&2; exit 2; }
name=$1 regex=$2; shift 2
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
command -v ncu >/dev/null || PATH=$PATH:$(ls -d /opt/nvidia/nsight-compute/*/ 2>/dev/null | tail -1)
csv="$OUT/kernels-$name.csv"
ncu --clock-control none --cache-control none --metrics gpu__time_duration.sum \
  -k "regex:$regex" --csv --print-units base "$@" > "$OUT/ncu-$name.raw" 2> "$OUT/ncu-$name.err"
python3 - "$OUT/ncu-$name.raw" "$csv" <<'PY'
import csv, sys
from collections import defaultdict
rows = [l for l in open(sys.argv[1], errors="replace") if l.startswith('"')]
launches = []
for r in csv.DictReader(rows):
    if r.get("Metric Name") == "gpu__time_duration.sum":
        launches.append((int(r["ID"]), r["Kernel Name"], float(r["Metric Value"].replace(",", ""))))
with open(sys.argv[2], "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["id", "kernel", "ns"])
    w.writerows(launches)
by = defaultdict(list)
for _, k, ns in launches:
    by[k].append(ns)
print(f"{len(launches)} launches, {sum(ns for *_, ns in launches) / 1e6:.3f} ms")
for k, v in sorted(by.items(), key=lambda kv: -sum(kv[1])):
    print(f"{len(v):5d} x {sum(v) / len(v) / 1e3:9.2f} us  {k[:150]}")
PY
