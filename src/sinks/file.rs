//! Append-only JSON-lines file sink (`[sinks.file] path = ...`), for log shippers.
//!
//! One event per line, written and `fsync`ed before the relay moves the cursor. After a
//! crash the same events may be appended again (consumers dedupe on `event_id`); a line
//! cut short by a crash is removed when the sink opens, so every line is whole JSON.

use crate::events::Event;
use crate::outbox::{Sink, SinkError};
use crate::BoxFuture;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The JSON-lines file sink.
pub struct FileSink {
    path: PathBuf,
    file: Arc<Mutex<Option<File>>>,
}

impl FileSink {
    /// Open (creating it and its directory if needed) and repair a torn last line.
    pub fn open(path: &Path) -> Result<FileSink, String> {
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            }
        }
        let mut f = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(|e| format!("cannot open file sink {}: {e}", path.display()))?;
        repair_torn_tail(&mut f).map_err(|e| format!("cannot repair {}: {e}", path.display()))?;
        Ok(FileSink {
            path: path.to_path_buf(),
            file: Arc::new(Mutex::new(Some(f))),
        })
    }
}

/// Truncate the file after its last newline (a partial line is an event whose cursor was
/// never saved, so it will be written again).
fn repair_torn_tail(f: &mut File) -> std::io::Result<()> {
    let len = f.metadata()?.len();
    if len == 0 {
        return Ok(());
    }
    let mut pos = len;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let start = pos.saturating_sub(buf.len() as u64);
        let n = (pos - start) as usize;
        f.seek(SeekFrom::Start(start))?;
        f.read_exact(&mut buf[..n])?;
        if let Some(i) = buf[..n].iter().rposition(|b| *b == b'\n') {
            let keep = start + i as u64 + 1;
            if keep != len {
                f.set_len(keep)?;
                f.sync_all()?;
            }
            return Ok(());
        }
        if start == 0 {
            f.set_len(0)?;
            f.sync_all()?;
            return Ok(());
        }
        pos = start;
    }
}

impl Sink for FileSink {
    fn name(&self) -> &str {
        "file"
    }

    fn deliver<'a>(&'a self, events: &'a [Event]) -> BoxFuture<'a, Result<(), SinkError>> {
        let mut buf = Vec::with_capacity(events.len() * 1024);
        for e in events {
            buf.extend_from_slice(e.to_json().as_bytes());
            buf.push(b'\n');
        }
        let file = self.file.clone();
        let path = self.path.clone();
        Box::pin(async move {
            let res = tokio::task::spawn_blocking(move || {
                let mut guard = file
                    .lock()
                    .map_err(|_| SinkError::Unavailable("file sink lock poisoned".into()))?;
                if guard.is_none() {
                    let f = OpenOptions::new()
                        .append(true)
                        .create(true)
                        .open(&path)
                        .map_err(|e| {
                            SinkError::Unavailable(format!("cannot open {}: {e}", path.display()))
                        })?;
                    *guard = Some(f);
                }
                let result = match guard.as_mut() {
                    Some(f) => f.write_all(&buf).and_then(|_| f.sync_data()),
                    None => Ok(()),
                };
                if let Err(e) = result {
                    // Reopen next time; a partial write is repaired as a torn tail only at
                    // open, so make sure the next line starts on its own.
                    *guard = None;
                    if let Ok(mut f) = OpenOptions::new().read(true).append(true).open(&path) {
                        let _ = repair_torn_tail(&mut f);
                    }
                    return Err(SinkError::Unavailable(format!(
                        "cannot write {}: {e}",
                        path.display()
                    )));
                }
                Ok(())
            })
            .await;
            match res {
                Ok(r) => r,
                Err(e) => Err(SinkError::Unavailable(format!(
                    "file sink task failed: {e}"
                ))),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torn_tail_is_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("events.jsonl");
        std::fs::write(&p, "{\"a\":1}\n{\"b\":2}\n{\"c\":").expect("write");
        let _s = FileSink::open(&p).expect("open");
        assert_eq!(
            std::fs::read_to_string(&p).expect("read"),
            "{\"a\":1}\n{\"b\":2}\n"
        );
        std::fs::write(&p, "{\"c\":").expect("write");
        let _s = FileSink::open(&p).expect("open");
        assert_eq!(std::fs::read_to_string(&p).expect("read"), "");
    }
}
