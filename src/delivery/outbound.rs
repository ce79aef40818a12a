//! One outbound SMTP connection over glommio (plaintext, STARTTLS or implicit TLS) and the transactions sent
//! over it. Protocol bytes come from [`crate::smtp::client`]; this module adds sockets, timeouts and the
//! mapping of every reply or I/O failure to a per-recipient [`RcptResult`].

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;

use super::{JobRcpt, RcptResult};
use crate::config::TlsLevel;
use crate::net::ClientConn;
use crate::queue::MessageBody;
use crate::smtp::client::{self, Capabilities, ServerReply};
use crate::smtp::reply_parser::EnhancedCode;

/// Read buffer per connection; replies longer than `crate::smtp::reply_parser::MAX_REPLY` are refused.
const READ_BUFFER_BYTES: usize = 16 * 1024;

/// rustls client configurations: one that checks certificates (level `verify`) and one that does not
/// (`may`/`encrypt`: opportunistic TLS authenticates nobody, as in Postfix).
#[derive(Clone)]
pub struct ClientTls {
    pub unverified: Arc<rustls::ClientConfig>,
    pub verified: Result<Arc<rustls::ClientConfig>, String>,
}

impl ClientTls {
    pub fn new(ca_file: &str) -> ClientTls {
        crate::tls::install_crypto_provider();
        let unverified = Arc::new(
            rustls::ClientConfig::builder()
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerify))
                .with_no_client_auth(),
        );
        let path = if ca_file.is_empty() {
            "/etc/ssl/certs/ca-certificates.crt"
        } else {
            ca_file
        };
        let verified = (|| {
            let pem =
                std::fs::read(path).map_err(|e| format!("cannot read CA file {path}: {e}"))?;
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls_pemfile::certs(&mut pem.as_slice()).flatten() {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(format!("no CA certificates in {path}"));
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
    pub connect_timeout: Duration,
    pub reply_timeout: Duration,
    pub data_timeout: Duration,
}

/// Why a host could not be used; the caller moves on to the next host or defers.
#[derive(Debug)]
pub enum HostError {
    Net(String),
    /// The greeting, EHLO or AUTH was refused.
    Refused(ServerReply),
    /// STARTTLS was offered but the handshake failed (opportunistic TLS retries in plaintext).
    TlsFailed(String),
    TlsRequired,
}

impl HostError {
    pub fn describe(&self) -> String {
        match self {
            HostError::Net(e) => format!("4.4.1 connection failed: {e}"),
            HostError::Refused(r) => r.one_line(),
            HostError::TlsFailed(e) => format!("4.7.5 TLS handshake failed: {e}"),
            HostError::TlsRequired => "4.7.4 TLS is required but was not offered".into(),
        }
    }
}

pub struct Connection {
    stream: ClientConn,
    pub caps: Capabilities,
    pub host: String,
    pub addr: SocketAddr,
    /// `TLSv1.3 TLS13_AES_256_GCM_SHA384` once TLS is on.
    pub tls: Option<String>,
    /// Messages sent over this connection.
    pub messages: u32,
    /// The last transaction failed after the server took DATA (354): sending the content or waiting for its
    /// reply. That is the message's failure (a receiver choking on it), not the destination's.
    pub failed_in_data: bool,
    rbuf: Vec<u8>,
    rlen: usize,
    wbuf: Vec<u8>,
    reply_timeout: Duration,
    data_timeout: Duration,
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

impl Connection {
    /// Connects to one address of `host` and gets the session ready for MAIL.
    pub async fn open(
        host: &str,
        addr: SocketAddr,
        p: &ConnectParams<'_>,
    ) -> Result<Connection, HostError> {
        let tcp = TcpStream::connect_timeout(addr, p.connect_timeout)
            .await
            .map_err(|e| HostError::Net(e.to_string()))?;
        tcp.set_nodelay(true)
            .map_err(|e| HostError::Net(e.to_string()))?;
        let mut c = Connection {
            stream: ClientConn::Plain(tcp),
            caps: Capabilities::default(),
            host: host.to_string(),
            addr,
            tls: None,
            messages: 0,
            failed_in_data: false,
            rbuf: vec![0; READ_BUFFER_BYTES],
            rlen: 0,
            wbuf: Vec::with_capacity(4096),
            reply_timeout: p.reply_timeout,
            data_timeout: p.data_timeout,
        };
        if p.wrapper {
            c.start_tls(p, host).await?;
        }
        let greeting = c
            .reply(p.reply_timeout)
            .await
            .map_err(|e| HostError::Net(e.to_string()))?;
        if greeting.class() != 2 {
            return Err(HostError::Refused(greeting));
        }
        c.ehlo(p.helo).await?;
        if !p.wrapper && p.tls_level != TlsLevel::None {
            if c.caps.starttls {
                let r = c
                    .command(b"STARTTLS\r\n")
                    .await
                    .map_err(|e| HostError::Net(e.to_string()))?;
                if r.class() == 2 {
                    c.start_tls(p, host).await?;
                    c.ehlo(p.helo).await?;
                } else if p.tls_level != TlsLevel::May {
                    return Err(HostError::TlsRequired);
                }
            } else if p.tls_level != TlsLevel::May {
                return Err(HostError::TlsRequired);
            }
        }
        if let Some((user, pass)) = p.sasl {
            if c.tls.is_none() {
                return Err(HostError::TlsRequired);
            }
            let r = if c.caps.auth_plain || !c.caps.auth_login {
                c.command(client::auth_plain(user, pass).as_bytes()).await
            } else {
                c.auth_login(user, pass).await
            }
            .map_err(|e| HostError::Net(e.to_string()))?;
            if r.class() != 2 {
                return Err(HostError::Refused(r));
            }
        }
        Ok(c)
    }

    async fn ehlo(&mut self, helo: &str) -> Result<(), HostError> {
        let r = self
            .command(format!("EHLO {helo}\r\n").as_bytes())
            .await
            .map_err(|e| HostError::Net(e.to_string()))?;
        if r.class() == 2 {
            self.caps = Capabilities::from_ehlo(&r);
            return Ok(());
        }
        let r = self
            .command(format!("HELO {helo}\r\n").as_bytes())
            .await
            .map_err(|e| HostError::Net(e.to_string()))?;
        if r.class() != 2 {
            return Err(HostError::Refused(r));
        }
        self.caps = Capabilities::default();
        Ok(())
    }

    async fn auth_login(&mut self, user: &str, pass: &str) -> io::Result<ServerReply> {
        use base64::Engine as _;
        let b64 = |s: &str| {
            format!(
                "{}\r\n",
                base64::engine::general_purpose::STANDARD.encode(s)
            )
        };
        let r = self.command(b"AUTH LOGIN\r\n").await?;
        if r.code != 334 {
            return Ok(r);
        }
        let r = self.command(b64(user).as_bytes()).await?;
        if r.code != 334 {
            return Ok(r);
        }
        self.command(b64(pass).as_bytes()).await
    }

    async fn start_tls(&mut self, p: &ConnectParams<'_>, host: &str) -> Result<(), HostError> {
        // Nothing read before the handshake may be used after it.
        self.rlen = 0;
        let cfg = if p.tls_level == TlsLevel::Verify {
            p.tls.verified.clone().map_err(HostError::TlsFailed)?
        } else {
            p.tls.unverified.clone()
        };
        let name = rustls::pki_types::ServerName::try_from(host.to_string())
            .map_err(|e| HostError::TlsFailed(e.to_string()))?;
        let Some(tcp) = self.stream.take_plain() else {
            return Err(HostError::TlsFailed("TLS already on".into()));
        };
        let hs = futures_rustls::TlsConnector::from(cfg).connect(name, tcp);
        let tls = glommio::timer::timeout(p.reply_timeout, async {
            hs.await.map_err(glommio::GlommioError::from)
        })
        .await
        .map_err(|e| HostError::TlsFailed(e.to_string()))?;
        self.tls = Some(tls_desc(tls.get_ref().1));
        self.stream = ClientConn::Tls(Box::new(tls));
        Ok(())
    }

    async fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        let t = self.reply_timeout;
        let stream = &mut self.stream;
        glommio::timer::timeout(t, async {
            stream
                .write_all(bytes)
                .await
                .map_err(glommio::GlommioError::from)?;
            stream.flush().await.map_err(glommio::GlommioError::from)?;
            Ok(())
        })
        .await
        .map_err(|e| io::Error::other(e.to_string()))
    }

    /// Writes the connection's own write buffer (kept for reuse, so no allocation per message).
    async fn write_wbuf(&mut self) -> io::Result<()> {
        let w = std::mem::take(&mut self.wbuf);
        let res = self.write(&w).await;
        self.wbuf = w;
        res
    }

    async fn command(&mut self, line: &[u8]) -> io::Result<ServerReply> {
        self.write(line).await?;
        self.reply(self.reply_timeout).await
    }

    /// Reads one complete reply (from what is buffered, reading more as needed).
    async fn reply(&mut self, t: Duration) -> io::Result<ServerReply> {
        loop {
            match client::parse_reply(&self.rbuf[..self.rlen]) {
                Ok(Some((r, n))) => {
                    self.rbuf.copy_within(n..self.rlen, 0);
                    self.rlen -= n;
                    return Ok(r);
                }
                Ok(None) => {}
                Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
            }
            if self.rlen == self.rbuf.len() {
                if self.rbuf.len() >= crate::smtp::reply_parser::MAX_REPLY + 1024 {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "reply too long"));
                }
                self.rbuf.resize(self.rbuf.len() * 2, 0);
            }
            let (buf, stream) = (&mut self.rbuf[self.rlen..], &mut self.stream);
            let n = glommio::timer::timeout(t, async {
                stream.read(buf).await.map_err(glommio::GlommioError::from)
            })
            .await
            .map_err(|e| io::Error::new(io::ErrorKind::TimedOut, e.to_string()))?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            self.rlen += n;
        }
    }

    /// Sends one message to `rcpts`. Returns one result per recipient, in order, and whether the connection
    /// can carry another message. Checks SIZE, 8BITMIME and SMTPUTF8 first: a message the server cannot take is
    /// bounced (RFC 6152/6531: no silent downgrade of content we cannot convert).
    pub async fn send(
        &mut self,
        sender: &str,
        rcpts: &[JobRcpt],
        body: &MessageBody,
        eight_bit: bool,
        smtputf8: bool,
    ) -> (Vec<RcptResult>, bool) {
        let size = (body.received.len() + body.data.len()) as u64;
        let all = |r: RcptResult| vec![r; rcpts.len()];
        // What the receiver cannot take is bounced, never downgraded.
        let refusal = if let Some(limit) = self.caps.size.filter(|&l| l > 0 && size > l) {
            Some((
                format!(
                    "552 5.3.4 message size {size} exceeds {}'s limit of {limit}",
                    self.host
                ),
                EnhancedCode::new(5, 3, 4),
            ))
        } else if smtputf8 && !self.caps.smtputf8 {
            Some((
                format!("553 5.6.7 {} does not support SMTPUTF8", self.host),
                EnhancedCode::new(5, 6, 7),
            ))
        } else if eight_bit && !self.caps.eight_bit_mime {
            Some((
                format!("554 5.6.3 {} does not support 8BITMIME", self.host),
                EnhancedCode::new(5, 6, 3),
            ))
        } else {
            None
        };
        if let Some((reply, status)) = refusal {
            return (all(RcptResult::Bounced { reply, status }), true);
        }
        match self
            .transaction(sender, rcpts, body, size, eight_bit, smtputf8)
            .await
        {
            Ok(r) => r,
            Err(e) => {
                let when = if self.failed_in_data {
                    " while sending the message"
                } else {
                    ""
                };
                (
                    all(RcptResult::Deferred {
                        reply: format!("4.4.2 lost connection with {}{when}: {e}", self.host),
                    }),
                    false,
                )
            }
        }
    }

    async fn transaction(
        &mut self,
        sender: &str,
        rcpts: &[JobRcpt],
        body: &MessageBody,
        size: u64,
        eight_bit: bool,
        smtputf8: bool,
    ) -> io::Result<(Vec<RcptResult>, bool)> {
        self.messages += 1;
        self.failed_in_data = false;
        let pipelining = self.caps.pipelining;
        self.wbuf.clear();
        client::encode_mail(
            &mut self.wbuf,
            sender,
            size,
            &self.caps,
            eight_bit,
            smtputf8,
        );
        let mut replies: Vec<ServerReply> = Vec::with_capacity(rcpts.len() + 2);
        if pipelining {
            for r in rcpts {
                client::encode_rcpt(&mut self.wbuf, &r.address);
            }
            self.wbuf.extend_from_slice(b"DATA\r\n");
            self.write_wbuf().await?;
            for _ in 0..rcpts.len() + 2 {
                replies.push(self.reply(self.reply_timeout).await?);
            }
        } else {
            self.write_wbuf().await?;
            let mail = self.reply(self.reply_timeout).await?;
            let ok = mail.class() == 2;
            replies.push(mail);
            if ok {
                for r in rcpts {
                    let mut line = Vec::with_capacity(r.address.len() + 12);
                    client::encode_rcpt(&mut line, &r.address);
                    replies.push(self.command(&line).await?);
                }
                if replies[1..].iter().any(|r| r.class() == 2) {
                    replies.push(self.command(b"DATA\r\n").await?);
                }
            }
        }
        let mail = &replies[0];
        let mut results: Vec<Option<RcptResult>> = vec![None; rcpts.len()];
        if mail.class() != 2 {
            results.iter_mut().for_each(|r| *r = Some(classify(mail)));
        } else {
            for (i, r) in replies[1..].iter().take(rcpts.len()).enumerate() {
                if r.class() != 2 {
                    results[i] = Some(classify(r));
                }
            }
        }
        let data_reply = replies.get(rcpts.len() + 1).cloned();
        let any_rcpt_ok = results.iter().any(Option::is_none);
        let mut reusable = true;
        match data_reply {
            Some(d) if d.code == 354 && any_rcpt_ok => {
                self.wbuf.clear();
                client::encode_data(&mut self.wbuf, &[body.received(), body.data()]);
                let sent = match self.write_wbuf().await {
                    Ok(()) => self.reply(self.data_timeout).await,
                    Err(e) => Err(e),
                };
                let fin = match sent {
                    Ok(fin) => fin,
                    Err(e) => {
                        self.failed_in_data = true;
                        return Err(e);
                    }
                };
                for r in results.iter_mut().filter(|r| r.is_none()) {
                    *r = Some(if fin.class() == 2 {
                        RcptResult::Delivered {
                            reply: fin.one_line(),
                        }
                    } else {
                        classify(&fin)
                    });
                }
                reusable &= fin.code != 421;
            }
            Some(d) if d.code == 354 => {
                // Pipelined DATA was accepted although no recipient was: send an empty message's end.
                self.write(b".\r\n").await?;
                let _ = self.reply(self.data_timeout).await?;
            }
            Some(d) if any_rcpt_ok => {
                for r in results.iter_mut().filter(|r| r.is_none()) {
                    *r = Some(classify(&d));
                }
                reusable &= d.code != 421;
            }
            _ => {}
        }
        reusable &= !replies.iter().any(|r| r.code == 421);
        let failed = results
            .iter()
            .any(|r| !matches!(r, Some(RcptResult::Delivered { .. })));
        if reusable && failed {
            // Leave the session clean for the next message.
            let rs = self.command(b"RSET\r\n").await?;
            reusable = rs.class() == 2;
        }
        let results = results
            .into_iter()
            .map(|r| {
                r.unwrap_or(RcptResult::Deferred {
                    reply: "4.3.0 no reply".into(),
                })
            })
            .collect();
        Ok((results, reusable))
    }

    /// Ends the session politely (best effort, bounded by the reply timeout).
    pub async fn quit(mut self) {
        let _ = self.command(b"QUIT\r\n").await;
        let _ = self.stream.close().await;
    }
}

/// 4xx: deferred; 5xx: bounced (with the reply's enhanced code, or 5.0.0).
pub fn classify(r: &ServerReply) -> RcptResult {
    if r.class() == 5 {
        let status = r.enhanced().unwrap_or(EnhancedCode::new(5, 0, 0));
        RcptResult::Bounced {
            reply: r.one_line(),
            status,
        }
    } else {
        RcptResult::Deferred {
            reply: r.one_line(),
        }
    }
}
