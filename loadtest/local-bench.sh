#!/usr/bin/env bash
# Local delivery benchmark: a release shardmta on loopback delivers to Maildirs (file fdatasync + new/ fsync,
# batched by the local-delivery shard); the load client sends on the same machine.
#   [SYNC=file|filesystem] loadtest/local-bench.sh [CONNECTIONS] [MESSAGES] [SIZE] [MAILBOXES]
# Recipients user<N>@bench.test are spread over MAILBOXES local users by a generated virtual(5) map. Two phases:
# "drain" (MESSAGES queued with delivery stopped, then the time for the local shard to empty the queue after a
# restart) and "end to end" (first message sent -> last one in new/, accept and delivery sharing the cores).
# Each prints msgs/s, the syncs made and batches, and the server's CPU per message. SYNC picks
# [local] sync_method; MAILFS=volume (default, root: a fresh ext4 image on a loop device) or spool.
# Bounded by MESSAGES and a 120 s wait; stops by itself; only 127.0.0.1 is used.
set -euo pipefail
cd "$(dirname "$0")/.."
C=${1:-50}; M=${2:-50000}; B=${3:-1024}; U=${4:-100}; SYNC=${SYNC:-file}; MAILFS=${MAILFS:-volume}
cargo build --release --quiet --bins
# ext4 without a journal (this machine's root file system) skips inodes deleted in the last 60 s when it
# allocates new ones, which makes file creation much slower right after a previous run removed its files.
# With MAILFS=spool, runs are kept at least 65 s apart so each one measures the same thing.
stamp=/var/tmp/shardmta-local-bench.last
if [ "$MAILFS" = spool ] && [ -f "$stamp" ]; then
    age=$(( $(date +%s) - $(stat -c %Y "$stamp") ))
    if [ "$age" -lt 65 ]; then echo "waiting $((65 - age)) s after the previous run (ext4 inode reuse)"; sleep $((65 - age)); fi
fi
work=$(mktemp -d /var/tmp/shardmta-local-bench.XXXXXX)
port=$((20000 + RANDOM % 20000))
pid=""
cleanup() {
    [ -n "$pid" ] && { kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; }
    if [ -n "${loopdev:-}" ]; then umount "$work/mailfs"; losetup -d "$loopdev"; fi
    rm -rf "$work"; touch "$stamp"
}
trap cleanup EXIT
python3 - "$work/virtual" "$M" "$U" <<'PY'
import sys
path, m, u = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with open(path, "w") as f:
    for n in range(m):
        f.write(f"user{n}@bench.test mbox{n % u}@localhost\n")
PY
# Mailboxes: by default on a fresh ext4 file system of their own (a 4 GiB image, journal on, default mkfs
# options, loop device with direct I/O), as a mail volume would be, so every run starts from the same state.
# MAILFS=spool puts them under the spool on the file system /var/tmp is on instead.
mailroot="$work/spool/mail"
if [ "$MAILFS" = volume ]; then
    truncate -s 4G "$work/mail.img"
    mkfs.ext4 -q -F "$work/mail.img"
    loopdev=$(losetup -f --show --direct-io=on "$work/mail.img")
    mkdir -p "$work/mailfs"
    mount "$loopdev" "$work/mailfs"
    mailroot="$work/mailfs"
fi
users=$(python3 -c "print(', '.join('\"mbox%d\"' % i for i in range($U)))")
cat > "$work/shardmta.toml" <<TOML
queue_directory = "$work/spool"
mydestination = ["localhost"]
virtual_alias_maps = ["$work/virtual"]
[[listener]]
address = "127.0.0.1:$port"
kind = "smtp"
[dns]
servers = ["127.0.0.1:9"]
[local]
users = [$users]
system_users = false
sync_method = "$SYNC"
mailbox_path = "$mailroot/{domain}/{user}/Maildir"
TOML
# Phase 1 (drain): queue M messages with delivery stopped, restart with delivery on and time the local shard
# emptying the queue into Maildirs: the local delivery rate without the accept load on the same 2 cores.
# Phase 2 (end to end): the same load with delivery on while it arrives: first message sent -> last in new/.
serve() { target/release/shardmta serve --config "$work/shardmta.toml" 2>> "$work/server.log" & pid=$!; }
ready() { for _ in $(seq 200); do [ -s "$work/spool/stats.json" ] && break; sleep 0.05; done; }
stop() { kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true; rm -f "$work/spool/stats.json"; }
cpu() { awk '{print $14 + $15}' "/proc/$pid/stat"; }   # utime + stime, clock ticks
counter() {  # one counter from stats.json, in bash only (the poll must not eat the CPU it measures)
    local s; s=$(< "$work/spool/stats.json") || return 1
    [[ $s =~ \"$1\":([0-9]+) ]] && echo "${BASH_REMATCH[1]}"
}
snap() { echo "$(date +%s.%N) $(cpu) $(counter local_delivered) $(counter local_file_syncs) $(counter local_dir_syncs) $(counter local_batches) $(counter local_fs_syncs)"; }
wait_delivered() {  # bounded: at most 120 s
    for _ in $(seq 1200); do [ "$(counter local_delivered)" -ge "$1" ] && return; sleep 0.1; done
}
send() {
    target/release/shardmta-loadtest send --target "127.0.0.1:$port" --connections "$C" --messages "$M" \
        --size "$B" --to-domain bench.test 2>/dev/null > "$work/lt.out"
    grep -E "^elapsed_s" "$work/lt.out" || true
}
report() {  # label, snapshot before, snapshot after
    python3 - "$1" $2 $3 "$M" <<'PY'
import sys
label = sys.argv[1]
t0, c0, d0, f0, s0, b0, y0, t1, c1, d1, f1, s1, b1, y1, m = map(float, sys.argv[2:])
hz = float(__import__("os").sysconf("SC_CLK_TCK"))
d, el, cpu = d1 - d0, t1 - t0, (c1 - c0) / hz
print(f"{label}: {d:.0f} delivered in {el:.2f} s = {d / el:.0f} msgs/s; {f1 - f0:.0f} file syncs, "
      f"{s1 - s0:.0f} dir syncs, {y1 - y0:.0f} syncfs, {b1 - b0:.0f} batches ({d / max(b1 - b0, 1):.0f} msgs/batch); "
      f"server CPU {1e6 * cpu / max(d, 1):.0f} us/msg")
PY
}
sed -i 's/^\[delivery\]$//' "$work/shardmta.toml"
printf '[delivery]\nenabled = false\n' >> "$work/shardmta.toml"
serve; ready
echo "phase 1: queueing $M messages with delivery stopped"; send
stop
sed -i 's/^enabled = false$/enabled = true/' "$work/shardmta.toml"
t0=$(date +%s.%N); serve; ready
before="$t0 $(cpu) 0 0 0 0 0"
wait_delivered "$M"
report "drain" "$before" "$(snap)"
echo "phase 2: end to end"
b2=$(snap); send
wait_delivered $((2 * M))
report "end to end" "$b2" "$(snap)"
files=$(find "$mailroot" -path '*/new/*' -type f | wc -l)
echo "files in new/: $files (expected $((2 * M)))"
