#!/usr/bin/env bash
# Minimises the grown corpora before they are committed: for each target, the smallest set of files of
# fuzz/corpus/<target> that keeps all its features (libFuzzer -set_cover_merge=1); when that is still more
# than MAX files (default 400), the set that keeps all its edges instead (-use_counters=0: hit counts are
# dropped). The committed corpora are replayed by `cargo test` (src/fuzzing.rs), so they must stay small.
#
#   fuzz/minimize.sh [MAX]        (after fuzz/run.sh, which builds the targets)
#   git add fuzz/corpus && git commit
#
# `cargo +nightly fuzz cmin <target>` does the first step alone (it keeps more files).
set -euo pipefail
cd "$(dirname "$0")"
MAX="${1:-400}"
ALL="command address data bdat session record segment_scan reply dns_answer config"
bin="target/$(rustc +nightly -vV | sed -n 's/^host: //p')/release"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for t in ${FUZZ_TARGETS:-$ALL}; do
    [ -d "corpus/$t" ] || continue
    [ -x "$bin/$t" ] || { echo "$bin/$t missing: run fuzz/run.sh or cargo +nightly fuzz build first" >&2; exit 2; }
    before=$(find "corpus/$t" -type f | wc -l)
    rm -rf "$tmp/$t" && mkdir "$tmp/$t"
    "$bin/$t" -set_cover_merge=1 "$tmp/$t" "corpus/$t" >"$tmp/$t.log" 2>&1
    how="all features"
    if [ "$(find "$tmp/$t" -type f | wc -l)" -gt "$MAX" ]; then
        rm -rf "$tmp/$t" && mkdir "$tmp/$t"
        "$bin/$t" -use_counters=0 -set_cover_merge=1 "$tmp/$t" "corpus/$t" >"$tmp/$t.log" 2>&1
        how="all edges"
    fi
    rm -rf "corpus/$t"
    mv "$tmp/$t" "corpus/$t"
    printf '%-13s %5s -> %4s files (%s), %s KB\n' "$t" "$before" "$(find "corpus/$t" -type f | wc -l)" "$how" \
        "$(du -sk --apparent-size "corpus/$t" | cut -f1)"
done
