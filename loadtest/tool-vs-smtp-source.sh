#!/usr/bin/env bash
# tool-vs-smtp-source.sh: shardmta-loadtest (send, sink) against Postfix's smtp-source and smtp-sink on
# loopback, with the same connections and message size, reusing connections and with a new connection per
# message. Every load generator runs against every sink, so the generator and the sink can be told apart.
#   loadtest/tool-vs-smtp-source.sh [C=50] [M=20000] [B=1024] [RUNS=1] [S=<cores>] [W=8]
# C connections (smtp-source -s C), M messages, B payload bytes (smtp-source -l B; shardmta-loadtest gets
# --size equal to the whole message smtp-source sends, headers included, measured first), RUNS repetitions
# (medians), S shards of shardmta-loadtest sink, pinned (smtp-sink is one process). Rate = M / the generator's wall
# time (process start to exit, every message answered); CPU = the generator's user + system time per message, and
# the whole machine's user, kernel and steal time per message (both programs: where the cores went).
# smtp-source does not pipeline, so shardmta-loadtest runs pipelined (its default), with --no-pipelining,
# with --chunking (BDAT: a whole transaction in one write; only into its own sink, smtp-sink has no
# CHUNKING), reusing connections with --chunking --window W (W transactions in flight per connection), and with a
# new connection per message with --chunking --close-with-reset (an RST after the 221: no TIME_WAIT).
# Needs smtp-source/smtp-sink (installs Postfix's package when root and missing). Set LOADTEST=path to use a
# built binary; otherwise it builds one (release, nice 15, CARGO_TARGET_DIR or target/). Loopback only.
set -Eeuo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
C=50 M=20000 B=1024 RUNS=1 S=$(nproc) W=8
for a in "$@"; do
  case $a in
    C=* | M=* | B=* | RUNS=* | S=* | W=*) declare "${a%%=*}=${a#*=}" ;;
    -h | --help) sed -n '2,16p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "unknown argument $a (C= M= B= RUNS= S= W=)" >&2; exit 2 ;;
  esac
done
for v in C M B RUNS S W; do
  [[ ${!v} =~ ^[1-9][0-9]*$ ]] || { echo "$v must be a positive integer" >&2; exit 2; }
done
(( C <= 1000 && M <= 10000000 && RUNS <= 20 && S <= 64 && W <= 64 )) ||
  { echo "C <= 1000, M <= 10000000, RUNS <= 20, S <= 64, W <= 64" >&2; exit 2; }

if ! [[ -x /usr/sbin/smtp-source && -x /usr/sbin/smtp-sink ]]; then
  [[ $(id -u) == 0 ]] || { echo "smtp-source/smtp-sink missing: install postfix (as root)" >&2; exit 2; }
  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
  DEBIAN_FRONTEND=noninteractive apt-get install -y postfix >/dev/null
fi
if [[ -z ${LOADTEST:-} ]]; then
  (cd "$ROOT" && nice -n 15 cargo build --release --quiet --bin shardmta-loadtest)
  LOADTEST=${CARGO_TARGET_DIR:-$ROOT/target}/release/shardmta-loadtest
fi
[[ -x $LOADTEST ]] || { echo "no binary at $LOADTEST" >&2; exit 2; }
ulimit -l 8192 2>/dev/null || true

PROBE=127.0.0.63:2525
work=$(mktemp -d /var/tmp/tool-vs-smtp-source.XXXXXX)
pids=()
cleanup() {
  local p
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

wait_listen() { # wait_listen ip:port
  local i
  for ((i = 0; i < 250; i++)); do
    (exec 3<>"/dev/tcp/${1%:*}/${1#*:}") 2>/dev/null && return 0
    sleep 0.02
  done
  echo "nothing listens on $1" >&2
  return 1
}
sink_user=()
[[ $(id -u) == 0 ]] && sink_user=(-u postfix)

# The size of what smtp-source sends with -l B: one message into a saving sink.
"$LOADTEST" sink --listen "$PROBE" --save-dir "$work/probe" --duration 30 >/dev/null 2>&1 &
pids+=($!)
wait_listen "$PROBE"
smtp-source -m 1 -l "$B" -M source.test -f sender@source.test -t rcpt@bench.test "$PROBE"
probe=$(ls "$work"/probe/*.eml)
# The sink prepends 6 X-Sink-* header lines; the rest is the message as sent (dot-unstuffed, no final dot).
SIZE=$(sed -n '7,$p' "$probe" | wc -c)

# Each combination gets a fresh sink on an address of its own (127.0.1R.N): with a new connection per
# message, thousands of TIME_WAIT sockets from the previous combination would otherwise share its
# ephemeral ports (28k on this kernel) with the next one.
SINK_PID=
sink_start() { # sink_start smtp-sink|loadtest-sink ip:port
  if [[ $1 == smtp-sink ]]; then
    smtp-sink "${sink_user[@]}" -m 1024 "$2" 1024 >/dev/null 2>"$work/sink.err" &
  else
    "$LOADTEST" sink --listen "$2" --shards "$S" --pin >/dev/null 2>"$work/sink.err" &
  fi
  SINK_PID=$!
  pids+=("$SINK_PID")
  wait_listen "$2"
}
sink_stop() {
  kill "$SINK_PID" 2>/dev/null || true
  wait "$SINK_PID" 2>/dev/null || true
}

# timed OUT -- CMD...: runs CMD, prints "wall_s cpu_s rc user_s kernel_s steal_s": the CPU of the command and its
# children, then the whole machine's user, kernel (system + irq + softirq) and steal time over the run from
# /proc/stat (generator and sink together: on loopback the kernel's TCP work lands on whichever side sends).
timed() {
  local out=$1; shift 2
  python3 - "$out" "$@" <<'PY'
import os, resource, subprocess, sys, time
def cpu():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return v[0] + v[1], v[2] + v[5] + v[6], v[7]
out = open(sys.argv[1], "wb")
c0 = cpu()
t = time.monotonic()
rc = subprocess.call(sys.argv[2:], stdout=out, stderr=subprocess.STDOUT)
wall = time.monotonic() - t
c1 = cpu()
hz = os.sysconf("SC_CLK_TCK")
user, kern, steal = ((b - a) / hz for a, b in zip(c0, c1))
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
print(f"{wall:.4f} {ru.ru_utime + ru.ru_stime:.4f} {rc} {user:.3f} {kern:.3f} {steal:.3f}")
PY
}

results=$work/results.txt
: >"$results"
load=$(cut -d' ' -f1 /proc/loadavg)
echo "load average before: $load (2 cores; figures are unreliable above ~1.5)" >&2
for ((run = 1; run <= RUNS; run++)); do
  n=0
  for mode in reuse new; do
    for gen in smtp-source send send-no-pipelining send-chunking send-chunking-window send-chunking-reset; do
      for sink in smtp-sink loadtest-sink; do
        # smtp-sink offers no CHUNKING; a window needs reused connections; the reset is about new ones.
        [[ $gen == send-chunking* && $sink == smtp-sink ]] && continue
        [[ $gen == send-chunking-window && $mode == new ]] && continue
        [[ $gen == send-chunking-reset && $mode == reuse ]] && continue
        n=$((n + 1))
        addr=127.0.$((10 + run)).$n:2525
        sink_start "$sink" "$addr"
        case $gen in
          smtp-source)
            cmd=(smtp-source -s "$C" -m "$M" -l "$B" -M source.test -f sender@source.test -t rcpt@bench.test)
            [[ $mode == reuse ]] && cmd+=(-d)
            cmd+=("$addr") ;;
          send*)
            cmd=("$LOADTEST" send --target "$addr" --connections "$C" --messages "$M" --size "$SIZE"
              --max-conn-errors 1)
            [[ $mode == new ]] && cmd+=(--new-connection)
            [[ $gen == send-no-pipelining ]] && cmd+=(--no-pipelining)
            [[ $gen == send-chunking* ]] && cmd+=(--chunking)
            [[ $gen == send-chunking-window ]] && cmd+=(--window "$W")
            [[ $gen == send-chunking-reset ]] && cmd+=(--close-with-reset) ;;
        esac
        read -r wall cpu rc user kern steal < <(timed "$work/out.txt" -- "${cmd[@]}")
        sink_stop
        if [[ $rc != 0 ]] || { [[ $gen == send* ]] && ! grep -q " accepted $M " "$work/out.txt"; }; then
          echo "FAILED ($rc): ${cmd[*]}" >&2
          tail -5 "$work/out.txt" >&2
          exit 1
        fi
        echo "$mode $gen $sink $wall $cpu $user $kern $steal" >>"$results"
        printf 'run %d %-6s %-20s -> %-14s %8s msgs/s\n' "$run" "$mode" "$gen" "$sink" \
          "$(awk -v m="$M" -v w="$wall" 'BEGIN { printf "%.0f", m / w }')" >&2
      done
    done
  done
done

python3 - "$results" "$C" "$M" "$B" "$SIZE" "$RUNS" "$load" "$S" "$W" <<'PY'
import statistics, sys
path, c, m, b, size, runs, load, s, w = sys.argv[1:]
m = int(m)
rows = {}
for line in open(path):
    mode, gen, sink, *v = line.split()
    rows.setdefault((mode, gen, sink), []).append(tuple(map(float, v)))
print(f"C={c} connections, M={m} messages, smtp-source -l {b} = {size} bytes per message "
      f"(send --size {size}); medians of {runs} run(s); load before {load}; loadtest sink --shards {s} --pin; "
      f"--window {w}")
print("gen CPU: the generator's user + system time; machine user/kernel/steal: all processes, from /proc/stat "
      "(kernel = system + irq + softirq); all per message")
print(f"{'connections':<12} {'generator':<20} {'sink':<14} {'msgs/s':>9} {'gen CPU us':>11} {'user us':>8} "
      f"{'kernel us':>10} {'steal us':>9} {'x smtp-source':>14}")
def med(v, i):
    return statistics.median(x[i] for x in v)
for mode, label in (("reuse", "reused"), ("new", "new per msg")):
    base = rows.get((mode, "smtp-source", "smtp-sink"))
    base_rate = m / med(base, 0) if base else None
    for gen in ("smtp-source", "send", "send-no-pipelining", "send-chunking", "send-chunking-window",
                "send-chunking-reset"):
        for sink in ("smtp-sink", "loadtest-sink"):
            v = rows.get((mode, gen, sink))
            if not v:
                continue
            wall = med(v, 0)
            ratio = f"{m / wall / base_rate:.2f}" if base_rate else "-"
            print(f"{label:<12} {gen:<20} {sink:<14} {m / wall:>9.0f} {med(v, 1) * 1e6 / m:>11.1f} "
                  f"{med(v, 2) * 1e6 / m:>8.1f} {med(v, 3) * 1e6 / m:>10.1f} {med(v, 4) * 1e6 / m:>9.1f} {ratio:>14}")
PY
