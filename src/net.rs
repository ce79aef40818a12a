//! A connection that is plaintext or TLS: [`MaybeTls`] delegates `AsyncRead`/`AsyncWrite` to whichever it is,
//! so the SMTP server, the outbound client and the load tester's sink share one type (`T` is the rustls server
//! or client stream over a glommio `TcpStream`); and how such a connection ends and acknowledges at the TCP level
//! ([`MaybeTls::send_and_close`], [`delay_acks`], [`reset_on_close`]).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;

pub enum MaybeTls<T> {
    Plain(TcpStream),
    Tls(Box<T>),
    /// Between taking the plaintext stream for a handshake and installing the TLS one.
    Gone,
}

/// The server side: plaintext or a rustls server stream.
pub type ServerConn = MaybeTls<futures_rustls::server::TlsStream<TcpStream>>;
/// The client side: plaintext or a rustls client stream.
pub type ClientConn = MaybeTls<futures_rustls::client::TlsStream<TcpStream>>;

impl<T> MaybeTls<T> {
    /// Takes the plaintext stream out for a TLS handshake (`None` if TLS is already on).
    pub fn take_plain(&mut self) -> Option<TcpStream> {
        match std::mem::replace(self, MaybeTls::Gone) {
            MaybeTls::Plain(tcp) => Some(tcp),
            other => {
                *self = other;
                None
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for MaybeTls<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            MaybeTls::Gone => Poll::Ready(Ok(0)),
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for MaybeTls<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            MaybeTls::Gone => Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_flush(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            MaybeTls::Gone => Poll::Ready(Ok(())),
        }
    }
    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_close(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_close(cx),
            MaybeTls::Gone => Poll::Ready(Ok(())),
        }
    }
}

impl ServerConn {
    /// The server side of a TLS handshake over the plaintext stream (STARTTLS or implicit TLS). Returns the
    /// rustls connection, for the negotiated version and cipher.
    pub async fn accept_tls(
        &mut self,
        cfg: &std::sync::Arc<rustls::ServerConfig>,
    ) -> io::Result<&rustls::ServerConnection> {
        let Some(tcp) = self.take_plain() else {
            return Err(io::Error::other("TLS already active"));
        };
        let tls = futures_rustls::TlsAcceptor::from(cfg.clone())
            .accept(tcp)
            .await?;
        *self = MaybeTls::Tls(Box::new(tls));
        match self {
            MaybeTls::Tls(t) => Ok(t.get_ref().1),
            _ => unreachable!("just set"),
        }
    }
}

impl<T: AsyncWrite + Unpin> MaybeTls<T> {
    /// Writes and flushes `out` (if it holds anything), then clears it: one write per batch of replies.
    pub async fn send(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        use futures_lite::AsyncWriteExt;
        if !out.is_empty() {
            self.write_all(out).await?;
            self.flush().await?;
            out.clear();
        }
        Ok(())
    }

    /// The session's last replies, then the end of the connection (shutdown of the write side; the descriptor is
    /// closed when `self` is dropped). On plaintext the replies go out with `MSG_MORE`, so the FIN that the
    /// shutdown sends rides on the same segment: one packet fewer per connection. Whatever the socket does not
    /// take at once goes through the ordinary write. Returns the write's result.
    pub async fn send_and_close(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        if let MaybeTls::Plain(tcp) = self {
            if !out.is_empty() {
                use rustix::net::SendFlags;
                let flags = SendFlags::MORE | SendFlags::DONTWAIT | SendFlags::NOSIGNAL;
                if let Ok(n) = rustix::net::send(borrowed(tcp), out, flags) {
                    out.drain(..n);
                }
            }
        }
        let sent = self.send(out).await;
        // The connection ends either way; only a failed write of the replies is worth reporting.
        use futures_lite::AsyncWriteExt;
        let _ = self.close().await;
        sent
    }
}

/// Turns off quick ACKs (`TCP_QUICKACK` 0) on a fresh connection: the kernel then lets the ACK of what arrives
/// ride on this side's next write (or sends it after the delayed-ACK timer, or once two full segments are
/// unacknowledged) instead of sending a packet of its own. In a lockstep SMTP exchange every ACK then travels
/// with a command or a reply: two packets fewer per connection for each side that does it.
pub fn delay_acks(sock: &impl AsRawFd) -> io::Result<()> {
    Ok(rustix::net::sockopt::set_tcp_quickack(
        borrowed(sock),
        false,
    )?)
}

/// Makes the close of this socket abortive (`SO_LINGER` on, 0 s): the kernel sends an RST instead of a FIN,
/// discards anything unsent, and neither side keeps the connection in TIME_WAIT.
pub fn reset_on_close(sock: &impl AsRawFd) -> io::Result<()> {
    Ok(rustix::net::sockopt::set_socket_linger(
        borrowed(sock),
        Some(std::time::Duration::ZERO),
    )?)
}

/// The descriptor of `sock`, borrowed for as long as `sock` is (glommio's sockets implement `AsRawFd` only).
fn borrowed(sock: &impl AsRawFd) -> BorrowedFd<'_> {
    // SAFETY: `sock` owns an open descriptor and outlives the returned borrow, which is tied to it.
    unsafe { BorrowedFd::borrow_raw(sock.as_raw_fd()) }
}

/// The next connection on `listener`, or `None` once `stop`'s sender is dropped (an accept loop's one wait:
/// the server's and the sink's).
pub async fn accept_or_stop(
    listener: &glommio::net::TcpListener,
    stop: &glommio::channels::local_channel::LocalReceiver<()>,
) -> Option<glommio::Result<(TcpStream, std::net::SocketAddr), ()>> {
    futures_lite::future::or(
        async { Some(listener.accept_with_peer_addr().await) },
        async {
            let _ = stop.recv().await;
            None
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::os::fd::IntoRawFd;
    use std::os::unix::io::FromRawFd;
    use std::rc::Rc;
    use std::time::Duration;

    /// Makes a listener with `listen` on a glommio executor, accepts one connection from a client that connects
    /// 300 ms later while a 20 ms timer runs: whether the timer fired first (the accept did not block the
    /// executor), the peer address the accept gave, and the client's own address.
    fn accept_beside_a_timer(
        listen: impl FnOnce() -> glommio::net::TcpListener + Send + 'static,
    ) -> (bool, std::net::SocketAddr, std::net::SocketAddr) {
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let client = std::thread::spawn(move || {
            let addr: std::net::SocketAddr = addr_rx.recv().unwrap();
            std::thread::sleep(Duration::from_millis(300));
            let c = std::net::TcpStream::connect(addr).unwrap();
            let local = c.local_addr().unwrap();
            (c, local)
        });
        let (timer_first, peer) = glommio::LocalExecutorBuilder::default()
            .spawn(move || async move {
                let listener = listen();
                addr_tx.send(listener.local_addr().unwrap()).unwrap();
                let (_tx, rx) = glommio::channels::local_channel::new_bounded::<()>(1);
                let fired = Rc::new(Cell::new(false));
                let f = fired.clone();
                glommio::spawn_local(async move {
                    glommio::timer::sleep(Duration::from_millis(20)).await;
                    f.set(true);
                })
                .detach();
                let (_stream, peer) = super::accept_or_stop(&listener, &rx)
                    .await
                    .expect("not stopped")
                    .expect("accepted");
                (fired.get(), peer)
            })
            .unwrap()
            .join()
            .unwrap();
        let (_c, client_local) = client.join().unwrap();
        (timer_first, peer, client_local)
    }

    /// The accept of the vendored glommio (PATCHES.md): accept4(2) on a listener it makes non-blocking, a
    /// readiness poll when nothing waits, and the peer's address from the accept itself. A listener handed
    /// over blocking (as std makes them) must not block the executor: a timer due long before the client
    /// connects fires first.
    #[test]
    fn accept_waits_without_blocking_the_executor_and_reports_the_peer() {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let fd = std_listener.into_raw_fd();
        // SAFETY: a bound, listening socket whose ownership passes to the listener.
        let (timer_first, peer, client) =
            accept_beside_a_timer(move || unsafe { glommio::net::TcpListener::from_raw_fd(fd) });
        assert!(timer_first, "the accept blocked the executor");
        assert_eq!(peer, client);
    }

    /// The same through glommio's own `TcpListener::bind` (the load tester's sink binds this way).
    #[test]
    fn a_listener_glommio_binds_does_not_block_the_executor() {
        let (timer_first, peer, client) =
            accept_beside_a_timer(|| glommio::net::TcpListener::bind("127.0.0.1:0").unwrap());
        assert!(timer_first, "the accept blocked the executor");
        assert_eq!(peer, client);
    }
}
