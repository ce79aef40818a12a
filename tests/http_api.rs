//! The HTTP API and metrics end to end: a server started by the test with `[http] listen` on loopback, called
//! with real HTTP clients (curl, Python's urllib and http.client), its `/metrics` parsed with Python's
//! `prometheus_client` parsers (the Prometheus text format and OpenMetrics), and built messages parsed back with
//! Python's `email` package. Nothing leaves the loopback network.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const TOKEN: &str = "0123456789abcdef0123456789abcdef";

/// A server with `[http] listen` on a free port; `http_extra` goes into the `[http]` table, `top` before it.
fn start(top: &str, http_extra: &str) -> (Server, SocketAddr) {
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let s = Server::start(&format!(
        "{top}\n[http]\nlisten = \"{addr}\"\n{http_extra}\n"
    ));
    (s, addr)
}

/// One HTTP exchange with curl: (status, body). `args` go before the URL (e.g. `--interface 127.0.0.2`).
fn curl(method: &str, url: &str, body: Option<&[u8]>, args: &[&str]) -> (u16, String) {
    let (status, _, body) = curl_full(method, url, body, args);
    (status, body)
}

/// (status, response headers in lower case, body).
fn curl_full(method: &str, url: &str, body: Option<&[u8]>, args: &[&str]) -> (u16, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let headers = dir.path().join("h");
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "60", "-X", method, "-D"])
        .arg(&headers)
        .args(args);
    if body.is_some() {
        cmd.args([
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            "@-",
        ]);
    }
    cmd.arg("-w").arg("\n%{http_code}").arg(url);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("curl");
    {
        let mut stdin = child.stdin.take().unwrap();
        if let Some(b) = body {
            stdin.write_all(b).unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    let code: u16 = code.trim().parse().unwrap_or_else(|_| {
        panic!(
            "curl {method} {url}: no status: {text:?} {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let h = std::fs::read_to_string(&headers)
        .unwrap_or_default()
        .to_ascii_lowercase();
    (code, h, body.to_string())
}

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body:?}"))
}

/// Whether Python's prometheus_client can be imported (installed with pip here if it is missing; .ci/run
/// installs it too). A test that needs it and cannot get it says so loudly and returns.
fn prometheus_client() -> bool {
    let have = || {
        Command::new("python3")
            .args(["-c", "import prometheus_client"])
            .status()
            .is_ok_and(|s| s.success())
    };
    if have() {
        return true;
    }
    let _ = Command::new("python3")
        .args(["-m", "pip", "install", "-q", "prometheus_client"])
        .status();
    if have() {
        return true;
    }
    eprintln!("\n\n*** SKIPPED: Python's prometheus_client is not installed and pip could not install it ***\n\n");
    false
}

const SCRAPE_PY: &str = r#"
import json, sys, urllib.request
from prometheus_client.parser import text_string_to_metric_families as prom
from prometheus_client.openmetrics.parser import text_string_to_metric_families as om

url = sys.argv[1]
def get(accept):
    req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.headers["Content-Type"], r.read().decode()

out = {"types": {}, "samples": {}}
out["content_type"], text = get(None)
for fam in prom(text):
    out["types"][fam.name] = fam.type
    for s in fam.samples:
        labels = ",".join('%s="%s"' % kv for kv in sorted(s.labels.items()))
        out["samples"][s.name + ("{" + labels + "}" if labels else "")] = s.value
out["om_content_type"], otext = get("application/openmetrics-text; version=1.0.0")
out["om_types"] = {f.name: f.type for f in om(otext)}
print(json.dumps(out))
"#;

/// `/metrics` parsed by both Python parsers: {content_type, types, samples, om_content_type, om_types}.
fn scrape(addr: SocketAddr) -> Value {
    let out = Command::new("python3")
        .args(["-c", SCRAPE_PY, &format!("http://{addr}/metrics")])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "scrape: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn sample(m: &Value, key: &str) -> f64 {
    m["samples"][key]
        .as_f64()
        .unwrap_or_else(|| panic!("no sample {key} in {}", m["samples"]))
}

/// Waits until the scraped `key` reaches `at_least`; returns the last scrape.
fn wait_sample(addr: SocketAddr, key: &str, at_least: f64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = scrape(addr);
        if m["samples"][key].as_f64().is_some_and(|v| v >= at_least) {
            return m;
        }
        assert!(
            Instant::now() < deadline,
            "{key} did not reach {at_least}: {}",
            m["samples"]
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn health_routes_and_methods() {
    let (s, addr) = start("", "");
    let (code, h, body) = curl_full("GET", &format!("http://{addr}/health"), None, &[]);
    assert_eq!(code, 200, "{body}");
    assert!(h.contains("content-type: application/json"), "{h}");
    let v = json(&body);
    assert_eq!(v["healthy"], true, "{v}");
    let shards = v["shards"].as_array().unwrap();
    assert_eq!(shards.len(), 2);
    assert!(shards
        .iter()
        .all(|x| x["answered"] == true && x["queue_writable"] == true));
    // HEAD answers without a body.
    let (code, _) = curl("HEAD", &format!("http://{addr}/health"), None, &["-I"]);
    assert_eq!(code, 200);
    // Unknown routes and actions: 404 with a JSON error; a known route with the wrong method: 405 and Allow.
    let (code, body) = curl("GET", &format!("http://{addr}/nope"), None, &[]);
    assert_eq!(code, 404);
    assert!(json(&body)["error"].as_str().unwrap().contains("/nope"));
    let (code, body) = curl(
        "POST",
        &format!("http://{addr}/api/v1/queue/requeue"),
        Some(b"{\"all\":true}"),
        &[],
    );
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("unknown queue action"), "{body}");
    let (code, h, _) = curl_full("DELETE", &format!("http://{addr}/metrics"), None, &[]);
    assert_eq!(code, 405);
    assert!(h.contains("allow: get, head"), "{h}");
    let (code, h, _) = curl_full("GET", &format!("http://{addr}/api/v1/inject"), None, &[]);
    assert_eq!(code, 405);
    assert!(h.contains("allow: post"), "{h}");
    let (code, _) = curl(
        "GET",
        &format!("http://{addr}/api/v1/queue/hold"),
        None,
        &[],
    );
    assert_eq!(code, 405);
    // The queue listing (the `queue list --json` data) and a reload request.
    let (code, body) = curl("GET", &format!("http://{addr}/api/v1/queue"), None, &[]);
    assert_eq!(code, 200);
    assert_eq!(json(&body), serde_json::json!([]));
    let mut c = Client::greeted(s.smtp);
    c.cmd("EHLO client.test");
    let id = queued_id(&c.send_mail(
        "a@client.test",
        &["bob@localhost"],
        "Subject: q\r\n\r\nq\r\n",
    ));
    let (code, body) = curl("GET", &format!("http://{addr}/api/v1/queue"), None, &[]);
    assert_eq!(code, 200);
    let v = json(&body);
    assert_eq!(v.as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v[0]["id"], id.as_str());
    assert_eq!(v, serde_json::to_value(s.queue()).unwrap());
    let (code, body) = curl("POST", &format!("http://{addr}/api/v1/reload"), None, &[]);
    assert_eq!(code, 202, "{body}");
    assert_eq!(json(&body)["reload"], "requested");
}

#[test]
fn metrics_parse_and_move_with_mail_and_delivery() {
    if !prometheus_client() {
        return;
    }
    let sink_port = free_port();
    let sink = Sink::start("127.0.0.81", sink_port, &[]);
    let deferring = Sink::start("127.0.0.82", sink_port, &["--tempfail-rate", "1"]);
    // Only 127.0.0.1 may relay: 127.0.0.2 gets "relay access denied".
    let (s, addr) = start(
        &format!(
            "mynetworks = [\"127.0.0.1/32\"]\nminimal_backoff_time = \"1s\"\nmaximal_backoff_time = \"2s\"\n\
             [transport]\n\"sink.test\" = \"[127.0.0.81]:{sink_port}\"\n\"slow.test\" = \"[127.0.0.82]:{sink_port}\"\n\
             [delivery]\nsmtp_connection_cache_time_limit = \"1s\"\nsmtp_reply_timeout = \"5s\"\n"
        ),
        "",
    );
    let m = scrape(addr);
    assert_eq!(
        m["content_type"], "text/plain; version=0.0.4; charset=utf-8",
        "{m}"
    );
    assert!(
        m["om_content_type"]
            .as_str()
            .unwrap()
            .starts_with("application/openmetrics-text"),
        "{m}"
    );
    for (family, kind) in [
        ("shardmta_messages_accepted", "counter"),
        ("shardmta_messages_rejected", "counter"),
        ("shardmta_deliveries", "counter"),
        ("shardmta_queue_messages", "gauge"),
        ("shardmta_queue_syncs", "counter"),
        ("shardmta_connections", "gauge"),
        ("shardmta_destination_deliveries", "counter"),
        ("shardmta_delivery_failures", "counter"),
        ("shardmta_smtp_data_to_250_seconds", "histogram"),
        ("shardmta_shard_cpu_microseconds", "counter"),
        ("shardmta_shard_parks", "counter"),
        ("shardmta_shard_syscalls", "counter"),
        ("shardmta_shard_ring_enters", "counter"),
    ] {
        assert_eq!(m["types"][family], kind, "{family}: {}", m["types"]);
        assert_eq!(m["om_types"][family], kind, "{family}: {}", m["om_types"]);
    }
    let accepted0 = sample(&m, "shardmta_messages_accepted_total");
    let count0 = sample(&m, "shardmta_smtp_data_to_250_seconds_count");
    assert_eq!(
        sample(
            &m,
            "shardmta_messages_rejected_total{reason=\"relay_denied\"}"
        ),
        0.0
    );
    // Three messages over SMTP: accepted, synced, timed.
    let mut c = Client::greeted(s.smtp);
    c.cmd("EHLO client.test");
    for to in ["a@sink.test", "b@sink.test", "c@slow.test"] {
        queued_id(&c.send_mail("sender@client.test", &[to], "Subject: m\r\n\r\nbody\r\n"));
    }
    c.cmd("QUIT");
    let m = scrape(addr);
    assert_eq!(
        sample(&m, "shardmta_messages_accepted_total"),
        accepted0 + 3.0
    );
    assert_eq!(
        sample(&m, "shardmta_smtp_data_to_250_seconds_count"),
        count0 + 3.0
    );
    assert_eq!(
        sample(&m, "shardmta_smtp_data_to_250_seconds_bucket{le=\"+Inf\"}"),
        count0 + 3.0
    );
    assert!(sample(&m, "shardmta_smtp_data_to_250_seconds_sum") > 0.0);
    // Copied from the queue by each shard's tick (100 ms).
    wait_sample(addr, "shardmta_queue_syncs_total", 1.0);
    // Each shard's thread cost: its reactor parked and entered io_uring, and it used CPU (copied each tick).
    let m = wait_sample(addr, "shardmta_shard_ring_enters_total{shard=\"0\"}", 1.0);
    assert!(
        sample(&m, "shardmta_shard_parks_total{shard=\"0\"}") >= 1.0,
        "{m}"
    );
    assert!(
        sample(&m, "shardmta_shard_cpu_microseconds_total{shard=\"0\"}") >= 1.0,
        "{m}"
    );
    // And per accepted message in stats.json.
    wait_for(
        || {
            let st = server_stats(&s);
            st["cost_per_message"]["cpu_us"].as_f64() > Some(0.0)
                && st["per_shard"][0]["cost_per_message"]["parks"].as_f64() > Some(0.0)
        },
        "cost per message in stats.json",
    );
    // A refused relay attempt from a stranger.
    let stream = connect_from("127.0.0.2".parse().unwrap(), s.smtp).unwrap();
    let mut c = Client::from_stream(stream);
    assert!(c.reply().starts_with("220"));
    c.cmd("EHLO stranger.test");
    c.cmd("MAIL FROM:<x@stranger.test>");
    assert!(c.cmd("RCPT TO:<y@elsewhere.test>").starts_with("554 5.7.1"));
    c.cmd("QUIT");
    wait_sample(
        addr,
        "shardmta_messages_rejected_total{reason=\"relay_denied\"}",
        1.0,
    );
    // Delivery: two delivered to one destination, one deferred at the other, per destination too.
    sink.wait_messages(2);
    let m = wait_sample(addr, "shardmta_deliveries_total{result=\"delivered\"}", 2.0);
    let m = if m["samples"]["shardmta_deliveries_total{result=\"deferred\"}"]
        .as_f64()
        .unwrap_or(0.0)
        >= 1.0
    {
        m
    } else {
        wait_sample(addr, "shardmta_deliveries_total{result=\"deferred\"}", 1.0)
    };
    assert_eq!(
        sample(&m, "shardmta_deliveries_total{result=\"bounced\"}"),
        0.0
    );
    // The deferral's bounce class: the sink's "451 4.3.0 Try again later" is none of the named kinds.
    assert!(
        sample(
            &m,
            "shardmta_delivery_failures_total{class=\"other\",result=\"deferred\"}"
        ) >= 1.0,
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            "shardmta_delivery_failures_total{class=\"rate_limit\",result=\"deferred\"}"
        ),
        0.0
    );
    let dest = format!("[127.0.0.81]:{sink_port}");
    let m = wait_sample(
        addr,
        &format!(
            "shardmta_destination_deliveries_total{{destination=\"{dest}\",result=\"delivered\"}}"
        ),
        2.0,
    );
    let slow = format!("[127.0.0.82]:{sink_port}");
    assert!(
        sample(
            &m,
            &format!(
                "shardmta_destination_deliveries_total{{destination=\"{slow}\",result=\"deferred\"}}"
            )
        ) >= 1.0
    );
    // The deferred message waits in the queue.
    let m = wait_sample(addr, "shardmta_queue_messages{state=\"deferred\"}", 1.0);
    assert_eq!(
        sample(&m, "shardmta_queue_messages{state=\"pending\"}"),
        0.0
    );
    drop(deferring);
}

#[test]
fn connection_gauges_count_open_sessions() {
    if !prometheus_client() {
        return;
    }
    let (s, addr) = start("", "");
    let before = sample(&scrape(addr), "shardmta_connections{direction=\"inbound\"}");
    let clients: Vec<Client> = (0..3).map(|_| Client::greeted(s.smtp)).collect();
    wait_sample(
        addr,
        "shardmta_connections{direction=\"inbound\"}",
        before + 3.0,
    );
    drop(clients);
    let deadline = Instant::now() + Duration::from_secs(10);
    while sample(&scrape(addr), "shardmta_connections{direction=\"inbound\"}") > before {
        assert!(Instant::now() < deadline, "sessions still counted as open");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        sample(
            &scrape(addr),
            "shardmta_connections{direction=\"outbound\"}"
        ),
        0.0
    );
}

#[test]
fn tokens_and_trusted_networks() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, format!("# monitoring\nprom:{TOKEN}\n")).unwrap();
    let (_s, addr) = start(
        "",
        &format!(
            "trusted_networks = [\"127.0.0.1/32\"]\napi_token_file = \"{}\"\n",
            tokens.display()
        ),
    );
    let url = format!("http://{addr}/health");
    let stranger = ["--interface", "127.0.0.2"];
    let bearer = format!("Authorization: Bearer {TOKEN}");
    // Trusted network, no token.
    assert_eq!(curl("GET", &url, None, &[]).0, 200);
    // Another address without a token: 401 with a challenge, for every route (unknown ones included).
    let (code, h, body) = curl_full("GET", &url, None, &stranger);
    assert_eq!(code, 401, "{body}");
    assert!(h.contains("www-authenticate: bearer"), "{h}");
    assert!(json(&body)["error"]
        .as_str()
        .unwrap()
        .contains("bearer token"));
    assert_eq!(
        curl("GET", &format!("http://{addr}/nope"), None, &stranger).0,
        401
    );
    assert_eq!(
        curl(
            "POST",
            &format!("http://{addr}/api/v1/queue/delete"),
            Some(b"{\"all\":true}"),
            &stranger
        )
        .0,
        401
    );
    // With the token: 200 from anywhere.
    let (code, body) = curl(
        "GET",
        &url,
        None,
        &[stranger[0], stranger[1], "-H", &bearer],
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        curl(
            "GET",
            &format!("http://{addr}/metrics"),
            None,
            &[stranger[0], stranger[1], "-H", &bearer]
        )
        .0,
        200
    );
    // A wrong token is refused, from the trusted network too; so is another scheme.
    let wrong = format!("Authorization: Bearer {}x", &TOKEN[1..]);
    assert_eq!(curl("GET", &url, None, &["-H", &wrong]).0, 401);
    assert_eq!(
        curl("GET", &url, None, &[stranger[0], stranger[1], "-H", &wrong]).0,
        401
    );
    assert_eq!(
        curl(
            "GET",
            &url,
            None,
            &[
                stranger[0],
                stranger[1],
                "-H",
                &format!("Authorization: Basic {TOKEN}")
            ]
        )
        .0,
        401
    );
}

#[test]
fn bad_requests_are_answered_precisely() {
    let (_s, addr) = start("message_size_limit = 100000\n", "");
    let inject = format!("http://{addr}/api/v1/inject");
    // Bad JSON: 400 naming where.
    let (code, body) = curl(
        "POST",
        &inject,
        Some(b"{\"recipients\": [\n\"a@b.c\",\n]}"),
        &[],
    );
    assert_eq!(code, 400, "{body}");
    let e = json(&body)["error"].as_str().unwrap().to_string();
    assert!(e.contains("bad JSON") && e.contains("line 3"), "{e}");
    // A header injection attempt.
    let (code, body) = curl(
        "POST",
        &inject,
        Some(br#"{"from":"a@b.example","recipients":["c@d.example"],"subject":"x\r\nBcc: e@f.example","text_body":"t"}"#),
        &[],
    );
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("header injection"), "{body}");
    // A bad selector, and none.
    let hold = format!("http://{addr}/api/v1/queue/hold");
    let (code, body) = curl("POST", &hold, Some(b"{\"ids\": [\"12\"]}"), &[]);
    assert_eq!(code, 400, "{body}");
    assert!(json(&body)["error"]
        .as_str()
        .unwrap()
        .starts_with("bad selector"));
    let (code, body) = curl(
        "POST",
        &hold,
        Some(b"{\"all\": true, \"domain\": \"x\"}"),
        &[],
    );
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("exactly one"), "{body}");
    let (code, body) = curl("POST", &hold, None, &[]);
    assert_eq!(code, 400, "{body}");
    // 413: a message over message_size_limit (the body itself is within the inject bound) ...
    let big = "x".repeat(150_000);
    let raw = format!(
        r#"{{"envelope_sender":"a@b.example","recipients":["c@localhost"],"content":"Subject: big\r\n\r\n{big}"}}"#
    );
    let (code, body) = curl("POST", &inject, Some(raw.as_bytes()), &[]);
    assert_eq!(code, 413, "{body}");
    assert!(body.contains("message_size_limit"), "{body}");
    // ... and a body over the bound, refused from its Content-Length before it is read ...
    let huge = vec![b' '; 300_000];
    let (code, body) = curl("POST", &inject, Some(&huge), &[]);
    assert_eq!(code, 413, "{body}");
    // ... or while it streams in without one (chunked).
    let (code, body) = curl(
        "POST",
        &inject,
        Some(&huge),
        &["-H", "Transfer-Encoding: chunked"],
    );
    assert_eq!(code, 413, "{body}");
    // Other routes take at most 1 MiB.
    let two_mib = vec![b' '; 2 << 20];
    let (code, _) = curl("POST", &hold, Some(&two_mib), &[]);
    assert_eq!(code, 413);
}

#[test]
fn control_socket_answers_and_is_private() {
    let (mut s, _addr) = start("", "");
    let sock = s.spool().join("control.sock");
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let meta = std::fs::symlink_metadata(&sock).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let unix = ["--unix-socket", sock.to_str().unwrap()];
    let (code, body) = curl("GET", "http://localhost/health", None, &unix);
    assert_eq!(code, 200, "{body}");
    assert_eq!(json(&body)["healthy"], true);
    assert_eq!(
        curl("GET", "http://localhost/api/v1/queue", None, &unix).0,
        200
    );
    // On the socket every caller is trusted, whatever it claims.
    assert_eq!(
        curl(
            "GET",
            "http://localhost/health",
            None,
            &[unix[0], unix[1], "-H", "Authorization: Bearer nonsense"]
        )
        .0,
        200
    );
    // A stale socket (a killed server's) is replaced at the next start; a clean stop removes it.
    s.kill9();
    assert!(std::fs::symlink_metadata(&sock).is_ok());
    s.spawn();
    assert_eq!(curl("GET", "http://localhost/health", None, &unix).0, 200);
    assert!(s.terminate().success());
    assert!(std::fs::symlink_metadata(&sock).is_err(), "removed at stop");
}

#[test]
fn a_symlink_at_the_socket_path_is_replaced_never_followed() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    std::fs::create_dir(&spool).unwrap();
    std::fs::set_permissions(&spool, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let target = dir.path().join("victim");
    std::fs::write(&target, "keep me").unwrap();
    std::os::unix::fs::symlink(&target, spool.join("control.sock")).unwrap();
    let port = free_port();
    let s = Server::start_in(dir, &format!("[http]\nlisten = \"127.0.0.1:{port}\"\n"));
    let sock = s.spool().join("control.sock");
    use std::os::unix::fs::FileTypeExt;
    assert!(std::fs::symlink_metadata(&sock)
        .unwrap()
        .file_type()
        .is_socket());
    assert_eq!(
        std::fs::read_to_string(s.dir.path().join("victim")).unwrap(),
        "keep me"
    );
}

/// Holds `n` raw TCP connections to `addr` that send nothing.
fn idle_connections(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    (0..n).map(|_| TcpStream::connect(addr).unwrap()).collect()
}

/// The start of the response to a GET on a fresh connection ("" if the server closed it).
fn raw_get(addr: SocketAddr) -> String {
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let _ = c.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let mut out = Vec::new();
    let _ = c.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn connections_are_bounded_and_slow_heads_time_out() {
    let (_s, addr) = start("", "");
    let max = shardmta::limits::HTTP_TCP_CONNECTIONS_MAX;
    let held = idle_connections(addr, max);
    // Let the server accept them all.
    std::thread::sleep(Duration::from_millis(500));
    let r = raw_get(addr);
    assert!(r.starts_with("HTTP/1.1 503"), "{r}");
    assert!(r.contains("too many HTTP connections"), "{r}");
    // One closed: there is room again.
    let mut held = held;
    held.pop();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = raw_get(addr);
        if r.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(Instant::now() < deadline, "{r}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The others never sent a request head: the header timeout closes them.
    let started = Instant::now();
    let mut first = held.remove(0);
    first
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut b = [0u8; 64];
    let n = first.read(&mut b).unwrap_or(0);
    let waited = started.elapsed();
    assert!(
        waited <= shardmta::limits::HTTP_HEADER_READ_TIMEOUT + Duration::from_secs(3),
        "closed after {waited:?} ({n} bytes)"
    );
}

#[test]
fn start_errors_name_the_address_and_the_token_file() {
    let dir = tempfile::tempdir().unwrap();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_addr = busy.local_addr().unwrap();
    let write = |name: &str, http: &str| -> PathBuf {
        let p = dir.path().join(name);
        std::fs::write(
            &p,
            format!(
                "queue_directory = \"{}\"\nshards = 1\nqueue_segment_size = 16777216\nmyhostname = \"mx.test\"\n\
                 [[listener]]\naddress = \"127.0.0.1:{}\"\nkind = \"smtp\"\n[delivery]\nenabled = false\n[http]\n{http}\n",
                dir.path().join("spool").display(),
                free_port()
            ),
        )
        .unwrap();
        p
    };
    let run = |config: &Path| {
        let out = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(config)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = run(&write("a.toml", &format!("listen = \"{busy_addr}\"")));
    assert!(e.contains(&format!("http.listen = {busy_addr}")), "{e}");
    let e = run(&write(
        "b.toml",
        &format!(
            "api_token_file = \"{}\"",
            dir.path().join("no-such-tokens").display()
        ),
    ));
    assert!(e.contains("no-such-tokens"), "{e}");
    std::fs::write(dir.path().join("short"), "abc\n").unwrap();
    let e = run(&write(
        "c.toml",
        &format!(
            "api_token_file = \"{}\"",
            dir.path().join("short").display()
        ),
    ));
    assert!(e.contains("short line 1"), "{e}");
    // check-config prints the section.
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(write("d.toml", "listen = \"127.0.0.1:8025\""))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("[http]") && text.contains("listen = \"127.0.0.1:8025\""),
        "{text}"
    );
    drop(busy);
}

const EMAIL_PY: &str = r#"
import email, email.policy, json, sys
msg = email.message_from_bytes(sys.stdin.buffer.read(), policy=email.policy.default)
def walk(m):
    return {
        "type": m.get_content_type(),
        "defects": [str(d) for d in m.defects],
        "filename": m.get_filename(),
        "parts": [walk(p) for p in m.iter_parts()] if m.is_multipart() else [],
        "content": None if m.is_multipart() else (m.get_content() if m.get_content_maintype() == "text" else m.get_content().hex()),
    }
print(json.dumps({
    "from": str(msg["From"]), "to": str(msg["To"]), "subject": str(msg["Subject"]),
    "date": str(msg["Date"]), "message_id": str(msg["Message-ID"]),
    "x_campaign": str(msg["X-Campaign"]), "mime": str(msg["MIME-Version"]),
    "tree": walk(msg),
}))
"#;

fn python_email(content: &[u8]) -> Value {
    let mut child = Command::new("python3")
        .args(["-c", EMAIL_PY])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(content).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn no_defects(t: &Value) {
    assert_eq!(t["defects"], serde_json::json!([]), "{t}");
    for p in t["parts"].as_array().unwrap() {
        no_defects(p);
    }
}

/// The builder's messages, parsed back by an independent reader (Python's email package).
#[test]
fn built_messages_parse_back_with_python_email() {
    use base64::Engine as _;
    let pdf: Vec<u8> = (0..=255u8).cycle().take(5000).collect();
    let req = serde_json::json!({
        "from": {"email": "news@x.example", "name": "Zoë Müller"},
        "subject": "Grüße, {{name}}!",
        "text_body": "Hallo {{name}},\nZeile zwei: äöü\n",
        "html_body": "<p>Hallo {{name}}</p>",
        "headers": {"X-Campaign": "spring"},
        "attachments": [{"data": base64::engine::general_purpose::STANDARD.encode(&pdf), "content_type": "application/pdf", "file_name": "report.pdf"}],
        "recipients": [{"email": "ann@y.example", "name": "Ann Æ", "substitutions": {"name": "Ann"}}, "bob@y.example"],
        "substitutions": {"name": "friend"}
    });
    let lim = shardmta::http::inject::InjectLimits {
        message_size_limit: 1_000_000,
        recipient_limit: 10,
        hostname: "mx.test".into(),
    };
    let msgs =
        shardmta::http::inject::prepare(req.to_string().as_bytes(), &lim, 1_700_000_000).unwrap();
    assert_eq!(msgs.len(), 2);
    let a = python_email(&msgs[0].content);
    assert_eq!(a["from"], "Zoë Müller <news@x.example>", "{a}");
    assert_eq!(a["to"], "Ann Æ <ann@y.example>", "{a}");
    assert_eq!(a["subject"], "Grüße, Ann!", "{a}");
    assert_eq!(a["x_campaign"], "spring");
    assert_eq!(a["mime"], "1.0");
    assert!(
        a["message_id"].as_str().unwrap().ends_with("@mx.test>"),
        "{a}"
    );
    assert!(a["date"].as_str().unwrap().contains("2023"), "{a}");
    let t = &a["tree"];
    no_defects(t);
    assert_eq!(t["type"], "multipart/mixed");
    assert_eq!(t["parts"][0]["type"], "multipart/alternative");
    assert_eq!(t["parts"][0]["parts"][0]["type"], "text/plain");
    assert_eq!(
        t["parts"][0]["parts"][0]["content"]
            .as_str()
            .unwrap()
            .replace("\r\n", "\n"),
        "Hallo Ann,\nZeile zwei: äöü\n"
    );
    assert_eq!(t["parts"][0]["parts"][1]["type"], "text/html");
    assert_eq!(t["parts"][1]["type"], "application/pdf");
    assert_eq!(t["parts"][1]["filename"], "report.pdf");
    let hex: String = pdf.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(t["parts"][1]["content"], hex.as_str());
    let b = python_email(&msgs[1].content);
    assert_eq!(b["to"], "bob@y.example");
    assert_eq!(b["subject"], "Grüße, friend!");
    // Text only: a single text/plain part.
    let req = serde_json::json!({"from": "a@x.example", "recipients": ["c@y.example"], "subject": "s", "text_body": "only\ntext"});
    let m =
        shardmta::http::inject::prepare(req.to_string().as_bytes(), &lim, 1_700_000_000).unwrap();
    let v = python_email(&m[0].content);
    no_defects(&v["tree"]);
    assert_eq!(v["tree"]["type"], "text/plain");
    assert_eq!(
        v["tree"]["content"].as_str().unwrap().replace("\r\n", "\n"),
        "only\ntext\n"
    );
}

// ---------------------------------------------------------------- injection and queue changes (through the shards)

fn inject_json(addr: SocketAddr, body: &Value) -> (u16, Value) {
    let (code, text) = curl(
        "POST",
        &format!("http://{addr}/api/v1/inject"),
        Some(body.to_string().as_bytes()),
        &[],
    );
    (code, json(&text))
}

#[test]
fn inject_raw_is_queued_durably_and_reports_refusals() {
    let (s, addr) = start(
        "[local]\nusers = [\"bob\", \"carol\", \"dave\"]\nsystem_users = false\n",
        "",
    );
    let (code, v) = inject_json(
        addr,
        &serde_json::json!({
            "envelope_sender": "app@client.test",
            "recipients": ["bob@localhost", "carol@localhost"],
            "content": "From: app@client.test\nTo: bob@localhost\nSubject: raw\n\nline one\nline two\n"
        }),
    );
    assert_eq!(code, 200, "{v}");
    let ids = v["queue_ids"].as_array().unwrap();
    assert_eq!(ids.len(), 1, "{v}");
    assert_eq!(
        v["accepted"],
        serde_json::json!(["bob@localhost", "carol@localhost"])
    );
    assert_eq!(v["refused"], serde_json::json!([]));
    // Answered after the sync: the message is in the queue at once, with CRLF line ends and a Message-ID.
    let id = ids[0].as_str().unwrap();
    let q = s.queue();
    let m = q.iter().find(|m| m["id"] == id).expect("queued");
    assert_eq!(m["sender"], "app@client.test");
    let stored = String::from_utf8(s.queue_cat(id)).unwrap();
    assert!(
        stored.contains("Subject: raw\r\n\r\nline one\r\nline two\r\n"),
        "{stored}"
    );
    assert!(stored.contains("Message-ID: <"), "{stored}");
    assert!(!stored.replace("\r\n", "").contains('\n'));
    // The RCPT checks of SMTP (an authenticated client's: it may relay): an unknown local user is refused, the
    // others are queued.
    let (code, v) = inject_json(
        addr,
        &serde_json::json!({
            "envelope_sender": "app@client.test",
            "recipients": ["dave@localhost", "eve@localhost", "frank@remote.example"],
            "content": "Subject: mixed\r\n\r\nx\r\n"
        }),
    );
    assert_eq!(code, 200, "{v}");
    assert_eq!(
        v["accepted"],
        serde_json::json!(["dave@localhost", "frank@remote.example"])
    );
    assert_eq!(v["refused"][0]["recipient"], "eve@localhost");
    assert!(
        v["refused"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("5.1.1"),
        "{v}"
    );
    // Nobody accepted: nothing queued, no ID.
    let (code, v) = inject_json(
        addr,
        &serde_json::json!({
            "envelope_sender": "app@client.test",
            "recipients": ["eve@localhost"],
            "content": "Subject: none\r\n\r\nx\r\n"
        }),
    );
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["queue_ids"], serde_json::json!([]));
    assert_eq!(v["accepted"], serde_json::json!([]));
}

#[test]
fn inject_built_makes_one_message_per_recipient() {
    let (s, addr) = start("", "");
    let (code, v) = inject_json(
        addr,
        &serde_json::json!({
            "from": {"email": "news@client.test", "name": "News"},
            "subject": "Hello {{name}}",
            "text_body": "Dear {{name}},\nhere it is.",
            "html_body": "<p>Dear {{name}}</p>",
            "recipients": [
                {"email": "ann@localhost", "substitutions": {"name": "Ann"}},
                {"email": "bob@localhost", "substitutions": {"name": "Bob"}}
            ]
        }),
    );
    assert_eq!(code, 200, "{v}");
    let ids: Vec<&str> = v["queue_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 2, "{v}");
    assert_eq!(
        v["accepted"],
        serde_json::json!(["ann@localhost", "bob@localhost"])
    );
    for (id, name) in ids.iter().zip(["Ann", "Bob"]) {
        let stored = s.queue_cat(id);
        // The stored bytes start with the Received header; the message follows it.
        let text = String::from_utf8_lossy(&stored).into_owned();
        let at = text.find("From: ").expect("the built message");
        let parsed = python_email(&text.as_bytes()[at..]);
        assert_eq!(parsed["subject"], format!("Hello {name}"), "{parsed}");
        assert_eq!(parsed["tree"]["type"], "multipart/alternative");
        no_defects(&parsed["tree"]);
    }
}

#[test]
fn queue_endpoints_hold_release_flush_and_delete() {
    let (s, addr) = start("", "");
    let mut c = Client::greeted(s.smtp);
    c.cmd("EHLO client.test");
    let a = queued_id(&c.send_mail("x@client.test", &["a@localhost"], "Subject: a\r\n\r\na\r\n"));
    let b = queued_id(&c.send_mail("x@client.test", &["b@localhost"], "Subject: b\r\n\r\nb\r\n"));
    c.cmd("QUIT");
    let post = |action: &str, body: Value| {
        let (code, text) = curl(
            "POST",
            &format!("http://{addr}/api/v1/queue/{action}"),
            Some(body.to_string().as_bytes()),
            &[],
        );
        (code, json(&text))
    };
    let (code, r) = post("hold", serde_json::json!({"ids": [a, "00000000000000FF"]}));
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["changed"], serde_json::json!([a]));
    assert_eq!(r["not_found"], serde_json::json!(["00000000000000FF"]));
    let (_, r) = post("hold", serde_json::json!({"ids": [a]}));
    assert_eq!(r["unchanged"], serde_json::json!([a]));
    if prometheus_client() {
        let m = wait_sample(addr, "shardmta_queue_messages{state=\"held\"}", 1.0);
        assert_eq!(sample(&m, "shardmta_queue_messages{state=\"held\"}"), 1.0);
        assert_eq!(
            sample(&m, "shardmta_queue_messages{state=\"pending\"}"),
            1.0,
            "the other message"
        );
    }
    // The listing shows the hold (the lead's `queue list` carries the held state).
    let (code, text) = curl("GET", &format!("http://{addr}/api/v1/queue"), None, &[]);
    assert_eq!(code, 200);
    assert!(text.contains("held"), "{text}");
    let (_, r) = post("release", serde_json::json!({"ids": [a]}));
    assert_eq!(r["changed"], serde_json::json!([a]));
    let (_, r) = post("flush", serde_json::json!({"all": true}));
    assert!(r.get("changed").is_some(), "{r}");
    let (_, r) = post("delete", serde_json::json!({"ids": [b]}));
    assert_eq!(r["changed"], serde_json::json!([b]));
    wait_gone(&s, &b);
    let (_, r) = post("bounce", serde_json::json!({"domain": "localhost"}));
    assert!(
        r["changed"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x == a.as_str()),
        "{r}"
    );
}

/// `message_size_limit` changes with a reload: the injection bound follows it (the reload asked for over HTTP).
#[test]
fn a_reload_moves_the_injection_size_limit() {
    let (s, addr) = start("message_size_limit = 100000\n", "");
    let inject = format!("http://{addr}/api/v1/inject");
    let big = "x".repeat(150_000);
    let raw = format!(
        r#"{{"envelope_sender":"a@b.example","recipients":["c@localhost"],"content":"Subject: big\r\n\r\n{big}"}}"#
    );
    let (code, body) = curl("POST", &inject, Some(raw.as_bytes()), &[]);
    assert_eq!(code, 413, "{body}");
    let text = std::fs::read_to_string(&s.config).unwrap();
    std::fs::write(
        &s.config,
        text.replace(
            "message_size_limit = 100000",
            "message_size_limit = 1000000",
        ),
    )
    .unwrap();
    let before = server_stats(&s)["config_reloads"].as_u64().unwrap_or(0);
    let (code, body) = curl("POST", &format!("http://{addr}/api/v1/reload"), None, &[]);
    assert_eq!(code, 202, "{body}");
    wait_for(
        || server_stats(&s)["config_reloads"].as_u64().unwrap_or(0) > before,
        "the reload",
    );
    let (code, body) = curl("POST", &inject, Some(raw.as_bytes()), &[]);
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        json(&body)["queue_ids"].as_array().unwrap().len(),
        1,
        "{body}"
    );
}

/// The issue's proof: a message injected over HTTP is delivered to the next hop, content intact, both the raw
/// and the built form.
#[test]
fn injected_messages_are_delivered_to_the_next_hop() {
    let sink_port = free_port();
    let sink = Sink::start("127.0.0.83", sink_port, &[]);
    let (s, addr) = start(
        &format!(
            "[transport]\n\"sink.test\" = \"[127.0.0.83]:{sink_port}\"\n\
             [delivery]\nsmtp_connection_cache_time_limit = \"1s\"\nsmtp_reply_timeout = \"5s\"\n"
        ),
        "",
    );
    let (code, v) = inject_json(
        addr,
        &serde_json::json!({
            "envelope_sender": "app@client.test",
            "recipients": ["ann@sink.test"],
            "content": "From: app@client.test\nTo: ann@sink.test\nSubject: raw to the sink\n\nraw body\n.leading dot\n"
        }),
    );
    assert_eq!(code, 200, "{v}");
    let raw_id = v["queue_ids"][0].as_str().unwrap().to_string();
    let (code, v) = inject_json(
        addr,
        &serde_json::json!({
            "from": "app@client.test",
            "subject": "Hello {{name}}",
            "text_body": "Dear {{name}},\nyour order shipped.\n",
            "recipients": [{"email": "bo@sink.test", "substitutions": {"name": "Bo"}}]
        }),
    );
    assert_eq!(code, 200, "{v}");
    let built_id = v["queue_ids"][0].as_str().unwrap().to_string();
    sink.wait_messages(2);
    wait_gone(&s, &raw_id);
    wait_gone(&s, &built_id);
    let msgs = sink.messages();
    let raw = msgs
        .iter()
        .find(|m| m.contains("X-Sink-Rcpt-To: <ann@sink.test>"))
        .expect("the raw message at the sink");
    assert!(raw.contains("X-Sink-Mail-From: <app@client.test>"), "{raw}");
    assert!(
        raw.contains("Subject: raw to the sink\r\n")
            && raw.contains("\r\nraw body\r\n.leading dot\r\n"),
        "{raw}"
    );
    assert!(raw.contains(&format!("with HTTP id {raw_id}")), "{raw}");
    let built = msgs
        .iter()
        .find(|m| m.contains("X-Sink-Rcpt-To: <bo@sink.test>"))
        .expect("the built message at the sink");
    assert!(built.contains("Subject: Hello Bo"), "{built}");
    assert!(built.contains("Dear Bo,"), "{built}");
}
