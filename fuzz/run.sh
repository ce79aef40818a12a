#!/usr/bin/env bash
# Runs every fuzz target of shardmta for SECONDS each (default 30), one at a time, and prints one line per
# target: runs, runs/s, coverage (cov) and features (ft), and how many files it added to its corpus.
# Exits 1 if any target found a crash (or a timeout / out-of-memory input: saved under fuzz/artifacts/<target>/),
# 2 if the build failed.
#
#   fuzz/run.sh [SECONDS]
#
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz --locked`). The targets are the
# functions of src/fuzzing.rs (invariants included); fuzz/fuzz_targets/*.rs only call them. Inputs read:
# fuzz/corpus/<target> (grown in place), fuzz/seeds/<target> (hand-written, from `fuzzing::seeds()`),
# fuzz/regressions/<target> (inputs that once failed). `cargo test` replays all three on stable.
# Environment: FUZZ_TARGETS="data bdat" runs only those; FUZZ_BUILD_FLAGS adds `cargo fuzz build` flags
# (e.g. "-s none" for no AddressSanitizer); CARGO_BUILD_JOBS=1 builds on one core.
#
# A crash: the input is fuzz/artifacts/<target>/crash-*; reproduce it with
#   cargo +nightly fuzz run <target> fuzz/artifacts/<target>/crash-...
# fix the bug, copy the input to fuzz/regressions/<target>/<short-name> and commit it with the fix (the
# replay test keeps it fixed).
#
# Growing the committed corpora: a long run (e.g. `fuzz/run.sh 1800`, or FUZZ_TARGETS=session fuzz/run.sh 3600),
# then minimise every grown corpus before committing it:
#   fuzz/minimize.sh            # set-cover merge, at most ~400 files per target (see the script)
#   git add fuzz/corpus && git commit -m "fuzz: grown corpora"
# (`cargo +nightly fuzz cmin <target>` minimises one corpus too, keeping more files.) The replay test runs
# every committed file in the debug build of `cargo test`, so the corpora must stay small: today about
# 1,800 files, 0.5 MB, replayed in well under a second.
set -uo pipefail
cd "$(dirname "$0")"

SECS="${1:-30}"
case "$SECS" in '' | *[!0-9]*) echo "usage: fuzz/run.sh [SECONDS]" >&2; exit 2 ;; esac
ALL="command address data bdat session record segment_scan reply dns_answer config"
TARGETS="${FUZZ_TARGETS:-$ALL}"

if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz is missing: cargo install cargo-fuzz --locked (and rustup toolchain install nightly)" >&2
    exit 2
fi
start=$(date +%s)
# shellcheck disable=SC2086
if ! cargo +nightly fuzz build ${FUZZ_BUILD_FLAGS:-}; then
    echo "fuzz build failed" >&2
    exit 2
fi
triple=$(rustc +nightly -vV | sed -n 's/^host: //p')
bin="target/$triple/release"
logs="target/fuzz-logs"
mkdir -p "$logs"
echo "built in $(($(date +%s) - start)) s; running each target for ${SECS} s"

failed=0
for t in $TARGETS; do
    mkdir -p "corpus/$t" "artifacts/$t"
    dirs=("corpus/$t")
    for d in "seeds/$t" "regressions/$t"; do
        [ -d "$d" ] && dirs+=("$d")
    done
    dict=()
    case "$t" in command | address | session | data | bdat | reply) dict=(-dict=dict/smtp.dict) ;; esac
    before=$(find "corpus/$t" -type f | wc -l)
    "$bin/$t" -max_total_time="$SECS" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        -artifact_prefix="artifacts/$t/" "${dict[@]}" "${dirs[@]}" >"$logs/$t.log" 2>&1
    rc=$?
    after=$(find "corpus/$t" -type f | wc -l)
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$logs/$t.log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$logs/$t.log" | tail -1)
    cov=$(grep -o 'cov: [0-9]*' "$logs/$t.log" | tail -1 | cut -d' ' -f2)
    ft=$(grep -o 'ft: [0-9]*' "$logs/$t.log" | tail -1 | cut -d' ' -f2)
    status=ok
    if [ "$rc" -ne 0 ]; then
        status="FAILED (exit $rc): $(grep -o 'Test unit written to .*' "$logs/$t.log" | tail -1) log $PWD/$logs/$t.log"
        failed=1
    fi
    printf '%-13s runs=%-10s runs/s=%-7s cov=%-6s ft=%-6s corpus=%s (+%s)  %s\n' \
        "$t" "${runs:-?}" "${rate:-?}" "${cov:-?}" "${ft:-?}" "$after" "$((after - before))" "$status"
done
echo "total $(($(date +%s) - start)) s"
exit "$failed"
