#!/usr/bin/env bash
# postfix-relay-bench.sh: baseline benchmark of Postfix as an SMTP relay, loopback only.
#
#   smtp-source (S sessions, M msgs of B bytes, R rcpts) -> Postfix smtpd 127.0.0.1:2525
#     -> queue (fsync'd, Postfix default durability) -> smtp client -> smtp-sink 127.0.0.1:2526
#
# Usage:  shared/bench/postfix-relay-bench.sh [S=50] [M=20000] [B=1024] [R=1] [D=0] [N=0]
#                                        [PROFILE=default|tuned] [MODE=relay|direct]
#                                        [PF_SET="param=value ..."] [LABEL=text]
# Prints:  postfix: accepted M in Xs (Y msg/s); relayed in Zs (W msg/s end-to-end); ...
# and appends one row to $RESULTS_CSV (default /var/tmp/relay-bench/results.csv).
#
# The instance is private: config, queue and log live under $BENCH_DIR/postfix (default
# /var/tmp/relay-bench/postfix); /etc/postfix is not used and no system Postfix is started.
# Delivery can only go to the sink: default_transport, relay_transport and local_transport are
# `error`, and bench.test is routed by transport_maps to [127.0.0.1]:$SINK_PORT. No DNS: the next
# hop is a bracketed IP, smtp_dns_support_level=disabled, smtpd_peername_lookup=no.
#
# TLS=1 (see the harness's --help): smtpd offers STARTTLS with a self-signed certificate made by openssl
# (smtpd_tls_cert_file/key_file, smtpd_tls_security_level=may) and the smtp client delivers with
# smtp_tls_security_level=may (no verification) to a STARTTLS sink; no TLS session cache on either side.
#
# PROFILE=default keeps Postfix's stock performance knobs. PROFILE=tuned keeps durability
# (every queue file is still fsync'd before 250) but lifts the concurrency limits that cap a
# loopback benchmark; see pf_tuned below. PF_SET adds arbitrary main.cf overrides on top.
#
# Every process it starts is stopped (by PID) on exit, also on error or Ctrl-C.
set -Eeuo pipefail
# shellcheck source=lib/relay-bench-common.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/bench-lib/relay-bench-common.sh"

RELAY_RCPT_PER_TXN=50          # smtp_destination_recipient_limit default

relay_name() { echo postfix; }

relay_install() { :; }         # ensure_loadgen already installed the postfix package

PF_ETC= PF_SPOOL= PF_MASTER_PID=
pf_tuned() {
  # Concurrency only; durability (fsync before 250) and flow control (in_flow_delay) untouched.
  #  - default_process_limit: smtpd processes = sessions, and it is also the listen() backlog of
  #    127.0.0.1:2525; at the default 100, S>100 overflows the accept queue -> SYN drops -> 1s
  #    TCP retransmits (throughput collapses to ~100-170 msg/s).
  #  - smtp_destination_concurrency_limit: parallel deliveries to the one next hop (default 20).
  cat <<EOF
# --- PROFILE=tuned: concurrency limits raised for a loopback benchmark
default_process_limit = $(( S + 100 > 500 ? S + 100 : 500 ))
smtp_destination_concurrency_limit = 100
EOF
}

relay_setup() {
  PF_ETC=$RELAY_DIR/etc PF_SPOOL=$RELAY_DIR/spool
  # Only ever remove our own instance directory, and only while it is stopped.
  local old_pid
  old_pid=$(sed -n '1s/ //gp' "$PF_SPOOL/pid/master.pid" 2>/dev/null || true)
  if [[ -n $old_pid && -f $PF_ETC/main.cf ]] && kill -0 "$old_pid" 2>/dev/null \
     && [[ $(readlink "/proc/$old_pid/exe" 2>/dev/null) == */postfix/sbin/master ]]; then
    note "a previous bench instance is still running; stopping it"
    postfix -c "$PF_ETC" stop >/dev/null 2>&1 || true
    sleep 1
  fi
  rm -rf "$RELAY_DIR"
  mkdir -p "$PF_ETC" "$PF_SPOOL" "$RELAY_DIR/data"
  chown postfix:postfix "$RELAY_DIR/data"
  chmod 755 "$RELAY_DIR" "$PF_ETC" "$PF_SPOOL"
  local tls_level=none
  if (( TLS )); then tls_make_cert "$RELAY_DIR"; tls_level=may; fi

  cat > "$PF_ETC/main.cf" <<EOF
# Private Postfix instance for shared/bench/postfix-relay-bench.sh (generated; do not edit)
compatibility_level = 3.6
queue_directory = $PF_SPOOL
data_directory = $RELAY_DIR/data
maillog_file = $RUN_DIR/maillog
maillog_file_prefixes = $RUN_DIR
myhostname = relay-bench.localdomain
mydomain = localdomain
myorigin = \$myhostname
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
mynetworks_style = host
relay_domains = bench.test
relay_recipient_maps =
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
local_recipient_maps =
alias_maps =
alias_database =
biff = no
append_dot_mydomain = no
# Never deliver anywhere but the loopback sink.
transport_maps = inline:{ bench.test=smtp:[127.0.0.1]:$SINK_PORT }
default_transport = error:relay bench: no delivery outside bench.test
relay_transport = error:relay bench: no delivery outside bench.test
local_transport = error:relay bench: no local delivery
virtual_transport = error:relay bench: no virtual delivery
# No DNS anywhere.
smtp_dns_support_level = disabled
smtp_host_lookup = native
smtpd_peername_lookup = no
smtp_tls_security_level = $tls_level
smtpd_tls_security_level = $tls_level
EOF
  if (( TLS )); then
    cat >> "$PF_ETC/main.cf" <<EOF
smtpd_tls_cert_file = $RELAY_DIR/tls-cert.pem
smtpd_tls_key_file = $RELAY_DIR/tls-key.pem
EOF
  fi
  [[ $PROFILE == tuned ]] && pf_tuned >> "$PF_ETC/main.cf"
  if [[ -n ${PF_SET:-} ]]; then
    local kv
    echo "# --- PF_SET overrides" >> "$PF_ETC/main.cf"
    for kv in $PF_SET; do echo "${kv%%=*} = ${kv#*=}" >> "$PF_ETC/main.cf"; done
  fi

  # Stock Debian services, chroot off (a private queue dir has no chroot jail set up), and
  # smtpd on 127.0.0.1:$LISTEN_PORT instead of *:25.
  cat > "$PF_ETC/master.cf" <<EOF
# service type  private unpriv  chroot  wakeup  maxproc command + args
$LISTEN_ADDR:$LISTEN_PORT inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
EOF
  # Fail early on a bad parameter name or value.
  local bad
  bad=$(postconf -c "$PF_ETC" -n 2>&1 >/dev/null | grep -i 'warning\|fatal' || true)
  [[ -z $bad ]] || die "main.cf problem: $bad"
}

relay_start() {
  cg_exec "$CG_RELAY" postfix -c "$PF_ETC" start > "$RUN_DIR/postfix-start.out" 2>&1 \
    || die "postfix start failed: $(tail -5 "$RUN_DIR/postfix-start.out"; tail -5 "$RUN_DIR/maillog" 2>/dev/null)"
  PF_MASTER_PID=$(sed -n '1s/ //gp' "$PF_SPOOL/pid/master.pid" 2>/dev/null || true)
  [[ -n $PF_MASTER_PID ]] || die "postfix master.pid missing"
  wait_listen "$LISTEN_PORT" 10 || die "postfix did not listen on $LISTEN_ADDR:$LISTEN_PORT"
}

relay_queue_count() {
  find "$PF_SPOOL/maildrop" "$PF_SPOOL/incoming" "$PF_SPOOL/active" "$PF_SPOOL/deferred" \
       "$PF_SPOOL/hold" -type f 2>/dev/null | wc -l
}

relay_log_stats() {
  local log=$RUN_DIR/maillog
  printf 'sent=%d deferred=%d bounced=%d\n' \
    "$(grep -c 'status=sent' "$log" || true)" "$(grep -c 'status=deferred' "$log" || true)" \
    "$(grep -c 'status=bounced' "$log" || true)"
}

relay_stop() {
  [[ -n $PF_ETC ]] || return 0
  postfix -c "$PF_ETC" stop >> "$RUN_DIR/postfix-start.out" 2>&1 || true
  local i
  if [[ -n $PF_MASTER_PID ]]; then
    for ((i = 0; i < 100; i++)); do kill -0 "$PF_MASTER_PID" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$PF_MASTER_PID" 2>/dev/null && kill -TERM "$PF_MASTER_PID" 2>/dev/null
  fi
  # master's children exit on master's signal; wait for the cgroup to empty (cleanup kills leftovers)
  for ((i = 0; i < 50; i++)); do [[ -z $(cg_pids "$CG_RELAY") ]] && break; sleep 0.1; done
  PF_MASTER_PID=
  return 0
}

relay_describe() {
  local v
  v=$(postconf -c "$PF_ETC" -h mail_version)
  echo "postfix $v PROFILE=$PROFILE $(postconf -c "$PF_ETC" -x default_process_limit in_flow_delay \
        smtp_destination_concurrency_limit 2>/dev/null | tr '\n' ' ' | sed 's/ = /=/g')tls=$TLS${PF_SET:+ PF_SET=[$PF_SET]}"
}

bench_main "$@"
