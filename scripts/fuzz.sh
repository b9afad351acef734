#!/usr/bin/env bash
# Fuzzes the readers of untrusted files: every cargo-fuzz target of fuzz/
# (unpickler, torch zip, safetensors, embeddings, ncnn, ONNX, PNG infotext, prompts) runs for
# SECONDS each, one after the other, and a line per target gives executions, seconds and
# crashes. Exits 1 when any target crashed (panic, sanitizer report, out-of-memory, timeout);
# the input that did it is in fuzz/artifacts/<target>/, the run's output in fuzz/logs/.
#
#   scripts/fuzz.sh [SECONDS]         # default 60, or $FUZZ_SECONDS
#   FUZZ_TARGETS="pickle ncnn" scripts/fuzz.sh 10
#
# "Allocates what a header claims" is a finding too: a single allocation over
# $FUZZ_MALLOC_MB (512) or a resident size over $FUZZ_RSS_MB (2048) stops the run, as does
# one input taking longer than $FUZZ_TIMEOUT seconds (10). Needs the nightly toolchain
# ($FUZZ_TOOLCHAIN, default nightly); installs cargo-fuzz from crates.io when missing.
# Seeds come from fuzz/seeds.py (committed fixtures and files it builds); what the fuzzer
# adds stays in fuzz/corpus/ (not committed) and makes the next run start further.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-${FUZZ_SECONDS:-60}}
toolchain=${FUZZ_TOOLCHAIN:-nightly}
rss_mb=${FUZZ_RSS_MB:-2048}
malloc_mb=${FUZZ_MALLOC_MB:-512}
timeout_s=${FUZZ_TIMEOUT:-10}
if ! [[ $seconds =~ ^[0-9]+$ ]] || [ "$seconds" -eq 0 ]; then
    echo "usage: scripts/fuzz.sh [SECONDS]  (a whole number of seconds per target)" >&2
    exit 2
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi
python3 fuzz/seeds.py
# The targets build the workspace's crates with the workspace's versions of everything: the
# fuzz workspace starts from its lock file (cargo then adds libfuzzer-sys). Not committed.
[ -f fuzz/Cargo.lock ] || cp Cargo.lock fuzz/Cargo.lock

start=$(date +%s)
# Release with debug assertions and overflow checks, AddressSanitizer: cargo-fuzz's defaults.
cargo "+$toolchain" fuzz build
built=$(date +%s)
host=$(rustc "+$toolchain" -vV | sed -n 's/^host: //p')
bin_dir=fuzz/target/$host/release
targets=${FUZZ_TARGETS:-$(cargo "+$toolchain" fuzz list)}
mkdir -p fuzz/logs

failed=0
printf '%-14s %12s %8s %8s  %s\n' target executions seconds crashes artifact
for t in $targets; do
    mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
    log=fuzz/logs/$t.log
    t0=$(date +%s.%N)
    set +e
    "$bin_dir/$t" "fuzz/corpus/$t" \
        -artifact_prefix="fuzz/artifacts/$t/" \
        -max_total_time="$seconds" -timeout="$timeout_s" \
        -rss_limit_mb="$rss_mb" -malloc_limit_mb="$malloc_mb" \
        -print_final_stats=1 >"$log" 2>&1
    rc=$?
    set -e
    t1=$(date +%s.%N)
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    crashes=0
    artifact=""
    if [ "$rc" -ne 0 ]; then
        crashes=1
        failed=1
        artifact=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -1)
        artifact=${artifact:-"exit $rc, see $log"}
    fi
    printf '%-14s %12s %8.1f %8s  %s\n' "$t" "${execs:-?}" "$(echo "$t1 - $t0" | bc)" \
        "$crashes" "$artifact"
    if [ "$rc" -ne 0 ]; then
        # What went wrong: the panic message or the sanitizer's summary.
        grep -m3 -E "panicked at|^SUMMARY|==ERROR|out-of-memory|timeout after|deadly signal" \
            "$log" | sed 's/^/    /' || true
    fi
done
end=$(date +%s)
echo "build $((built - start)) s, fuzzing $((end - built)) s"
exit "$failed"
