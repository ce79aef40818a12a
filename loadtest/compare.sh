#!/usr/bin/env bash
# compare.sh: shardmta and Postfix as relays, side by side, on loopback, with the same load and sink
# (smtp-sink): runs the two benches interleaved RUNS times and prints one table: accept and end-to-end rate,
# the relay's CPU per message, the p99 of the 250 after the end of data, disk flushes.
#   loadtest/compare.sh [RUNS=2] [KEY=VALUE ...]   e.g. loadtest/compare.sh RUNS=3 D=1 M=20000
# KEY=VALUE pairs go to both benches (S, M, B, R, D, LOADGEN, ...; see bench-lib/relay-bench-common.sh
# --help). The load comes from `shardmta-loadtest send` (LOADGEN=shardmta-loadtest, built here if missing),
# which measures the latencies; LOADGEN=smtp-source uses Postfix's generator instead (no p99 then).
# TLS=1: STARTTLS on both sides of the relays (shardmta-loadtest generator and sink). For the whole matrix of
# generators, sizes, D and TLS in one table, see loadtest/matrix.sh.
# Run as root (the harness installs Postfix for its load generator and uses cgroups for CPU accounting).
set -Eeuo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
RUNS=2
LOADGEN=shardmta-loadtest
args=()
need_lt=0
for a in "$@"; do
  case $a in RUNS=*) RUNS=${a#RUNS=} ;; LOADGEN=*) LOADGEN=${a#LOADGEN=} ;; *) args+=("$a") ;; esac
  case $a in TLS=1|SINK=shardmta-loadtest) need_lt=1 ;; esac   # the load tester is the sink then
done
[[ $RUNS =~ ^[1-9][0-9]*$ ]] || { echo "RUNS must be a positive integer" >&2; exit 2; }
args+=("LOADGEN=$LOADGEN")
if [[ $LOADGEN == shardmta-loadtest || $need_lt == 1 ]] && [[ -z ${LOADTEST_BIN:-} ]]; then
  (cd "$HERE/.." && nice -n 15 cargo build --release --quiet --bin shardmta-loadtest)
  LOADTEST_BIN=${CARGO_TARGET_DIR:-$HERE/../target}/release/shardmta-loadtest
  export LOADTEST_BIN
fi
csv=$(mktemp /var/tmp/compare.XXXXXX.csv)
trap 'rm -f "$csv"' EXIT
for ((i = 1; i <= RUNS; i++)); do
  for relay in postfix shardmta; do
    echo "run $i/$RUNS: $relay" >&2
    RESULTS_CSV=$csv bash "$HERE/$relay-relay-bench.sh" "${args[@]}" >&2
  done
done
python3 - "$csv" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))
by = {}
for r in rows:
    by.setdefault(r["relay"], []).append(r)
def med(rs, k):
    v = [float(r[k]) for r in rs if r[k] not in ("", "n/a")]
    return statistics.median(v) if v else float("nan")
r0 = rows[0]
print(f"S={r0['S']} M={r0['M']} B={r0['B']} R={r0['R']} D={r0['D']} TLS={r0.get('tls', '0')}, "
      f"{r0['label'] or 'loadgen=smtp-source'}, sink {r0.get('sink', 'smtp-sink')}, "
      f"medians of {len(by.get('shardmta', []))} run(s) each")
print(f"{'relay':<10} {'accept msg/s':>13} {'e2e msg/s':>10} {'relay CPU us/msg':>17} {'p99 250 ms':>11} {'disk flushes':>13}")
for name in ("postfix", "shardmta"):
    rs = by.get(name, [])
    if rs:
        p99 = med(rs, 'accept_p99_us') / 1000 if 'accept_p99_us' in rs[0] else float("nan")
        print(f"{name:<10} {med(rs,'inject_msg_s'):>13.0f} {med(rs,'e2e_msg_s'):>10.0f} {med(rs,'relay_cpu_us_per_msg'):>17.0f} {p99:>11.2f} {med(rs,'disk_flushes'):>13.0f}")
if by.get("postfix") and by.get("shardmta"):
    p, s = by["postfix"], by["shardmta"]
    print(f"shardmta/postfix: e2e x{med(s,'e2e_msg_s')/med(p,'e2e_msg_s'):.1f}, CPU per message x{med(s,'relay_cpu_us_per_msg')/med(p,'relay_cpu_us_per_msg'):.3f}")
print("p99 250 ms: from the last byte of the message to the relay's 250 (nan with LOADGEN=smtp-source, which measures none)")
PY
