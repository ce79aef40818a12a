//! Owns: symlink-safe resolution and creation of Maildir paths, and the creation, renaming and removal of
//! the files delivered into them (always relative to directory descriptors the walk opened).
//!
//! [`open_maildir`] resolves a Maildir path one component at a time with `openat(O_PATH|O_NOFOLLOW)` from
//! `/` (or from the working directory for a relative path), so no symlink is followed unless the walk
//! decides to:
//! - a symlink is followed only if it is owned by root or by the server's own euid (an administrator's
//!   `/home -> /data/home`); one owned by anybody else (the mailbox owner included) is refused;
//! - every directory must be owned by root, the server's euid or the Maildir's owner, and must not be
//!   writable by group or others unless it is sticky and owned by root (`/tmp`);
//! - a missing component is created with `mkdirat`: parents 0755, the Maildir and its tmp/, new/ and cur/
//!   0700. While the walk is in directories of root or the server it creates as the server (and hands a
//!   Maildir it created to the owner with `fchown`); from the first directory the owner owns on downwards it
//!   acts as the owner (a root server switches the thread's fs identity, [`super::fsid`]), so the kernel
//!   checks each step as for the owner and what is created is theirs;
//! - the Maildir, tmp/ and new/ must be owned by the Maildir's owner; tmp/ and new/ must be real directories.
//!
//! A refusal is a [`WalkError::Refused`] naming the component and the reason; the recipient is deferred with
//! `451 4.3.0`. The starting directory (`/` or the working directory) is trusted as it is.
//!
//! The caller keeps the Maildir's descriptors ([`OpenMaildir`]) and does the rest relative to them, as the
//! owner: [`create_fresh`] unlinks any entry of the file's name in tmp/ and creates the file with
//! `O_CREAT|O_EXCL|O_NOFOLLOW` (never writing through a planted symlink or hard link), [`rename`] moves it
//! into new/ with `renameat`, [`unlink`] removes it; directory syncs use the new/ descriptor.

use std::collections::VecDeque;
use std::ffi::{CStr, CString, OsStr, OsString};
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Component, Path, PathBuf};

use super::fsid::{self, Acting, Ident};
use super::maildir::{self, FILE_MODE};
use crate::limits;

/// What fstat/fstatat return (rustix's `struct stat`).
type Stat = rustix::fs::Stat;

/// Mode of parent directories the walk creates (traversable, e.g. `mail/<domain>/`).
pub const PARENT_MODE: u32 = 0o755;
/// Mode of a created Maildir and of its tmp/, new/ and cur/.
pub const MAILDIR_MODE: u32 = 0o700;

/// A Maildir opened by [`open_maildir`]: its descriptors and the identity to use inside it.
#[derive(Debug)]
pub struct OpenMaildir {
    /// The configured path (for replies and logs only; nothing is opened by it again).
    pub path: PathBuf,
    pub dir: OwnedFd,
    pub tmp: OwnedFd,
    pub new: OwnedFd,
    /// The file system (st_dev).
    pub dev: u64,
    /// The identity every operation inside the Maildir runs with ([`fsid::as_owner`]); None: the server's.
    pub acting: Option<Ident>,
    /// Owner to give files created inside, when the identity creating them is not the owner (a server not
    /// running as root, or root delivering for uid 0 with another gid).
    pub chown: Option<Ident>,
}

impl OpenMaildir {
    /// The path of `name` in tmp/, for replies.
    pub fn tmp_path(&self, name: &CStr) -> PathBuf {
        self.path
            .join("tmp")
            .join(OsStr::from_bytes(name.to_bytes()))
    }

    /// The path of new/, for replies.
    pub fn new_path(&self) -> PathBuf {
        self.path.join("new")
    }
}

/// Why a Maildir could not be opened.
#[derive(Debug)]
pub enum WalkError {
    /// A component breaks the rules (see the module doc).
    Refused { path: PathBuf, reason: String },
    /// A system call failed.
    Io {
        what: &'static str,
        path: PathBuf,
        err: io::Error,
    },
}

impl WalkError {
    /// The deferral reply: `451 4.3.0` naming the component and the reason, or the file-system error's
    /// class (`452 4.2.2` for a full disk or quota).
    pub fn reply(&self, maildir: &Path) -> String {
        match self {
            WalkError::Refused { path, reason } => format!(
                "451 4.3.0 refusing Maildir {}: {} {reason}",
                maildir.display(),
                path.display()
            ),
            WalkError::Io { what, path, err } => maildir::defer_reply(what, path, err),
        }
    }
}

/// A step of a path.
enum Part {
    Root,
    Up,
    Name(OsString),
}

fn parts(p: &Path) -> Vec<Part> {
    p.components()
        .filter_map(|c| match c {
            Component::RootDir => Some(Part::Root),
            Component::ParentDir => Some(Part::Up),
            Component::Normal(n) => Some(Part::Name(n.to_os_string())),
            Component::CurDir | Component::Prefix(_) => None,
        })
        .collect()
}

fn cstring(name: &OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "name contains a NUL byte"))
}

fn errno_is(e: &io::Error, code: i32) -> bool {
    e.raw_os_error() == Some(code)
}

/// `openat(dir, name, flags | O_CLOEXEC)` (no O_CREAT; `flags` are libc's `O_*` bits).
fn open_at(dir: BorrowedFd, name: &CStr, flags: libc::c_int) -> io::Result<OwnedFd> {
    let flags = rustix::fs::OFlags::from_bits_retain(flags as u32) | rustix::fs::OFlags::CLOEXEC;
    Ok(rustix::fs::openat(
        dir,
        name,
        flags,
        rustix::fs::Mode::empty(),
    )?)
}

fn mkdir_at(dir: BorrowedFd, name: &CStr, mode: u32) -> io::Result<()> {
    Ok(rustix::fs::mkdirat(
        dir,
        name,
        rustix::fs::Mode::from_raw_mode(mode),
    )?)
}

fn stat_fd(fd: BorrowedFd) -> io::Result<Stat> {
    Ok(rustix::fs::fstat(fd)?)
}

/// lstat of `name` in `dir`.
fn stat_at(dir: BorrowedFd, name: &CStr) -> io::Result<Stat> {
    Ok(rustix::fs::statat(
        dir,
        name,
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )?)
}

/// Gives the object `fd` refers to (an O_PATH descriptor works too) to `owner`.
fn chown_fd(fd: BorrowedFd, owner: Ident) -> io::Result<()> {
    use rustix::fs::{Gid, Uid};
    // AT_EMPTY_PATH with the empty path: fchownat acts on `fd` itself.
    Ok(rustix::fs::chownat(
        fd,
        c"",
        Some(Uid::from_raw(owner.uid)),
        Some(Gid::from_raw(owner.gid)),
        rustix::fs::AtFlags::EMPTY_PATH,
    )?)
}

/// The target of the symlink that `fd` (O_PATH|O_NOFOLLOW) refers to; at most `PATH_MAX` bytes.
fn readlink_fd(fd: BorrowedFd) -> io::Result<PathBuf> {
    // With an empty path readlinkat reads the link `fd` refers to.
    let target = rustix::fs::readlinkat(fd, c"", Vec::new())?.into_bytes();
    if target.len() >= libc::PATH_MAX as usize {
        return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    Ok(PathBuf::from(OsString::from_vec(target)))
}

fn file_type(st: &Stat) -> libc::mode_t {
    st.st_mode & libc::S_IFMT
}

/// A directory on the walk's way and its owner.
struct Dir {
    fd: OwnedFd,
    uid: u32,
}

struct Walker {
    /// The server's effective identity (trusted, as root is).
    server: Ident,
    /// The Maildir's owner.
    owner: Ident,
    /// The identity to switch to from the owner's first directory on (root delivering for another uid).
    acting_id: Option<Ident>,
    /// The switch, once made (restored when the walker is dropped).
    acting: Option<Acting>,
    /// From the starting directory to the current one.
    stack: Vec<Dir>,
    /// Whether the bottom of `stack` is `/` (else the working directory).
    rooted: bool,
    /// The path walked so far, for replies.
    shown: PathBuf,
}

impl Walker {
    fn refuse(&self, reason: impl Into<String>) -> WalkError {
        WalkError::Refused {
            path: self.shown.clone(),
            reason: reason.into(),
        }
    }

    fn io(&self, what: &'static str, err: io::Error) -> WalkError {
        WalkError::Io {
            what,
            path: self.shown.clone(),
            err,
        }
    }

    fn trusted(&self, uid: u32) -> bool {
        uid == 0 || uid == self.server.uid
    }

    fn trusted_names(&self) -> String {
        if self.server.uid == 0 {
            "root".to_string()
        } else {
            format!("root or the server (uid {})", self.server.uid)
        }
    }

    /// Who creates what the walk creates now.
    fn creator(&self) -> Ident {
        match (&self.acting, self.acting_id) {
            (Some(_), Some(id)) => id,
            _ => self.server,
        }
    }

    fn top(&self) -> Result<BorrowedFd<'_>, WalkError> {
        self.stack
            .last()
            .map(|d| d.fd.as_fd())
            .ok_or_else(|| self.refuse("has no directory to start from"))
    }

    /// Starts (again) at `/` (`rooted`) or at the working directory, trusted as they are.
    fn start_at(&mut self, rooted: bool) -> Result<(), WalkError> {
        self.rooted = rooted;
        self.shown = PathBuf::from(if rooted { "/" } else { "." });
        let at = if rooted { c"/" } else { c"." };
        let fd = open_at(rustix::fs::CWD, at, libc::O_PATH | libc::O_DIRECTORY)
            .map_err(|e| self.io("open", e))?;
        let st = stat_fd(fd.as_fd()).map_err(|e| self.io("stat", e))?;
        self.stack.clear();
        self.stack.push(Dir { fd, uid: st.st_uid });
        Ok(())
    }

    /// `..`: back to the directory the walk came from (the physical parent, as every directory on the
    /// stack was entered from the one below it); above the working directory, the parent is checked like any
    /// other directory.
    fn up(&mut self) -> Result<(), WalkError> {
        if self.stack.len() > 1 {
            self.stack.pop();
            self.shown.pop();
            return Ok(());
        }
        if self.rooted {
            return Ok(()); // "/.." is "/"
        }
        self.shown.push("..");
        let fd = open_at(self.top()?, c"..", libc::O_PATH | libc::O_DIRECTORY)
            .map_err(|e| self.io("open", e))?;
        let st = stat_fd(fd.as_fd()).map_err(|e| self.io("stat", e))?;
        self.check_dir(&st)?;
        self.stack.clear();
        self.enter(fd, &st)
    }

    /// The owner and mode rules for a directory on the way.
    fn check_dir(&self, st: &Stat) -> Result<(), WalkError> {
        let uid = st.st_uid;
        if !self.trusted(uid) && uid != self.owner.uid {
            return Err(self.refuse(format!(
                "is owned by uid {uid}, neither {} nor the mailbox owner (uid {})",
                self.trusted_names(),
                self.owner.uid
            )));
        }
        let mode = st.st_mode;
        let sticky_root = mode & libc::S_ISVTX != 0 && uid == 0;
        if mode & 0o022 != 0 && !sticky_root {
            return Err(self.refuse(format!(
                "is writable by group or others (mode {:04o}) and not a sticky directory owned by root",
                mode & 0o7777
            )));
        }
        Ok(())
    }

    /// Makes `fd` the current directory; from the owner's first directory on, acts as the owner.
    fn enter(&mut self, fd: OwnedFd, st: &Stat) -> Result<(), WalkError> {
        if self.acting.is_none() {
            if let Some(id) = self.acting_id.filter(|id| id.uid == st.st_uid) {
                self.acting = Some(fsid::act_as(id).map_err(|e| self.io("enter", e))?);
            }
        }
        self.stack.push(Dir { fd, uid: st.st_uid });
        Ok(())
    }

    /// One named component: opened without following it, created if missing (`last`: it is the Maildir).
    /// Returns a symlink's target when the symlink is to be followed.
    fn step(&mut self, name: &OsStr, last: bool) -> Result<Option<PathBuf>, WalkError> {
        self.shown.push(name);
        let c = cstring(name).map_err(|e| self.io("open", e))?;
        let flags = libc::O_PATH | libc::O_NOFOLLOW;
        let mut created = false;
        let fd = match open_at(self.top()?, &c, flags) {
            Ok(fd) => fd,
            Err(e) if errno_is(&e, libc::ENOENT) => {
                let mode = if last { MAILDIR_MODE } else { PARENT_MODE };
                match mkdir_at(self.top()?, &c, mode) {
                    Ok(()) => created = true,
                    Err(e) if errno_is(&e, libc::EEXIST) => {}
                    Err(e) => return Err(self.io("create", e)),
                }
                open_at(self.top()?, &c, flags).map_err(|e| self.io("open", e))?
            }
            Err(e) => return Err(self.io("open", e)),
        };
        let mut st = stat_fd(fd.as_fd()).map_err(|e| self.io("stat", e))?;
        match file_type(&st) {
            libc::S_IFDIR => {}
            libc::S_IFLNK => {
                if !self.trusted(st.st_uid) {
                    return Err(self.refuse(format!(
                        "is a symlink owned by uid {}; only symlinks owned by {} are followed",
                        st.st_uid,
                        self.trusted_names()
                    )));
                }
                let target = readlink_fd(fd.as_fd()).map_err(|e| self.io("read symlink", e))?;
                self.shown.pop();
                return Ok(Some(target));
            }
            _ => return Err(self.refuse("is not a directory")),
        }
        if created && last && self.creator() != self.owner {
            // Made by the server in a directory of its own: handed to the owner before anything else
            // happens in it (nobody else can reach it meanwhile: its parent is not writable by others).
            chown_fd(fd.as_fd(), self.owner).map_err(|e| self.io("hand over", e))?;
            st.st_uid = self.owner.uid;
            st.st_gid = self.owner.gid;
        }
        self.check_dir(&st)?;
        self.enter(fd, &st)?;
        Ok(None)
    }

    /// tmp/ or new/ of the Maildir `dir`: a real directory of the owner's, created if missing; opened for
    /// reading (the `*at` calls and the directory fsync need that).
    fn subdir(&mut self, dir: BorrowedFd, name: &CStr) -> Result<OwnedFd, WalkError> {
        self.shown.push(OsStr::from_bytes(name.to_bytes()));
        let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW;
        let mut created = false;
        let opened = match open_at(dir, name, flags) {
            Err(e) if errno_is(&e, libc::ENOENT) => {
                match mkdir_at(dir, name, MAILDIR_MODE) {
                    Ok(()) => created = true,
                    Err(e) if errno_is(&e, libc::EEXIST) => {}
                    Err(e) => return Err(self.io("create", e)),
                }
                open_at(dir, name, flags)
            }
            r => r,
        };
        let fd = match opened {
            Ok(fd) => fd,
            Err(e) if errno_is(&e, libc::ELOOP) || errno_is(&e, libc::ENOTDIR) => {
                let symlink = stat_at(dir, name).is_ok_and(|st| file_type(&st) == libc::S_IFLNK);
                return Err(self.refuse(if symlink {
                    "is a symlink (not followed inside a Maildir)"
                } else {
                    "is not a directory"
                }));
            }
            Err(e) => return Err(self.io("open", e)),
        };
        let st = stat_fd(fd.as_fd()).map_err(|e| self.io("stat", e))?;
        if created && self.creator() != self.owner {
            chown_fd(fd.as_fd(), self.owner).map_err(|e| self.io("hand over", e))?;
        } else if st.st_uid != self.owner.uid {
            return Err(self.refuse(format!(
                "is owned by uid {}, not by the mailbox owner (uid {})",
                st.st_uid, self.owner.uid
            )));
        } else {
            self.check_dir(&st)?;
        }
        self.shown.pop();
        Ok(fd)
    }

    /// cur/: created if missing (delivery never writes there, so an existing one is left as it is).
    fn ensure_cur(&mut self, dir: BorrowedFd) -> Result<(), WalkError> {
        self.shown.push("cur");
        match mkdir_at(dir, c"cur", MAILDIR_MODE) {
            Ok(()) if self.creator() != self.owner => {
                let fd = open_at(dir, c"cur", libc::O_PATH | libc::O_NOFOLLOW)
                    .map_err(|e| self.io("open", e))?;
                chown_fd(fd.as_fd(), self.owner).map_err(|e| self.io("hand over", e))?;
            }
            Ok(()) => {}
            Err(e) if errno_is(&e, libc::EEXIST) => {}
            Err(e) => return Err(self.io("create", e)),
        }
        self.shown.pop();
        Ok(())
    }
}

/// Opens (creating what is missing) the Maildir at `path` for `owner` (None: the server itself), by the
/// rules of the module doc. The calling thread's identity is its own again when this returns.
pub fn open_maildir(path: &Path, owner: Option<Ident>) -> Result<OpenMaildir, WalkError> {
    let server = Ident::effective();
    let owner = owner.unwrap_or(server);
    let acting_id = (server.uid == 0 && owner.uid != 0).then_some(owner);
    let mut w = Walker {
        server,
        owner,
        acting_id,
        acting: None,
        stack: Vec::new(),
        rooted: false,
        shown: PathBuf::new(),
    };
    w.start_at(path.is_absolute())?;
    let mut pending: VecDeque<Part> = parts(path).into();
    let mut links = 0;
    while let Some(part) = pending.pop_front() {
        match part {
            Part::Root => w.start_at(true)?,
            Part::Up => w.up()?,
            Part::Name(name) => {
                let last = pending.is_empty();
                if let Some(target) = w.step(&name, last)? {
                    links += 1;
                    if links > limits::LOCAL_SYMLINKS_FOLLOWED_MAX {
                        return Err(w.refuse("has too many symlinks on its way"));
                    }
                    for p in parts(&target).into_iter().rev() {
                        pending.push_front(p);
                    }
                }
            }
        }
    }
    let top_uid = w.stack.last().map_or(u32::MAX, |d| d.uid);
    if top_uid != owner.uid {
        return Err(w.refuse(format!(
            "is owned by uid {top_uid}, not by the mailbox owner (uid {})",
            owner.uid
        )));
    }
    if let (None, Some(id)) = (&w.acting, acting_id) {
        // Reached through "..": act as the owner inside all the same.
        w.acting = Some(fsid::act_as(id).map_err(|e| w.io("enter", e))?);
    }
    let dir =
        open_at(w.top()?, c".", libc::O_RDONLY | libc::O_DIRECTORY).map_err(|e| w.io("open", e))?;
    let tmp = w.subdir(dir.as_fd(), c"tmp")?;
    let new = w.subdir(dir.as_fd(), c"new")?;
    w.ensure_cur(dir.as_fd())?;
    let dev = stat_fd(dir.as_fd()).map_err(|e| w.io("stat", e))?.st_dev;
    let creator = w.creator();
    Ok(OpenMaildir {
        path: path.to_path_buf(),
        dir,
        tmp,
        new,
        dev,
        acting: acting_id,
        chown: (creator != owner).then_some(owner),
    })
}

/// Removes `name` from `dir`; a missing entry is fine.
pub fn unlink(dir: BorrowedFd, name: &CStr) -> io::Result<()> {
    match rustix::fs::unlinkat(dir, name, rustix::fs::AtFlags::empty()) {
        Err(rustix::io::Errno::NOENT) => Ok(()),
        r => Ok(r?),
    }
}

/// Creates `name` in `dir` as a new file (mode 0600) holding `content`, handed to `chown` if given; not
/// synced. An entry already there (this delivery's own file from before a crash, or something planted) is
/// unlinked first and the file is created with `O_EXCL|O_NOFOLLOW`, so a planted symlink or hard link is
/// never written through.
pub fn create_fresh(
    dir: BorrowedFd,
    name: &CStr,
    content: &[u8],
    chown: Option<Ident>,
) -> io::Result<File> {
    unlink(dir, name)?;
    use rustix::fs::OFlags;
    let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let fd = rustix::fs::openat(dir, name, flags, rustix::fs::Mode::from_raw_mode(FILE_MODE))?;
    let mut f = File::from(fd);
    f.write_all(content)?;
    if let Some(o) = chown {
        std::os::unix::fs::fchown(&f, Some(o.uid), Some(o.gid))?;
    }
    Ok(f)
}

/// `renameat(from, name, to, name)`: replaces an entry of that name in `to` (not following it).
pub fn rename(from: BorrowedFd, to: BorrowedFd, name: &CStr) -> io::Result<()> {
    Ok(rustix::fs::renameat(from, name, to, name)?)
}

/// fsync(2) of an open descriptor (a directory's, to make renames into it durable).
pub fn fsync(fd: BorrowedFd) -> io::Result<()> {
    Ok(rustix::fs::fsync(fd)?)
}

/// syncfs(2) of the file system `fd` is on.
pub fn syncfs(fd: BorrowedFd) -> io::Result<()> {
    Ok(rustix::fs::syncfs(fd)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    const NOBODY: Ident = Ident {
        uid: 65534,
        gid: 65534,
    };
    /// Somebody else.
    const STRANGER: u32 = 65533;

    fn root_tempdir() -> tempfile::TempDir {
        assert_eq!(
            Ident::effective().uid,
            0,
            "the test suite runs as root (CI does too)"
        );
        let d = tempfile::tempdir().unwrap();
        set_mode(d.path(), 0o755);
        d
    }

    fn set_mode(p: &Path, mode: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    fn owner_mode(p: &Path) -> (u32, u32, u32) {
        let m = std::fs::symlink_metadata(p).unwrap();
        (m.uid(), m.gid(), m.mode() & 0o7777)
    }

    fn lchown(p: &Path, uid: u32, gid: u32) {
        std::os::unix::fs::lchown(p, Some(uid), Some(gid)).unwrap();
    }

    fn refused(r: Result<OpenMaildir, WalkError>) -> (PathBuf, String) {
        match r {
            Err(WalkError::Refused { path, reason }) => (path, reason),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn missing_components_are_created_with_owners_and_modes() {
        let base = root_tempdir();
        let md = base.path().join("mail/example.com/alice/Maildir");
        let o = open_maildir(&md, Some(NOBODY)).unwrap();
        assert_eq!(o.acting, Some(NOBODY));
        assert_eq!(o.chown, None);
        assert_eq!(fsid::fsuid(), 0, "identity restored after the walk");
        for p in ["mail", "mail/example.com", "mail/example.com/alice"] {
            assert_eq!(owner_mode(&base.path().join(p)), (0, 0, 0o755), "{p}");
        }
        assert_eq!(owner_mode(&md), (65534, 65534, 0o700));
        for s in ["tmp", "new", "cur"] {
            assert_eq!(owner_mode(&md.join(s)), (65534, 65534, 0o700), "{s}");
        }
        assert_eq!(o.dev, std::fs::metadata(&md).unwrap().dev());
        // Files are created as the owner, fresh, and renamed into new/ through the descriptors.
        let name = c"1.Q1R0.mx,S=5";
        fsid::as_owner(o.acting, || {
            let f = create_fresh(o.tmp.as_fd(), name, b"hello", o.chown).unwrap();
            f.sync_data().unwrap();
            rename(o.tmp.as_fd(), o.new.as_fd(), name).unwrap();
            fsync(o.new.as_fd()).unwrap();
            syncfs(o.dir.as_fd()).unwrap();
        })
        .unwrap();
        let file = md.join("new/1.Q1R0.mx,S=5");
        assert_eq!(owner_mode(&file), (65534, 65534, 0o600));
        assert_eq!(std::fs::read(&file).unwrap(), b"hello");
        // Opened again: nothing to create, the same.
        drop(o);
        let again = open_maildir(&md, Some(NOBODY)).unwrap();
        assert_eq!(again.path, md);
        // Without an owner (root delivering as root): root's.
        let rootmd = base.path().join("mail/example.com/root/Maildir");
        let r = open_maildir(&rootmd, None).unwrap();
        assert_eq!((r.acting, r.chown), (None, None));
        assert_eq!(owner_mode(&rootmd.join("new")), (0, 0, 0o700));
    }

    #[test]
    fn below_the_owners_directory_everything_is_created_as_the_owner() {
        let base = root_tempdir();
        let home = base.path().join("home/alice");
        std::fs::create_dir_all(&home).unwrap();
        lchown(&home, NOBODY.uid, NOBODY.gid);
        set_mode(&home, 0o700);
        let md = home.join("mail/Maildir");
        open_maildir(&md, Some(NOBODY)).unwrap();
        assert_eq!(owner_mode(&home.join("mail")), (65534, 65534, 0o755));
        assert_eq!(owner_mode(&md), (65534, 65534, 0o700));
        assert_eq!(owner_mode(&md.join("cur")), (65534, 65534, 0o700));
        // A root-owned directory inside the owner's stays out of reach: the walk acts as the owner there.
        let locked = home.join("locked");
        std::fs::create_dir(&locked).unwrap();
        set_mode(&locked, 0o700);
        match open_maildir(&locked.join("Maildir"), Some(NOBODY)) {
            Err(WalkError::Io { err, .. }) => {
                assert_eq!(err.kind(), io::ErrorKind::PermissionDenied, "{err}")
            }
            other => panic!("expected EACCES, got {other:?}"),
        }
        assert!(!locked.join("Maildir").exists());
    }

    #[test]
    fn symlinks_owned_by_root_are_followed() {
        let base = root_tempdir();
        let real = base.path().join("data/home");
        std::fs::create_dir_all(&real).unwrap();
        // Absolute and relative targets, and a Maildir that is itself a link.
        std::os::unix::fs::symlink(&real, base.path().join("home")).unwrap();
        std::os::unix::fs::symlink("data/home", base.path().join("rel")).unwrap();
        let md = base.path().join("home/alice/Maildir");
        open_maildir(&md, Some(NOBODY)).unwrap();
        assert_eq!(
            owner_mode(&real.join("alice/Maildir")),
            (65534, 65534, 0o700)
        );
        assert!(real.join("alice/Maildir/new").is_dir());
        open_maildir(&base.path().join("rel/bob/Maildir"), Some(NOBODY)).unwrap();
        assert!(real.join("bob/Maildir/tmp").is_dir());
        let carol = real.join("carol");
        std::fs::create_dir(&carol).unwrap();
        std::os::unix::fs::symlink("../alice/./Maildir", carol.join("Maildir")).unwrap();
        let o = open_maildir(&base.path().join("home/carol/Maildir"), Some(NOBODY)).unwrap();
        assert_eq!(
            o.dev,
            std::fs::metadata(real.join("alice/Maildir")).unwrap().dev()
        );
        // ".." in the configured path goes back the way the walk came.
        open_maildir(
            &base.path().join("home/alice/../dave/Maildir"),
            Some(NOBODY),
        )
        .unwrap();
        assert!(real.join("dave/Maildir/cur").is_dir());
    }

    #[test]
    fn symlinks_owned_by_a_user_are_refused() {
        let base = root_tempdir();
        let secret = base.path().join("secret");
        std::fs::create_dir(&secret).unwrap();
        set_mode(&secret, 0o700);
        let home = base.path().join("home/mallory");
        std::fs::create_dir_all(&home).unwrap();
        lchown(&home, NOBODY.uid, NOBODY.gid);
        let link = home.join("Maildir");
        std::os::unix::fs::symlink(&secret, &link).unwrap();
        lchown(&link, NOBODY.uid, NOBODY.gid);
        let (path, reason) = refused(open_maildir(&link, Some(NOBODY)));
        assert_eq!(path, link);
        assert!(reason.contains("symlink owned by uid 65534"), "{reason}");
        assert_eq!(std::fs::read_dir(&secret).unwrap().count(), 0);
        // A user's symlink higher up, and one planted for tmp/ inside a good Maildir, likewise.
        let up = base.path().join("home/up");
        std::os::unix::fs::symlink(&secret, &up).unwrap();
        lchown(&up, NOBODY.uid, NOBODY.gid);
        refused(open_maildir(&up.join("x/Maildir"), Some(NOBODY)));
        let md = home.join("real");
        open_maildir(&md, Some(NOBODY)).unwrap();
        std::fs::remove_dir(md.join("tmp")).unwrap();
        std::os::unix::fs::symlink(&secret, md.join("tmp")).unwrap();
        lchown(&md.join("tmp"), NOBODY.uid, NOBODY.gid);
        let e = open_maildir(&md, Some(NOBODY)).unwrap_err();
        assert!(
            e.reply(&md).starts_with("451 4.3.0 ") && e.reply(&md).contains("is a symlink"),
            "{}",
            e.reply(&md)
        );
        assert_eq!(std::fs::read_dir(&secret).unwrap().count(), 0);
        // new/ as a plain file.
        std::fs::remove_file(md.join("tmp")).unwrap();
        std::fs::remove_dir(md.join("new")).unwrap();
        std::fs::write(md.join("new"), b"").unwrap();
        let (_, reason) = refused(open_maildir(&md, Some(NOBODY)));
        assert_eq!(reason, "is not a directory");
    }

    #[test]
    fn foreign_owners_and_writable_directories_are_refused() {
        let base = root_tempdir();
        let bob = base.path().join("home/bob");
        std::fs::create_dir_all(&bob).unwrap();
        lchown(&bob, STRANGER, STRANGER);
        let (path, reason) = refused(open_maildir(&bob.join("Maildir"), Some(NOBODY)));
        assert_eq!(path, bob);
        assert!(reason.contains("owned by uid 65533"), "{reason}");
        assert!(!bob.join("Maildir").exists());
        let open = base.path().join("open");
        std::fs::create_dir(&open).unwrap();
        set_mode(&open, 0o777);
        let (_, reason) = refused(open_maildir(&open.join("a/Maildir"), Some(NOBODY)));
        assert!(
            reason.contains("writable by group or others (mode 0777)"),
            "{reason}"
        );
        // Sticky and root's (like /tmp): fine.
        set_mode(&open, 0o1777);
        open_maildir(&open.join("a/Maildir"), Some(NOBODY)).unwrap();
        // A Maildir that is not the owner's.
        let theirs = base.path().join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        set_mode(&theirs, 0o700);
        let (_, reason) = refused(open_maildir(&theirs, Some(NOBODY)));
        assert!(
            reason.contains("not by the mailbox owner (uid 65534)"),
            "{reason}"
        );
    }

    #[test]
    fn planted_links_in_tmp_are_replaced_not_written_through() {
        let base = root_tempdir();
        let victim = base.path().join("shadow");
        std::fs::write(&victim, b"root:secret\n").unwrap();
        set_mode(&victim, 0o600);
        let md = base.path().join("mail/alice/Maildir");
        let o = open_maildir(&md, Some(NOBODY)).unwrap();
        let sym = md.join("tmp/a");
        std::os::unix::fs::symlink(&victim, &sym).unwrap();
        lchown(&sym, NOBODY.uid, NOBODY.gid);
        std::fs::hard_link(&victim, md.join("tmp/b")).unwrap();
        fsid::as_owner(o.acting, || {
            for name in [c"a", c"b"] {
                create_fresh(o.tmp.as_fd(), name, b"mail\n", o.chown).unwrap();
                rename(o.tmp.as_fd(), o.new.as_fd(), name).unwrap();
            }
        })
        .unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"root:secret\n");
        assert_eq!(owner_mode(&victim), (0, 0, 0o600));
        for n in ["a", "b"] {
            let p = md.join("new").join(n);
            assert!(std::fs::symlink_metadata(&p).unwrap().is_file());
            assert_eq!(owner_mode(&p), (65534, 65534, 0o600));
            assert_eq!(std::fs::read(&p).unwrap(), b"mail\n");
        }
        assert_eq!(std::fs::read_dir(md.join("tmp")).unwrap().count(), 0);
    }
}
