//! `[cluster]` end to end: a real `redis-server` started by each test on a free loopback port, two shardmta
//! nodes (two processes, their own spools) sharing it, and a slow sink on 127.0.0.x counting concurrent
//! connections. Also the `SharedLimits` API against the real server (leases, GCRA rate, fallback, reconnect).

mod common;

use std::net::{IpAddr, Ipv4Addr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::rc::Rc;
use std::time::{Duration, Instant};

use common::*;
use shardmta::cluster::{ClusterConfig, SharedLimits};
use shardmta::config::{Config, PfDuration};
use shardmta::dns::testserver::TestDns;

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

/// A `redis-server` on 127.0.0.1, killed when dropped (also when the test panics).
struct Redis {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

impl Redis {
    fn start() -> Redis {
        let mut r = Redis {
            child: None,
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
        };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (installed by .ci/run)");
        self.child = Some(child);
        wait_for(
            || TcpStream::connect(("127.0.0.1", self.port)).is_ok(),
            "redis-server to listen",
        );
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

fn cluster_toml(redis: &Redis, node: &str, ttl: &str) -> String {
    format!(
        "[cluster]\nredis_url = \"{}\"\nnode_name = \"{node}\"\nlease_ttl = \"{ttl}\"\nredis_timeout = \"1s\"\nnodes = 2\n",
        redis.url()
    )
}

/// A node relaying `shared.test` to the sink, with 2 connections per destination over the cluster.
fn node(port: u16, dns: &TestDns, redis: &Redis, name: &str, ttl: &str) -> Server {
    Server::start(&relay_config(
        port,
        dns,
        "destination_concurrency_limit = 2",
        &cluster_toml(redis, name, ttl),
    ))
}

fn send_n(s: &Server, n: usize, tag: &str) {
    send_n_addr(s.smtp, n, tag)
}

fn setup(dns_ip: &str, sink_ip: &str) -> (TestDns, u16) {
    let dns = TestDns::start(IpAddr::V4(ip(dns_ip)));
    dns.add_mx("shared.test", 10, "mx.shared.test");
    dns.add_a("mx.shared.test", ip(sink_ip));
    (dns, free_port())
}

/// Two loaded nodes with `destination_concurrency_limit = 2` each: the sink never sees more than 2 connections
/// at once (without the cluster it would see up to 4), and every message arrives.
#[test]
fn two_nodes_share_one_connection_limit() {
    let redis = Redis::start();
    let (dns, port) = setup("127.0.0.141", "127.0.0.145");
    let sink = Sink::start("127.0.0.145", port, &["--delay-ms", "150"]);
    let mut a = node(port, &dns, &redis, "node-a", "3s");
    let b = node(port, &dns, &redis, "node-b", "3s");
    let (ta, tb) = (
        std::thread::spawn({
            let smtp = a.smtp;
            move || send_n_addr(smtp, 10, "a")
        }),
        std::thread::spawn({
            let smtp = b.smtp;
            move || send_n_addr(smtp, 10, "b")
        }),
    );
    ta.join().unwrap();
    tb.join().unwrap();
    sink.wait_messages(20);
    let st = sink.stats();
    let max = st["max_concurrent_connections"].as_u64().unwrap();
    assert!(max <= 2, "the sink saw {max} connections at once: {st}");
    assert_eq!(max, 2, "the limit is used, not starved: {st}");
    // Both nodes took part, through Redis.
    for s in [&a, &b] {
        wait_for(
            || server_stats(s)["cluster"]["redis_up"] == 1,
            "stats.json to show redis up",
        );
        assert!(delivered(s) > 0);
    }
    // The lease refresher does not hold up a clean stop.
    assert!(a.terminate().success());
}

fn send_n_addr(addr: std::net::SocketAddr, n: usize, tag: &str) {
    let mut c = Client::greeted(addr);
    c.cmd("EHLO client.test");
    for i in 0..n {
        queued_id(&c.send_mail(
            "a@client.test",
            &[&format!("r{i}@shared.test")],
            &format!("Subject: {tag} {i}\r\n\r\nx\r\n"),
        ));
    }
    c.cmd("QUIT");
}

/// `default_destination_rate_limit = "4/s"` on two nodes: 8 messages (4 from each) take the shared rate,
/// about 7 x 250 ms, where two local limits would take about 3 x 250 ms.
#[test]
fn two_nodes_share_one_message_rate() {
    let redis = Redis::start();
    let (dns, port) = setup("127.0.0.144", "127.0.0.148");
    let sink = Sink::start("127.0.0.148", port, &[]);
    let nodes: Vec<Server> = ["node-a", "node-b"]
        .iter()
        .map(|name| {
            Server::start(&relay_config(
                port,
                &dns,
                "default_destination_rate_limit = \"4/s\"",
                &cluster_toml(&redis, name, "3s"),
            ))
        })
        .collect();
    let t0 = Instant::now();
    let senders: Vec<_> = nodes
        .iter()
        .map(|s| {
            let smtp = s.smtp;
            std::thread::spawn(move || send_n_addr(smtp, 4, "rate"))
        })
        .collect();
    for t in senders {
        t.join().unwrap();
    }
    sink.wait_messages(8);
    let took = t0.elapsed();
    eprintln!("8 messages at a shared 4/s took {took:?}");
    assert!(
        took >= Duration::from_millis(1600),
        "8 messages at 4/s over the cluster took {took:?}"
    );
}

fn delivered(s: &Server) -> usize {
    delivery_log(s)
        .iter()
        .filter(|l| l["result"] == "delivered")
        .count()
}

/// A node killed while it holds both leases: after the lease TTL the other node gets the whole limit (2
/// connections at a fresh sink). Were the dead node's leases kept, the other node would never connect.
#[test]
fn a_killed_node_returns_its_leases() {
    let redis = Redis::start();
    let (dns, port) = setup("127.0.0.142", "127.0.0.146");
    let sink = Sink::start("127.0.0.146", port, &["--delay-ms", "400"]);
    let mut a = node(port, &dns, &redis, "node-a", "3s");
    let b = node(port, &dns, &redis, "node-b", "3s");
    send_n(&a, 8, "a");
    wait_for(
        || sink.count("open_connections") >= 2,
        "node a to hold both connections",
    );
    a.kill9();
    let killed = Instant::now();
    drop(sink);
    let sink = Sink::start("127.0.0.146", port, &["--delay-ms", "200"]);
    send_n(&b, 8, "b");
    sink.wait_messages(8);
    let st = sink.stats();
    assert_eq!(
        st["max_concurrent_connections"].as_u64(),
        Some(2),
        "node b reached the full limit once a's leases expired: {st}"
    );
    eprintln!(
        "node b delivered 8 messages {:?} after node a was killed",
        killed.elapsed()
    );
}

/// Redis stopped mid-run: mail keeps flowing on each node's share (every message arrives), and the nodes say
/// so (stats.json `cluster.redis_up` 0, `cluster.fallback_total` counting).
#[test]
fn mail_flows_while_redis_is_down() {
    let mut redis = Redis::start();
    let (dns, port) = setup("127.0.0.143", "127.0.0.147");
    let sink = Sink::start("127.0.0.147", port, &["--delay-ms", "100"]);
    let a = node(port, &dns, &redis, "node-a", "3s");
    let b = node(port, &dns, &redis, "node-b", "3s");
    send_n(&a, 4, "a1");
    send_n(&b, 4, "b1");
    sink.wait_messages(2);
    redis.stop();
    // The first messages finish (on leases taken before); once their connections are closed, new mail needs
    // new leases, which only the fallback share can give now.
    sink.wait_messages(8);
    wait_for(
        || sink.count("open_connections") == 0,
        "the first connections to close",
    );
    send_n(&a, 4, "a2");
    send_n(&b, 4, "b2");
    sink.wait_messages(16);
    for s in [&a, &b] {
        wait_for(
            || {
                let c = &server_stats(s)["cluster"];
                c["redis_up"] == 0 && c["fallback_total"].as_u64() > Some(0)
            },
            "stats.json to show the fallback",
        );
    }
    // Everything queued went out: nothing is left on either node.
    for s in [&a, &b] {
        wait_for(|| s.queue().is_empty(), "empty queues");
    }
    assert_eq!(sink.count("messages"), 16);
}

/// One command over a plain socket (RESP by hand); returns the first reply line.
fn redis_command(port: u16, args: &[&str]) -> String {
    use std::io::{BufRead, Write};
    let mut out = format!("*{}\r\n", args.len());
    for a in args {
        out.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(out.as_bytes()).unwrap();
    let mut line = String::new();
    std::io::BufReader::new(s).read_line(&mut line).unwrap();
    line.trim_end().to_string()
}

fn cluster_config(redis: &Redis, node: &str) -> Config {
    Config {
        cluster: Some(ClusterConfig {
            redis_url: redis.url(),
            node_name: node.into(),
            lease_ttl: PfDuration(Duration::from_secs(2)),
            redis_timeout: PfDuration(Duration::from_secs(1)),
            // One expected: the second is learned from its heartbeat (the fallback share below depends on it).
            nodes: 1,
        }),
        ..Config::default()
    }
}

async fn sleep(ms: u64) {
    glommio::timer::sleep(Duration::from_millis(ms)).await;
}

/// The API against a real Redis: leases counted over two nodes, released on drop; the GCRA slots shared; with
/// Redis gone the node's share (1 of 2 connections, half the rate); Redis back: shared again.
#[test]
fn shared_limits_api_against_redis() {
    let mut redis = Redis::start();
    let ex = glommio::LocalExecutorBuilder::default().make().unwrap();
    ex.run(async {
        let a: Rc<SharedLimits> = SharedLimits::from_config(&cluster_config(&redis, "n1")).unwrap();
        let b: Rc<SharedLimits> = SharedLimits::from_config(&cluster_config(&redis, "n2")).unwrap();
        let l1 = a.acquire_connection("d.test:25", 2).await.expect("first");
        let l2 = b.acquire_connection("d.test:25", 2).await.expect("second");
        assert!(a.acquire_connection("d.test:25", 2).await.is_none());
        assert!(b.acquire_connection("d.test:25", 2).await.is_none());
        // Another key has its own count.
        let other = b
            .acquire_connection("e.test:25", 1)
            .await
            .expect("other key");
        drop(l1);
        // The release goes out from a's connection, the next lease from b's: allow for the order.
        let mut l3 = None;
        for _ in 0..50 {
            sleep(50).await;
            l3 = b.acquire_connection("d.test:25", 2).await;
            if l3.is_some() {
                break;
            }
        }
        let l3 = l3.expect("released");
        // Leases outlive their TTL while refreshed (every third of it).
        sleep(2500).await;
        assert!(a.acquire_connection("d.test:25", 2).await.is_none());
        assert_eq!(a.nodes(), 2, "two heartbeats seen (1 configured)");
        drop((l2, l3, other));

        // A dead node's lease (written as it would have, expiring in 2 s) while a live lease keeps the key
        // refreshed: the slot is refused until the dead member expires, then granted.
        let live = b.acquire_connection("h.test:25", 2).await.expect("live");
        let expiry = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
            + 2000;
        let r = redis_command(
            redis.port,
            &[
                "ZADD",
                "shardmta:conn:h.test:25",
                &expiry.to_string(),
                "dead:0:0",
            ],
        );
        assert_eq!(r, ":1", "{r}");
        assert!(a.acquire_connection("h.test:25", 2).await.is_none());
        sleep(2300).await;
        let back = a
            .acquire_connection("h.test:25", 2)
            .await
            .expect("dead lease expired");
        drop((live, back));

        // GCRA, 10/s over both nodes: each slot 100 ms after the previous one, whoever asks. Slot i starts
        // i x 100 ms after call 0 ran, and call i ran between its send and its answer: so its wait lies
        // within bounds however slow the machine is.
        let t0 = Instant::now();
        let mut calls = Vec::new();
        for (i, l) in [&a, &b, &a].into_iter().enumerate() {
            let sent = t0.elapsed();
            let w = l.message_slot("r.test:25", 10.0).await;
            calls.push((i as u32, sent, t0.elapsed(), w));
        }
        let first_answered = calls[0].2;
        let ms = Duration::from_millis;
        for &(i, sent, answered, w) in &calls {
            let slot = ms(100) * i;
            assert!(w + ms(5) >= slot.saturating_sub(answered), "{calls:?}");
            assert!(
                w <= (slot + first_answered).saturating_sub(sent) + ms(5),
                "{calls:?}"
            );
        }

        // Cost of a rate slot against a loopback Redis: one at a time, then 200 at once (pipelined by the
        // shard's client: calls due together go in one write). Printed, not asserted (machine-dependent).
        let t = Instant::now();
        for _ in 0..200 {
            a.message_slot("m.test:25", 1e6).await;
        }
        let one_by_one = t.elapsed() / 200;
        let t = Instant::now();
        let tasks: Vec<_> = (0..200)
            .map(|_| {
                let a = a.clone();
                glommio::spawn_local(async move { a.message_slot("n.test:25", 1e6).await })
            })
            .collect();
        for task in tasks {
            task.await;
        }
        eprintln!(
            "message_slot: {one_by_one:?} per call one at a time, {:?} per call with 200 at once",
            t.elapsed() / 200
        );

        // A slow rate with many callers: a slot further away than the longest wait (60 s) is not reserved, so the
        // theoretical arrival time stays within one wait of the clock (it ran away by one interval per caller,
        // and a restored rate then waited hours behind it).
        assert!(a.message_slot("slow.test:25", 1.0 / 40.0).await.is_zero());
        let w = a.message_slot("slow.test:25", 1.0 / 40.0).await;
        assert!(
            w > Duration::from_secs(35) && w <= Duration::from_secs(40),
            "{w:?}"
        );
        let tat = redis_command(redis.port, &["GET", "shardmta:rate:slow.test:25"]);
        let waiting: Vec<_> = (0..10)
            .map(|_| {
                let a = a.clone();
                glommio::spawn_local(
                    async move { a.message_slot("slow.test:25", 1.0 / 40.0).await },
                )
                .detach()
            })
            .collect();
        glommio::timer::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            redis_command(redis.port, &["GET", "shardmta:rate:slow.test:25"]),
            tat,
            "nothing reserved beyond the longest wait"
        );
        for t in waiting {
            t.cancel();
        }

        // Connections closed by Redis (its idle timeout, a failover): the next call goes through on a new one,
        // not on the fallback share.
        let r = redis_command(redis.port, &["CLIENT", "KILL", "TYPE", "normal"]);
        assert!(r.starts_with(':'), "{r}");
        let fallbacks =
            shardmta::cluster::FALLBACK_TOTAL.load(std::sync::atomic::Ordering::Relaxed);
        let k = a.acquire_connection("k.test:25", 1).await;
        assert!(k.is_some());
        assert_eq!(
            shardmta::cluster::FALLBACK_TOTAL.load(std::sync::atomic::Ordering::Relaxed),
            fallbacks,
            "decided in redis"
        );
        drop(k);

        // Redis gone: the share of 2 connections over 2 nodes is 1; of 10/s, 5/s.
        redis.stop();
        let f1 = a.acquire_connection("f.test:25", 2).await.expect("share");
        assert!(a.acquire_connection("f.test:25", 2).await.is_none());
        assert_eq!(shardmta::cluster::redis_up(), Some(false));
        assert!(shardmta::cluster::FALLBACK_TOTAL.load(std::sync::atomic::Ordering::Relaxed) >= 2);
        let t = Instant::now();
        let w0 = a.message_slot("s.test:25", 10.0).await;
        let w1 = a.message_slot("s.test:25", 10.0).await;
        assert!(
            w0.is_zero() && w1 + t.elapsed() >= Duration::from_millis(200),
            "{w0:?} {w1:?}"
        );
        drop(f1);

        // Redis back (same port): shared again once each node's client has reconnected (its backoff).
        redis.spawn();
        let decided_in_redis = |l: &Rc<SharedLimits>| {
            let l = l.clone();
            async move {
                let t = Instant::now();
                loop {
                    // Decided in Redis (not on the fallback share) when the fallback counter stays put.
                    let n = shardmta::cluster::FALLBACK_TOTAL
                        .load(std::sync::atomic::Ordering::Relaxed);
                    let got = l.acquire_connection("g.test:25", 1).await;
                    if shardmta::cluster::FALLBACK_TOTAL.load(std::sync::atomic::Ordering::Relaxed)
                        == n
                    {
                        return got;
                    }
                    drop(got);
                    assert!(t.elapsed() < Duration::from_secs(10), "no reconnect");
                    sleep(200).await;
                }
            }
        };
        let held = decided_in_redis(&a).await;
        assert!(held.is_some());
        assert!(decided_in_redis(&b).await.is_none(), "shared again");
        assert_eq!(shardmta::cluster::redis_up(), Some(true));
    });
}

/// The suppression list through Redis: an entry added on one node is listed on the other within a few
/// seconds (with its reason); removed there, it is gone on the first too. A node started later learns the
/// entries added before it. One added while Redis is down reaches the others when it is back.
#[test]
fn suppression_changes_reach_the_other_node() {
    let mut redis = Redis::start();
    let a = Server::start(&cluster_toml(&redis, "node-a", "3s"));
    let b = Server::start(&cluster_toml(&redis, "node-b", "3s"));
    let check = |s: &Server, who: &str| s.cli(&["suppression", "check", who]).status.success();
    let out = a.cli(&[
        "suppression",
        "add",
        "bob@example.com",
        "--reason",
        "unsubscribed",
    ]);
    assert!(out.status.success(), "{out:?}");
    assert!(!check(&b, "bob@example.com"));
    wait_for(|| check(&b, "bob@example.com"), "node b to list bob");
    let listed = String::from_utf8_lossy(&b.cli(&["suppression", "list"]).stdout).into_owned();
    assert!(listed.contains("unsubscribed"), "{listed}");
    let out = b.cli(&["suppression", "add", "@complainers.example"]);
    assert!(out.status.success(), "{out:?}");
    let out = b.cli(&["suppression", "remove", "bob@example.com"]);
    assert!(out.status.success(), "{out:?}");
    wait_for(
        || !check(&a, "bob@example.com") && check(&a, "x@complainers.example"),
        "node a to follow node b's remove and add",
    );
    // A third node, started now, reads the history.
    let c = Server::start(&cluster_toml(&redis, "node-c", "3s"));
    wait_for(
        || check(&c, "x@complainers.example"),
        "node c to learn the list",
    );
    assert!(!check(&c, "bob@example.com"));
    // A change made while Redis is down is kept and shared once it is back (an empty Redis: no persistence).
    redis.stop();
    let out = a.cli(&["suppression", "add", "carol@example.com"]);
    assert!(out.status.success(), "{out:?}");
    assert!(check(&a, "carol@example.com"), "the local change stands");
    redis.spawn();
    wait_for(
        || check(&b, "carol@example.com") && check(&c, "carol@example.com"),
        "the change made while redis was down to reach the others",
    );
}

/// A site's worker that closes its connection to open one for another domain (a provider site over two MX sets:
/// the connection is not reused across them) gives the closed connection's lease back first: with one
/// connection allowed, mail for the two domains alternates and all of it is delivered (the stale lease, still
/// refreshed, held the only slot and the worker waited for a lease forever).
#[test]
fn a_connection_closed_for_another_domain_returns_its_lease() {
    let redis = Redis::start();
    let port = free_port();
    let dns = TestDns::start(IpAddr::V4(ip("127.0.0.146")));
    dns.add_mx("one.test", 10, "mx1.partner.test");
    dns.add_mx("two.test", 10, "mx2.partner.test");
    dns.add_a("mx1.partner.test", ip("127.0.0.147"));
    dns.add_a("mx2.partner.test", ip("127.0.0.147"));
    let sink = Sink::start("127.0.0.147", port, &[]);
    let dir = tempfile::tempdir().unwrap();
    let shaping = dir.path().join("shaping.toml");
    std::fs::write(
        &shaping,
        "[site.partner]\nmatch = [\"*.partner.test\"]\nmax_connections = 1\n",
    )
    .unwrap();
    let s = Server::start(&relay_config(
        port,
        &dns,
        "",
        &format!(
            "shaping_file = \"{}\"\n{}",
            path_str(&shaping),
            cluster_toml(&redis, "node-a", "60s")
        ),
    ));
    let mut c = Client::greeted(s.smtp);
    c.cmd("EHLO client.test");
    for i in 0..6 {
        let to = if i % 2 == 0 {
            "x@one.test"
        } else {
            "y@two.test"
        };
        let r = c.send_mail(
            "a@client.test",
            &[to],
            &format!("Subject: alt {i}\r\n\r\nb\r\n"),
        );
        assert!(r.starts_with("250"), "{r}");
    }
    c.cmd("QUIT");
    sink.wait_messages(6);
    assert_eq!(
        sink.count("max_concurrent_connections"),
        1,
        "{}",
        sink.stats()
    );
}
