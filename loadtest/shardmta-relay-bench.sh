#!/usr/bin/env bash
# shardmta-relay-bench.sh: shardmta measured as a relay with the same harness, load generator (Postfix's
# smtp-source) and sink (smtp-sink) as loadtest/postfix-relay-bench.sh, all on 127.0.0.1:
#
#   smtp-source --S sessions--> shardmta 127.0.0.1:$LISTEN_PORT --smtp--> smtp-sink 127.0.0.1:$SINK_PORT
#
# Run as root from anywhere: loadtest/shardmta-relay-bench.sh [S=50 M=20000 B=1024 R=1 D=0 ...]
# (see bench-lib/relay-bench-common.sh --help). It builds the release binary first. The durable queue is on,
# as always: every 250 follows an fdatasync; delivery goes to bench.test via a transport entry.
# Environment only (shardmta's side): SHARDS=N sets `shards`, COMMIT_DELAY_US=N sets `queue_commit_delay_us`,
# PIPELINING_LIMIT=N sets `delivery.smtp_transaction_pipelining_limit`.
# TLS=1: inbound STARTTLS with a self-signed certificate made by openssl (smtpd_tls_cert_file/key_file), and
# delivery with smtp_tls_security_level = "may" (STARTTLS when offered, nothing verified) to a STARTTLS sink.
set -Eeuo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$HERE/bench-lib/relay-bench-common.sh"

RELAY_RCPT_PER_TXN=50          # [delivery] destination_recipient_limit default
SM_BIN=${CARGO_TARGET_DIR:-$HERE/../target}/release/shardmta
SM_PID=

relay_name() { echo shardmta; }

relay_install() {
  (cd "$HERE/.." && nice -n 15 cargo build --release --quiet --bin shardmta) || die "cargo build failed"
  if [[ ${ROUTE:-transport} == mx ]]; then
    # The DNS responder is test support: only the load tester is built with it, never the server.
    (cd "$HERE/.." && nice -n 15 cargo build --release --quiet --features test-support --bin shardmta-loadtest) \
      || die "cargo build failed"
  fi
}

# ROUTE=transport (default): bench.test goes to the sink by a [transport] entry (no DNS). ROUTE=mx: by its MX
# record, served by `shardmta-loadtest dns` on 127.0.0.53 (the site lookup and owner hand-off are then measured).
relay_route_toml() {
  case ${ROUTE:-transport} in
    transport)
      printf '[transport]\n"bench.test" = "[127.0.0.1]:%s"\n\n[dns]\nservers = ["127.0.0.1:9"]\n' "$SINK_PORT" ;;
    mx)
      local out=$RUN_DIR/dns.out addr
      "${CARGO_TARGET_DIR:-$HERE/../target}/release/shardmta-loadtest" dns --listen 127.0.0.53 --mx bench.test=mx.bench.test \
        --a mx.bench.test=127.0.0.1 > "$out" 2>&1 &
      for _ in $(seq 50); do addr=$(sed -n 's/^listening on //p' "$out"); [[ -n $addr ]] && break; sleep 0.1; done
      [[ -n $addr ]] || die "the DNS responder did not start ($(cat "$out"))"
      # Still in [delivery]: MX delivery goes to the sink's port.
      printf 'smtp_port = %s\n\n[dns]\nservers = ["%s"]\n' "$SINK_PORT" "$addr" ;;
    *) die "ROUTE must be transport or mx" ;;
  esac
}

relay_setup() {
  rm -rf "$RELAY_DIR"
  mkdir -p "$RELAY_DIR"
  local tls_toml="" out_tls=none
  if (( TLS )); then
    tls_make_cert "$RELAY_DIR"
    tls_toml=$(printf 'smtpd_tls_cert_file = "%s"\nsmtpd_tls_key_file = "%s"' "$RELAY_DIR/tls-cert.pem" "$RELAY_DIR/tls-key.pem")
    out_tls=may
  fi
  cat > "$RELAY_DIR/shardmta.toml" <<TOML
myhostname = "relay-bench.localdomain"
queue_directory = "$RELAY_DIR/spool"
mydestination = []
mynetworks = ["127.0.0.0/8"]
relay_domains = ["bench.test"]
${SHARDS:+shards = $SHARDS}
${COMMIT_DELAY_US:+queue_commit_delay_us = $COMMIT_DELAY_US}
$tls_toml

[[listener]]
address = "$LISTEN_ADDR:$LISTEN_PORT"
kind = "smtp"

[delivery]
smtp_tls_security_level = "$out_tls"
delivery_log = "$RUN_DIR/delivery.log"
${PIPELINING_LIMIT:+smtp_transaction_pipelining_limit = $PIPELINING_LIMIT}

$(relay_route_toml)
TOML
  local alg
  case ${DKIM:-none} in
    none) ;;
    ed25519|rsa-2048) dkim_key "$DKIM" ;;
    dual) dkim_key rsa-2048; dkim_key ed25519 ;;
    *) die "DKIM must be none, ed25519, rsa-2048 or dual" ;;
  esac
  "$SM_BIN" check-config --config "$RELAY_DIR/shardmta.toml" > /dev/null || die "bad shardmta config"
}

# Appends a [[dkim]] entry for source.test (the generators' From: domain) with a new key of algorithm $1.
dkim_key() {
  "$SM_BIN" dkim keygen --domain source.test --selector "bench-$1" --algorithm "$1" \
    --out "$RELAY_DIR/dkim-$1.pem" | sed -n '/^\[\[dkim\]\]/,$p' >> "$RELAY_DIR/shardmta.toml" \
    || die "dkim keygen failed"
}

relay_start() {
  cg_spawn "$CG_RELAY" "$SM_BIN" serve --config "$RELAY_DIR/shardmta.toml" > "$RUN_DIR/shardmta.out" 2>&1 &
  SM_PID=$!
  wait_listen "$LISTEN_PORT" 20 || die "shardmta did not listen on $LISTEN_ADDR:$LISTEN_PORT ($(tail -3 "$RUN_DIR/shardmta.out"))"
}

relay_queue_count() {
  # Messages with any recipient not yet delivered or bounced (rewritten every 200 ms by the server).
  python3 -c "import json; print(json.load(open('$RELAY_DIR/spool/stats.json'))['pending_messages'])" 2>/dev/null || echo 1
}

relay_log_stats() {
  local log=$RUN_DIR/delivery.log
  printf 'sent=%d deferred=%d bounced=%d\n' \
    "$(grep -c '"result":"delivered"' "$log" || true)" "$(grep -c '"result":"deferred"' "$log" || true)" \
    "$(grep -c '"result":"bounced"' "$log" || true)"
}

relay_stop() {
  # The DNS responder of ROUTE=mx (started in relay_setup's command substitution, so found by its arguments).
  pkill -f 'shardmta-loadtest dns --listen 127.0.0.53' 2>/dev/null || true
  [[ -n $SM_PID ]] || return 0
  kill -TERM "$SM_PID" 2>/dev/null || true
  local i
  for ((i = 0; i < 200; i++)); do kill -0 "$SM_PID" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$SM_PID" 2>/dev/null || true
  SM_PID=
}

relay_describe() {
  echo "shardmta $("$SM_BIN" --version | awk '{print $2}') shards=$(nproc) durable-queue group-commit dkim=${DKIM:-none} route=${ROUTE:-transport} tls=$TLS"
}

bench_main "$@"
