//! Owns the file-system identity under which local delivery acts inside a mailbox owner's Maildir: a root
//! server switches one thread's fsuid/fsgid to the owner's (and drops that thread's supplementary groups)
//! for the span of one synchronous closure, as Postfix's local(8) and Dovecot's LDA deliver as the user.
//!
//! Only per-thread system calls are used: `setfsuid`/`setfsgid` (glibc passes them straight to the kernel)
//! and the raw `setgroups` system call (rustix's `set_thread_groups`; glibc's `setgroups()` applies itself to every thread of the process,
//! as do `setuid`/`seteuid`, which would change the identity of the SMTP shards too). The kernel keeps these
//! ids per thread; while the fsuid is not 0 the thread's capabilities that override file permissions and
//! ownership (CAP_DAC_OVERRIDE, CAP_FOWNER, CAP_CHOWN, ...) are off, so the kernel checks every access as
//! for the owner, and what the thread creates belongs to the owner.
//!
//! The identity is restored when the [`Acting`] guard is dropped (also on early return or unwinding); a
//! guard is not `Send`, so it cannot be dropped on another thread. A closure given to [`as_owner`] must not
//! yield to other work on the same thread (no `.await` inside) nor start threads (they would inherit the
//! identity).

use std::io;
use std::marker::PhantomData;

/// A uid and gid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ident {
    pub uid: u32,
    pub gid: u32,
}

impl Ident {
    /// The process's effective uid and gid.
    pub fn effective() -> Ident {
        Ident {
            uid: rustix::process::geteuid().as_raw(),
            gid: rustix::process::getegid().as_raw(),
        }
    }
}

/// An id that is not valid: `setfsuid`/`setfsgid` then change nothing and return the current value.
const QUERY: u32 = u32::MAX;

/// This thread's fsuid.
pub fn fsuid() -> u32 {
    // SAFETY: setfsuid has no memory arguments; an invalid id changes nothing.
    unsafe { libc::setfsuid(QUERY) as u32 }
}

/// This thread's fsgid.
pub fn fsgid() -> u32 {
    // SAFETY: as in fsuid.
    unsafe { libc::setfsgid(QUERY) as u32 }
}

/// Sets this thread's fsuid and checks that it took (setfsuid reports no errors, only the previous value).
fn set_fsuid(uid: u32) -> io::Result<()> {
    // SAFETY: setfsuid has no memory arguments.
    let _previous = unsafe { libc::setfsuid(uid) };
    let now = fsuid();
    if now != uid {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("setfsuid({uid}) did not take (fsuid is {now})"),
        ));
    }
    Ok(())
}

/// Sets this thread's fsgid and checks that it took.
fn set_fsgid(gid: u32) -> io::Result<()> {
    // SAFETY: setfsgid has no memory arguments.
    let _previous = unsafe { libc::setfsgid(gid) };
    let now = fsgid();
    if now != gid {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("setfsgid({gid}) did not take (fsgid is {now})"),
        ));
    }
    Ok(())
}

/// This thread's supplementary groups (rustix's getgroups is the plain system call: it reads the calling
/// thread's credentials).
pub fn thread_groups() -> io::Result<Vec<libc::gid_t>> {
    Ok(rustix::process::getgroups()?
        .into_iter()
        .map(|g| g.as_raw())
        .collect())
}

/// Sets this thread's supplementary groups only (rustix's `set_thread_groups` is the raw system call, the
/// 32-bit-id one on x86 and arm; glibc's setgroups would change every thread, see the module doc).
fn set_thread_groups(groups: &[libc::gid_t]) -> io::Result<()> {
    let groups: Vec<rustix::thread::Gid> = groups
        .iter()
        .map(|&g| rustix::thread::Gid::from_raw(g))
        .collect();
    Ok(rustix::thread::set_thread_groups(&groups)?)
}

/// This thread acts as another identity until the guard is dropped; see [`act_as`].
#[must_use]
pub struct Acting {
    uid: u32,
    gid: u32,
    groups: Vec<libc::gid_t>,
    /// Not Send: the ids belong to the thread that switched them.
    _thread: PhantomData<*const ()>,
}

/// Makes `id` this thread's file-system identity with no supplementary groups, until the returned guard
/// is dropped. Fails (with the thread's identity unchanged) when the process may not do it, e.g. it is
/// not root.
pub fn act_as(id: Ident) -> io::Result<Acting> {
    let guard = Acting {
        uid: fsuid(),
        gid: fsgid(),
        groups: thread_groups()?,
        _thread: PhantomData,
    };
    let switch = || -> io::Result<()> {
        // Groups and gid first: changing them needs CAP_SETGID, which the fsuid switch leaves alone, but
        // nothing is done as the owner before the fsuid is theirs too.
        set_thread_groups(&[])?;
        set_fsgid(id.gid)?;
        set_fsuid(id.uid)
    };
    switch().map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot act as uid {} gid {}: {e}", id.uid, id.gid),
        )
    })?;
    Ok(guard)
}

impl Drop for Acting {
    fn drop(&mut self) {
        let restored = set_fsuid(self.uid)
            .and_then(|()| set_fsgid(self.gid))
            .and_then(|()| set_thread_groups(&self.groups));
        if let Err(e) = restored {
            // Cannot happen for a process that could switch; continuing would do later work (for other
            // mailboxes) with the wrong identity.
            eprintln!(
                "shardmta: cannot restore the local-delivery thread's file-system identity: {e}"
            );
            std::process::abort();
        }
    }
}

/// Runs `f` with `id` as this thread's file-system identity (None: the thread's own), restoring it after.
/// Err only if the switch failed (then `f` did not run).
pub fn as_owner<T>(id: Option<Ident>, f: impl FnOnce() -> T) -> io::Result<T> {
    let _acting = id.map(act_as).transpose()?;
    Ok(f())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    const NOBODY: Ident = Ident {
        uid: 65534,
        gid: 65534,
    };

    fn assert_root() {
        assert_eq!(
            Ident::effective().uid,
            0,
            "the test suite runs as root (CI does too)"
        );
    }

    #[test]
    fn acts_as_the_owner_on_this_thread_only_and_restores() {
        assert_root();
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let shared = dir.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
        let before = thread_groups().unwrap();
        let (other_tx, other_rx) = std::sync::mpsc::channel::<()>();
        let (seen_tx, seen_rx) = std::sync::mpsc::channel();
        let other = std::thread::spawn(move || {
            other_rx.recv().unwrap();
            seen_tx.send((fsuid(), fsgid())).unwrap();
        });
        as_owner(Some(NOBODY), || {
            assert_eq!((fsuid(), fsgid()), (NOBODY.uid, NOBODY.gid));
            assert_eq!(thread_groups().unwrap(), Vec::<libc::gid_t>::new());
            // Another thread of the process keeps root's identity meanwhile.
            other_tx.send(()).unwrap();
            assert_eq!(seen_rx.recv().unwrap(), (0, 0));
            // Root-only places are closed; what is created belongs to the owner.
            assert_eq!(
                std::fs::write(dir.path().join("x"), b"x")
                    .unwrap_err()
                    .kind(),
                io::ErrorKind::PermissionDenied
            );
            std::fs::write(shared.join("f"), b"x").unwrap();
        })
        .unwrap();
        other.join().unwrap();
        assert_eq!((fsuid(), fsgid()), (0, 0));
        assert_eq!(thread_groups().unwrap(), before);
        let m = std::fs::metadata(shared.join("f")).unwrap();
        assert_eq!((m.uid(), m.gid()), (NOBODY.uid, NOBODY.gid));
        std::fs::write(dir.path().join("x"), b"root again").unwrap();
    }

    #[test]
    fn restores_on_early_return_and_panic() {
        assert_root();
        let r: io::Result<io::Result<()>> = as_owner(Some(NOBODY), || {
            Err(io::Error::other("early"))?;
            Ok(())
        });
        assert!(r.unwrap().is_err());
        assert_eq!((fsuid(), fsgid()), (0, 0));
        let p = std::panic::catch_unwind(|| {
            let _g = act_as(NOBODY).unwrap();
            panic!("inside");
        });
        assert!(p.is_err());
        assert_eq!((fsuid(), fsgid()), (0, 0));
        // None: no switch at all.
        assert_eq!(as_owner(None, fsuid).unwrap(), 0);
    }
}
