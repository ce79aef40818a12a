//! Canonicalisation against RFC 6376 section 3.4.6, RFC 8463's Ed25519 vector, signer choice and which mail
//! is signed.

use super::canon::{header_fields, relaxed_header, BodyHasher};
use super::*;

fn relaxed_headers(data: &[u8]) -> Vec<u8> {
    let (fields, _) = header_fields(data).expect("within the bound");
    let mut out = Vec::new();
    for f in fields {
        relaxed_header(f.raw, &mut out, true);
    }
    out
}

fn body_hash(chunks: &[&[u8]]) -> Vec<u8> {
    let mut h = BodyHasher::new();
    for c in chunks {
        h.update(c);
    }
    h.finish().as_ref().to_vec()
}

fn sha256(b: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, b)
        .as_ref()
        .to_vec()
}

/// RFC 6376 section 3.4.6, the example in its relaxed forms.
#[test]
fn rfc6376_relaxed_example() {
    let msg: &[u8] = b"A: X\r\nB : Y\t\r\n\tZ  \r\n\r\n C \r\nD \t E\r\n\r\n\r\n";
    assert_eq!(relaxed_headers(msg), b"a:X\r\nb:Y Z\r\n".to_vec());
    let (_, body_at) = header_fields(msg).expect("within the bound");
    assert_eq!(&msg[body_at..], b" C \r\nD \t E\r\n\r\n\r\n");
    assert_eq!(
        body_hash(&[&msg[body_at..]]),
        sha256(b" C\r\nD E\r\n"),
        "relaxed body: WSP reduced, trailing WSP and empty lines dropped"
    );
}

#[test]
fn relaxed_body_edge_cases_in_any_chunking() {
    let cases: [(&[u8], &[u8]); 7] = [
        (b"", b""),
        (b"\r\n\r\n", b""),
        (b"  \t\r\n", b""),
        (b"x", b"x\r\n"),
        (b"a  b\t\r\n\r\n c\r\n \r\n", b"a b\r\n\r\n c\r\n"),
        (b"a\rb\r\n", b"a\rb\r\n"),
        (b"\xc3\xa9t\xc3\xa9 \r\n", b"\xc3\xa9t\xc3\xa9\r\n"),
    ];
    for (input, canonical) in cases {
        let want = sha256(canonical);
        assert_eq!(body_hash(&[input]), want, "{input:?}");
        // Fed a byte at a time: a CR at a chunk's end waits for its LF.
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(body_hash(&bytes), want, "{input:?} byte by byte");
    }
}

#[test]
fn header_fields_end_at_the_empty_line_and_keep_folding() {
    let msg = b"Subject: a\r\n b\r\nTo: x\r\n\r\nbody: not a header\r\n";
    let (f, at) = header_fields(msg).expect("within the bound");
    assert_eq!(f.len(), 2);
    assert_eq!(f[0].name, b"Subject");
    assert_eq!(f[0].raw, b"Subject: a\r\n b\r\n");
    assert_eq!(&msg[at..], b"body: not a header\r\n");
    // No body at all.
    let (f, at) = header_fields(b"Subject: only\r\n").expect("within the bound");
    assert_eq!((f.len(), at), (1, 15));
}

const RFC8463_MESSAGE: &[u8] = b"From: Joe SixPack <joe@football.example.com>\r\n\
To: Suzie Q <suzie@shopping.example.net>\r\n\
Subject: Is dinner ready?\r\n\
Date: Fri, 11 Jul 2003 21:00:37 -0700 (PDT)\r\n\
Message-ID: <20030712040037.46341.5F8J@football.example.com>\r\n\
\r\n\
Hi.\r\n\
\r\n\
We lost the game.  Are you hungry yet?\r\n\
\r\n\
Joe.\r\n";

/// RFC 8463 appendix A: the body hash and the Ed25519 signature, reproduced with ring from the published key.
#[test]
fn rfc8463_ed25519_vector() {
    let b64 = &base64::engine::general_purpose::STANDARD;
    let (fields, body_at) = header_fields(RFC8463_MESSAGE).expect("within the bound");
    let bh = b64.encode(body_hash(&[&RFC8463_MESSAGE[body_at..]]));
    assert_eq!(bh, "2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=");
    let sig_field = b"DKIM-Signature: v=1; a=ed25519-sha256; c=relaxed/relaxed;\r\n \
d=football.example.com; i=@football.example.com;\r\n \
q=dns/txt; s=brisbane; t=1528637909; h=from : to :\r\n \
subject : date : message-id : from : subject : date;\r\n \
bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=;\r\n \
b=";
    let mut input = Vec::new();
    for name in ["from", "to", "subject", "date", "message-id"] {
        let f = fields
            .iter()
            .find(|f| f.name.eq_ignore_ascii_case(name.as_bytes()))
            .unwrap();
        relaxed_header(f.raw, &mut input, true);
    }
    relaxed_header(sig_field, &mut input, false);
    let seed = b64
        .decode("nWGxne/9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A=")
        .unwrap();
    let public = b64
        .decode("11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=")
        .unwrap();
    let kp = ring::signature::Ed25519KeyPair::from_seed_and_public_key(&seed, &public).unwrap();
    let key = SigningKey::Ed25519(Arc::new(kp));
    assert_eq!(
        b64.encode(key.sign(&input).unwrap()),
        "/gCrinpcQOoIfuHNQIbq4pgh9kyIK3AQUdt9OdqQehSwhEIug4D11BusFa3bT3FY5OsU7ZbnKELq+eXdp1Q1Dw=="
    );
    assert_eq!(
        key.dns_record_value(),
        "v=DKIM1; k=ed25519; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="
    );
}

fn rfc8463_dkim(domain: &str) -> Dkim {
    let b64 = &base64::engine::general_purpose::STANDARD;
    let seed = b64
        .decode("nWGxne/9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A=")
        .unwrap();
    let public = b64
        .decode("11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=")
        .unwrap();
    let kp = ring::signature::Ed25519KeyPair::from_seed_and_public_key(&seed, &public).unwrap();
    let mut by_domain = HashMap::new();
    by_domain.insert(
        domain.to_string(),
        vec![Arc::new(Signer {
            domain: domain.into(),
            selector: "brisbane".into(),
            key: SigningKey::Ed25519(Arc::new(kp)),
            headers: DEFAULT_SIGNED_HEADERS
                .iter()
                .map(|s| s.to_string())
                .collect(),
        })],
    );
    Dkim { by_domain }
}

#[test]
fn the_signature_field_names_present_headers_and_oversigns_from() {
    let dkim = rfc8463_dkim("shopping.example.net");
    assert!(
        dkim.prepare(RFC8463_MESSAGE, 1).is_none(),
        "only the From: domain counts"
    );
    let dkim = rfc8463_dkim("football.example.com");
    let sig = dkim.sign_now(RFC8463_MESSAGE, 1528637909).unwrap().unwrap();
    let text = String::from_utf8(sig).unwrap();
    assert!(
        text.starts_with("DKIM-Signature: v=1; a=ed25519-sha256; c=relaxed/relaxed;\r\n\td=football.example.com; s=brisbane;\r\n"),
        "{text}"
    );
    let unfolded = text.replace("\r\n\t", "");
    assert!(
        unfolded.contains("h=from:to:subject:date:message-id:from;"),
        "{text}"
    );
    assert!(unfolded.contains("bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=;"));
    assert!(text.lines().all(|l| l.len() <= 80), "{text}");
    assert!(text.ends_with("\r\n") && !text[..text.len() - 2].contains("\r\n\r\n"));
    // The signature verifies over the input a verifier builds from the emitted field (its b= emptied).
    let b64 = &base64::engine::general_purpose::STANDARD;
    let b_val = &unfolded[unfolded.rfind("b=").unwrap() + 2..];
    let sig = b64.decode(b_val.trim_end()).unwrap();
    let b_at = &text[..text.rfind("b=").unwrap() + 2];
    let (fields, _) = header_fields(RFC8463_MESSAGE).expect("within the bound");
    let mut input = Vec::new();
    for name in ["from", "to", "subject", "date", "message-id"] {
        let f = fields
            .iter()
            .find(|f| f.name.eq_ignore_ascii_case(name.as_bytes()))
            .unwrap();
        relaxed_header(f.raw, &mut input, true);
    }
    relaxed_header(b_at.as_bytes(), &mut input, false);
    let public = b64
        .decode("11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=")
        .unwrap();
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, &public)
        .verify(sha256(&input).as_ref(), &sig)
        .expect("verifies");
}

#[test]
fn signers_are_the_from_domains_or_its_nearest_parents() {
    let dkim = rfc8463_dkim("example.com");
    assert!(dkim.signers_for("example.com").is_some());
    assert!(dkim.signers_for("mail.sub.example.com").is_some());
    assert!(dkim.signers_for("badexample.com").is_none());
    assert!(dkim.signers_for("com").is_none());
    let msg = |from: &str| format!("From: {from}\r\nSubject: x\r\n\r\nbody\r\n");
    assert!(dkim
        .prepare(msg("a@mail.example.com").as_bytes(), 1)
        .is_some());
    assert!(dkim.prepare(msg("a@other.test").as_bytes(), 1).is_none());
    assert!(dkim.prepare(b"Subject: no from\r\n\r\nx\r\n", 1).is_none());
    let two = "From: a@example.com\r\nFrom: b@example.com\r\n\r\nx\r\n";
    assert!(
        dkim.prepare(two.as_bytes(), 1).is_none(),
        "two From: fields"
    );
    assert!(Dkim::empty()
        .prepare(msg("a@example.com").as_bytes(), 1)
        .is_none());
}

#[test]
fn from_domains() {
    let d = |v: &str| from_domain(format!("From:{v}\r\n").as_bytes());
    assert_eq!(
        d(" Joe <joe@Football.Example.COM.>").as_deref(),
        Some("football.example.com")
    );
    assert_eq!(d(" joe@example.com (Joe)").as_deref(), Some("example.com"));
    assert_eq!(
        d(" \"a@evil.test, x\" <joe@example.com>").as_deref(),
        Some("example.com")
    );
    assert_eq!(
        d(" (c@evil.test) joe@example.com").as_deref(),
        Some("example.com")
    );
    assert_eq!(
        d("\r\n\tJoe\r\n <joe@example.com>").as_deref(),
        Some("example.com")
    );
    assert_eq!(
        d(" =?utf-8?q?J=C3=B6?= <j@example.com>").as_deref(),
        Some("example.com")
    );
    assert_eq!(d(" a@example.com, b@example.org"), None);
    assert_eq!(d(" undisclosed-recipients:;"), None);
    assert_eq!(d(" joe@[192.0.2.1]"), None);
    assert_eq!(d(" <joe@example.com"), None);
    assert_eq!(d(" nobody"), None);
    assert_eq!(d(" <a@x.test> <b@y.test>"), None);
}

#[test]
fn which_mail_is_signed() {
    assert!(should_sign(Origin::Trusted, false));
    assert!(should_sign(Origin::Injected, false));
    assert!(!should_sign(Origin::Outsider { all_relayed: true }, false));
    assert!(should_sign(Origin::Outsider { all_relayed: true }, true));
    assert!(!should_sign(Origin::Outsider { all_relayed: false }, true));
}

#[test]
fn bad_dkim_entries_are_problems_of_the_configuration() {
    let parse = |t: &str| Config::parse(t, std::path::Path::new("t.toml"));
    let entry = |d: &str, s: &str, extra: &str| {
        format!("[[dkim]]\ndomain = \"{d}\"\nselector = \"{s}\"\nprivate_key_file = \"/k.pem\"\n{extra}\n")
    };
    let ok = parse(&format!(
        "dkim_sign_relayed = true\n{}{}",
        entry("Example.COM.", "s2026", ""),
        entry(
            "example.com",
            "ed",
            "headers = [\"Subject\", \"X-Campaign\"]"
        )
    ))
    .unwrap();
    assert!(ok.dkim_sign_relayed);
    assert_eq!(ok.dkim.len(), 2);
    // It prints and reads back the same.
    assert_eq!(parse(&ok.to_toml()).unwrap(), ok);
    for (text, says) in [
        (entry("localhost", "s", ""), "not a domain name"),
        (entry("[192.0.2.1]", "s", ""), "not a domain name"),
        (entry("example.com", "bad selector", ""), "selector"),
        (entry("example.com", "", ""), "selector"),
        (
            format!(
                "{}{}",
                entry("example.com", "s", ""),
                entry("EXAMPLE.com", "s", "")
            ),
            "listed twice",
        ),
        (
            entry("example.com", "s", "headers = [\"Subject:\"]"),
            "not a header field name",
        ),
        (entry("example.com", "s", "colour = 1"), "unknown field"),
    ] {
        let e = parse(&text).unwrap_err().to_string();
        assert!(e.contains(says), "{text}: {e}");
    }
}

#[test]
fn a_key_that_cannot_be_read_names_its_entry_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.pem");
    std::fs::write(&good, key::generate_pem(KeyAlgorithm::Ed25519).unwrap()).unwrap();
    let cfg = |path: &std::path::Path| Config {
        dkim: vec![crate::config::DkimKeyConfig {
            domain: "Example.com".into(),
            selector: "s1".into(),
            private_key_file: path.into(),
            headers: Some(vec!["Subject".into()]),
        }],
        ..Config::default()
    };
    let d = Dkim::load(&cfg(&good)).unwrap();
    let s = &d.signers_for("example.com").unwrap()[0];
    assert_eq!(s.headers, ["from", "subject"], "From is always signed");
    let e = Dkim::load(&cfg(&dir.path().join("gone.pem"))).unwrap_err();
    assert_eq!(e.len(), 1);
    assert!(
        e[0].contains("selector s1") && e[0].contains("gone.pem"),
        "{e:?}"
    );
}

/// RFC 6376 section 3.4.4 written the plain way: lines split at CRLF, each line's WSP runs made one SP and its
/// trailing WSP removed, empty lines at the end removed, CRLF after the last line.
fn reference_relaxed_body(body: &[u8]) -> Vec<u8> {
    let mut lines: Vec<Vec<u8>> = Vec::new();
    let mut rest = body;
    while !rest.is_empty() {
        let (line, next) = match memchr::memmem::find(rest, b"\r\n") {
            Some(i) => (&rest[..i], &rest[i + 2..]),
            None => (rest, &rest[rest.len()..]),
        };
        let mut out = Vec::new();
        let mut wsp = false;
        for &b in line {
            if b == b' ' || b == b'\t' {
                wsp = true;
            } else {
                if wsp {
                    out.push(b' ');
                }
                wsp = false;
                out.push(b);
            }
        }
        lines.push(out);
        rest = next;
    }
    while lines.last().is_some_and(|l| l.is_empty()) {
        lines.pop();
    }
    let mut out = Vec::new();
    for l in lines {
        out.extend_from_slice(&l);
        out.extend_from_slice(b"\r\n");
    }
    out
}

#[test]
fn the_streamed_body_hash_matches_the_plain_reading_in_any_slicing() {
    let alphabet: &[&[u8]] = &[
        b"a",
        b"xyz",
        b" ",
        b"\t",
        b"\r\n",
        b"\r",
        b"\r\n\r\n",
        b"  \t ",
    ];
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for _ in 0..2000 {
        let mut body = Vec::new();
        for _ in 0..(next() % 40) {
            body.extend_from_slice(alphabet[(next() % alphabet.len() as u64) as usize]);
        }
        let want = sha256(&reference_relaxed_body(&body));
        let mut h = BodyHasher::new();
        let mut rest = &body[..];
        while !rest.is_empty() {
            let n = 1 + (next() as usize % rest.len().min(7));
            h.update(&rest[..n]);
            rest = &rest[n..];
        }
        assert_eq!(
            h.finish().as_ref(),
            &want[..],
            "{:?}",
            String::from_utf8_lossy(&body)
        );
    }
}

#[test]
fn hostile_header_bytes_never_panic_and_fields_stay_within_the_message() {
    let pieces: &[&[u8]] = &[
        b"From:",
        b"from : ",
        b"<",
        b">",
        b"\"",
        b"(",
        b")",
        b"\\",
        b"@",
        b"a",
        b".",
        b",",
        b";",
        b"\r\n",
        b"\r\n ",
        b"\r",
        b"\n",
        b"\t",
        b" ",
        b"\xff",
        b":",
        b"\r\n\r\n",
        b"x@ed.example",
    ];
    let dkim = rfc8463_dkim("example");
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..5000 {
        let mut m = Vec::new();
        for _ in 0..(seed % 30) {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            m.extend_from_slice(pieces[(seed % pieces.len() as u64) as usize]);
        }
        let (fields, body_at) = header_fields(&m).expect("within the bound");
        assert!(body_at <= m.len());
        let mut covered = 0;
        for f in &fields {
            assert!(!f.name.is_empty() && f.raw.len() > f.name.len());
            covered += f.raw.len();
            let _ = from_domain(f.raw);
        }
        assert!(covered <= body_at);
        let _ = dkim.sign_now(&m, 1);
    }
}

/// The header-field bound: exactly HEADER_FIELDS_MAX fields is read whole (the body starts after the empty line,
/// not at the next blank line inside the body); one more and the message is not signed at all, rather than
/// signed over a part of its header section that a verifier would not take.
#[test]
fn the_header_field_bound_is_exact_and_past_it_nothing_is_signed() {
    let dkim = rfc8463_dkim("football.example.com");
    let message = |fields: usize| {
        let mut m = b"From: Joe <joe@football.example.com>\r\n".to_vec();
        for i in 1..fields {
            m.extend_from_slice(format!("X-F{i}: v\r\n").as_bytes());
        }
        m.extend_from_slice(b"\r\nl1\r\n\r\nl3\r\n");
        m
    };
    let m = message(super::canon::HEADER_FIELDS_MAX);
    let (fields, body_at) = header_fields(&m).expect("within the bound");
    assert_eq!(fields.len(), super::canon::HEADER_FIELDS_MAX);
    assert_eq!(&m[body_at..], b"l1\r\n\r\nl3\r\n");
    assert!(dkim.sign_now(&m, 1).is_some());
    let m = message(super::canon::HEADER_FIELDS_MAX + 1);
    assert!(header_fields(&m).is_none());
    assert!(dkim.select(&m).is_none(), "not signed");
    assert!(dkim.sign_now(&m, 1).is_none());
}
