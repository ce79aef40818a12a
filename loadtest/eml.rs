//! `--eml PATH`: messages from a .eml file or a directory of them, loaded
//! once at start and kept in wire form (CRLF line ends, ending with CRLF;
//! dot-stuffed for DATA, not for BDAT), then sent round-robin by message
//! number.

use std::fs::File;
use std::io::Read as _;
use std::path::{Path, PathBuf};

/// Largest message file accepted.
pub const MAX_FILE_BYTES: u64 = 64 << 20;
/// Most directory entries looked at.
pub const MAX_DIR_ENTRIES: usize = 100_000;
/// Cap on all messages together, in memory.
pub const MAX_TOTAL_BYTES: u64 = 1 << 30;

/// Converts a message to its wire form: bare LF becomes CRLF, with `stuff`
/// (DATA) a line that starts with '.' gets another '.', and the result ends
/// with CRLF (unless empty). The terminating ".\r\n" is not included.
pub fn to_wire(raw: &[u8], stuff: bool, out: &mut Vec<u8>) {
    out.clear();
    out.reserve(raw.len() + raw.len() / 32 + 2);
    let mut line_start = true;
    let mut prev = 0u8;
    for &b in raw {
        if stuff && line_start && b == b'.' {
            out.push(b'.');
        }
        if b == b'\n' && prev != b'\r' {
            out.push(b'\r');
        }
        out.push(b);
        line_start = b == b'\n';
        prev = b;
    }
    if !out.is_empty() && !out.ends_with(b"\r\n") {
        if out.ends_with(b"\r") {
            out.push(b'\n');
        } else {
            out.extend_from_slice(b"\r\n");
        }
    }
}

fn read_limited(path: &Path) -> Result<Vec<u8>, String> {
    let f = File::open(path).map_err(|e| format!("--eml {}: {e}", path.display()))?;
    let mut raw = Vec::new();
    f.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut raw)
        .map_err(|e| format!("--eml {}: {e}", path.display()))?;
    if raw.len() as u64 > MAX_FILE_BYTES {
        return Err(format!(
            "--eml {}: file larger than {} MiB",
            path.display(),
            MAX_FILE_BYTES >> 20
        ));
    }
    Ok(raw)
}

fn is_eml(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("eml"))
}

/// The message files at `path`: the file itself, or the `*.eml` regular
/// files of a directory (not recursive), sorted by name.
pub fn list(path: &Path) -> Result<Vec<PathBuf>, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("--eml {}: {e}", path.display()))?;
    if !meta.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let rd = std::fs::read_dir(path).map_err(|e| format!("--eml {}: {e}", path.display()))?;
    let mut files = Vec::new();
    for (n, entry) in rd.enumerate() {
        if n >= MAX_DIR_ENTRIES {
            return Err(format!(
                "--eml {}: directory has more than {MAX_DIR_ENTRIES} entries; use a smaller set",
                path.display()
            ));
        }
        let entry = entry.map_err(|e| format!("--eml {}: {e}", path.display()))?;
        let p = entry.path();
        if is_eml(&p) && std::fs::metadata(&p).is_ok_and(|m| m.is_file()) {
            files.push(p);
        }
    }
    if files.is_empty() {
        return Err(format!("--eml {}: no *.eml files in it", path.display()));
    }
    files.sort();
    Ok(files)
}

/// Loads every message in wire form; `stuff`: dot-stuffed for DATA (false
/// for BDAT).
pub fn load(path: &Path, stuff: bool) -> Result<Vec<Vec<u8>>, String> {
    let files = list(path)?;
    let mut out = Vec::with_capacity(files.len());
    let mut total = 0u64;
    for f in &files {
        let size = std::fs::metadata(f)
            .map_err(|e| format!("--eml {}: {e}", f.display()))?
            .len();
        if size > MAX_FILE_BYTES {
            return Err(format!(
                "--eml {}: file larger than {} MiB",
                f.display(),
                MAX_FILE_BYTES >> 20
            ));
        }
        let raw = read_limited(f)?;
        let mut wire = Vec::new();
        to_wire(&raw, stuff, &mut wire);
        total += wire.len() as u64;
        if total > MAX_TOTAL_BYTES {
            return Err(format!(
                "--eml {}: the messages add up to more than {} MiB",
                path.display(),
                MAX_TOTAL_BYTES >> 20
            ));
        }
        out.push(wire);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(raw: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        to_wire(raw, true, &mut v);
        v
    }

    #[test]
    fn bdat_form_is_not_dot_stuffed() {
        let mut v = Vec::new();
        to_wire(b".hidden\n..two\nend", false, &mut v);
        assert_eq!(v, b".hidden\r\n..two\r\nend\r\n");
    }

    #[test]
    fn lf_becomes_crlf_and_dots_are_stuffed() {
        assert_eq!(wire(b"a\nb\n"), b"a\r\nb\r\n");
        assert_eq!(wire(b"a\r\nb\r\n"), b"a\r\nb\r\n");
        assert_eq!(wire(b"a\r\nb"), b"a\r\nb\r\n");
        assert_eq!(wire(b".x\n.\n..y\nz.\n"), b"..x\r\n..\r\n...y\r\nz.\r\n");
        assert_eq!(wire(b"S: x\r\n\r\n.\r\nend"), b"S: x\r\n\r\n..\r\nend\r\n");
        assert_eq!(wire(b"lone\rcr\n"), b"lone\rcr\r\n");
        assert_eq!(wire(b"ends in cr\r"), b"ends in cr\r\n");
        assert_eq!(wire(b""), b"");
        // A bare LF after a CR-LF pair is still converted.
        assert_eq!(wire(b"a\r\n\nb"), b"a\r\n\r\nb\r\n");
    }

    #[test]
    fn directory_lists_eml_files_sorted_and_bounded() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("b.eml"), b"Subject: b\n\nB\n").expect("write");
        std::fs::write(dir.path().join("a.EML"), b"Subject: a\n\n.A\n").expect("write");
        std::fs::write(dir.path().join("notes.txt"), b"skip").expect("write");
        std::fs::create_dir(dir.path().join("sub.eml")).expect("mkdir");
        let msgs = load(dir.path(), true).expect("load");
        assert_eq!(msgs.len(), 2);
        assert_eq!(msgs[0], b"Subject: a\r\n\r\n..A\r\n");
        assert_eq!(msgs[1], b"Subject: b\r\n\r\nB\r\n");
        // A single file.
        let one = load(&dir.path().join("b.eml"), true).expect("load");
        assert_eq!(one.len(), 1);
        // No .eml files, missing path.
        let empty = tempfile::tempdir().expect("tempdir");
        assert!(load(empty.path(), true)
            .unwrap_err()
            .contains("no *.eml files"));
        assert!(load(&empty.path().join("missing.eml"), true).is_err());
    }

    #[test]
    fn oversized_file_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("big.eml");
        let f = File::create(&p).expect("create");
        // Sparse: no real disk use.
        f.set_len(MAX_FILE_BYTES + 1).expect("set_len");
        let e = load(&p, true).unwrap_err();
        assert!(e.contains("larger than 64 MiB"), "{e}");
    }
}
