//! A small authoritative-looking DNS responder for tests (unit tests here and the crate's integration
//! tests): plain std threads with a std `UdpSocket` and `TcpListener` on the same ephemeral port of a
//! loopback address, answering from a zone edited at run time through `&self`.
//!
//! Names not in the zone answer NXDOMAIN; a name in the zone without records of the asked type answers
//! NOERROR with no answers (NODATA). Negative answers carry a SOA whose minimum is the zone TTL. A name may be
//! an alias (CNAME, [`TestDns::add_cname`]): its answers carry the chain and the final name's records.
//! Bounds: the threads poll a stop flag every 50 ms (socket timeouts), a TCP connection is served for
//! at most 64 messages and 2 s of idle time, one connection at a time. Stops (and joins) when dropped.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::tlsa::{CertUsage, Matching, Selector};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, MX, SOA, TLSA, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};

const POLL: Duration = Duration::from_millis(50);
const TCP_MESSAGES_PER_CONNECTION: usize = 64;
const TCP_IDLE: Duration = Duration::from_secs(2);
const CNAME_HOPS: usize = 8;

#[derive(Debug, Default, Clone)]
struct Node {
    /// Answers for its types; false: NXDOMAIN (a node created only to carry a flag).
    exists: bool,
    mx: Vec<(u16, String)>,
    a: Vec<Ipv4Addr>,
    aaaa: Vec<Ipv6Addr>,
    txt: Vec<String>,
    tlsa: Vec<(u8, u8, u8, Vec<u8>)>,
    /// An alias: queries of any type answer this CNAME, followed by the target's records (as a recursive
    /// resolver's answer would carry them).
    cname: Option<String>,
    servfail: bool,
    drop: bool,
    /// Answers for this name carry the AD bit (as a validating resolver's would).
    authentic: bool,
}

#[derive(Debug)]
struct Zone {
    nodes: HashMap<String, Node>,
    ttl: u32,
    truncate_udp: bool,
}

struct Shared {
    zone: Mutex<Zone>,
    queries: AtomicU64,
    stop: AtomicBool,
}

/// The responder; see the module documentation.
pub struct TestDns {
    shared: Arc<Shared>,
    addr: SocketAddr,
    threads: Vec<JoinHandle<()>>,
}

fn key(name: &str) -> String {
    super::wire::normalize(name)
}

impl TestDns {
    /// Starts on `bind` (a loopback address such as 127.0.0.53) on an ephemeral port, UDP and TCP.
    /// Panics if it cannot bind: it is test support.
    pub fn start(bind: IpAddr) -> TestDns {
        let (udp, tcp) = bind_pair(bind);
        let addr = udp.local_addr().expect("test dns: local_addr");
        udp.set_read_timeout(Some(POLL))
            .expect("test dns: read timeout");
        tcp.set_nonblocking(true).expect("test dns: nonblocking");
        let shared = Arc::new(Shared {
            zone: Mutex::new(Zone {
                nodes: HashMap::new(),
                ttl: 300,
                truncate_udp: false,
            }),
            queries: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        });
        let s1 = shared.clone();
        let s2 = shared.clone();
        let threads = vec![
            std::thread::spawn(move || udp_loop(&s1, &udp)),
            std::thread::spawn(move || tcp_loop(&s2, &tcp)),
        ];
        TestDns {
            shared,
            addr,
            threads,
        }
    }

    /// Where it listens (UDP and TCP).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Queries received so far (UDP and TCP, answered or not).
    pub fn queries(&self) -> u64 {
        self.shared.queries.load(Ordering::SeqCst)
    }

    fn zone(&self) -> MutexGuard<'_, Zone> {
        self.shared
            .zone
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn node(&self, name: &str, f: impl FnOnce(&mut Node)) {
        let mut zone = self.zone();
        f(zone.nodes.entry(key(name)).or_default());
    }

    /// TTL of every record and negative answer from now on (default 300).
    pub fn set_ttl(&self, ttl: u32) {
        self.zone().ttl = ttl;
    }

    pub fn add_mx(&self, domain: &str, preference: u16, host: &str) {
        self.node(domain, |n| {
            n.exists = true;
            n.mx.push((preference, key(host)));
        });
    }

    pub fn add_a(&self, name: &str, ip: Ipv4Addr) {
        self.node(name, |n| {
            n.exists = true;
            n.a.push(ip);
        });
    }

    pub fn add_aaaa(&self, name: &str, ip: Ipv6Addr) {
        self.node(name, |n| {
            n.exists = true;
            n.aaaa.push(ip);
        });
    }

    /// A TXT record (split into 255-byte character-strings on the wire).
    pub fn add_txt(&self, name: &str, text: &str) {
        self.node(name, |n| {
            n.exists = true;
            n.txt.push(text.to_string());
        });
    }

    /// Replaces the name's TXT records.
    pub fn set_txt(&self, name: &str, texts: &[&str]) {
        self.node(name, |n| {
            n.exists = true;
            n.txt = texts.iter().map(|t| t.to_string()).collect();
        });
    }

    /// A TLSA record (`_25._tcp.mx.example`): usage, selector, matching type, data.
    pub fn add_tlsa(&self, name: &str, usage: u8, selector: u8, matching: u8, data: &[u8]) {
        self.node(name, |n| {
            n.exists = true;
            n.tlsa.push((usage, selector, matching, data.to_vec()));
        });
    }

    /// Makes `name` an alias of `target` (a CNAME; other records of the name are no longer served). The answer
    /// follows the chain (at most 8 links) inside the zone; it has the AD bit only if every name on the chain
    /// is marked authentic.
    pub fn add_cname(&self, name: &str, target: &str) {
        self.node(name, |n| {
            n.exists = true;
            n.cname = Some(key(target));
        });
    }

    /// While on, answers for the name (records, NODATA, NXDOMAIN) have the AD bit set, as a validating
    /// resolver's answers for a signed zone.
    pub fn set_authentic(&self, name: &str, on: bool) {
        self.node(name, |n| n.authentic = on);
    }

    /// RFC 7505: the single MX record `0 .`.
    pub fn null_mx(&self, domain: &str) {
        self.node(domain, |n| {
            n.exists = true;
            n.mx = vec![(0, String::new())];
        });
    }

    /// Removes the name's records: it answers NXDOMAIN.
    pub fn set_nxdomain(&self, name: &str) {
        self.node(name, |n| {
            n.exists = false;
            n.mx.clear();
            n.a.clear();
            n.aaaa.clear();
            n.txt.clear();
            n.tlsa.clear();
        });
    }

    /// While on, every query for the name answers SERVFAIL.
    pub fn set_servfail(&self, name: &str, on: bool) {
        self.node(name, |n| n.servfail = on);
    }

    /// While on, queries for the name get no answer at all (the client times out).
    pub fn set_drop(&self, name: &str, on: bool) {
        self.node(name, |n| n.drop = on);
    }

    /// While on, UDP answers have TC set and no records; TCP answers are complete.
    pub fn set_truncate_udp(&self, on: bool) {
        self.zone().truncate_udp = on;
    }
}

impl Drop for TestDns {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A UDP socket and a TCP listener on the same ephemeral port (bounded retries).
fn bind_pair(bind: IpAddr) -> (UdpSocket, TcpListener) {
    for _ in 0..32 {
        let udp = UdpSocket::bind((bind, 0)).expect("test dns: bind udp");
        let port = udp.local_addr().expect("test dns: local_addr").port();
        if let Ok(tcp) = TcpListener::bind((bind, port)) {
            return (udp, tcp);
        }
    }
    panic!("test dns: no port free for both UDP and TCP on {bind}");
}

fn udp_loop(shared: &Shared, sock: &UdpSocket) {
    let mut buf = [0u8; 4096];
    while !shared.stop.load(Ordering::SeqCst) {
        let Ok((n, peer)) = sock.recv_from(&mut buf) else {
            continue; // timeout: look at the stop flag again
        };
        if let Some(reply) = answer(shared, &buf[..n], true) {
            let _ = sock.send_to(&reply, peer);
        }
    }
}

fn tcp_loop(shared: &Shared, listener: &TcpListener) {
    while !shared.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => serve_tcp(shared, stream),
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

fn serve_tcp(shared: &Shared, mut stream: TcpStream) {
    if stream.set_nonblocking(false).is_err() || stream.set_read_timeout(Some(POLL)).is_err() {
        return;
    }
    let _ = stream.set_nodelay(true);
    let mut idle = Duration::ZERO;
    let mut messages = 0;
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 4096];
    while messages < TCP_MESSAGES_PER_CONNECTION && idle < TCP_IDLE {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        match stream.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => {
                idle = Duration::ZERO;
                buf.extend_from_slice(&chunk[..n]);
            }
            Err(_) => {
                idle += POLL;
                continue;
            }
        }
        // Whole length-prefixed messages in the buffer (at most 64 KiB + 2 each).
        while buf.len() >= 2 {
            let len = usize::from(u16::from_be_bytes([buf[0], buf[1]]));
            if buf.len() < 2 + len {
                break;
            }
            let msg: Vec<u8> = buf.drain(..2 + len).skip(2).collect();
            messages += 1;
            if let Some(reply) = answer(shared, &msg, false) {
                let Ok(len) = u16::try_from(reply.len()) else {
                    return;
                };
                let mut out = len.to_be_bytes().to_vec();
                out.extend_from_slice(&reply);
                if stream.write_all(&out).is_err() {
                    return;
                }
            }
        }
    }
}

/// The reply bytes for one query, or None (unparseable, or the name is set to drop).
fn answer(shared: &Shared, bytes: &[u8], udp: bool) -> Option<Vec<u8>> {
    shared.queries.fetch_add(1, Ordering::SeqCst);
    let query = Message::from_vec(bytes).ok()?;
    if query.metadata.message_type != MessageType::Query {
        return None;
    }
    let q = query.queries.first()?.clone();
    let qname = q.name().clone();
    let mut reply = Message::response(query.metadata.id, OpCode::Query);
    reply.metadata.recursion_desired = query.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.add_query(q.clone());

    let zone = shared
        .zone
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let ttl = zone.ttl;
    let node = zone.nodes.get(&key(&qname.to_ascii())).cloned();
    let truncate = udp && zone.truncate_udp;
    drop(zone);

    let node = node.unwrap_or_default();
    if node.drop {
        return None;
    }
    if node.servfail {
        reply.metadata.response_code = ResponseCode::ServFail;
        return reply.to_vec().ok();
    }
    if truncate {
        reply.metadata.truncation = true;
        return reply.to_vec().ok();
    }
    // A CNAME chain (bounded): the CNAME records, then the final name's records.
    let mut answers = Vec::new();
    let mut node = node;
    let mut owner = qname.clone();
    let mut authentic = node.authentic;
    for _ in 0..CNAME_HOPS {
        let Some(target) = node.cname.clone() else {
            break;
        };
        if q.query_type() == RecordType::CNAME {
            break;
        }
        let target_name = Name::from_ascii(format!("{target}.")).ok()?;
        answers.push(Record::from_rdata(
            owner.clone(),
            ttl,
            RData::CNAME(CNAME(target_name.clone())),
        ));
        owner = target_name;
        node = shared
            .zone
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .nodes
            .get(&target)
            .cloned()
            .unwrap_or_default();
        authentic &= node.authentic;
        if node.servfail {
            reply.metadata.response_code = ResponseCode::ServFail;
            return reply.to_vec().ok();
        }
    }
    reply.metadata.authentic_data = authentic;
    if !node.exists {
        reply.metadata.response_code = ResponseCode::NXDomain;
        reply.add_answers(answers);
        reply.add_authority(soa(&owner, ttl));
        return reply.to_vec().ok();
    }
    let qname = owner;
    let chained = !answers.is_empty();
    match q.query_type() {
        RecordType::MX => {
            for (pref, host) in &node.mx {
                let exchange = if host.is_empty() {
                    Name::root()
                } else {
                    Name::from_ascii(format!("{host}.")).ok()?
                };
                answers.push(Record::from_rdata(
                    qname.clone(),
                    ttl,
                    RData::MX(MX::new(*pref, exchange)),
                ));
            }
        }
        RecordType::A => {
            for ip in &node.a {
                answers.push(Record::from_rdata(qname.clone(), ttl, RData::A(A(*ip))));
            }
        }
        RecordType::AAAA => {
            for ip in &node.aaaa {
                answers.push(Record::from_rdata(
                    qname.clone(),
                    ttl,
                    RData::AAAA(AAAA(*ip)),
                ));
            }
        }
        RecordType::TXT => {
            for t in &node.txt {
                let parts: Vec<&[u8]> = t.as_bytes().chunks(255).collect();
                answers.push(Record::from_rdata(
                    qname.clone(),
                    ttl,
                    RData::TXT(TXT::from_bytes(parts)),
                ));
            }
        }
        RecordType::TLSA => {
            for (u, s, m, d) in &node.tlsa {
                answers.push(Record::from_rdata(
                    qname.clone(),
                    ttl,
                    RData::TLSA(TLSA::new(
                        CertUsage::from(*u),
                        Selector::from(*s),
                        Matching::from(*m),
                        d.clone(),
                    )),
                ));
            }
        }
        _ => {}
    }
    if answers.is_empty()
        || (chained && answers.iter().all(|r| r.record_type() == RecordType::CNAME))
    {
        reply.add_authority(soa(&qname, ttl));
    }
    reply.add_answers(answers);
    reply.to_vec().ok()
}

fn soa(owner: &Name, ttl: u32) -> Record {
    let mname = Name::from_ascii("ns.test.").unwrap_or_else(|_| Name::root());
    let rname = Name::from_ascii("hostmaster.test.").unwrap_or_else(|_| Name::root());
    Record::from_rdata(
        owner.clone(),
        ttl,
        RData::SOA(SOA::new(mname, rname, 1, 3600, 600, 86400, ttl)),
    )
}
