#!/usr/bin/env bash
# Two builds of sdkube against each other on one GPU, in one call: `bench` items alternating
# between the builds (ROUNDS times, so a drift of the machine shows as a drift, not as a
# difference), each build's per-shape choices from the first item with SDKUBE_LOG=debug (every
# choice logs both times: which path each shape took), and the `check` stage of gpu_run.sh on
# the second build (fp16 images against CPU fp32) unless CHECK=off.
#
#   benches/gpu_ab.sh .gpu/main.xz .gpu/branch.xz      # binaries, or their .xz (carry limit)
#
# WHAT (default "unet-sd15 unet-sdxl vae"), ROUNDS (default 2) and REPEAT (default 10) narrow a
# run; the choice logs go to $OUT/choices-<build>.log.
set -uo pipefail
[ $# -eq 2 ] || { echo "usage: $0 BUILD_A BUILD_B (binaries or .xz)" >&2; exit 2; }
. "$(dirname "$0")/gpu_env.sh"
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
WHAT=${WHAT:-unet-sd15 unet-sdxl vae}
unpack() {
  local bin=${1%.xz}
  if [ "$bin" != "$1" ] && [ ! -x "$bin" ]; then
    python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" "$1" "$bin"
    chmod +x "$bin"
  fi
  echo "$bin"
}
A=$(unpack "$1"); B=$(unpack "$2")
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
bench() { "$1" bench --device cuda --precision fp16 --what "$2" --repeat "${REPEAT:-10}" 2>&1; }

first=${WHAT%% *}
for bin in "$A" "$B"; do
  log="$OUT/choices-$(basename "$bin").log"
  SDKUBE_LOG=sdkube_nn=debug bench "$bin" "$first" | sed 's/\x1b\[[0-9;]*m//g' > "$log"
  echo "== $(basename "$bin"): choices in $first ($log)"
  # per kind of choice: shapes timed, shapes where the candidate won, shapes refused
  python3 - "$log" <<'PY'
import re, sys
unit = {"ns": 1e-3, "µs": 1.0, "us": 1.0, "ms": 1e3, "s": 1e6}
def us(text):
    m = re.match(r"([0-9.]+)(ns|µs|us|ms|s)$", text)
    return float(m[1]) * unit[m[2]] if m else None
kinds = {}
for line in open(sys.argv[1], errors="replace"):
    m = re.search(r"choice: (.+?)(: timed against the current path| refused)", line)
    if not m:
        continue
    k = kinds.setdefault(m[1], [0, 0, 0])
    if m[2].endswith("refused"):
        k[2] += 1
        continue
    t = dict(re.findall(r"(candidate_time|current_time)=(\S+)", line))
    a, b = us(t.get("candidate_time", "")), us(t.get("current_time", ""))
    k[0] += 1
    k[1] += a is not None and b is not None and a < b
for kind, (timed, won, refused) in sorted(kinds.items()):
    print(f"  {kind}: {won} of {timed} shapes to the candidate, {refused} refused")
PY
  grep -iE 'panicked|error' "$log" | head -5
done
for round in $(seq "${ROUNDS:-2}"); do
  for what in $WHAT; do
    for bin in "$A" "$B"; do
      bench "$bin" "$what" | grep '"bench".*"ms"' | sed "s|^|round $round $(basename "$bin"): |" | cut -c1-220
    done
  done
done
if [ "${CHECK:-on}" != off ]; then
  # gpu_run.sh runs .gpu/sdkube: B stands in for it, whatever was there comes back after
  mkdir -p .gpu
  [ -e .gpu/sdkube ] && [ "$(realpath "$B")" != "$(realpath .gpu/sdkube)" ] && mv .gpu/sdkube .gpu/sdkube.ab-kept
  [ -e .gpu/sdkube ] || cp "$B" .gpu/sdkube
  STAGES=check bash benches/gpu_run.sh 2>&1 | grep 'vs CPU'
  [ -e .gpu/sdkube.ab-kept ] && mv .gpu/sdkube.ab-kept .gpu/sdkube
fi
