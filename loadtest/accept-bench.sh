#!/usr/bin/env bash
# Durable accept benchmark: a release shardmta on loopback, the load client against it, on the same machine.
# Prints msgs/s, syncs/s, messages per sync, latency percentiles and the server's CPU per message.
#   loadtest/accept-bench.sh [CONNECTIONS] [MESSAGES] [SIZE] [RATE]
# RATE (msgs/s, optional) makes the load open-loop. Everything stays on 127.0.0.1; the run is bounded by
# MESSAGES and stops by itself.
set -euo pipefail
cd "$(dirname "$0")/.."
C=${1:-50}; M=${2:-100000}; B=${3:-1024}; RATE=${4:-}
cargo build --release --quiet --bins
work=$(mktemp -d /var/tmp/shardmta-bench.XXXXXX)
port=$((20000 + RANDOM % 20000))
cat > "$work/shardmta.toml" <<TOML
queue_directory = "$work/spool"
[[listener]]
address = "127.0.0.1:$port"
kind = "smtp"
[delivery]
enabled = false
TOML
target/release/shardmta serve --config "$work/shardmta.toml" 2> "$work/server.log" &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 100); do [ -s "$work/spool/stats.json" ] && break; sleep 0.1; done
cpu() { awk '{print $14 + $15}' "/proc/$pid/stat"; }   # utime + stime, clock ticks
stat() { python3 -c "import json,sys; print(json.load(open('$work/spool/stats.json'))['$1'])"; }
hz=$(getconf CLK_TCK)
cpu0=$(cpu); syncs0=$(stat queue_syncs); acc0=$(stat messages_accepted)
args=(send --target "127.0.0.1:$port" --connections "$C" --messages "$M" --size "$B")
[ -n "$RATE" ] && args+=(--rate "$RATE")
target/release/shardmta-loadtest "${args[@]}" 2>/dev/null | tee "$work/lt.out"
sleep 0.5   # let stats.json catch up
cpu1=$(cpu); syncs1=$(stat queue_syncs); acc1=$(stat messages_accepted)
python3 - "$work/lt.out" "$hz" "$cpu0" "$cpu1" "$syncs0" "$syncs1" "$acc0" "$acc1" <<'PY'
import sys
out, hz, c0, c1, s0, s1, a0, a1 = sys.argv[1], *map(float, sys.argv[2:])
el = float([l for l in open(out) if l.startswith("elapsed_s")][0].split()[1])
msgs, syncs, cpu = a1 - a0, s1 - s0, (c1 - c0) / hz
print(f"server: accepted {msgs:.0f} in {el:.2f} s = {msgs/el:.0f} msgs/s; syncs {syncs:.0f} = {syncs/el:.0f}/s "
      f"({msgs/max(syncs,1):.1f} msgs/sync); CPU {cpu:.2f} s = {1e6*cpu/max(msgs,1):.1f} us/msg")
PY
