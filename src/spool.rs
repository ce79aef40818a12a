//! Owns safe access to the spool's own files: directories held open as descriptors, files opened relative to
//! them with `O_NOFOLLOW` (never through a symlink), the ownership and mode checks that every spool directory
//! and file must pass, and the `corrupt/` area where unreadable queue bytes are kept for an operator.
//!
//! The rules (see README, "Security model"):
//! - the spool root (`queue_directory`) must be a directory owned by the server's user and not writable by
//!   group or others (it is created 0700 when missing);
//! - every directory below it that the server makes (`shard-N/`, `corrupt/`) is 0700, every file 0600;
//! - a file is used only if it is a regular file owned by the server's user with one link; a symlink, a
//!   device, a FIFO, a hard link or a foreign file is refused, never opened for writing.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};

use rustix::fs::{Mode, OFlags};
use std::path::{Path, PathBuf};

/// Mode of every directory the server creates in the spool.
pub const DIR_MODE: u32 = 0o700;
/// Mode of every file the server creates in the spool.
pub const FILE_MODE: u32 = 0o600;

/// Why a spool path is not used.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The path exists but must not be used (symlink, foreign owner, writable by others, ...).
    #[error("{path}: {reason}")]
    Unsafe { path: PathBuf, reason: String },
}

impl SpoolError {
    fn io(path: &Path, source: io::Error) -> SpoolError {
        SpoolError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// The underlying I/O error, if this is one.
    pub fn io_error(&self) -> Option<&io::Error> {
        match self {
            SpoolError::Io { source, .. } => Some(source),
            SpoolError::Unsafe { .. } => None,
        }
    }
}

/// The effective uid of this process: the owner every spool file must have.
pub fn server_uid() -> u32 {
    rustix::process::geteuid().as_raw()
}

fn fstat(fd: impl AsFd) -> io::Result<rustix::fs::Stat> {
    Ok(rustix::fs::fstat(fd)?)
}

/// `flags` (libc's `O_*` bits, the same values as the kernel's) as rustix's.
fn oflags(flags: libc::c_int) -> OFlags {
    OFlags::from_bits_retain(flags as u32)
}

/// A directory of the spool, held open: every name below it is resolved relative to this descriptor, so a
/// rename or symlink swap of a path component cannot redirect the server's writes.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    path: PathBuf,
}

impl Dir {
    /// Opens (creating it 0700 if it does not exist) the spool root `path`. Refused: not a directory, not
    /// owned by the server's user, writable by group or others.
    pub fn open_root(path: &Path) -> Result<Dir, SpoolError> {
        let created = match std::fs::DirBuilder::new().create(path) {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => false,
            // A missing parent: create the chain (the parents get the umask's mode, as mkdir -p does).
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                std::fs::create_dir_all(path).map_err(|e| SpoolError::io(path, e))?;
                true
            }
            Err(e) => return Err(SpoolError::io(path, e)),
        };
        if created {
            // Created by us: 0700 whatever the umask.
            rustix::fs::chmod(path, Mode::from_raw_mode(DIR_MODE))
                .map_err(|e| SpoolError::io(path, e.into()))?;
        }
        // The root itself may be reached through an administrator's symlink (e.g. /var/spool/shardmta ->
        // /data/spool); what it resolves to must pass the checks.
        let fd = rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| SpoolError::io(path, e.into()))?;
        let dir = Dir {
            fd,
            path: path.to_path_buf(),
        };
        dir.check_dir(false)?;
        Ok(dir)
    }

    /// Opens the subdirectory `name`, creating it 0700 if missing; refuses a symlink or a foreign or
    /// group/other-accessible directory (a directory of ours with a looser mode is tightened to 0700).
    pub fn subdir(&self, name: &str) -> Result<Dir, SpoolError> {
        let path = self.path.join(name);
        match rustix::fs::mkdirat(&self.fd, name, Mode::from_raw_mode(DIR_MODE)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(SpoolError::io(&path, e.into())),
        }
        let fd = self.openat_nofollow(
            name,
            &path,
            libc::O_RDONLY | libc::O_DIRECTORY,
            "is a symlink or not a directory; the spool's directories must be real directories",
        )?;
        let dir = Dir { fd, path };
        dir.check_dir(true)?;
        Ok(dir)
    }

    /// Owner and mode checks of an open directory; `tighten`: set 0700 on a directory of ours with other bits.
    fn check_dir(&self, tighten: bool) -> Result<(), SpoolError> {
        let st = fstat(&self.fd).map_err(|e| SpoolError::io(&self.path, e))?;
        let uid = server_uid();
        if st.st_uid != uid {
            return Err(SpoolError::Unsafe {
                path: self.path.clone(),
                reason: format!(
                    "owned by uid {} but the server runs as uid {uid}: the spool must belong to the server's user (chown -R)",
                    st.st_uid
                ),
            });
        }
        let mode = st.st_mode & 0o7777;
        if mode & 0o022 != 0 {
            return Err(SpoolError::Unsafe {
                path: self.path.clone(),
                reason: format!(
                    "mode {mode:04o} lets group or others write to it: chmod 700 {}",
                    self.path.display()
                ),
            });
        }
        if tighten && mode & 0o077 != 0 {
            rustix::fs::fchmod(&self.fd, Mode::from_raw_mode(DIR_MODE))
                .map_err(|e| SpoolError::io(&self.path, e.into()))?;
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// A second handle to the same directory (for a helper thread).
    pub fn try_clone(&self) -> io::Result<Dir> {
        Ok(Dir {
            fd: self.fd.try_clone()?,
            path: self.path.clone(),
        })
    }

    /// Opens the existing file `name` (read-write or read-only) without following a symlink, and checks that
    /// it is a regular file owned by the server's user with one link; a looser mode is tightened to 0600.
    pub fn open_file(&self, name: &str, write: bool) -> Result<File, SpoolError> {
        let access = if write { libc::O_RDWR } else { libc::O_RDONLY };
        self.open_checked(name, access, write)
    }

    /// `openat` of `name` with `flags` plus `O_NOFOLLOW` (a symlink is [`SpoolError::Unsafe`]) and
    /// `O_NONBLOCK` (opening a FIFO planted under the name must not hang; cleared after), then the file checks.
    fn open_checked(
        &self,
        name: &str,
        flags: libc::c_int,
        tighten: bool,
    ) -> Result<File, SpoolError> {
        let path = self.path.join(name);
        // O_NONBLOCK: opening a FIFO planted under the name must not hang (cleared below).
        let fd = self.openat_nofollow(
            name,
            &path,
            flags | libc::O_NONBLOCK | libc::O_NOCTTY,
            "is a symlink",
        )?;
        let file = File::from(fd);
        check_file(&file, &path, tighten)?;
        // Back to blocking mode for ordinary I/O.
        if let Ok(fl) = rustix::fs::fcntl_getfl(&file) {
            let _ = rustix::fs::fcntl_setfl(&file, fl - OFlags::NONBLOCK);
        }
        Ok(file)
    }

    /// `openat(name, flags | O_NOFOLLOW | O_CLOEXEC)` relative to this directory (mode 0600 if `flags` create
    /// the file); a symlink (ELOOP, or ENOTDIR for `O_DIRECTORY`) is [`SpoolError::Unsafe`] with `refusal`.
    fn openat_nofollow(
        &self,
        name: &str,
        path: &Path,
        flags: libc::c_int,
        refusal: &str,
    ) -> Result<OwnedFd, SpoolError> {
        let opened = rustix::fs::openat(
            &self.fd,
            name,
            oflags(flags) | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(FILE_MODE),
        )
        .map_err(io::Error::from);
        match opened {
            Ok(fd) => Ok(fd),
            Err(e)
                if e.raw_os_error() == Some(libc::ELOOP)
                    || (flags & libc::O_DIRECTORY != 0
                        && e.raw_os_error() == Some(libc::ENOTDIR)) =>
            {
                Err(SpoolError::Unsafe {
                    path: path.to_path_buf(),
                    reason: refusal.into(),
                })
            }
            Err(e) => Err(SpoolError::io(path, e)),
        }
    }

    /// Creates `name` as a new file (mode 0600), replacing a leftover of ours by that name: the old name is
    /// unlinked first and the new file is created with `O_EXCL | O_NOFOLLOW`, so a planted symlink or hard link
    /// is never written through.
    pub fn create_file(&self, name: &str) -> Result<File, SpoolError> {
        let path = self.path.join(name);
        match self.unlink(name) {
            Ok(()) => {}
            Err(SpoolError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        self.create_new(name).map_err(|e| SpoolError::io(&path, e))
    }

    /// Creates `name` with `O_CREAT | O_EXCL | O_NOFOLLOW`, mode 0600 (fails if anything has that name).
    pub fn create_new(&self, name: &str) -> io::Result<File> {
        let fd = rustix::fs::openat(
            &self.fd,
            name,
            OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(FILE_MODE),
        )?;
        let file = File::from(fd);
        // Whatever the umask: 0600.
        rustix::fs::fchmod(&file, Mode::from_raw_mode(FILE_MODE))?;
        Ok(file)
    }

    /// Opens `name` for appending, creating it 0600 if missing; an existing one must pass the file checks.
    pub fn open_append(&self, name: &str) -> Result<File, SpoolError> {
        self.open_checked(name, libc::O_WRONLY | libc::O_APPEND | libc::O_CREAT, true)
    }

    /// Removes `name` (a symlink is removed itself, never its target).
    pub fn unlink(&self, name: &str) -> Result<(), SpoolError> {
        let path = self.path.join(name);
        rustix::fs::unlinkat(&self.fd, name, rustix::fs::AtFlags::empty())
            .map_err(|e| SpoolError::io(&path, e.into()))
    }

    /// Renames `from` in this directory to `to` in `dest` (the entry itself moves, whatever it is).
    pub fn rename(&self, from: &str, dest: &Dir, to: &str) -> Result<(), SpoolError> {
        let path = self.path.join(from);
        rustix::fs::renameat(&self.fd, from, &dest.fd, to)
            .map_err(|e| SpoolError::io(&path, e.into()))
    }

    /// Replaces `name` with `bytes` atomically: written to `<name>.tmp` (created as [`Dir::create_file`] does,
    /// never through a link), then renamed over `name`. With `durable` the file is fsynced before the rename
    /// and this directory after it, so a crash leaves the old content or the new one, never a part.
    pub fn replace_file(&self, name: &str, bytes: &[u8], durable: bool) -> Result<(), SpoolError> {
        use std::io::Write;
        let tmp = format!("{name}.tmp");
        let path = self.path.join(&tmp);
        let mut f = self.create_file(&tmp)?;
        f.write_all(bytes)
            .and_then(|()| if durable { f.sync_all() } else { Ok(()) })
            .map_err(|e| SpoolError::io(&path, e))?;
        drop(f);
        self.rename(&tmp, self, name)?;
        if durable {
            self.sync()?;
        }
        Ok(())
    }

    /// Makes creations, renames and unlinks in this directory durable.
    pub fn sync(&self) -> Result<(), SpoolError> {
        rustix::fs::fsync(&self.fd).map_err(|e| SpoolError::io(&self.path, e.into()))
    }

    /// The names in this directory (read through this descriptor), without `.` and `..`; names that are not
    /// UTF-8 are left out (the server never makes such names).
    pub fn names(&self) -> Result<Vec<String>, SpoolError> {
        // read_from opens "." again: an offset of its own, from the start.
        let dir = rustix::fs::Dir::read_from(&self.fd)
            .map_err(|e| SpoolError::io(&self.path, e.into()))?;
        let mut out = Vec::new();
        // Bounded by the directory's entries.
        for ent in dir {
            let ent = ent.map_err(|e| SpoolError::io(&self.path, e.into()))?;
            if let Ok(s) = ent.file_name().to_str() {
                if s != "." && s != ".." {
                    out.push(s.to_string());
                }
            }
        }
        Ok(out)
    }
}

/// Reads the whole regular file at `path` without following a symlink in its last component (read-only
/// tools: `queue list`, `queue cat`; they may run as another user than the server, so ownership is not checked).
pub fn read_regular_file(path: &Path) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let fd = rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK | OFlags::NOCTTY,
        Mode::empty(),
    )?;
    let mut f = File::from(fd);
    let st = fstat(&f)?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a regular file",
        ));
    }
    // A queue file is never 4 GiB or more: a larger (perhaps sparse) one is not read.
    if st.st_size < 0 || st.st_size as u64 > u32::MAX as u64 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "larger than any queue file",
        ));
    }
    let mut v = Vec::with_capacity(st.st_size as usize);
    f.read_to_end(&mut v)?;
    Ok(v)
}

/// A file the spool may use: regular, owned by the server's user, one link; mode tightened to 0600 when it is
/// opened for writing.
fn check_file(file: &File, path: &Path, tighten: bool) -> Result<(), SpoolError> {
    let st = fstat(file).map_err(|e| SpoolError::io(path, e))?;
    let unsafe_file = |reason: String| SpoolError::Unsafe {
        path: path.to_path_buf(),
        reason,
    };
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(unsafe_file("is not a regular file".into()));
    }
    let uid = server_uid();
    if st.st_uid != uid {
        return Err(unsafe_file(format!(
            "owned by uid {} but the server runs as uid {uid}",
            st.st_uid
        )));
    }
    if st.st_nlink != 1 {
        return Err(unsafe_file(format!(
            "has {} hard links (a spool file has exactly one)",
            st.st_nlink
        )));
    }
    if tighten && st.st_mode & 0o077 != 0 {
        rustix::fs::fchmod(file, Mode::from_raw_mode(FILE_MODE))
            .map_err(|e| SpoolError::io(path, e.into()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn root_is_created_private_and_checked() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("spool");
        let d = Dir::open_root(&root).unwrap();
        assert_eq!(
            std::fs::metadata(&root).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let s = d.subdir("shard-0").unwrap();
        assert_eq!(
            std::fs::metadata(root.join("shard-0"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o700
        );
        drop(s);
        // Writable by others: refused.
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = Dir::open_root(&root).unwrap_err().to_string();
        assert!(e.contains("chmod 700"), "{e}");
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700)).unwrap();
        // A looser shard directory of ours is tightened.
        std::fs::set_permissions(root.join("shard-0"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        let d = Dir::open_root(&root).unwrap();
        d.subdir("shard-0").unwrap();
        assert_eq!(
            std::fs::metadata(root.join("shard-0"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o700
        );
    }

    /// A symlink planted at the temporary name (or at the name itself) is replaced, never written through.
    #[test]
    fn replace_file_never_writes_through_a_planted_link() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("spool");
        let d = Dir::open_root(&root).unwrap();
        let victim = t.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        std::os::unix::fs::symlink(&victim, root.join("list.tmp")).unwrap();
        d.replace_file("list", b"one", true).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        assert_eq!(std::fs::read_to_string(root.join("list")).unwrap(), "one");
        assert!(!root.join("list.tmp").exists());
        // Now the name itself is a symlink: the rename replaces the link, the target stays.
        std::fs::remove_file(root.join("list")).unwrap();
        std::os::unix::fs::symlink(&victim, root.join("list")).unwrap();
        d.replace_file("list", b"two", false).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        assert!(!std::fs::symlink_metadata(root.join("list"))
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read_to_string(root.join("list")).unwrap(), "two");
    }

    #[test]
    fn symlinks_and_hard_links_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("spool");
        let d = Dir::open_root(&root).unwrap();
        let victim = t.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        std::os::unix::fs::symlink(&victim, root.join("a.seg")).unwrap();
        assert!(matches!(
            d.open_file("a.seg", true),
            Err(SpoolError::Unsafe { .. })
        ));
        assert!(matches!(
            d.open_append("a.seg"),
            Err(SpoolError::Unsafe { .. })
        ));
        // create_file replaces the link itself, never writes through it.
        let mut f = d.create_file("a.seg").unwrap();
        std::io::Write::write_all(&mut f, b"ours").unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert_eq!(
            std::fs::metadata(root.join("a.seg"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
        std::fs::hard_link(&victim, root.join("b.seg")).unwrap();
        let e = d.open_file("b.seg", true).unwrap_err().to_string();
        assert!(e.contains("hard links"), "{e}");
        std::os::unix::fs::symlink(t.path(), root.join("sub")).unwrap();
        assert!(matches!(d.subdir("sub"), Err(SpoolError::Unsafe { .. })));
        // A FIFO is not a regular file (and opening it does not hang).
        rustix::fs::mknodat(
            rustix::fs::CWD,
            root.join("c.seg"),
            rustix::fs::FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let e = d.open_file("c.seg", false).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        let mut names = d.names().unwrap();
        names.sort();
        assert_eq!(names, vec!["a.seg", "b.seg", "c.seg", "sub"]);
    }
}
