#!/usr/bin/env bash
# matrix.sh: the relay benchmark matrix (issue 15): Postfix and shardmta side by side on loopback, for each case
# of generator x connection reuse x message size x TLS, and ONE markdown table to paste into the README.
#
#   loadtest/matrix.sh [RUNS=1] [M1K=20000] [M100K=3000] [CASES="..."] [KEY=VALUE ...]
#
# Cases: smtp-source and `shardmta-loadtest send` as the generator, D=0 (a new connection per message) and D=1
# (connections reused), 1 KB and 100 KB bodies (B=1024 / B=102400, M1K / M100K messages), and STARTTLS on both
# sides of the relay (TLS=1: inbound from the generator, outbound to `shardmta-loadtest sink --starttls`) with
# the shardmta-loadtest generator only (smtp-source cannot do STARTTLS). That makes 12 cases by default.
# Each case runs Postfix then shardmta, RUNS times (interleaved), through loadtest/postfix-relay-bench.sh and
# loadtest/shardmta-relay-bench.sh (the harness in bench-lib/relay-bench-common.sh, which waits for TIME_WAIT
# sockets and COOLDOWN=10 s, an environment variable, before every run).
#
# CASES: a space-separated subset, each GENERATOR:D<0|1>:<1k|100k>[:tls], GENERATOR = smtp-source or
# shardmta-loadtest (short: loadtest), e.g.
#   CASES="smtp-source:D0:1k smtp-source:D1:100k loadtest:D1:1k:tls"
# Other KEY=VALUE pairs go to both benches (S, R, PROFILE, LISTEN_PORT, BENCH_DIR, ...; see the harness's
# --help), but not M, B, D, LOADGEN or TLS, which the cases set.
#
# Output (stdout): the date, the commit, the load average before the first run, the parameters, and the table:
# end-to-end msgs/s of each relay (until the sink has every message), their ratio, shardmta's accept rate and
# its end-to-end rate as a share of it, and the relay CPU per message (its cgroup) of each. With RUNS > 1 each
# figure is the median, with min-max under it. The benches' own output goes to stderr; every row is kept in
# $BENCH_DIR/matrix-<time>.csv. A run that failed or did not deliver everything marks its case with "!" (the
# table still prints; the reasons are listed under it). Run as root (see compare.sh).
set -Eeuo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
RUNS=1 M1K=20000 M100K=3000
CASES=""
args=()
for a in "$@"; do
  case $a in
    -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    RUNS=*) RUNS=${a#RUNS=} ;;
    M1K=*) M1K=${a#M1K=} ;;
    M100K=*) M100K=${a#M100K=} ;;
    CASES=*) CASES=${a#CASES=} ;;
    M=*|B=*|D=*|LOADGEN=*|TLS=*) echo "matrix.sh: ${a%%=*} is set by the cases (see --help)" >&2; exit 2 ;;
    *=*) args+=("$a") ;;
    *) echo "matrix.sh: arguments are KEY=VALUE (see --help), got '$a'" >&2; exit 2 ;;
  esac
done
for x in RUNS M1K M100K; do
  [[ ${!x} =~ ^[1-9][0-9]*$ ]] || { echo "matrix.sh: $x must be a positive integer" >&2; exit 2; }
done
if [[ -z $CASES ]]; then
  for gen in smtp-source shardmta-loadtest; do
    for tls in "" :tls; do
      [[ $gen == smtp-source && -n $tls ]] && continue
      for d in D0 D1; do for size in 1k 100k; do CASES+="$gen:$d:$size$tls "; done; done
    done
  done
fi

# Validate every case before the first (long) run.
declare -a case_ids=() case_args=()
for c in $CASES; do
  IFS=: read -r gen d size tls extra <<<"$c"
  [[ $gen == loadtest ]] && gen=shardmta-loadtest
  case $gen in smtp-source|shardmta-loadtest) ;; *) echo "matrix.sh: case '$c': generator must be smtp-source or shardmta-loadtest" >&2; exit 2 ;; esac
  case $d in D0|D1) ;; *) echo "matrix.sh: case '$c': second part must be D0 or D1" >&2; exit 2 ;; esac
  case $size in 1k) b=1024 m=$M1K ;; 100k) b=102400 m=$M100K ;; *) echo "matrix.sh: case '$c': size must be 1k or 100k" >&2; exit 2 ;; esac
  case ${tls:-} in "") t=0 ;; tls) t=1 ;; *) echo "matrix.sh: case '$c': fourth part can only be tls" >&2; exit 2 ;; esac
  [[ -z ${extra:-} ]] || { echo "matrix.sh: case '$c': too many parts" >&2; exit 2; }
  if (( t )) && [[ $gen != shardmta-loadtest ]]; then
    echo "matrix.sh: case '$c': TLS needs the shardmta-loadtest generator (smtp-source cannot do STARTTLS)" >&2; exit 2
  fi
  case_ids+=("$gen:$d:$size${tls:+:tls}")
  case_args+=("LOADGEN=$gen D=${d#D} B=$b M=$m TLS=$t")
done
(( ${#case_ids[@]} )) || { echo "matrix.sh: no cases" >&2; exit 2; }

# The load tester is the generator of most cases and the sink of the TLS ones: build it once (niced).
need_lt=0
for ca in "${case_args[@]}" "${args[@]}"; do [[ $ca == *LOADGEN=shardmta-loadtest* || $ca == SINK=shardmta-loadtest ]] && need_lt=1; done
if (( need_lt )) && [[ -z ${LOADTEST_BIN:-} ]]; then
  (cd "$HERE/.." && nice -n 15 cargo build --release --quiet --bin shardmta-loadtest)
  LOADTEST_BIN=${CARGO_TARGET_DIR:-$HERE/../target}/release/shardmta-loadtest
  export LOADTEST_BIN
fi

bench_dir=/var/tmp/relay-bench
for a in "${args[@]}"; do [[ $a == BENCH_DIR=* ]] && bench_dir=${a#BENCH_DIR=}; done
mkdir -p "$bench_dir"
csv=$bench_dir/matrix-$(date -u +%Y%m%dT%H%M%SZ).csv
fails=$(mktemp /var/tmp/matrix-fails.XXXXXX)
trap 'rm -f "$fails"' EXIT

commit=$(git -C "$HERE/.." rev-parse --short HEAD 2>/dev/null || echo unknown)
[[ -n $(git -C "$HERE/.." status --porcelain --untracked-files=no 2>/dev/null) ]] && commit+=" (plus uncommitted changes)"
header=$(
  echo "Date: $(date -u '+%Y-%m-%d %H:%M UTC'); commit $commit; load average before starting: $(cut -d' ' -f1-3 /proc/loadavg); $(nproc) CPUs"
  echo "RUNS=$RUNS M1K=$M1K M100K=$M100K${args[*]:+ ${args[*]}}; cases: ${case_ids[*]}"
)
echo "$header" >&2

total=$(( ${#case_ids[@]} * RUNS * 2 )) n=0
for ((ci = 0; ci < ${#case_ids[@]}; ci++)); do
  read -r -a cargs <<<"${case_args[ci]}"
  for ((i = 1; i <= RUNS; i++)); do
    for relay in postfix shardmta; do
      n=$(( n + 1 ))
      echo "[$n/$total] ${case_ids[ci]} run $i/$RUNS: $relay" >&2
      rc=0
      RESULTS_CSV=$csv bash "$HERE/$relay-relay-bench.sh" "${args[@]}" "${cargs[@]}" "LABEL=case=${case_ids[ci]}" >&2 || rc=$?
      (( rc == 0 )) || echo "${case_ids[ci]} $relay run $i: exit $rc ($( ((rc == 2)) && echo 'not all delivered cleanly' || echo 'failed'); see its output above)" >> "$fails"
    done
  done
done

echo "$header"
echo
python3 - "$csv" "$fails" "${case_ids[@]}" <<'PY'
import csv, os, re, statistics, sys
path, fails_path, cases = sys.argv[1], sys.argv[2], sys.argv[3:]
rows = list(csv.DictReader(open(path))) if os.path.exists(path) else []
fails = [l.strip() for l in open(fails_path) if l.strip()]
failed_cases = {f.split()[0] for f in fails}
by = {}
for r in rows:
    m = re.search(r"case=(\S+)", r.get("label", ""))
    if m:
        by.setdefault((m.group(1), r["relay"]), []).append(r)

def vals(case, relay, key):
    out = []
    for r in by.get((case, relay), []):
        try:
            out.append(float(r[key]))
        except (KeyError, ValueError):
            pass
    return out

def fmt(v, digits=0):
    return f"{v:,.{digits}f}"

def cell(v, digits=0):
    """median, and min-max when there are several values"""
    if not v:
        return "n/a"
    s = fmt(statistics.median(v), digits)
    if len(v) > 1:
        s += f" ({fmt(min(v), digits)}-{fmt(max(v), digits)})"
    return s

def name(case):
    gen, d, size, *tls = case.split(":")
    return (f"{gen}, {'reused connections' if d == 'D1' else 'new connection per message'}, "
            f"{'1 KB' if size == '1k' else '100 KB'}{', STARTTLS' if tls else ''}")

print("| case | Postfix e2e msgs/s | shardmta e2e msgs/s | ratio | shardmta accept msgs/s | e2e/accept | relay CPU µs/msg (Postfix / shardmta) |")
print("|---|---|---|---|---|---|---|")
for c in cases:
    pe, se = vals(c, "postfix", "e2e_msg_s"), vals(c, "shardmta", "e2e_msg_s")
    sa = vals(c, "shardmta", "inject_msg_s")
    pc, sc = vals(c, "postfix", "relay_cpu_us_per_msg"), vals(c, "shardmta", "relay_cpu_us_per_msg")
    ratio = f"x{statistics.median(se) / statistics.median(pe):.1f}" if pe and se else "n/a"
    # e2e/accept per run (the same run's two rates), then the median
    runs = by.get((c, "shardmta"), [])
    share = [100 * float(r["e2e_msg_s"]) / float(r["inject_msg_s"]) for r in runs
             if r.get("inject_msg_s") not in (None, "", "n/a") and float(r["inject_msg_s"]) > 0]
    share_s = cell(share) + " %" if share else "n/a"
    mark = " !" if c in failed_cases else ""
    print(f"| {name(c)} (`{c}`){mark} | {cell(pe)} | {cell(se)} | {ratio} | {cell(sa)} | {share_s} | {cell(pc)} / {cell(sc)} |")
if fails:
    print()
    print("! = a run of this case failed or did not deliver everything cleanly (its figures, if any, are still shown):")
    for f in fails:
        print(f"- {f}")
print()
print("e2e/accept: shardmta's end-to-end rate as a share of its accept rate; the accept time ends when the generator has")
print("exited, so on short runs the sink can have everything first (above 100 %).")
print(f"Rows: {path}")
PY
