//! The compile step's output, as it crosses from a sandbox (or a container) to the host.
//!
//! Whatever a compile step leaves in `/build` is untrusted: it may hold symbolic links to
//! host files, hard links, devices, fifos, a million files. So the host never walks that
//! directory. The listing and the reading happen where the build happened (the sandbox's
//! own mount namespace, or the container), and what crosses is a byte stream, the frame:
//!
//! ```text
//! CRUCIBLE-BUILD 1\n
//! status exited <code> | status signaled <sig> | status failed\n
//! stdout <len>\n<len bytes>
//! stderr <len>\n<len bytes>
//! tar <len>\n<len bytes: a tar of /build>   (or `tar *`: the rest of the stream)
//! ```
//!
//! The host parses it ([`parse`]) and extracts the tar into a directory it has just
//! created ([`extract`]), keeping regular files (mode 0755 or 0644) and directories only,
//! with every name checked; it never creates a link, so nothing under that directory can
//! lead anywhere else. Other entries are skipped and counted.

use std::io::Read;
use std::path::{Component, Path};

/// The first line of a frame.
pub const MAGIC: &str = "CRUCIBLE-BUILD 1";

/// How the compiler ended, as its parent in the sandbox saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Exited(i32),
    Signaled(i32),
    /// The compiler could not be started.
    Failed,
}

/// A parsed frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub status: Status,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub tar: Vec<u8>,
}

/// Write a frame (the sandbox side).
pub fn write_frame(
    out: &mut impl std::io::Write,
    status: Status,
    stdout: &[u8],
    stderr: &[u8],
    tar: &[u8],
) -> std::io::Result<()> {
    let status = match status {
        Status::Exited(c) => format!("exited {c}"),
        Status::Signaled(s) => format!("signaled {s}"),
        Status::Failed => "failed".to_string(),
    };
    write!(out, "{MAGIC}\nstatus {status}\n")?;
    for (name, bytes) in [("stdout", stdout), ("stderr", stderr), ("tar", tar)] {
        writeln!(out, "{name} {}", bytes.len())?;
        out.write_all(bytes)?;
    }
    out.flush()
}

/// Parse a frame; `None` if it is not one (the step died before writing it, or the
/// bytes were cut).
pub fn parse(bytes: &[u8]) -> Option<Frame> {
    let mut rest = bytes;
    let mut line = || -> Option<String> {
        let i = rest.iter().position(|b| *b == b'\n')?;
        let l = std::str::from_utf8(&rest[..i]).ok()?.to_string();
        rest = &rest[i + 1..];
        Some(l)
    };
    if line()? != MAGIC {
        return None;
    }
    let status_line = line()?;
    let status = match status_line.strip_prefix("status ")?.split_once(' ') {
        Some(("exited", c)) => Status::Exited(c.trim().parse().ok()?),
        Some(("signaled", s)) => Status::Signaled(s.trim().parse().ok()?),
        None if status_line == "status failed" => Status::Failed,
        _ => return None,
    };
    let mut parts = Vec::new();
    for name in ["stdout", "stderr", "tar"] {
        let i = rest.iter().position(|b| *b == b'\n')?;
        let head = std::str::from_utf8(&rest[..i]).ok()?;
        let len = head.strip_prefix(name)?.trim();
        rest = &rest[i + 1..];
        // `tar *`: the rest of the stream (a container's tar goes straight to stdout).
        let len: usize = match len {
            "*" if name == "tar" => rest.len(),
            n => n.parse().ok()?,
        };
        if rest.len() < len {
            return None;
        }
        parts.push(rest[..len].to_vec());
        rest = &rest[len..];
    }
    let tar = parts.pop()?;
    let stderr = parts.pop()?;
    let stdout = parts.pop()?;
    Some(Frame {
        status,
        stdout,
        stderr,
        tar,
    })
}

/// What [`extract`] wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Extracted {
    pub files: u64,
    pub bytes: u64,
    /// Entries that were not regular files or directories (links, devices, fifos), or
    /// had a name that is not a plain relative path: not written.
    pub skipped: u64,
}

/// Extract `tar` into `dest`, which must be a new, empty directory the caller created.
/// At most `max_files` files and `max_bytes` bytes; beyond that it is an error.
pub fn extract(
    tar: &[u8],
    dest: &Path,
    max_files: u64,
    max_bytes: u64,
) -> Result<Extracted, String> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut out = Extracted::default();
    let mut archive = tar::Archive::new(tar);
    let entries = archive
        .entries()
        .map_err(|e| format!("the build output is not a tar stream: {e}"))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| format!("the build output is damaged: {e}"))?;
        let kind = entry.header().entry_type();
        let Ok(path) = entry.path().map(|p| p.into_owned()) else {
            out.skipped += 1;
            continue;
        };
        // Plain relative names only: no root, no `..`; `.` parts are dropped.
        let mut rel = std::path::PathBuf::new();
        let mut plain = true;
        for c in path.components() {
            match c {
                Component::Normal(p) => rel.push(p),
                Component::CurDir => {}
                _ => plain = false,
            }
        }
        if !plain || rel.as_os_str().len() > 1024 || rel.components().count() > 32 {
            out.skipped += 1;
            continue;
        }
        if rel.as_os_str().is_empty() {
            continue;
        }
        let target = dest.join(&rel);
        if kind.is_dir() {
            std::fs::create_dir_all(&target)
                .map_err(|e| format!("cannot write the build output: {e}"))?;
            continue;
        }
        if !kind.is_file() {
            out.skipped += 1;
            continue;
        }
        out.files += 1;
        if out.files > max_files {
            return Err(format!("the build output has more than {max_files} files"));
        }
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| format!("cannot write the build output: {e}"))?;
        }
        let exec = entry
            .header()
            .mode()
            .map(|m| m & 0o111 != 0)
            .unwrap_or(false);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(if exec { 0o755 } else { 0o644 })
            .open(&target)
            .map_err(|e| format!("cannot write the build output {}: {e}", rel.display()))?;
        let mut limited = (&mut entry).take(max_bytes.saturating_sub(out.bytes) + 1);
        let n = std::io::copy(&mut limited, &mut f)
            .map_err(|e| format!("cannot write the build output: {e}"))?;
        out.bytes += n;
        if out.bytes > max_bytes {
            return Err(format!("the build output is over {max_bytes} bytes"));
        }
    }
    Ok(out)
}

/// A tar of the directory tree at `root`, read without following any link (the sandbox
/// side, where the build happened; also the host side, re-reading a cache entry it wrote
/// itself, for a container). Regular files and directories only.
pub fn archive(root: &Path, max_bytes: u64) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    let mut stack = vec![std::path::PathBuf::new()];
    let mut total = 0u64;
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        let mut entries: Vec<_> = std::fs::read_dir(&dir)?.flatten().collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let meta = std::fs::symlink_metadata(e.path())?;
            let name = rel.join(e.file_name());
            if meta.is_dir() {
                let mut h = tar::Header::new_gnu();
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                b.append_data(&mut h, &name, std::io::empty())?;
                stack.push(name);
            } else if meta.is_file() {
                total += meta.len();
                if total > max_bytes {
                    return Err(std::io::Error::other(format!(
                        "the build output is over {max_bytes} bytes"
                    )));
                }
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(e.path())?;
                let mut h = tar::Header::new_gnu();
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(if meta.mode() & 0o111 != 0 {
                    0o755
                } else {
                    0o644
                });
                h.set_size(meta.len());
                b.append_data(&mut h, &name, f.take(meta.len()))?;
            }
        }
    }
    b.into_inner()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_cut_frames_are_refused() {
        let mut buf = Vec::new();
        write_frame(&mut buf, Status::Exited(1), b"out\n", b"err: x\n", b"TAR").expect("write");
        let f = parse(&buf).expect("parse");
        assert_eq!(f.status, Status::Exited(1));
        assert_eq!(
            (f.stdout.as_slice(), f.stderr.as_slice()),
            (&b"out\n"[..], &b"err: x\n"[..])
        );
        assert_eq!(f.tar, b"TAR");
        assert!(parse(&buf[..buf.len() - 1]).is_none());
        assert!(parse(b"nonsense").is_none());
    }

    #[test]
    fn extraction_keeps_files_and_drops_links_and_escapes() {
        let src = tempfile::tempdir().expect("src");
        std::fs::create_dir(src.path().join("sub")).expect("mkdir");
        std::fs::write(src.path().join("sub/a.class"), b"class").expect("write");
        std::fs::write(src.path().join("main"), b"\x7fELF").expect("write");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            src.path().join("main"),
            std::fs::Permissions::from_mode(0o755),
        )
        .expect("chmod");
        std::os::unix::fs::symlink("/etc/shadow", src.path().join("leak")).expect("symlink");
        let tar = archive(src.path(), 1 << 20).expect("archive");

        // A hostile tar: a symlink, a path escaping with `..`, an absolute path.
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, "evil", "/etc/passwd").expect("link");
        let mut h = tar::Header::new_gnu();
        h.set_size(1);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        // `append_data` refuses `..`; write the name into the header directly.
        h.as_old_mut().name[..9].copy_from_slice(b"../escape");
        h.set_cksum();
        b.append(&h, &b"x"[..]).expect("append");
        let hostile = b.into_inner().expect("tar");

        let dest = tempfile::tempdir().expect("dest");
        let out = extract(&tar, dest.path(), 100, 1 << 20).expect("extract");
        assert_eq!(
            (out.files, out.skipped),
            (2, 0),
            "the link was never archived"
        );
        assert!(dest.path().join("sub/a.class").is_file());
        let mode = std::fs::metadata(dest.path().join("main"))
            .expect("main")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
        assert!(!dest.path().join("leak").exists());

        let dest2 = tempfile::tempdir().expect("dest");
        let out = extract(&hostile, dest2.path(), 100, 1 << 20).expect("extract");
        assert_eq!((out.files, out.skipped), (0, 2));
        assert!(std::fs::read_dir(dest2.path())
            .expect("read")
            .next()
            .is_none());
        assert!(!dest2.path().parent().expect("p").join("escape").exists());
        assert!(extract(&tar, tempfile::tempdir().expect("d").path(), 1, 1 << 20).is_err());
        assert!(extract(&tar, tempfile::tempdir().expect("d").path(), 100, 3).is_err());
    }
}
