//! Owns what runs as whom: the `mail_owner` account, the spool made ready for it, listening sockets bound while
//! still root, and the one-way switch to that account with no capabilities left (checked, not assumed).
//!
//! Order at start (see `server::run`): read the configuration, TLS keys and the users file as root; bind every
//! listener (ports below 1024 need root); create the spool for `mail_owner`; then, still single-threaded,
//! `setgroups`, `setresgid`, `setresuid` to `mail_owner` and `PR_SET_NO_NEW_PRIVS`. Only then do the shards
//! start: the queue, Maildirs, logs and everything a client can influence are handled without privileges.

use std::ffi::CString;
use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::Path;

use crate::limits;

/// Why the switch could not be made; each says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("mail_owner {0:?}: no such user (create it, e.g. `useradd --system --home-dir /var/spool/shardmta --shell /usr/sbin/nologin {0}`)")]
    NoSuchUser(String),
    #[error("mail_owner {0:?} is root (uid 0): name an unprivileged account")]
    IsRoot(String),
    #[error("mail_owner {name:?} needs the server to start as root (it runs as uid {uid})")]
    NotRoot { name: String, uid: u32 },
    #[error("cannot switch to mail_owner {name:?}: {source}")]
    Switch { name: String, source: io::Error },
    #[error("after switching to mail_owner {name:?} the process still has {what}")]
    StillPrivileged { name: String, what: String },
    #[error("queue_directory {path}: {reason}")]
    Spool { path: String, reason: String },
    #[error("{key} = {value} cannot be used with mail_owner {owner:?} (id {own}): local delivery runs as mail_owner, without the privilege to give files to another owner; leave {key} unset or set it to {own}")]
    LocalOwner {
        key: &'static str,
        value: u32,
        owner: String,
        own: u32,
    },
}

impl MailOwner {
    /// Local delivery after the switch writes as this account: a configured mailbox owner must be this one.
    pub fn check_local(&self, local: &crate::config::LocalConfig) -> Result<(), PrivilegeError> {
        for (key, value, own) in [
            ("local.mailbox_uid", local.mailbox_uid, self.uid),
            ("local.mailbox_gid", local.mailbox_gid, self.gid),
        ] {
            if let Some(v) = value.filter(|&v| v != own) {
                return Err(PrivilegeError::LocalOwner {
                    key,
                    value: v,
                    owner: self.name.clone(),
                    own,
                });
            }
        }
        Ok(())
    }
}

/// The account the server runs as after start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailOwner {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

impl MailOwner {
    /// Looks `name` up in the system's accounts.
    pub fn lookup(name: &str) -> Result<MailOwner, PrivilegeError> {
        let c = CString::new(name).map_err(|_| PrivilegeError::NoSuchUser(name.to_string()))?;
        let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
        let mut buf = vec![0 as libc::c_char; limits::PASSWD_ENTRY_BYTES_MAX];
        let mut out: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call; getpwnam_r writes strings into buf only.
        let rc =
            unsafe { libc::getpwnam_r(c.as_ptr(), &mut pw, buf.as_mut_ptr(), buf.len(), &mut out) };
        if rc != 0 || out.is_null() {
            return Err(PrivilegeError::NoSuchUser(name.to_string()));
        }
        if pw.pw_uid == 0 {
            return Err(PrivilegeError::IsRoot(name.to_string()));
        }
        Ok(MailOwner {
            name: name.to_string(),
            uid: pw.pw_uid,
            gid: pw.pw_gid,
        })
    }
}

/// The effective uid now.
pub fn euid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// Creates `queue_directory` for `owner` if it is missing (0700, owned by it); an existing one must already
/// belong to it (the server never changes the owner of files it finds: `chown -R` is the administrator's).
pub fn prepare_spool(path: &Path, owner: &MailOwner) -> Result<(), PrivilegeError> {
    let spool_err = |reason: String| PrivilegeError::Spool {
        path: path.display().to_string(),
        reason,
    };
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::create_dir_all(path).map_err(|e| spool_err(e.to_string()))?;
            use std::os::unix::fs::PermissionsExt;
            // The mode first, while root owns it: changing the mode of another user's directory would need
            // CAP_FOWNER, which the systemd unit does not grant (tuning/shardmta.service).
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
                .and_then(|()| std::os::unix::fs::lchown(path, Some(owner.uid), Some(owner.gid)))
                .map_err(|e| spool_err(e.to_string()))
        }
        Err(e) => Err(spool_err(e.to_string())),
        Ok(_) => {
            let md = std::fs::metadata(path).map_err(|e| spool_err(e.to_string()))?;
            use std::os::unix::fs::MetadataExt;
            if md.uid() != owner.uid {
                return Err(spool_err(format!(
                    "owned by uid {} but mail_owner {:?} is uid {}: run `chown -R {}: {}`",
                    md.uid(),
                    owner.name,
                    owner.uid,
                    owner.name,
                    path.display()
                )));
            }
            Ok(())
        }
    }
}

/// A listening TCP socket on `addr` with SO_REUSEPORT (one per shard and listener address: the kernel spreads
/// connections over them), bound now, while the process may still bind privileged ports.
pub fn bind_listener(addr: SocketAddr) -> io::Result<OwnedFd> {
    use rustix::net::{sockopt, AddressFamily, SocketFlags, SocketType};
    let family = if addr.is_ipv6() {
        AddressFamily::INET6
    } else {
        AddressFamily::INET
    };
    // Non-blocking: the shard accepts with accept4(2) at once and waits for readiness only when nothing waits.
    let fd = rustix::net::socket_with(
        family,
        SocketType::STREAM,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )?;
    sockopt::set_socket_reuseport(&fd, true)?;
    sockopt::set_socket_reuseaddr(&fd, true)?;
    // Accepted connections inherit TCP_NODELAY from the listener (Linux copies the listener's TCP state into
    // each new socket): one setsockopt(2) here instead of one per connection. A session writes each batch of
    // replies once, so Nagle would only delay them.
    sockopt::set_tcp_nodelay(&fd, true)?;
    rustix::net::bind(&fd, &addr)?;
    rustix::net::listen(&fd, limits::LISTEN_BACKLOG_CONNECTIONS_MAX)?;
    Ok(fd)
}

/// Whether another process holds `addr`: binds a socket there WITHOUT SO_REUSEPORT (with SO_REUSEADDR, so the
/// TIME_WAIT connections a previous run left do not count) and closes it at once. The kernel refuses that bind
/// (EADDRINUSE) while any socket listens on the address or on one that covers it, SO_REUSEPORT or not, from any
/// user: so a second instance of this server (which binds with SO_REUSEPORT as the same user, and would
/// otherwise silently take half of the connections into its own spool) cannot start beside the first. Call it
/// for every listener before [`bind_listener`].
pub fn probe_address_free(addr: SocketAddr) -> io::Result<()> {
    use rustix::net::{sockopt, AddressFamily, SocketFlags, SocketType};
    let family = if addr.is_ipv6() {
        AddressFamily::INET6
    } else {
        AddressFamily::INET
    };
    let fd = rustix::net::socket_with(family, SocketType::STREAM, SocketFlags::CLOEXEC, None)?;
    sockopt::set_socket_reuseaddr(&fd, true)?;
    rustix::net::bind(&fd, &addr)?;
    Ok(())
}

/// The capability sets of this process from /proc (hex masks): (effective, permitted).
fn capabilities() -> Option<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
    };
    Some((field("CapEff:")?, field("CapPrm:")?))
}

/// Becomes `owner` for good: no supplementary groups but its own, its gid and uid as real, effective and saved
/// ids (so nothing can switch back), no new privileges through exec, and no capability left; checked after.
/// Call while the process has a single thread (glibc applies the id calls to every thread anyway).
pub fn drop_to(owner: &MailOwner) -> Result<(), PrivilegeError> {
    let fail = |source: io::Error| PrivilegeError::Switch {
        name: owner.name.clone(),
        source,
    };
    let groups = [owner.gid];
    // SAFETY: plain id system calls with valid arguments.
    unsafe {
        if libc::setgroups(groups.len(), groups.as_ptr()) != 0 {
            return Err(fail(io::Error::last_os_error()));
        }
        if libc::setresgid(owner.gid, owner.gid, owner.gid) != 0 {
            return Err(fail(io::Error::last_os_error()));
        }
        if libc::setresuid(owner.uid, owner.uid, owner.uid) != 0 {
            return Err(fail(io::Error::last_os_error()));
        }
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(fail(io::Error::last_os_error()));
        }
    }
    let still = |what: String| PrivilegeError::StillPrivileged {
        name: owner.name.clone(),
        what,
    };
    let (mut r, mut e, mut s) = (0, 0, 0);
    // SAFETY: the pointers are valid u32 locations.
    unsafe { libc::getresuid(&mut r, &mut e, &mut s) };
    if [r, e, s] != [owner.uid; 3] {
        return Err(still(format!("uids {r}/{e}/{s}")));
    }
    // SAFETY: setuid(0) must fail now; if it did not, undoing it is moot: the process stops with an error.
    if unsafe { libc::setuid(0) } == 0 {
        return Err(still("the power to become root again".into()));
    }
    match capabilities() {
        Some((0, 0)) => Ok(()),
        Some((eff, prm)) => Err(still(format!(
            "capabilities (effective {eff:x}, permitted {prm:x})"
        ))),
        None => Err(still("capabilities that cannot be read".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_refuses_root_and_unknown() {
        assert!(matches!(
            MailOwner::lookup("root"),
            Err(PrivilegeError::IsRoot(_))
        ));
        assert!(matches!(
            MailOwner::lookup("no-such-user-shardmta"),
            Err(PrivilegeError::NoSuchUser(_))
        ));
        let nobody = MailOwner::lookup("nobody").unwrap();
        assert_ne!(nobody.uid, 0);
    }

    /// The listener is non-blocking (an accept with nothing waiting returns at once, which the shard's accept
    /// relies on) and its TCP_NODELAY is what every accepted connection has: the sessions set it no more.
    #[test]
    fn listeners_do_not_block_and_pass_nodelay_to_accepted_connections() {
        use rustix::net::sockopt;
        let l: std::net::TcpListener = bind_listener("127.0.0.1:0".parse().unwrap())
            .unwrap()
            .into();
        let e = l.accept().unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
        let _client = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let accepted = loop {
            match l.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(std::time::Instant::now() < deadline, "no connection");
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        assert!(sockopt::tcp_nodelay(&accepted).unwrap());
        // A listener without it gives connections without it: the test would see a missing option.
        let plain = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let _c2 = std::net::TcpStream::connect(plain.local_addr().unwrap()).unwrap();
        let (a2, _) = plain.accept().unwrap();
        assert!(!sockopt::tcp_nodelay(&a2).unwrap());
    }

    #[test]
    fn listeners_bind_with_reuseport() {
        let a = bind_listener("127.0.0.1:0".parse().unwrap()).unwrap();
        let a: std::net::TcpListener = a.into();
        let port = a.local_addr().unwrap().port();
        // A second socket on the same port while the first listens (one per shard).
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let b: std::net::TcpListener = bind_listener(addr).unwrap().into();
        assert_eq!(b.local_addr().unwrap().port(), port);
        // A port taken by a socket without SO_REUSEPORT is refused.
        let plain = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let taken = plain.local_addr().unwrap();
        let e = bind_listener(taken).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EADDRINUSE));
    }

    /// The start's probe sees another instance's SO_REUSEPORT listeners (same user), on the address itself and
    /// through a wildcard, but not a free address, nor a previous run's TIME_WAIT connections.
    #[test]
    fn the_probe_sees_an_address_held_with_reuseport() {
        let first: std::net::TcpListener = bind_listener("127.0.0.1:0".parse().unwrap())
            .unwrap()
            .into();
        let port = first.local_addr().unwrap().port();
        let same: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        for addr in [
            same,
            format!("0.0.0.0:{port}").parse().unwrap(),
            format!("[::]:{port}").parse().unwrap(),
        ] {
            let e = probe_address_free(addr).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EADDRINUSE), "{addr}");
        }
        // Without the probe a second SO_REUSEPORT socket binds beside the first: what the probe is for.
        let _second: std::net::TcpListener = bind_listener(same).unwrap().into();
        // A TIME_WAIT left by a closed connection does not count.
        let plain = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = plain.local_addr().unwrap();
        let c = std::net::TcpStream::connect(addr).unwrap();
        let (served, _) = plain.accept().unwrap();
        drop(served); // the server side closes first: its end goes to TIME_WAIT
        let mut b = [0u8; 1];
        let _ = std::io::Read::read(&mut &c, &mut b);
        drop(c);
        drop(plain);
        probe_address_free(addr).unwrap();
        // And a free address is free.
        drop(first);
        drop(_second);
        probe_address_free(same).unwrap();
    }
}
