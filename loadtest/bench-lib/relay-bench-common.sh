# shellcheck shell=bash
# relay-bench-common.sh: the shared harness behind bench/*-relay-bench.sh.
#
# It measures one relay under test (RUT) on loopback only:
#
#   smtp-source --S sessions--> RUT 127.0.0.1:$LISTEN_PORT --smtp--> smtp-sink 127.0.0.1:$SINK_PORT
#
# (or with TLS=1: shardmta-loadtest send --starttls --> RUT --STARTTLS--> shardmta-loadtest sink --starttls)
#
# An anchor script defines these functions and then calls `bench_main "$@"`:
#   relay_name                 print a short name ("postfix")
#   relay_install              install the RUT if missing (guarded, idempotent)
#   relay_setup                write a fresh config + empty queue under $RELAY_DIR
#   relay_start                start the RUT; run it via `cg_exec "$CG_RELAY" ...` so that its
#                              CPU is accounted; return once it listens on $LISTEN_PORT
#   relay_queue_count          print how many messages are still queued (0 = drained)
#   relay_log_stats            print "sent=N deferred=N bounced=N" (per recipient) from its log
#   relay_stop                 stop the RUT by PID and wait until it is gone
#   RELAY_RCPT_PER_TXN         max recipients the RUT puts in one outbound transaction
#   relay_describe             print one line describing the relay config (profile, knobs)
#
# Parameters: KEY=VALUE arguments or environment variables (arguments win):
#   S=50 sessions, M=20000 messages, B=1024 body bytes, R=1 recipients per message,
#   D=0 (1 = smtp-source -d: keep each session's connection for many messages),
#   N=0 (1 = smtp-source -N: unique recipient names), PROFILE=default|tuned,
#   MODE=relay|direct (direct = smtp-source straight into smtp-sink: load generator ceiling),
#   LISTEN_PORT=2525 SINK_PORT=2526, BENCH_DIR=/var/tmp/relay-bench, TIMEOUT=600 (seconds),
#   RESULTS_CSV=$BENCH_DIR/results.csv, LABEL=free text stored in the CSV.
#   DKIM=none (default) | ed25519 | rsa-2048 | dual: shardmta signs the generators' mail (From: ...@source.test)
#     with a key made by `shardmta dkim keygen` (dual: both); other relays ignore it; the config note says dkim=X.
#   ROUTE=transport (default) | mx: shardmta reaches the sink by a [transport] entry, or by the MX record of
#     bench.test served by `shardmta-loadtest dns` (measures the site lookup and hand-off of MX routing).
#   LOADGEN=smtp-source (default) | traffic-gen: KumoMTA's load generator instead of smtp-source,
#     TRAFFIC_GEN=/path/to/traffic-gen (already built); it sends M messages over S persistent
#     connections (D is implied, R must be 1, N is ignored) to rcpt user-<n>@bench.test with a
#     body of at least B bytes; "loadgen=traffic-gen" is appended to LABEL.
#   LOADGEN=shardmta-loadtest: `shardmta-loadtest send` (LOADTEST_BIN=path, default the release build
#     of this repository) with S connections (a new one per message unless D=1), M messages of B + 142
#     bytes (the size smtp-source -l B sends), R recipients user<n>@bench.test; it also records the
#     p99 of the reply to the end of data (accept_p99_us in the CSV); "loadgen=shardmta-loadtest" is
#     appended to LABEL.
#   TLS=0 (default) | 1: STARTTLS on both sides. The generator (LOADGEN=shardmta-loadtest only: smtp-source
#     cannot) sends --starttls; the relay gets a self-signed RSA-2048 certificate made by openssl in its
#     directory and offers STARTTLS with it (Postfix: smtpd_tls_security_level=may; shardmta:
#     smtpd_tls_cert_file/key_file), and delivers with opportunistic TLS (smtp_tls_security_level=may on
#     both, nothing verified) to `shardmta-loadtest sink --starttls` (its own self-signed certificate).
#     Checked after the run: every connection the sink saw used TLS.
#   SINK=smtp-sink (default with TLS=0) | shardmta-loadtest (implied by TLS=1): the sink on SINK_PORT; the
#     second, with TLS=0, measures what the sink change alone does to a TLS=1 comparison. The load tester's
#     sink counts from its --stats-file (the time of its last message is exact, from that file).
#   SINK_RTT_MS=N (environment, SINK=shardmta-loadtest): the sink holds each write of replies N ms, as a
#     receiver N ms away would; shows what round trips per message cost the relay's delivery.
#   The CSV's last columns are tls (0/1) and sink.
#
# Everything it starts runs with a known PID and (where the kernel allows) in its own cgroup;
# an EXIT trap stops all of it, by PID, and removes the cgroups. Nothing leaves 127.0.0.1.

set -Eeuo pipefail

BENCH_LIB_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

die()  { printf '%s: error: %s\n' "${RELAY_NAME:-bench}" "$*" >&2; exit 1; }
note() { printf '%s: %s\n' "${RELAY_NAME:-bench}" "$*" >&2; }

# ---------------------------------------------------------------- parameters
bench_parse_args() {
  local a k v
  for a in "$@"; do
    case $a in
      -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
      *=*) k=${a%%=*}; v=${a#*=}
           case $k in
             S|M|B|R|D|N|PROFILE|MODE|LISTEN_PORT|SINK_PORT|BENCH_DIR|TIMEOUT|RESULTS_CSV|LABEL|PF_SET|KEEP_LOGS|LOADGEN|TRAFFIC_GEN|LOADTEST_BIN|DKIM|ROUTE|TLS|SINK)
               printf -v "$k" '%s' "$v"; export "${k?}" ;;
             *) die "unknown parameter '$k' (see --help)" ;;
           esac ;;
      *) die "arguments are KEY=VALUE (see --help), got '$a'" ;;
    esac
  done
  S=${S:-50} M=${M:-20000} B=${B:-1024} R=${R:-1} D=${D:-0} N=${N:-0}
  PROFILE=${PROFILE:-default} MODE=${MODE:-relay}
  LISTEN_ADDR=127.0.0.1 SINK_ADDR=127.0.0.1
  LISTEN_PORT=${LISTEN_PORT:-2525} SINK_PORT=${SINK_PORT:-2526}
  BENCH_DIR=${BENCH_DIR:-/var/tmp/relay-bench} TIMEOUT=${TIMEOUT:-600}
  RESULTS_CSV=${RESULTS_CSV:-$BENCH_DIR/results.csv} LABEL=${LABEL:-}
  TLS=${TLS:-0}
  local x
  for x in S M B R D N LISTEN_PORT SINK_PORT TIMEOUT; do
    [[ ${!x} =~ ^[0-9]+$ ]] || die "$x must be a non-negative integer, got '${!x}'"
  done
  (( S >= 1 && M >= 1 && R >= 1 )) || die "S, M and R must be >= 1"
  case $MODE in relay|direct) ;; *) die "MODE must be relay or direct" ;; esac
  case $PROFILE in default|tuned) ;; *) die "PROFILE must be default or tuned" ;; esac
  case $TLS in 0|1) ;; *) die "TLS must be 0 or 1" ;; esac
  [[ $BENCH_DIR == /* ]] || die "BENCH_DIR must be absolute"
  LOADGEN=${LOADGEN:-smtp-source}
  case $LOADGEN in
    smtp-source) ;;
    traffic-gen)
      [[ -n ${TRAFFIC_GEN:-} && -x ${TRAFFIC_GEN:-} ]] || die "LOADGEN=traffic-gen needs TRAFFIC_GEN=/path/to/traffic-gen"
      (( R == 1 )) || die "LOADGEN=traffic-gen sends one recipient per message (R=1)"
      LABEL="${LABEL:+$LABEL }loadgen=traffic-gen" ;;
    shardmta-loadtest)
      LABEL="${LABEL:+$LABEL }loadgen=shardmta-loadtest" ;;
    *) die "LOADGEN must be smtp-source, traffic-gen or shardmta-loadtest" ;;
  esac
  (( TLS == 0 )) || [[ $LOADGEN == shardmta-loadtest ]] \
    || die "TLS=1 needs LOADGEN=shardmta-loadtest: $LOADGEN cannot do STARTTLS"
  SINK=${SINK:-$( (( TLS )) && echo shardmta-loadtest || echo smtp-sink)}
  case $SINK in
    smtp-sink) (( TLS == 0 )) || die "TLS=1 needs SINK=shardmta-loadtest: smtp-sink cannot do STARTTLS" ;;
    shardmta-loadtest) ;;
    *) die "SINK must be smtp-sink or shardmta-loadtest" ;;
  esac
  if [[ $LOADGEN == shardmta-loadtest || $SINK == shardmta-loadtest ]]; then
    LOADTEST_BIN=${LOADTEST_BIN:-${CARGO_TARGET_DIR:-$BENCH_LIB_DIR/../../target}/release/shardmta-loadtest}
    [[ -x $LOADTEST_BIN ]] || die "no $LOADTEST_BIN: cargo build --release --bin shardmta-loadtest (or set LOADTEST_BIN)"
  fi
}

# ---------------------------------------------------------------- install (guarded)
apt_install() { # apt_install pkg... : install with no prompts; apt-get update only when needed
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y --no-install-recommends "$@" >/dev/null 2>&1; then
    apt-get update >/dev/null 2>&1 || die "apt-get update failed"
    apt-get install -y --no-install-recommends "$@" >/dev/null || die "apt-get install $* failed"
  fi
}

ensure_loadgen() { # Postfix ships smtp-source/smtp-sink; swaks sends the smoke-test message.
  [[ $(id -u) == 0 ]] || die "run as root (installs packages, uses cgroups, smtp-sink -u)"
  if ! [[ -x /usr/sbin/smtp-source && -x /usr/sbin/smtp-sink && -x /usr/lib/postfix/sbin/master ]]; then
    local other
    other=$(dpkg-query -W -f='${Package} ${Status}\n' exim4-daemon-light exim4-daemon-heavy opensmtpd sendmail-bin 2>/dev/null \
            | awk '/install ok installed/{print $1}' | tr '\n' ' ' || true)  # dpkg-query fails for absent packages
    [[ -z $other || ${ALLOW_MTA_REPLACE:-0} == 1 ]] \
      || die "installing postfix would remove the installed MTA package(s): $other(set ALLOW_MTA_REPLACE=1 to accept)"
    note "installing postfix (debconf: No configuration) for smtp-source/smtp-sink"
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    apt_install postfix
  fi
  command -v swaks >/dev/null || apt_install swaks
  command -v perl >/dev/null || apt_install perl
  perl -MTime::HiRes -e1 2>/dev/null || apt_install perl
  command -v ss >/dev/null || apt_install iproute2
  if (( TLS )); then command -v openssl >/dev/null || apt_install openssl; fi
}

# tls_make_cert DIR: a self-signed RSA-2048 certificate and key for the relay's inbound STARTTLS (TLS=1), as
# DIR/tls-cert.pem and DIR/tls-key.pem (the same kind for every relay: the handshake's cost depends on it).
tls_make_cert() {
  openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=relay-bench.localdomain" \
    -addext "subjectAltName=DNS:relay-bench.localdomain" \
    -keyout "$1/tls-key.pem" -out "$1/tls-cert.pem" > "$1/openssl.out" 2>&1 \
    || die "openssl could not make a certificate: $(tail -3 "$1/openssl.out")"
  chmod 600 "$1/tls-key.pem"
}

# ---------------------------------------------------------------- cgroups (CPU accounting)
CG_KIND=none CG_BASE=
cg_init() {
  local m
  m=$(awk '$3=="cgroup2"{print $2; exit}' /proc/mounts)
  if [[ -n $m ]] && mkdir -p "$m/relay-bench.probe.$$" 2>/dev/null; then
    if [[ -e $m/relay-bench.probe.$$/cpu.stat ]]; then CG_KIND=v2 CG_BASE=$m; fi
    rmdir "$m/relay-bench.probe.$$" 2>/dev/null || true
  fi
  if [[ $CG_KIND == none && -d /sys/fs/cgroup/cpuacct ]] && mkdir -p /sys/fs/cgroup/cpuacct/relay-bench.probe.$$ 2>/dev/null; then
    CG_KIND=v1 CG_BASE=/sys/fs/cgroup/cpuacct
    rmdir "$CG_BASE/relay-bench.probe.$$" 2>/dev/null || true
  fi
  [[ $CG_KIND != none ]] || note "no usable cgroup: per-component CPU will read n/a (system CPU still measured)"
}
cg_create() { # cg_create name -> prints path ("" when no cgroups)
  [[ $CG_KIND == none ]] && { echo ""; return; }
  local p=$CG_BASE/relay-bench.$1
  cg_remove "$p"
  mkdir -p "$p" && echo "$p"
}
cg_exec() { # cg_exec path cmd... : run cmd inside cgroup path (path may be "")
  local p=$1; shift
  ( if [[ -n $p ]]; then echo "$BASHPID" > "$p/cgroup.procs"; fi; exec "$@" )
}
cg_usage_us() { # CPU microseconds used so far by all processes ever in the cgroup
  local p=$1
  [[ -z $p || ! -d $p ]] && { echo ""; return; }
  if [[ $CG_KIND == v2 ]]; then awk '$1=="usage_usec"{print $2}' "$p/cpu.stat"
  else echo $(( $(<"$p/cpuacct.usage") / 1000 )); fi
}
cg_spawn() { # cg_spawn path cmd... & : like cg_exec but without an extra fork, so $! is cmd's PID
  local p=$1; shift
  if [[ -n $p ]]; then echo "$BASHPID" > "$p/cgroup.procs"; fi
  exec "$@"
}
cg_pids() { [[ -n ${1:-} && -e $1/cgroup.procs ]] && cat "$1/cgroup.procs" || true; }
cg_remove() { # kill leftovers (only processes we put there), then rmdir
  local p=$1 pid i
  [[ -n $p && -d $p ]] || return 0
  for i in 1 2 3 4 5 6 7 8 9 10; do
    [[ -z $(cg_pids "$p") ]] && break
    for pid in $(cg_pids "$p"); do kill -TERM "$pid" 2>/dev/null || true; done
    sleep 0.2
  done
  for pid in $(cg_pids "$p"); do kill -KILL "$pid" 2>/dev/null || true; done
  for i in 1 2 3 4 5 6 7 8 9 10; do rmdir "$p" 2>/dev/null && return 0; sleep 0.1; done
  note "warning: could not remove cgroup $p"
}

# ---------------------------------------------------------------- system counters
proc_stat() { # prints "busy_ticks iowait_ticks total_ticks steal_ticks" (all CPUs)
  local cpu u n s i w irq sirq st rest
  read -r cpu u n s i w irq sirq st rest < /proc/stat
  echo "$((u+n+s+irq+sirq+st)) $w $((u+n+s+i+w+irq+sirq+st)) $st"
}
tcp_listen_drops() { awk '/^TcpExt:/{if(!h){split($0,k);h=1}else{for(i=2;i<=NF;i++)if(k[i]=="ListenDrops")print $i}}' /proc/net/netstat; }
settle() { # let TIME_WAIT sockets from a previous run expire, so runs do not disturb each other
  local i tw
  for ((i = 0; i < 70; i++)); do
    tw=$(ss -Htan state time-wait 2>/dev/null | wc -l)
    (( tw < ${SETTLE_TW:-3000} )) && break   # (was 'return 0', which skipped sync + COOLDOWN)
    (( i == 0 )) && note "waiting for $tw TIME_WAIT sockets to expire (max 70s)"
    sleep 1
  done
  # Flush dirty pages / the fs journal left by a previous run, then let the box go idle, so
  # every run starts from the same disk and CPU state (COOLDOWN=0 to skip).
  sync
  sleep "${COOLDOWN:-10}"
}
DISK_DEV=
disk_init() { # block device holding $BENCH_DIR (for write/flush counts)
  local src
  src=$(df --output=source "$BENCH_DIR" 2>/dev/null | tail -1)
  src=${src#/dev/}
  awk -v d="$src" '$3==d{f=1} END{exit !f}' /proc/diskstats 2>/dev/null && DISK_DEV=$src || DISK_DEV=
}
disk_stat() { # prints "sectors_written flushes" for DISK_DEV
  [[ -z $DISK_DEV ]] && { echo "0 0"; return; }
  awk -v d="$DISK_DEV" '$3==d{print $10, (NF>=20?$20:0)}' /proc/diskstats
}

port_busy() { ss -Hltn "sport = :$1" 2>/dev/null | grep -q . ; }
wait_listen() { # wait_listen port seconds
  local i
  for ((i = 0; i < $2 * 20; i++)); do port_busy "$1" && return 0; sleep 0.05; done
  return 1
}

# ---------------------------------------------------------------- sink + monitor
# smtp-sink -c prints "\rsess=N quit=N mesg=N" on every update; a small perl reader turns
# that stream into time-stamped events ("<target> <epoch>") when mesg reaches each target,
# so completion is timed without polling.
SINK_PID= MON_PID= EVFD= CG_SINK= CG_SRC= CG_RELAY= RELAY_STARTED=0
sink_start() { # sink_start target...
  rm -f "$RUN_DIR/sink.fifo" "$RUN_DIR/events.fifo"
  mkfifo "$RUN_DIR/sink.fifo" "$RUN_DIR/events.fifo"
  exec {EVFD}<>"$RUN_DIR/events.fifo"
  [[ $SINK == shardmta-loadtest ]] && { loadtest_sink_start "$@"; return; }
  cg_spawn "$CG_SINK" perl -e '
    use strict; use warnings; use Time::HiRes qw(time); use IO::Handle;
    my ($ev, $cf, @t) = @ARGV;
    open(my $E, ">", $ev) or die "events: $!"; $E->autoflush(1);
    local $/ = "\r"; my $n = 0;
    while (my $r = <STDIN>) {
      next unless $r =~ /mesg=(\d+)/; $n = $1;
      while (@t && $n >= $t[0]) { printf $E "%d %.6f\n", shift(@t), time; }
    }
    open(my $C, ">", $cf) or die; print $C "$n\n"; close $C;
    printf $E "eof %d %.6f\n", $n, time;
  ' "$RUN_DIR/events.fifo" "$RUN_DIR/sink.count" "$@" < "$RUN_DIR/sink.fifo" &
  MON_PID=$!
  cg_spawn "$CG_SINK" smtp-sink -u postfix -c -m 1024 "$SINK_ADDR:$SINK_PORT" 1024 \
    > "$RUN_DIR/sink.fifo" 2> "$RUN_DIR/sink.err" &
  SINK_PID=$!
  wait_listen "$SINK_PORT" 10 || die "smtp-sink did not listen on $SINK_ADDR:$SINK_PORT ($(cat "$RUN_DIR/sink.err"))"
}
# SINK=shardmta-loadtest: the load tester's sink (with --starttls when TLS=1) writes its counters to a stats
# file (rewritten within ~75 ms of a change); a perl poller turns it into the same events, timed by the file's
# last_message_unix_s (when the sink accepted its latest message), and writes sink.count once the sink is gone.
loadtest_sink_start() { # loadtest_sink_start target...
  local sink_args=(sink --listen "$SINK_ADDR:$SINK_PORT" --stats-file "$RUN_DIR/sink.json")
  (( TLS )) && sink_args+=(--starttls)
  # SINK_RTT_MS=N (environment): the sink holds each write of replies N ms, a distant receiver's round trip.
  [[ -n ${SINK_RTT_MS:-} ]] && sink_args+=(--rtt-ms "$SINK_RTT_MS")
  rm -f "$RUN_DIR/sink.json"
  cg_spawn "$CG_SINK" "$LOADTEST_BIN" "${sink_args[@]}" > "$RUN_DIR/sink.out" 2> "$RUN_DIR/sink.err" &
  SINK_PID=$!
  cg_spawn "$CG_SINK" perl -e '
    use strict; use warnings; use Time::HiRes qw(time sleep stat); use IO::Handle; use JSON::PP;
    my ($ev, $cf, $sf, $pid, @t) = @ARGV;
    open(my $E, ">", $ev) or die "events: $!"; $E->autoflush(1);
    my ($n, $seen) = (0, "");
    my $poll = sub {   # re-read only a file that changed (it is replaced by a rename: new inode)
      my @st = stat($sf) or return; my $id = "$st[1] $st[9] $st[7]"; return if $id eq $seen;
      open(my $F, "<", $sf) or return; local $/; my $j = <$F>; close $F;
      my $d = eval { decode_json($j) } or return;
      $seen = $id; $n = $d->{messages};
      my $at = $d->{last_message_unix_s} // time;
      while (@t && $n >= $t[0]) { printf $E "%d %.6f\n", shift(@t), $at; }
    };
    my $alive = sub {   # a sink that exited stays a zombie until the harness reaps it
      return 0 unless kill(0, $pid);
      open(my $S, "<", "/proc/$pid/stat") or return 0; my $l = <$S> // ""; return $l !~ /^\d+ \(.*\) [ZX] /;
    };
    while ($alive->()) { $poll->(); sleep 0.02; }
    $poll->();
    open(my $C, ">", $cf) or die; print $C "$n\n"; close $C;
    printf $E "eof %d %.6f\n", $n, time;
  ' "$RUN_DIR/events.fifo" "$RUN_DIR/sink.count" "$RUN_DIR/sink.json" "$SINK_PID" "$@" &
  MON_PID=$!
  wait_listen "$SINK_PORT" 10 || die "shardmta-loadtest sink did not listen on $SINK_ADDR:$SINK_PORT ($(cat "$RUN_DIR/sink.err"))"
}
# Prints "connections tls_connections" from the load tester's sink (after it stopped).
loadtest_sink_conns() {
  python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d["connections"], d["tls_connections"])' \
    "$RUN_DIR/sink.json" 2>/dev/null || echo "? ?"
}

wait_event() { # wait_event target timeout_s -> prints epoch when reached; fails on timeout/eof
  local tgt ts deadline=$(( ${EPOCHREALTIME%.*} + $2 )) left
  while :; do
    left=$(( deadline - ${EPOCHREALTIME%.*} )); (( left > 0 )) || return 1
    read -r -t "$left" -u "$EVFD" tgt ts || return 1
    [[ $tgt == eof ]] && return 1
    [[ $tgt == "$1" ]] && { echo "$ts"; return 0; }
  done
}
sink_stop() {
  if [[ -n $SINK_PID ]]; then kill -TERM "$SINK_PID" 2>/dev/null || true; wait "$SINK_PID" 2>/dev/null || true; SINK_PID=; fi
  if [[ -n $MON_PID ]]; then
    local i; for i in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$MON_PID" 2>/dev/null || break; sleep 0.1; done
    kill -TERM "$MON_PID" 2>/dev/null || true; wait "$MON_PID" 2>/dev/null || true; MON_PID=
  fi
  [[ -n $EVFD ]] && { exec {EVFD}<&-; EVFD=; }
  rm -f "$RUN_DIR/sink.fifo" "$RUN_DIR/events.fifo"
}

bench_cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if (( RELAY_STARTED )); then relay_stop || true; RELAY_STARTED=0; fi
  sink_stop || true
  cg_remove "$CG_RELAY"; cg_remove "$CG_SINK"; cg_remove "$CG_SRC"
  local p leaks=""
  for p in "$LISTEN_PORT" "$SINK_PORT"; do port_busy "$p" && leaks+=" port:$p"; done
  [[ -n $leaks ]] && note "warning: still listening after cleanup:$leaks"
  exit "$rc"
}

# ---------------------------------------------------------------- main
bench_main() {
  bench_parse_args "$@"
  RELAY_NAME=$(relay_name)
  [[ $MODE == direct ]] && RELAY_NAME=direct
  ensure_loadgen
  [[ $MODE == relay ]] && relay_install
  for p in "$SINK_PORT" $([[ $MODE == relay ]] && echo "$LISTEN_PORT"); do
    port_busy "$p" && die "port $p is already in use on this machine; stop that first (not ours to kill)"
  done

  RELAY_DIR=$BENCH_DIR/$(relay_name)
  RUN_DIR=$BENCH_DIR/run-$RELAY_NAME
  rm -rf "$RUN_DIR"; mkdir -p "$RUN_DIR"
  settle
  cg_init; disk_init
  trap bench_cleanup EXIT
  trap 'exit 130' INT TERM
  CG_SINK=$(cg_create sink); CG_SRC=$(cg_create source)

  local per_txn=${RELAY_RCPT_PER_TXN:-50} expect smoke=0 dst_port=$SINK_PORT
  if [[ $MODE == relay ]]; then
    expect=$(( M * ( (R + per_txn - 1) / per_txn ) ))   # messages the sink should see
    smoke=1; dst_port=$LISTEN_PORT
    CG_RELAY=$(cg_create relay)
    relay_setup
    sink_start "$smoke" "$(( smoke + expect ))"
    relay_start
    RELAY_STARTED=1
    # Smoke test: one message through the relay before timing starts (fails fast on bad config).
    swaks --server "$LISTEN_ADDR:$LISTEN_PORT" --helo source.test --from smoke@source.test \
          --to smoke@bench.test --silent 2 > "$RUN_DIR/swaks.out" 2>&1 \
      || die "smoke test: relay refused mail: $(tail -5 "$RUN_DIR/swaks.out")"
    wait_event "$smoke" 30 >/dev/null || die "smoke test: message not relayed to the sink within 30s (see $RUN_DIR)"
    local i; for ((i = 0; i < 200; i++)); do [[ $(relay_queue_count) == 0 ]] && break; sleep 0.05; done
  else
    expect=$M
    sink_start "$expect"
  fi

  # ---- timed phase
  local c0 s0 k0 d0 t0 t1 t2 t3 src_rc=0 p99=n/a
  local src_args=(-s "$S" -m "$M" -l "$B" -r "$R" -M source.test -f sender@source.test -t rcpt@bench.test)
  (( D )) && src_args+=(-d)
  (( N )) && src_args+=(-N)
  c0=$(cg_usage_us "$CG_RELAY"); s0=$(cg_usage_us "$CG_SRC"); k0=$(cg_usage_us "$CG_SINK")
  read -r sb0 sw0 st0 ss0 < <(proc_stat); read -r dw0 df0 < <(disk_stat); ld0=$(tcp_listen_drops)
  t0=$EPOCHREALTIME
  if [[ $LOADGEN == traffic-gen ]]; then
    cg_exec "$CG_SRC" "$TRAFFIC_GEN" --target "$LISTEN_ADDR:$dst_port" --concurrency "$S" \
      --message-count "$M" --body-size "$B" --duration "$TIMEOUT" --domain bench --domain-suffix test \
      > "$RUN_DIR/source.out" 2>&1 || src_rc=$?
    t1=$EPOCHREALTIME
    # traffic-gen exits 0 even when sessions failed: require "sent M messages, failed 0".
    local tg; tg=$(sed -n 's/^sent \([0-9,]*\) messages, failed \([0-9,]*\) .*/\1 \2/p' "$RUN_DIR/source.out" | tr -d ,)
    [[ $tg == "$M 0" ]] || { (( src_rc )) || src_rc=1; }
  elif [[ $LOADGEN == shardmta-loadtest ]]; then
    # 142 bytes: the headers smtp-source adds to its -l B body (measured by tool-vs-smtp-source.sh).
    local lt_args=(send --target "$LISTEN_ADDR:$dst_port" --connections "$S" --messages "$M"
      --size $(( B + 142 )) --rcpts "$R" --to-domain bench.test --from sender@source.test
      --max-conn-errors 1 --json "$RUN_DIR/send.json")
    (( D )) || lt_args+=(--new-connection)
    (( TLS )) && lt_args+=(--starttls)
    cg_exec "$CG_SRC" "$LOADTEST_BIN" "${lt_args[@]}" > "$RUN_DIR/source.out" 2>&1 || src_rc=$?
    t1=$EPOCHREALTIME
    # Every message must have been accepted; then the p99 of the 250 to the end of data.
    p99=$(python3 - "$RUN_DIR/send.json" "$M" <<'PY' 2>/dev/null || echo fail
import json, sys
j = json.load(open(sys.argv[1]))
assert j["accepted"] == int(sys.argv[2])
print(next(l["p99"] for l in j["latency_us"] if l["name"] == "data_to_250"))
PY
)
    [[ $p99 == fail ]] && { (( src_rc )) || src_rc=1; }
  else
    cg_exec "$CG_SRC" smtp-source "${src_args[@]}" "$LISTEN_ADDR:$dst_port" \
      > "$RUN_DIR/source.out" 2>&1 || src_rc=$?
    t1=$EPOCHREALTIME
  fi
  (( src_rc == 0 )) || die "$LOADGEN failed (rc=$src_rc): $(tail -3 "$RUN_DIR/source.out")"
  t2=$(wait_event "$(( smoke + expect ))" "$TIMEOUT") \
    || die "sink did not receive all $expect messages within ${TIMEOUT}s (see $RUN_DIR)"
  t3=$t2
  if [[ $MODE == relay ]]; then   # until the relay's queue is empty (its bookkeeping done)
    local q
    for ((i = 0; i < TIMEOUT * 50; i++)); do q=$(relay_queue_count); [[ $q == 0 ]] && break; sleep 0.02; done
    [[ $q == 0 ]] || die "relay queue not empty ($q) after sink got everything"
    t3=$EPOCHREALTIME
  fi
  local c1 s1 k1 sb1 sw1 st1 ss1 dw1 df1 ld1
  c1=$(cg_usage_us "$CG_RELAY"); s1=$(cg_usage_us "$CG_SRC"); k1=$(cg_usage_us "$CG_SINK")
  read -r sb1 sw1 st1 ss1 < <(proc_stat); read -r dw1 df1 < <(disk_stat); ld1=$(tcp_listen_drops)

  local stats="sent=$expect deferred=0 bounced=0" desc="$LOADGEN -> $SINK tls=$TLS"
  if [[ $MODE == relay ]]; then
    relay_stop; RELAY_STARTED=0
    stats=$(relay_log_stats); desc=$(relay_describe)
  fi
  sink_stop
  local sink_total; sink_total=$(cat "$RUN_DIR/sink.count" 2>/dev/null || echo "?")
  local sink_conns="" tls_ok=1
  if [[ $SINK == shardmta-loadtest ]]; then
    local conns tls_conns
    read -r conns tls_conns < <(loadtest_sink_conns)
    sink_conns="; sink connections $conns (TLS $tls_conns)"
    # TLS=1: every delivery must have come over TLS (opportunistic TLS could fall back to plaintext).
    (( TLS )) && [[ $conns != "$tls_conns" || $conns == "?" ]] && tls_ok=0
  fi

  # ---- report
  local line csv
  line=$(awk -v name="$RELAY_NAME" -v M="$M" -v t0="$t0" -v t1="$t1" -v t2="$t2" -v t3="$t3" \
      -v c0="$c0" -v c1="$c1" -v s0="$s0" -v s1="$s1" -v k0="$k0" -v k1="$k1" \
      -v sb0="$sb0" -v sb1="$sb1" -v sw0="$sw0" -v sw1="$sw1" -v st0="$st0" -v st1="$st1" -v ss0="$ss0" -v ss1="$ss1" \
      -v ld0="${ld0:-0}" -v ld1="${ld1:-0}" \
      -v dw0="$dw0" -v dw1="$dw1" -v df0="$df0" -v df1="$df1" -v mode="$MODE" -v lg="$LOADGEN" '
    function cpu(a, b) { return (a == "" || b == "") ? "n/a" : sprintf("%.2f", (b - a) / 1e6) }
    BEGIN {
      inj = t1 - t0; e2e = t2 - t0; drn = t3 - t0
      rc = cpu(c0, c1); sc = cpu(s0, s1); kc = cpu(k0, k1)
      upm = (rc == "n/a") ? "n/a" : sprintf("%.0f", (c1 - c0) / M)
      busy = (st1 > st0) ? 100 * (sb1 - sb0) / (st1 - st0) : 0
      iow  = (st1 > st0) ? 100 * (sw1 - sw0) / (st1 - st0) : 0
      stl  = (st1 > st0) ? 100 * (ss1 - ss0) / (st1 - st0) : 0
      ld = ld1 - ld0
      if (mode == "relay")
        printf "%s: accepted %d in %.2fs (%.0f msg/s); relayed in %.2fs (%.0f msg/s end-to-end); relay CPU %ss (%s us/msg); loadgen CPU src %ss sink %ss; system busy %.0f%% iowait %.0f%% steal %.0f%%; disk %.1f MB written, %d flushes; tcp listen drops %d\n",
          name, M, inj, M / inj, e2e, M / e2e, rc, upm, sc, kc, busy, iow, stl, (dw1 - dw0) * 512 / 1e6, df1 - df0, ld
      else
        printf "%s: %s sent %d in %.2fs (%.0f msg/s); sink had all in %.2fs (%.0f msg/s); loadgen CPU src %ss sink %ss; system busy %.0f%% steal %.0f%%; tcp listen drops %d\n",
          name, lg, M, inj, M / inj, e2e, M / e2e, sc, kc, busy, stl, ld
      printf "CSV,%.3f,%.1f,%.3f,%.1f,%.3f,%s,%s,%s,%s,%.1f,%.1f,%.1f,%.1f,%d,%d\n",
        inj, M / inj, e2e, M / e2e, drn, rc, upm, sc, kc, busy, iow, stl, (dw1 - dw0) * 512 / 1e6, df1 - df0, ld
    }')
  printf '%s\n' "${line%%$'\n'CSV,*}"
  [[ $p99 != n/a ]] && note "p99 of the 250 after the end of data: ${p99} us"
  note "config: $desc; S=$S M=$M B=$B R=$R D=$D N=$N TLS=$TLS; $stats; sink total=$sink_total (incl. $smoke smoke)$sink_conns; logs in $RUN_DIR"
  csv=${line##*$'\n'CSV,}
  mkdir -p "$(dirname "$RESULTS_CSV")"
  local header="time,relay,profile,mode,S,M,B,R,D,N,inject_s,inject_msg_s,e2e_s,e2e_msg_s,drain_s,relay_cpu_s,relay_cpu_us_per_msg,src_cpu_s,sink_cpu_s,sys_busy_pct,iowait_pct,steal_pct,disk_mb_written,disk_flushes,tcp_listen_drops,log_stats,label,accept_p99_us,tls,sink"
  # A results file from an older harness (other columns) is set aside rather than mixed with new rows.
  if [[ -s $RESULTS_CSV && $(head -n 1 "$RESULTS_CSV") != "$header" ]]; then
    mv "$RESULTS_CSV" "$RESULTS_CSV.old-columns" && note "older results file moved to $RESULTS_CSV.old-columns"
  fi
  [[ -s $RESULTS_CSV ]] || echo "$header" > "$RESULTS_CSV"
  echo "$(date -u +%FT%TZ),$RELAY_NAME,$PROFILE,$MODE,$S,$M,$B,$R,$D,$N,$csv,${stats// /;},${LABEL//,/;},$p99,$TLS,$SINK" >> "$RESULTS_CSV"

  (( tls_ok )) || { note "warning: TLS=1 but not every connection to the sink used TLS:${sink_conns#;}"; return 2; }
  # sanity: every recipient delivered, nothing deferred/bounced
  if [[ $MODE == relay ]]; then
    local sent; sent=$(sed -n 's/.*sent=\([0-9]*\).*/\1/p' <<<"$stats")
    [[ $stats == *"deferred=0 bounced=0"* && ${sent:-0} -ge $(( M * R )) ]] \
      || { note "warning: log stats do not show all $((M * R)) recipients sent cleanly: $stats"; return 2; }
  fi
  return 0
}
