//! systemd's service notifications (sd_notify(3)): `READY=1` once every shard is up, `RELOADING=1` with
//! `MONOTONIC_USEC` and then `READY=1` around a reload, `STOPPING=1` at shutdown, and `STATUS=` lines, each one
//! datagram to the unix socket named by `$NOTIFY_SOCKET` (a path, or an abstract name written with a leading
//! `@`). Without `$NOTIFY_SOCKET` (not started by systemd with `Type=notify`) nothing is sent.
//!
//! Written by hand: the protocol is one datagram per message, and a library would add a dependency for that.

use std::io;
use std::os::unix::net::UnixDatagram;

use crate::limits;

/// Where notifications go (the socket is unbound: the kernel gives it no name, systemd needs none).
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    target: Target,
}

#[derive(Debug)]
enum Target {
    Path(std::path::PathBuf),
    Abstract(Vec<u8>),
}

impl Notifier {
    /// From `$NOTIFY_SOCKET`; None when it is unset or empty. A value that is neither an absolute path nor an
    /// `@name` is an error (a unit that asks for notifications and would never get them must say so).
    pub fn from_env() -> io::Result<Option<Notifier>> {
        match std::env::var_os("NOTIFY_SOCKET") {
            None => Ok(None),
            Some(v) if v.is_empty() => Ok(None),
            Some(v) => Notifier::new(&v).map(Some),
        }
    }

    /// A notifier for the socket `name` (`/run/systemd/notify` or `@abstract-name`).
    pub fn new(name: &std::ffi::OsStr) -> io::Result<Notifier> {
        use std::os::unix::ffi::OsStrExt;
        let bytes = name.as_bytes();
        let target = match bytes.first() {
            Some(b'/') => Target::Path(name.into()),
            Some(b'@') => Target::Abstract(bytes[1..].to_vec()),
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "NOTIFY_SOCKET={name:?} is neither an absolute path nor an @abstract name"
                    ),
                ))
            }
        };
        Ok(Notifier {
            socket: UnixDatagram::unbound()?,
            target,
        })
    }

    /// Sends `state` (lines `KEY=value`) as one datagram.
    pub fn send(&self, state: &str) -> io::Result<()> {
        let mut msg = state.as_bytes();
        if msg.len() > limits::SD_NOTIFY_MESSAGE_BYTES_MAX {
            msg = &msg[..limits::SD_NOTIFY_MESSAGE_BYTES_MAX];
        }
        match &self.target {
            Target::Path(p) => self.socket.send_to(msg, p).map(drop),
            Target::Abstract(name) => {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                self.socket.send_to_addr(msg, &addr).map(drop)
            }
        }
    }

    /// `READY=1` with a status line.
    pub fn ready(&self, status: &str) -> io::Result<()> {
        self.send(&format!("READY=1\nSTATUS={}", one_line(status)))
    }

    /// `RELOADING=1` with the monotonic clock in microseconds, as systemd wants it.
    pub fn reloading(&self) -> io::Result<()> {
        self.send(&format!(
            "RELOADING=1\nMONOTONIC_USEC={}\nSTATUS=reloading the configuration",
            monotonic_usec()
        ))
    }

    /// `STOPPING=1`.
    pub fn stopping(&self) -> io::Result<()> {
        self.send("STOPPING=1\nSTATUS=shutting down")
    }

    /// A `STATUS=` line (what `systemctl status` shows).
    pub fn status(&self, status: &str) -> io::Result<()> {
        self.send(&format!("STATUS={}", one_line(status)))
    }
}

/// A status is one line: line ends become spaces.
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

/// CLOCK_MONOTONIC in microseconds (what systemd compares a reload's start with).
fn monotonic_usec() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    (t.tv_sec as u64)
        .saturating_mul(1_000_000)
        .saturating_add(t.tv_nsec as u64 / 1000)
}

/// Sends when there is a notifier; a failure is logged once per kind of message, never fatal (the service
/// manager then times the start out and says so).
pub fn notify(n: Option<&Notifier>, what: impl FnOnce(&Notifier) -> io::Result<()>) {
    if let Some(n) = n {
        if let Err(e) = what(n) {
            tracing::warn!(target: crate::eventlog::MASTER, "cannot notify systemd ({:?}): {e}", n.target);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recv(s: &UnixDatagram) -> String {
        let mut b = vec![0u8; 8192];
        let n = s.recv(&mut b).unwrap();
        String::from_utf8(b[..n].to_vec()).unwrap()
    }

    #[test]
    fn messages_reach_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let sock = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::new(path.as_os_str()).unwrap();
        n.ready("2 shard(s) listening\non 127.0.0.1:25").unwrap();
        assert_eq!(
            recv(&sock),
            "READY=1\nSTATUS=2 shard(s) listening on 127.0.0.1:25"
        );
        n.reloading().unwrap();
        let m = recv(&sock);
        let usec: u64 = m
            .lines()
            .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
            .unwrap()
            .parse()
            .unwrap();
        assert!(m.starts_with("RELOADING=1\n"), "{m}");
        assert!(usec > 0 && usec <= monotonic_usec(), "{m}");
        n.stopping().unwrap();
        assert!(recv(&sock).starts_with("STOPPING=1"));
        // A very long status is cut to the bound, not refused.
        n.status(&"x".repeat(10_000)).unwrap();
        assert_eq!(recv(&sock).len(), limits::SD_NOTIFY_MESSAGE_BYTES_MAX);
    }

    #[test]
    fn messages_reach_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("shardmta-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let sock = UnixDatagram::bind_addr(&addr).unwrap();
        let n = Notifier::new(std::ffi::OsStr::new(&format!("@{name}"))).unwrap();
        n.status("hello").unwrap();
        assert_eq!(recv(&sock), "STATUS=hello");
    }

    #[test]
    fn a_bad_socket_name_is_an_error() {
        assert!(Notifier::new(std::ffi::OsStr::new("relative/notify")).is_err());
        let dir = tempfile::tempdir().unwrap();
        // Nobody listens there: sending fails, and says so.
        let n = Notifier::new(dir.path().join("none").as_os_str()).unwrap();
        assert!(n.ready("x").is_err());
    }
}
