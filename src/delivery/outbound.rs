//! One outbound SMTP connection over glommio (plaintext, STARTTLS or implicit TLS): a socket pump driving the
//! sans-IO [`ClientSession`]. This module owns the socket, the TLS handshake (the session only says
//! [`Event::NeedTls`]), sleeping until the session's deadlines, and turning the session's events into one
//! [`RcptResult`] per recipient through the one classifier, [`Trouble`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;

use super::tls_rpt::TlsResult;
use super::trouble::{Scope, Trouble};
use super::{JobRcpt, RcptResult};
use crate::config::TlsLevel;
use crate::net::ClientConn;
use crate::queue::MessageBody;
use crate::smtp::client::{Capabilities, ServerReply};
use crate::smtp::client_session::{
    ClientSession, Event, Params, Phase, SessionError, Timeouts, TlsMode, Transaction,
};
use crate::smtp::reply_parser::EnhancedCode;

/// Longest wait when the session has no deadline of its own (it always has one while it waits for the server).
const FALLBACK_WAIT: Duration = Duration::from_secs(300);

/// rustls client configurations: one that checks certificates (level `verify`) and one that does not
/// (`may`/`encrypt`: opportunistic TLS authenticates nobody, as in Postfix).
#[derive(Clone)]
pub struct ClientTls {
    pub unverified: Arc<rustls::ClientConfig>,
    pub verified: Result<Arc<rustls::ClientConfig>, String>,
}

impl ClientTls {
    pub fn new(ca_file: Option<&std::path::Path>) -> ClientTls {
        crate::tls::install_crypto_provider();
        let unverified = Arc::new(
            rustls::ClientConfig::builder()
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerify))
                .with_no_client_auth(),
        );
        let path = ca_file.unwrap_or(std::path::Path::new("/etc/ssl/certs/ca-certificates.crt"));
        let verified = (|| {
            let pem = std::fs::read(path)
                .map_err(|e| format!("cannot read CA file {}: {e}", path.display()))?;
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls_pemfile::certs(&mut pem.as_slice()).flatten() {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(format!("no CA certificates in {}", path.display()));
            }
            Ok(Arc::new(
                rustls::ClientConfig::builder()
                    .with_root_certificates(roots)
                    .with_no_client_auth(),
            ))
        })();
        ClientTls {
            unverified,
            verified,
        }
    }
}

/// Accepts any server certificate: opportunistic TLS (`may`, `encrypt`) authenticates nobody, as in Postfix.
#[derive(Debug)]
pub struct NoVerify;

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// How to set up a connection.
pub struct ConnectParams<'a> {
    pub helo: &'a str,
    pub tls_level: TlsLevel,
    pub tls: &'a ClientTls,
    /// AUTH credentials (relayhost); sent only over TLS.
    pub sasl: Option<(&'a str, &'a str)>,
    /// TLS from the first byte (port 465 style).
    pub wrapper: bool,
    pub timeouts: Timeouts,
    /// Most transactions pipelined at once (`delivery.smtp_transaction_pipelining_limit`), when the server
    /// offers PIPELINING.
    pub transactions_at_once: usize,
    /// The client configuration of a security policy (DANE, MTA-STS) for this host, instead of the level's.
    pub tls_config: Option<Arc<rustls::ClientConfig>>,
    /// The name of the TLS policy applied, for the delivery log (`may`, `dane`, `mta-sts-enforce`, ...).
    pub tls_policy: &'static str,
    /// The egress source to bind to (`crate::egress`); None: the kernel picks the address.
    pub source: Option<&'a std::rc::Rc<crate::egress::Source>>,
}

/// Why a host could not be used; the caller moves on to the next host or defers.
#[derive(Debug)]
pub enum HostError {
    /// The TLS handshake failed (opportunistic TLS retries in plaintext), with its TLS-RPT result type.
    TlsFailed(Trouble, TlsResult),
    /// Anything else: connect, greeting, EHLO, STARTTLS, AUTH, TLS required (`starttls-not-supported`).
    Other(Trouble, Option<TlsResult>),
    /// The egress source's address cannot be bound (not an address of this host): no host can be reached
    /// from it.
    SourceUnusable(Trouble),
}

impl HostError {
    pub fn trouble(&self) -> &Trouble {
        match self {
            HostError::TlsFailed(t, _) | HostError::Other(t, _) | HostError::SourceUnusable(t) => t,
        }
    }

    /// The TLS-RPT result type of the failure, when TLS had a part in it.
    pub fn tls_result(&self) -> Option<TlsResult> {
        match self {
            HostError::TlsFailed(_, r) => Some(*r),
            HostError::Other(_, r) => *r,
            HostError::SourceUnusable(_) => None,
        }
    }
}

/// One message for [`Connection::send_all`].
pub struct OutboundMessage<'a> {
    pub sender: &'a str,
    pub rcpts: &'a [JobRcpt],
    pub body: &'a MessageBody,
    pub eight_bit: bool,
    pub smtputf8: bool,
    pub ret: Option<crate::smtp::dsn::Ret>,
    pub envid: Option<&'a str>,
}

impl OutboundMessage<'_> {
    /// The SIZE= value: the Received header we add and the stored message.
    fn size(&self) -> u64 {
        self.body.size()
    }
}

/// What became of one message of [`Connection::send_all`].
#[derive(Debug)]
pub struct TransactionOutcome {
    /// One result per recipient, in order.
    pub results: Vec<RcptResult>,
    /// The session failed after the server took DATA (354) for this message (sending the content or waiting
    /// for its reply), or while this message waited behind the one that did: the message's trouble (a
    /// receiver choking on it), not the destination's.
    pub failed_in_data: bool,
    /// What ended the session (a 421, a lost connection, a timeout) cut this message's transaction short.
    pub cut_short: bool,
}

pub struct Connection {
    stream: ClientConn,
    session: ClientSession,
    pub caps: Capabilities,
    pub host: String,
    pub addr: SocketAddr,
    /// `TLSv1.3 TLS13_AES_256_GCM_SHA384` once TLS is on.
    pub tls: Option<String>,
    /// Messages sent over this connection.
    pub messages: u32,
    /// The TLS policy applied to this connection (see [`ConnectParams::tls_policy`]).
    pub tls_policy: &'static str,
    /// What the policy would have refused, in MTA-STS `testing` mode (delivery went on).
    pub tls_note: Option<String>,
    /// The egress source the connection is bound to, if any.
    pub source: Option<std::rc::Rc<crate::egress::Source>>,
    /// Counts the connection in its shard's open outbound connections while it lives.
    _open: crate::shard::stats::OutboundConnection,
}

fn tls_desc(c: &rustls::ClientConnection) -> String {
    let v = match c.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
        _ => "TLS",
    };
    let suite = c
        .negotiated_cipher_suite()
        .map(|s| format!("{:?}", s.suite()))
        .unwrap_or_default();
    format!("{v} {suite}")
}

fn session_params(p: &ConnectParams<'_>) -> Params {
    let tls = if p.wrapper {
        TlsMode::Implicit
    } else {
        match p.tls_level {
            TlsLevel::None => TlsMode::Off,
            TlsLevel::May | TlsLevel::Dane => TlsMode::Opportunistic,
            TlsLevel::Encrypt | TlsLevel::Verify | TlsLevel::DaneOnly => TlsMode::Required,
        }
    };
    Params {
        helo: p.helo.to_string(),
        tls,
        auth: p.sasl.map(|(u, w)| (u.to_string(), w.to_string())),
        auth_requires_tls: true,
        pipelining: true,
        chunking: false,
        max_in_flight: p
            .transactions_at_once
            .clamp(1, crate::limits::SMTP_TRANSACTIONS_IN_FLIGHT_MAX),
        timeouts: p.timeouts,
    }
}

impl Connection {
    /// Connects to one address of `host` and gets the session ready for MAIL.
    pub async fn open(
        host: &str,
        addr: SocketAddr,
        p: &ConnectParams<'_>,
    ) -> Result<Connection, HostError> {
        let session = ClientSession::new(session_params(p), Instant::now());
        let tcp = match p.source {
            None => TcpStream::connect_timeout(addr, p.timeouts.connect)
                .await
                .map_err(|e| HostError::Other(Trouble::connect(&e.to_string()), None))?,
            Some(src) => crate::egress::connect_from(src.addr, addr, p.timeouts.connect)
                .await
                .map_err(|e| {
                    let t =
                        Trouble::connect(&format!("from source {} ({}): {e}", src.name, src.addr));
                    if e.source_unusable() {
                        HostError::SourceUnusable(t)
                    } else {
                        HostError::Other(t, None)
                    }
                })?,
        };
        tcp.set_nodelay(true)
            .map_err(|e| HostError::Other(Trouble::connect(&e.to_string()), None))?;
        let mut c = Connection {
            stream: ClientConn::Plain(tcp),
            session,
            caps: Capabilities::default(),
            host: host.to_string(),
            addr,
            tls: None,
            messages: 0,
            tls_policy: p.tls_policy,
            tls_note: None,
            source: p.source.cloned(),
            _open: crate::shard::stats::OutboundConnection::open(),
        };
        if p.wrapper {
            c.start_tls(p, host).await?;
        }
        c.session.connected(Instant::now());
        loop {
            match c.step().await {
                Ok(Event::Ready { caps, .. }) => {
                    c.caps = caps;
                    return Ok(c);
                }
                Ok(Event::NeedTls) => {
                    c.start_tls(p, host).await?;
                    c.session.tls_established(Instant::now());
                }
                Ok(Event::Failed(e)) => {
                    // TLS required and STARTTLS not offered, or refused.
                    let starttls = matches!(e, SessionError::TlsRequired)
                        || matches!(
                            e,
                            SessionError::Refused {
                                phase: Phase::StartTls,
                                ..
                            }
                        );
                    let result = starttls.then_some(TlsResult::StarttlsNotSupported);
                    return Err(HostError::Other(Trouble::session(&e, host), result));
                }
                Ok(_) => {}
                Err(t) => return Err(HostError::Other(t, None)),
            }
        }
    }

    async fn start_tls(&mut self, p: &ConnectParams<'_>, host: &str) -> Result<(), HostError> {
        let cfg = if let Some(cfg) = &p.tls_config {
            cfg.clone()
        } else if p.tls_level == TlsLevel::Verify {
            p.tls
                .verified
                .clone()
                .map_err(|e| HostError::TlsFailed(Trouble::tls(&e), TlsResult::ValidationFailure))?
        } else {
            p.tls.unverified.clone()
        };
        let name = rustls::pki_types::ServerName::try_from(host.to_string()).map_err(|e| {
            HostError::TlsFailed(Trouble::tls(&e.to_string()), TlsResult::ValidationFailure)
        })?;
        let Some(tcp) = self.stream.take_plain() else {
            return Err(HostError::TlsFailed(
                Trouble::tls("TLS already on"),
                TlsResult::ValidationFailure,
            ));
        };
        let hs = futures_rustls::TlsConnector::from(cfg).connect(name, tcp);
        let tls = glommio::timer::timeout(p.timeouts.starttls, async {
            hs.await.map_err(glommio::GlommioError::from)
        })
        .await
        .map_err(|e| {
            let result = match &e {
                glommio::GlommioError::IoError(io) => {
                    super::tls_rpt::of_handshake_error(p.tls_policy, io)
                }
                _ => TlsResult::ValidationFailure,
            };
            HostError::TlsFailed(Trouble::tls(&e.to_string()), result)
        })?;
        self.tls = Some(tls_desc(tls.get_ref().1));
        self.stream = ClientConn::Tls(Box::new(tls));
        Ok(())
    }

    /// Writes what the session has to send and reads until it has an event. `Err`: the socket failed (the
    /// session's own failures, timeouts included, come as [`Event::Failed`]).
    async fn step(&mut self) -> Result<Event, Trouble> {
        loop {
            if let Some(e) = self.session.poll_event() {
                return Ok(e);
            }
            let wait = |s: &ClientSession| {
                s.poll_timeout().map_or(FALLBACK_WAIT, |d| {
                    d.saturating_duration_since(Instant::now())
                })
            };
            if let Some(bytes) = self.session.poll_transmit() {
                let n = bytes.len();
                let stream = &mut self.stream;
                let written = glommio::timer::timeout(wait(&self.session), async {
                    stream
                        .write_all(bytes)
                        .await
                        .map_err(glommio::GlommioError::from)?;
                    stream.flush().await.map_err(glommio::GlommioError::from)?;
                    Ok(())
                })
                .await;
                match written {
                    Ok(()) => self.session.advance_transmit(n, Instant::now()),
                    Err(glommio::GlommioError::TimedOut(_)) => {
                        self.session.handle_timeout(Instant::now())
                    }
                    Err(e) => return Err(self.lost(&e.to_string())),
                }
                continue;
            }
            if self.session.is_closed() {
                return Ok(Event::Closed);
            }
            if self.session.poll_timeout().is_none() {
                // Idle: nothing to wait for.
                return Err(self.lost("no reply awaited"));
            }
            let t = wait(&self.session);
            let (session, stream) = (&mut self.session, &mut self.stream);
            let buf = session.input_buffer();
            if buf.is_empty() {
                session.input_filled(0, Instant::now());
                continue;
            }
            let read = glommio::timer::timeout(t, async {
                stream.read(buf).await.map_err(glommio::GlommioError::from)
            })
            .await;
            match read {
                Ok(0) => self.session.handle_eof(),
                Ok(n) => self.session.input_filled(n, Instant::now()),
                Err(glommio::GlommioError::TimedOut(_)) => {
                    self.session.handle_timeout(Instant::now())
                }
                Err(e) => return Err(self.lost(&e.to_string())),
            }
        }
    }

    fn lost(&self, why: &str) -> Trouble {
        Trouble::lost(self.session.phase(), &self.host, why)
    }

    /// How many transactions this connection takes at once: [`ConnectParams::transactions_at_once`] when the
    /// server offers PIPELINING, else 1.
    pub fn transactions_at_once(&self) -> usize {
        self.session.transactions_at_once()
    }

    /// Why a message cannot go to this server at all (SIZE, 8BITMIME, SMTPUTF8): it is bounced, never
    /// downgraded (RFC 6152/6531: no silent downgrade of content we cannot convert).
    fn refusal(&self, m: &OutboundMessage<'_>) -> Option<Trouble> {
        let size = m.size();
        if let Some(limit) = self.caps.size.filter(|&l| l > 0 && size > l) {
            Some(Trouble::unsendable(
                552,
                EnhancedCode::new(5, 3, 4),
                format!(
                    "message size {size} exceeds {}'s limit of {limit}",
                    self.host
                ),
            ))
        } else if m.smtputf8 && !self.caps.smtputf8 {
            Some(Trouble::unsendable(
                553,
                EnhancedCode::new(5, 6, 7),
                format!("{} does not support SMTPUTF8", self.host),
            ))
        } else if m.eight_bit && !self.caps.eight_bit_mime {
            Some(Trouble::unsendable(
                554,
                EnhancedCode::new(5, 6, 3),
                format!("{} does not support 8BITMIME", self.host),
            ))
        } else {
            None
        }
    }

    /// Sends `msgs`, each to its recipients, with the message's DSN `RET=`/`ENVID=` and the recipients'
    /// `NOTIFY=`/`ORCPT=` passed on when the server offers DSN. More than one message only up to
    /// [`Self::transactions_at_once`]: their transactions are pipelined (the next one's commands go with the
    /// content before them). Returns one [`TransactionOutcome`] per message, in order, and whether the connection can
    /// carry another message. A message the server cannot take (SIZE, 8BITMIME, SMTPUTF8) is bounced without a
    /// transaction.
    pub async fn send_all(
        &mut self,
        msgs: &[OutboundMessage<'_>],
    ) -> (Vec<TransactionOutcome>, bool) {
        debug_assert!(!msgs.is_empty() && msgs.len() <= self.session.transactions_at_once());
        /// One message's replies while its transaction is on the wire.
        struct Slot {
            txn: Option<crate::smtp::client_session::TxnId>,
            refused: Vec<Option<RcptResult>>,
            /// The reply that decides for the recipients not refused one by one.
            decisive: Option<(Phase, ServerReply)>,
            done: bool,
            /// What ended the session hit this message before its transaction was done.
            hit: bool,
            settled: Option<Vec<RcptResult>>,
        }
        let mut slots: Vec<Slot> = Vec::with_capacity(msgs.len());
        let mut trouble: Option<Trouble> = None;
        let mut pending = 0usize;
        for m in msgs {
            let mut slot = Slot {
                txn: None,
                refused: vec![None; m.rcpts.len()],
                decisive: None,
                done: false,
                hit: false,
                settled: None,
            };
            if let Some(t) = self.refusal(m) {
                slot.done = true;
                slot.settled = Some(vec![t.rcpt_result(); m.rcpts.len()]);
                slots.push(slot);
                continue;
            }
            if trouble.is_some() {
                // A transaction before this one could not start: this one is not tried either.
                slot.hit = true;
                slots.push(slot);
                continue;
            }
            let addrs: Vec<&str> = m.rcpts.iter().map(|r| r.address.as_str()).collect();
            let txn = Transaction {
                sender: m.sender,
                recipients: &addrs,
                body: &[m.body.received(), m.body.data()],
                size: m.size(),
                eight_bit: m.eight_bit,
                smtputf8: m.smtputf8,
                wire: false,
                external: 0,
            };
            let rcpt_dsn: Vec<crate::smtp::dsn::RcptDsn> =
                if m.rcpts.iter().all(|r| r.dsn.is_empty()) {
                    Vec::new()
                } else {
                    m.rcpts.iter().map(|r| r.dsn.clone()).collect()
                };
            let opts = crate::smtp::client_session::TxnOptions {
                ret: m.ret,
                envid: m.envid,
                rcpt_dsn: &rcpt_dsn,
                verify_only: false,
            };
            match self
                .session
                .start_transaction_with(&txn, &opts, Instant::now())
            {
                Ok(id) => {
                    self.messages += 1;
                    slot.txn = Some(id);
                    pending += 1;
                }
                Err(e) => {
                    trouble = Some(Trouble::lost(Phase::Mail, &self.host, &e.to_string()));
                    slot.hit = true;
                }
            }
            slots.push(slot);
        }
        let slot_of = |slots: &mut [Slot], id| slots.iter_mut().position(|s| s.txn == Some(id));
        while pending > 0 {
            let ev = match self.step().await {
                Ok(ev) => ev,
                Err(t) => {
                    trouble = Some(t);
                    break;
                }
            };
            match ev {
                Event::Mail { txn, reply } if reply.class() != 2 => {
                    let r = self.session.server_reply(reply);
                    if let Some(i) = slot_of(&mut slots, txn) {
                        slots[i].decisive = Some((Phase::Mail, r));
                    }
                }
                Event::Rcpt { txn, index, reply } if reply.class() != 2 => {
                    let r = self.session.server_reply(reply);
                    if let Some(slot) =
                        slot_of(&mut slots, txn).and_then(|i| slots[i].refused.get_mut(index))
                    {
                        *slot = Some(Trouble::reply(Phase::Rcpt, &r).rcpt_result());
                    }
                }
                Event::Data { txn, reply } if reply.code != 354 => {
                    let r = self.session.server_reply(reply);
                    if let Some(i) = slot_of(&mut slots, txn) {
                        slots[i].decisive.get_or_insert((Phase::Data, r));
                    }
                }
                Event::DataDone { txn, reply } => {
                    let r = self.session.server_reply(reply);
                    if let Some(i) = slot_of(&mut slots, txn) {
                        slots[i].decisive.get_or_insert((Phase::DataDone, r));
                    }
                }
                Event::MessageDone { txn, .. } => {
                    if let Some(i) = slot_of(&mut slots, txn) {
                        if !slots[i].done {
                            slots[i].done = true;
                            pending -= 1;
                        }
                    }
                }
                Event::Failed(e) => {
                    trouble = Some(Trouble::session(&e, &self.host));
                    break;
                }
                _ => {}
            }
        }
        if pending == 0 {
            // A 421 ends the transaction and then the session: its failure is already queued.
            while let Some(e) = self.session.poll_event() {
                if let Event::Failed(e) = e {
                    trouble = Some(Trouble::session(&e, &self.host));
                }
            }
        }
        // What ended the session decides for every message whose transaction it cut short; a failure in the
        // content's transfer is a message's, not the destination's (for those queued behind it as well).
        let in_data = trouble.as_ref().is_some_and(|t| t.scope == Scope::Message);
        let mut outcomes = Vec::with_capacity(slots.len());
        let mut failed = false;
        for mut slot in slots {
            let hit = slot.hit || !slot.done;
            let sent = slot.txn.is_some();
            let results = match slot.settled.take() {
                Some(r) => r,
                None => merge_results(
                    slot.refused,
                    slot.decisive.as_ref(),
                    trouble.as_ref().filter(|_| hit),
                ),
            };
            failed |= sent
                && results
                    .iter()
                    .any(|r| !matches!(r, RcptResult::Delivered { .. }));
            outcomes.push(TransactionOutcome {
                results,
                failed_in_data: hit && in_data,
                cut_short: hit && trouble.is_some(),
            });
        }
        if trouble.is_none() && failed {
            // Leave the session clean for the next message.
            if self.session.rset(Instant::now()).is_ok() {
                loop {
                    match self.step().await {
                        Ok(Event::RsetDone { .. }) if self.session.is_open() => break,
                        Ok(Event::Failed(e)) => {
                            trouble = Some(Trouble::session(&e, &self.host));
                            break;
                        }
                        Ok(_) => {}
                        Err(t) => {
                            trouble = Some(t);
                            break;
                        }
                    }
                }
            }
        }
        let reusable = trouble.is_none() && self.session.is_open();
        (outcomes, reusable)
    }

    /// Ends the session politely (best effort, bounded by the session's QUIT timeout).
    pub async fn quit(mut self) {
        self.session.quit(Instant::now());
        loop {
            match self.step().await {
                Ok(Event::Closed) | Ok(Event::Failed(_)) | Err(_) => break,
                Ok(_) => {}
            }
        }
        let _ = self.stream.close().await;
    }
}

/// One result per recipient of a transaction: `refused` holds the recipients refused at RCPT (classified);
/// `decisive` the reply that decides for the others (MAIL's refusal decides for all, else DATA's refusal or
/// the final reply); `trouble` what ended the session during the transaction (a 421, a timeout, a lost
/// connection), which decides before the reply. A recipient nothing decided is deferred.
fn merge_results(
    refused: Vec<Option<RcptResult>>,
    decisive: Option<&(Phase, ServerReply)>,
    trouble: Option<&Trouble>,
) -> Vec<RcptResult> {
    let fallback = match (trouble, decisive) {
        (_, Some((Phase::Mail, r))) => Some(Trouble::reply(Phase::Mail, r).rcpt_result()),
        (Some(t), _) => Some(t.rcpt_result()),
        (None, Some((Phase::DataDone | Phase::Bdat, r))) if r.class() == 2 => {
            Some(RcptResult::Delivered {
                reply: r.one_line(),
            })
        }
        (None, Some((phase, r))) => Some(Trouble::reply(*phase, r).rcpt_result()),
        (None, None) => None,
    };
    let mail_refused = matches!(decisive, Some((Phase::Mail, _)));
    refused
        .into_iter()
        .map(|r| {
            let r = if mail_refused { None } else { r };
            r.or_else(|| fallback.clone())
                .unwrap_or(RcptResult::Deferred {
                    reply: "4.3.0 no reply".into(),
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::client_session::SessionError;

    fn reply(raw: &[u8]) -> ServerReply {
        ServerReply::from_test_bytes(raw)
    }

    fn refused_rcpt(raw: &[u8]) -> Option<RcptResult> {
        Some(Trouble::reply(Phase::Rcpt, &reply(raw)).rcpt_result())
    }

    fn kinds(v: &[RcptResult]) -> Vec<&'static str> {
        v.iter()
            .map(|r| match r {
                RcptResult::Delivered { .. } => "delivered",
                RcptResult::Deferred { .. } => "deferred",
                RcptResult::Bounced { .. } => "bounced",
                RcptResult::Postponed { .. } => "postponed",
            })
            .collect()
    }

    #[test]
    fn partial_delivery_and_refusals() {
        let done = (Phase::DataDone, reply(b"250 2.0.0 Ok: queued as Q1\r\n"));
        let r = merge_results(
            vec![
                None,
                refused_rcpt(b"550 5.1.1 no such user\r\n"),
                refused_rcpt(b"450 4.2.0 greylisted\r\n"),
            ],
            Some(&done),
            None,
        );
        assert_eq!(kinds(&r), ["delivered", "bounced", "deferred"]);
        assert_eq!(r[0].reply(), "250 2.0.0 Ok: queued as Q1");
        match &r[1] {
            RcptResult::Bounced { status, .. } => assert_eq!(status.to_string(), "5.1.1"),
            other => panic!("{other:?}"),
        }
        // MAIL's refusal decides for every recipient.
        let mail = (Phase::Mail, reply(b"550 5.7.1 sender blocked (S3150)\r\n"));
        let r = merge_results(
            vec![None, refused_rcpt(b"450 4.2.0 x\r\n")],
            Some(&mail),
            None,
        );
        assert_eq!(kinds(&r), ["bounced", "bounced"]);
        // DATA refused: the message's, for those not refused at RCPT.
        let data = (Phase::Data, reply(b"451 4.3.0 try later\r\n"));
        let r = merge_results(
            vec![None, refused_rcpt(b"550 5.1.1 x\r\n")],
            Some(&data),
            None,
        );
        assert_eq!(kinds(&r), ["deferred", "bounced"]);
        // The final reply refuses the content.
        let done = (
            Phase::DataDone,
            reply(b"550 5.7.26 unauthenticated (DMARC)\r\n"),
        );
        let r = merge_results(vec![None], Some(&done), None);
        assert_eq!(kinds(&r), ["bounced"]);
    }

    #[test]
    fn a_421_or_a_lost_connection_decides_for_the_rest() {
        let closing = Trouble::session(
            &SessionError::Closing {
                phase: Phase::Rcpt,
                reply: reply(b"421 4.7.0 [TSS04] deferred\r\n"),
            },
            "mx",
        );
        let r = merge_results(
            vec![None, refused_rcpt(b"550 5.1.1 no\r\n"), None],
            None,
            Some(&closing),
        );
        assert_eq!(kinds(&r), ["deferred", "bounced", "deferred"]);
        assert!(r[2].reply().starts_with("421 4.7.0"));
        // A 421 at the end of data, with the reply also seen as the final one.
        let done = (Phase::DataDone, reply(b"421 4.7.28 rate limited\r\n"));
        let t = Trouble::reply(Phase::DataDone, &done.1);
        let r = merge_results(vec![None], Some(&done), Some(&t));
        assert_eq!(kinds(&r), ["deferred"]);
        let lost = Trouble::session(
            &SessionError::Lost {
                phase: Phase::DataDone,
            },
            "mx",
        );
        assert_eq!(lost.scope, Scope::Message);
        let r = merge_results(vec![None, None], None, Some(&lost));
        assert_eq!(kinds(&r), ["deferred", "deferred"]);
        assert!(r[0].reply().contains("while sending the message"));
        // Nothing decided: deferred, never dropped.
        let r = merge_results(vec![None], None, None);
        assert_eq!(
            r,
            vec![RcptResult::Deferred {
                reply: "4.3.0 no reply".into()
            }]
        );
    }
}
