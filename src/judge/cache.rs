//! The compile cache: compiled programs keyed by a hash of (language, compile command,
//! every file), bounded in bytes, least recently used entries evicted first, never an
//! entry a run is using.
//!
//! Layout: `<dir>/<key>/build/...` (what the compile step left, extracted from its tar
//! stream by [`crate::executor::build::extract`]: regular files and directories only)
//! and `<dir>/<key>/meta.json` (size; its modification time is the last use). An entry
//! appears by one `rename` of a finished directory, so a crash never leaves half of one;
//! `.tmp-*` directories of a crash are removed at start.

use crate::executor::build;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The cache.
pub struct CompileCache {
    dir: PathBuf,
    budget: u64,
    /// Entries in use by a run: key -> number of users.
    in_use: Mutex<HashMap<String, usize>>,
    /// Serializes inserts and evictions.
    writing: Mutex<()>,
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub evictions: AtomicU64,
}

/// An entry held for a run: its build directory cannot be evicted until this is dropped.
pub struct Held {
    cache: Arc<CompileCache>,
    key: String,
    /// The compiled program: shown read-only at /build.
    pub dir: PathBuf,
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Ok(mut m) = self.cache.in_use.lock() {
            if let Some(n) = m.get_mut(&self.key) {
                *n -= 1;
                if *n == 0 {
                    m.remove(&self.key);
                }
            }
        }
    }
}

fn dir_size(p: &Path) -> u64 {
    let mut total = 0;
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => total += dir_size(&e.path()),
                Ok(t) if t.is_file() => total += e.metadata().map(|m| m.len()).unwrap_or(0),
                _ => {}
            }
        }
    }
    total
}

impl CompileCache {
    /// Open (creating) the cache in `dir`, holding at most `budget` bytes. `world_readable`:
    /// let other users traverse it (as root, the sandbox helper runs as `sandbox.uid`).
    pub fn open(
        dir: &Path,
        budget: u64,
        world_readable: bool,
    ) -> Result<Arc<CompileCache>, String> {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create the compile cache {}: {e}", dir.display()))?;
        use std::os::unix::fs::PermissionsExt;
        let mode = if world_readable { 0o711 } else { 0o700 };
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
            .map_err(|e| format!("cannot set permissions on {}: {e}", dir.display()))?;
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with(".tmp-") {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        Ok(Arc::new(CompileCache {
            dir: dir.to_path_buf(),
            budget,
            in_use: Mutex::new(HashMap::new()),
            writing: Mutex::new(()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
        }))
    }

    fn hold(self: &Arc<Self>, key: &str) -> Held {
        if let Ok(mut m) = self.in_use.lock() {
            *m.entry(key.to_string()).or_insert(0) += 1;
        }
        Held {
            cache: self.clone(),
            key: key.to_string(),
            dir: self.dir.join(key).join("build"),
        }
    }

    /// The entry for `key`, if cached (and marks it used now).
    pub fn get(self: &Arc<Self>, key: &str) -> Option<Held> {
        let _w = self.writing.lock().ok()?;
        let meta = self.dir.join(key).join("meta.json");
        if !meta.is_file() {
            self.misses.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let _ = std::fs::File::options()
            .write(true)
            .open(&meta)
            .and_then(|f| f.set_modified(std::time::SystemTime::now()));
        self.hits.fetch_add(1, Ordering::Relaxed);
        Some(self.hold(key))
    }

    /// Store a compile step's tar stream as the entry for `key` and hold it.
    pub fn insert(self: &Arc<Self>, key: &str, tar: &[u8]) -> Result<Held, String> {
        let _w = self
            .writing
            .lock()
            .map_err(|_| "the compile cache lock is poisoned".to_string())?;
        let final_dir = self.dir.join(key);
        if !final_dir.join("meta.json").is_file() {
            let tmp = self
                .dir
                .join(format!(".tmp-{}", uuid::Uuid::new_v4().simple()));
            let build_dir = tmp.join("build");
            std::fs::create_dir_all(&build_dir)
                .map_err(|e| format!("cannot write the compile cache: {e}"))?;
            let result = build::extract(tar, &build_dir, 10_000, self.budget).and_then(|x| {
                let meta =
                    serde_json::json!({"bytes": x.bytes, "files": x.files, "skipped": x.skipped});
                std::fs::write(tmp.join("meta.json"), meta.to_string())
                    .map_err(|e| format!("cannot write the compile cache: {e}"))?;
                let _ = std::fs::remove_dir_all(&final_dir);
                std::fs::rename(&tmp, &final_dir)
                    .map_err(|e| format!("cannot write the compile cache: {e}"))?;
                if x.skipped > 0 {
                    tracing::warn!(
                        key,
                        skipped = x.skipped,
                        "the compile step left links or special files in /build: not kept"
                    );
                }
                Ok(())
            });
            if let Err(e) = result {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(e);
            }
        }
        let held = self.hold(key);
        self.evict_locked(key);
        Ok(held)
    }

    /// Entries oldest-used first, with their sizes.
    fn entries(&self) -> Vec<(String, std::time::SystemTime, u64)> {
        let mut out = Vec::new();
        if let Ok(rd) = std::fs::read_dir(&self.dir) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') {
                    continue;
                }
                let used = std::fs::metadata(e.path().join("meta.json"))
                    .and_then(|m| m.modified())
                    .unwrap_or(std::time::UNIX_EPOCH);
                out.push((name, used, dir_size(&e.path())));
            }
        }
        out.sort_by_key(|(_, used, _)| *used);
        out
    }

    /// Bytes the cache holds now.
    pub fn size(&self) -> u64 {
        self.entries().iter().map(|(_, _, b)| b).sum()
    }

    /// Evict least recently used entries (not `keep`, not in use) until under budget.
    fn evict_locked(&self, keep: &str) {
        let entries = self.entries();
        let mut total: u64 = entries.iter().map(|(_, _, b)| b).sum();
        let busy: Vec<String> = self
            .in_use
            .lock()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        for (key, _, bytes) in entries {
            if total <= self.budget {
                break;
            }
            if key == keep || busy.contains(&key) {
                continue;
            }
            if std::fs::remove_dir_all(self.dir.join(&key)).is_ok() {
                total = total.saturating_sub(bytes);
                self.evictions.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(key, bytes, "compile cache: evicted");
            }
        }
    }
}
