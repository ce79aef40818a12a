//! The DNS wire format for the resolver: building one query and turning one untrusted answer into a
//! [`Answer`]. Pure (no sockets, no clock); hickory-proto does the byte-level encoding and decoding.
//!
//! Answers are untrusted input: every path returns a value or an error, never panics. Bounds: at most
//! [`limits::DNS_CNAME_HOPS_MAX`] CNAME links are followed inside one answer, at most [`limits::DNS_ANSWER_RECORDS_MAX`] records are
//! kept, TTLs are capped at [`limits::DNS_POSITIVE_TTL_SECONDS_MAX`] / [`limits::DNS_NEGATIVE_TTL_SECONDS_MAX`] seconds.

use std::net::IpAddr;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RData, RecordType};

use crate::limits;

/// The record types the resolver asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum QType {
    Mx,
    A,
    Aaaa,
    /// TXT (MTA-STS's `_mta-sts.<domain>` record).
    Txt,
    /// TLSA (DANE, RFC 6698 / RFC 7672).
    Tlsa,
}

impl QType {
    pub fn record_type(self) -> RecordType {
        match self {
            QType::Mx => RecordType::MX,
            QType::A => RecordType::A,
            QType::Aaaa => RecordType::AAAA,
            QType::Txt => RecordType::TXT,
            QType::Tlsa => RecordType::TLSA,
        }
    }
}

/// One useful record from an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rdata {
    /// An MX record; `exchange` is lower case without the trailing dot ("" for the root, RFC 7505 null MX).
    Mx { preference: u16, exchange: String },
    /// An A or AAAA record.
    Ip(IpAddr),
    /// A TXT record: its character-strings concatenated (RFC 7208 style), invalid UTF-8 replaced.
    Txt(String),
    /// A TLSA record.
    Tlsa(super::TlsaRecord),
    /// Not a record of the asked type: the answer reached its records through a CNAME chain (inside the answer)
    /// and this is the chain's final name (normalized), the owner of those records: the "expanded name" of
    /// RFC 7672 section 2.2.3. First in the list when present; only with at least one record of the asked type.
    Cname(String),
}

/// What one answer says about (name, type), as far as the resolver cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// NOERROR with records of the asked type; `ttl` is the smallest TTL involved (capped).
    Records { records: Vec<Rdata>, ttl: u32 },
    /// NOERROR without records of the asked type; `ttl` is the negative-cache TTL.
    NoData { ttl: u32 },
    /// NXDOMAIN; `ttl` is the negative-cache TTL.
    NxDomain { ttl: u32 },
    /// The TC bit is set: ask again over TCP.
    Truncated,
    /// SERVFAIL, REFUSED, FORMERR, NOTIMP or any other code: try another server, never cache.
    ServerError(String),
}

/// Why an answer was not taken as the answer to our question.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("malformed DNS message: {0}")]
    Malformed(String),
    #[error("DNS message is not the answer to our question")]
    Mismatch,
    #[error("cannot build query: {0}")]
    Build(String),
}

/// A name as the resolver compares and caches it: lower case, no trailing dot.
pub fn normalize(name: &str) -> String {
    let name = name.trim();
    let name = name.strip_suffix('.').unwrap_or(name);
    name.to_ascii_lowercase()
}

/// Parses a (normalized) host name into an absolute DNS name.
pub fn fqdn(name: &str) -> Result<Name, WireError> {
    if name.is_empty() {
        return Err(WireError::Build("empty name".into()));
    }
    let mut n = Name::from_ascii(name).map_err(|e| WireError::Build(format!("{name:?}: {e}")))?;
    n.set_fqdn(true);
    Ok(n)
}

/// Encodes a recursive query for (name, qtype) with message id `id` and an EDNS OPT record.
pub fn build_query(id: u16, name: &Name, qtype: QType) -> Result<Vec<u8>, WireError> {
    build_query_ad(id, name, qtype, false)
}

/// [`build_query`] with the AD bit set when `ad`: RFC 6840 section 5.7, a stub that trusts its resolver asks
/// it to say (AD in the answer) whether the data was validated.
pub fn build_query_ad(id: u16, name: &Name, qtype: QType, ad: bool) -> Result<Vec<u8>, WireError> {
    let mut msg = Message::new(id, MessageType::Query, OpCode::Query);
    msg.metadata.recursion_desired = true;
    msg.metadata.authentic_data = ad;
    msg.add_query(Query::query(name.clone(), qtype.record_type()));
    let mut edns = Edns::new();
    edns.set_max_payload(limits::DNS_EDNS_PAYLOAD_BYTES);
    msg.set_edns(edns);
    msg.to_vec().map_err(|e| WireError::Build(e.to_string()))
}

/// Decodes `bytes` and checks that it answers query `id` for (name, qtype); then classifies it.
/// `Err(Mismatch)` means "not ours" (a UDP caller keeps waiting); `Err(Malformed)` means garbage.
pub fn parse_answer(bytes: &[u8], id: u16, name: &Name, qtype: QType) -> Result<Answer, WireError> {
    parse_answer_ad(bytes, id, name, qtype).map(|(a, _)| a)
}

/// [`parse_answer`], with the answer's AD bit (whether the resolver says it validated the data; meaningful
/// only from a resolver the operator trusts, see `DnsConfig::dnssec`).
pub fn parse_answer_ad(
    bytes: &[u8],
    id: u16,
    name: &Name,
    qtype: QType,
) -> Result<(Answer, bool), WireError> {
    // Cheap id check before decoding everything (a 12-byte header is the minimum).
    if bytes.len() < 12 {
        return Err(WireError::Malformed(format!("{} bytes", bytes.len())));
    }
    if u16::from_be_bytes([bytes[0], bytes[1]]) != id {
        return Err(WireError::Mismatch);
    }
    let msg = Message::from_vec(bytes).map_err(|e| WireError::Malformed(e.to_string()))?;
    let meta = &msg.metadata;
    if meta.id != id || meta.message_type != MessageType::Response || meta.op_code != OpCode::Query
    {
        return Err(WireError::Mismatch);
    }
    // The question must be echoed (RFC 5452 section 9.1); a truncated answer still carries it.
    match msg.queries.as_slice() {
        [q] if q.name().eq_ignore_root(name)
            && q.query_type() == qtype.record_type()
            && q.query_class() == DNSClass::IN => {}
        _ => return Err(WireError::Mismatch),
    }
    let ad = meta.authentic_data;
    if meta.truncation {
        return Ok((Answer::Truncated, false));
    }
    match meta.response_code {
        ResponseCode::NoError => {}
        ResponseCode::NXDomain => {
            return Ok((
                Answer::NxDomain {
                    ttl: negative_ttl(&msg),
                },
                ad,
            ))
        }
        other => return Ok((Answer::ServerError(other.to_string()), false)),
    }
    // Follow the CNAME chain inside the answer section (bounded), collecting the owner names
    // whose records answer our question.
    let mut owners: Vec<&Name> = vec![name];
    let mut ttl = limits::DNS_POSITIVE_TTL_SECONDS_MAX;
    for _ in 0..limits::DNS_CNAME_HOPS_MAX {
        let Some(last) = owners.last().copied() else {
            break;
        };
        let next = msg.answers.iter().find_map(|r| match &r.data {
            RData::CNAME(target) if r.name.eq_ignore_root(last) => Some((r.ttl, &target.0)),
            _ => None,
        });
        match next {
            Some((cname_ttl, target)) if !owners.iter().any(|o| o.eq_ignore_root(target)) => {
                ttl = ttl.min(cname_ttl);
                owners.push(target);
            }
            _ => break,
        }
    }
    let mut records = Vec::new();
    // One slot is kept for the chain's final name (see [`Rdata::Cname`]).
    let expanded = owners.len() > 1;
    let cap = limits::DNS_ANSWER_RECORDS_MAX.saturating_sub(usize::from(expanded));
    for r in &msg.answers {
        if records.len() >= cap {
            break;
        }
        if r.dns_class != DNSClass::IN || !owners.iter().any(|o| o.eq_ignore_root(&r.name)) {
            continue;
        }
        let data = match (&r.data, qtype) {
            (RData::MX(mx), QType::Mx) => Rdata::Mx {
                preference: mx.preference,
                exchange: normalize(&mx.exchange.to_ascii()),
            },
            (RData::A(a), QType::A) => Rdata::Ip(IpAddr::V4(a.0)),
            (RData::AAAA(a), QType::Aaaa) => Rdata::Ip(IpAddr::V6(a.0)),
            (RData::TXT(t), QType::Txt) => {
                let mut bytes = Vec::new();
                for part in t.txt_data.iter() {
                    bytes.extend_from_slice(part);
                }
                Rdata::Txt(String::from_utf8_lossy(&bytes).into_owned())
            }
            (RData::TLSA(t), QType::Tlsa) => Rdata::Tlsa(super::TlsaRecord {
                usage: u8::from(t.cert_usage),
                selector: u8::from(t.selector),
                matching: u8::from(t.matching),
                data: t.cert_data.clone(),
            }),
            _ => continue,
        };
        if !records.contains(&data) {
            records.push(data);
        }
        ttl = ttl.min(r.ttl);
    }
    if expanded && !records.is_empty() {
        if let Some(last) = owners.last() {
            records.insert(0, Rdata::Cname(normalize(&last.to_ascii())));
        }
    }
    if records.is_empty() {
        Ok((
            Answer::NoData {
                ttl: negative_ttl(&msg),
            },
            ad,
        ))
    } else {
        Ok((Answer::Records { records, ttl }, ad))
    }
}

/// RFC 2308 section 5: the negative TTL is min(SOA TTL, SOA MINIMUM) from the authority section,
/// [`limits::DNS_NEGATIVE_TTL_SECONDS_DEFAULT`] without a SOA, capped at [`limits::DNS_NEGATIVE_TTL_SECONDS_MAX`].
fn negative_ttl(msg: &Message) -> u32 {
    msg.authorities
        .iter()
        .find_map(|r| match &r.data {
            RData::SOA(soa) => Some(r.ttl.min(soa.minimum)),
            _ => None,
        })
        .unwrap_or(limits::DNS_NEGATIVE_TTL_SECONDS_DEFAULT)
        .min(limits::DNS_NEGATIVE_TTL_SECONDS_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::rdata::{A, CNAME, MX, SOA};
    use hickory_proto::rr::Record;
    use std::net::Ipv4Addr;

    fn name(s: &str) -> Name {
        fqdn(s).unwrap()
    }

    fn response(id: u16, q: &str, qtype: QType) -> Message {
        let mut m = Message::response(id, OpCode::Query);
        m.add_query(Query::query(name(q), qtype.record_type()));
        m
    }

    #[test]
    fn normalize_names() {
        assert_eq!(normalize("Example.COM."), "example.com");
        assert_eq!(normalize(" mx.example.org "), "mx.example.org");
        assert_eq!(normalize("."), "");
    }

    #[test]
    fn query_round_trip() {
        let bytes = build_query(0x1234, &name("example.com"), QType::Mx).unwrap();
        let m = Message::from_vec(&bytes).unwrap();
        assert_eq!(m.metadata.id, 0x1234);
        assert!(m.metadata.recursion_desired);
        assert_eq!(m.queries[0].query_type(), RecordType::MX);
        assert_eq!(
            m.edns.as_ref().map(|e| e.max_payload()),
            Some(limits::DNS_EDNS_PAYLOAD_BYTES)
        );
    }

    #[test]
    fn mismatches_are_rejected() {
        let n = name("example.com");
        let good = response(7, "example.com", QType::A).to_vec().unwrap();
        assert!(matches!(
            parse_answer(&good, 8, &n, QType::A),
            Err(WireError::Mismatch)
        ));
        assert!(matches!(
            parse_answer(&good, 7, &n, QType::Aaaa),
            Err(WireError::Mismatch)
        ));
        assert!(matches!(
            parse_answer(&good, 7, &name("other.com"), QType::A),
            Err(WireError::Mismatch)
        ));
        // A query (QR=0) is not an answer.
        let mut q = response(7, "example.com", QType::A);
        q.metadata.message_type = MessageType::Query;
        assert!(matches!(
            parse_answer(&q.to_vec().unwrap(), 7, &n, QType::A),
            Err(WireError::Mismatch)
        ));
        // Case and trailing dot do not matter.
        assert_eq!(
            parse_answer(&good, 7, &name("EXAMPLE.com"), QType::A),
            Ok(Answer::NoData {
                ttl: limits::DNS_NEGATIVE_TTL_SECONDS_DEFAULT
            })
        );
    }

    #[test]
    fn classifies_answers() {
        let n = name("example.com");
        let mut m = response(1, "example.com", QType::Mx);
        m.add_answer(Record::from_rdata(
            name("example.com"),
            300,
            RData::MX(MX::new(10, name("MX1.example.com"))),
        ));
        m.add_answer(Record::from_rdata(
            name("example.com"),
            100,
            RData::MX(MX::new(20, Name::root())),
        ));
        // A record of another type is ignored.
        m.add_answer(Record::from_rdata(
            name("example.com"),
            5,
            RData::A(A(Ipv4Addr::LOCALHOST)),
        ));
        let a = parse_answer(&m.to_vec().unwrap(), 1, &n, QType::Mx).unwrap();
        assert_eq!(
            a,
            Answer::Records {
                records: vec![
                    Rdata::Mx {
                        preference: 10,
                        exchange: "mx1.example.com".into()
                    },
                    Rdata::Mx {
                        preference: 20,
                        exchange: "".into()
                    },
                ],
                ttl: 100
            }
        );

        let mut nx = response(2, "example.com", QType::A);
        nx.metadata.response_code = ResponseCode::NXDomain;
        let soa = SOA::new(
            name("ns.example.com"),
            name("h.example.com"),
            1,
            1,
            1,
            1,
            30,
        );
        nx.add_authority(Record::from_rdata(n.clone(), 600, RData::SOA(soa)));
        assert_eq!(
            parse_answer(&nx.to_vec().unwrap(), 2, &n, QType::A),
            Ok(Answer::NxDomain { ttl: 30 })
        );

        let mut sf = response(3, "example.com", QType::A);
        sf.metadata.response_code = ResponseCode::ServFail;
        assert!(matches!(
            parse_answer(&sf.to_vec().unwrap(), 3, &n, QType::A),
            Ok(Answer::ServerError(_))
        ));

        let mut tc = response(4, "example.com", QType::A);
        tc.metadata.truncation = true;
        assert_eq!(
            parse_answer(&tc.to_vec().unwrap(), 4, &n, QType::A),
            Ok(Answer::Truncated)
        );
    }

    #[test]
    fn follows_cnames_within_bounds() {
        let n = name("www.example.com");
        let mut m = response(9, "www.example.com", QType::A);
        m.add_answer(Record::from_rdata(
            n.clone(),
            50,
            RData::CNAME(CNAME(name("host.example.net"))),
        ));
        m.add_answer(Record::from_rdata(
            name("host.example.net"),
            500,
            RData::A(A(Ipv4Addr::new(192, 0, 2, 1))),
        ));
        // An A record for an unrelated owner is ignored.
        m.add_answer(Record::from_rdata(
            name("evil.example"),
            500,
            RData::A(A(Ipv4Addr::new(192, 0, 2, 66))),
        ));
        assert_eq!(
            parse_answer(&m.to_vec().unwrap(), 9, &n, QType::A),
            Ok(Answer::Records {
                records: vec![
                    Rdata::Cname("host.example.net".into()),
                    Rdata::Ip("192.0.2.1".parse().unwrap())
                ],
                ttl: 50
            })
        );
        // A CNAME loop ends without records.
        let mut l = response(10, "a.example", QType::A);
        l.add_answer(Record::from_rdata(
            name("a.example"),
            50,
            RData::CNAME(CNAME(name("b.example"))),
        ));
        l.add_answer(Record::from_rdata(
            name("b.example"),
            50,
            RData::CNAME(CNAME(name("a.example"))),
        ));
        assert!(matches!(
            parse_answer(&l.to_vec().unwrap(), 10, &name("a.example"), QType::A),
            Ok(Answer::NoData { .. })
        ));
    }

    #[test]
    fn txt_tlsa_and_the_ad_bit() {
        use hickory_proto::rr::rdata::tlsa::{CertUsage, Matching, Selector};
        use hickory_proto::rr::rdata::{TLSA, TXT};
        let q = build_query_ad(5, &name("_25._tcp.mx.example"), QType::Tlsa, true).unwrap();
        assert!(Message::from_vec(&q).unwrap().metadata.authentic_data);
        let q = build_query(5, &name("mx.example"), QType::A).unwrap();
        assert!(!Message::from_vec(&q).unwrap().metadata.authentic_data);
        let n = name("_25._tcp.mx.example");
        let mut m = response(5, "_25._tcp.mx.example", QType::Tlsa);
        m.metadata.authentic_data = true;
        m.add_answer(Record::from_rdata(
            n.clone(),
            60,
            RData::TLSA(TLSA::new(
                CertUsage::DaneEe,
                Selector::Spki,
                Matching::Sha256,
                vec![1, 2, 3],
            )),
        ));
        let (a, ad) = parse_answer_ad(&m.to_vec().unwrap(), 5, &n, QType::Tlsa).unwrap();
        assert!(ad);
        assert_eq!(
            a,
            Answer::Records {
                records: vec![Rdata::Tlsa(crate::dns::TlsaRecord {
                    usage: 3,
                    selector: 1,
                    matching: 1,
                    data: vec![1, 2, 3]
                })],
                ttl: 60
            }
        );
        let t = name("_mta-sts.example");
        let mut m = response(6, "_mta-sts.example", QType::Txt);
        m.add_answer(Record::from_rdata(
            t.clone(),
            60,
            RData::TXT(TXT::from_bytes(vec![b"v=STSv1; ", b"id=20260101"])),
        ));
        let (a, ad) = parse_answer_ad(&m.to_vec().unwrap(), 6, &t, QType::Txt).unwrap();
        assert!(!ad);
        assert_eq!(
            a,
            Answer::Records {
                records: vec![Rdata::Txt("v=STSv1; id=20260101".into())],
                ttl: 60
            }
        );
        // A server error never counts as validated.
        let mut sf = response(7, "_mta-sts.example", QType::Txt);
        sf.metadata.authentic_data = true;
        sf.metadata.response_code = ResponseCode::ServFail;
        assert!(matches!(
            parse_answer_ad(&sf.to_vec().unwrap(), 7, &t, QType::Txt),
            Ok((Answer::ServerError(_), false))
        ));
    }

    /// Answers are untrusted: random bytes, random bytes behind a matching header, and every
    /// truncation and single-byte corruption of a valid answer must not panic.
    #[test]
    fn garbage_never_panics() {
        let n = name("example.com");
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for round in 0..20_000u32 {
            let len = (next() % 600) as usize;
            let mut buf: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if round % 2 == 0 && buf.len() >= 12 {
                // Matching id, QR=1, one question: gets past the cheap checks into the decoder.
                buf[0] = 0x12;
                buf[1] = 0x34;
                buf[2] = 0x80 | (buf[2] & 0x07);
                buf[4] = 0;
                buf[5] = 1;
            }
            let _ = parse_answer(&buf, 0x1234, &n, QType::Mx);
            let _ = parse_answer(&buf, 0x1234, &n, QType::A);
            let _ = parse_answer(&buf, 0x1234, &n, QType::Txt);
            let _ = parse_answer(&buf, 0x1234, &n, QType::Tlsa);
        }
        let mut m = response(0x1234, "example.com", QType::Mx);
        for i in 0..4u16 {
            m.add_answer(Record::from_rdata(
                n.clone(),
                300,
                RData::MX(MX::new(i, name("mx.example.com"))),
            ));
        }
        let good = m.to_vec().unwrap();
        for cut in 0..good.len() {
            let _ = parse_answer(&good[..cut], 0x1234, &n, QType::Mx);
        }
        for i in 0..good.len() {
            for v in [0u8, 0xff, 0xc0, 0x3f] {
                let mut bad = good.clone();
                bad[i] = v;
                let _ = parse_answer(&bad, 0x1234, &n, QType::Mx);
            }
        }
    }
}
