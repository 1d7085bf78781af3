//! Free space on the store's filesystem: the reserve below which new work is refused
//! (`[store] min_free_mb`), and [`DiskWatch`], the worker that measures it every second
//! and, while the last write failed, asks the writer to reopen the database so that the
//! store recovers by itself once space returns.

use super::{Store, StoreError};
use crate::ops::worker::{Backoff, State, Worker};
use crate::BoxFuture;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Bytes available to an unprivileged writer on the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statvfs writes into the zeroed struct we own; the path is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// The ballast: a file of real (allocated) bytes next to the store, given back when the
/// disk is nearly full so that the writes of running evaluations can still be made, and
/// taken again once space is back.
pub fn ballast_path(store: &Path) -> std::path::PathBuf {
    store.with_extension("ballast")
}

/// Delete the ballast; whether there was one.
pub fn release_ballast(store: &Path) -> bool {
    std::fs::remove_file(ballast_path(store)).is_ok()
}

/// Make sure a ballast of `bytes` exists (allocated, not sparse) when there is room for
/// it above `keep` free bytes. Returns whether it exists.
pub fn ensure_ballast(store: &Path, bytes: u64, keep: u64) -> bool {
    use std::os::fd::AsRawFd;
    let path = ballast_path(store);
    if std::fs::metadata(&path).is_ok_and(|m| m.len() >= bytes) {
        return true;
    }
    if bytes == 0 || free_bytes(store).unwrap_or(0) < bytes.saturating_add(keep) {
        return false;
    }
    let Ok(f) = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
    else {
        return false;
    };
    // SAFETY: fallocate on a file descriptor we own.
    let ok = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, bytes as libc::off_t) } == 0;
    if !ok {
        drop(f);
        let _ = std::fs::remove_file(&path);
    }
    ok
}

/// The refusal for `free` bytes against a reserve of `reserve` bytes.
pub fn insufficient(free: u64, reserve: u64) -> StoreError {
    StoreError::InsufficientStorage {
        free_mb: free / (1024 * 1024),
        reserve_mb: reserve.div_ceil(1024 * 1024),
    }
}

/// The largest ballast: enough for the results of the running evaluations, i.e. for a
/// few flushes near large records (the writer's bound for one can reach 15 MiB with
/// records of 200 kB: sled rewrites whole leaves of them).
const BALLAST_MAX: u64 = 32 * 1024 * 1024;

/// Measures free space every `every`; while the store is unhealthy (a write failed),
/// pings the writer, which reopens the database before answering.
pub struct DiskWatch {
    pub store: Arc<Store>,
    pub every: Duration,
    low: bool,
}

impl DiskWatch {
    pub fn new(store: Arc<Store>, every: Duration) -> DiskWatch {
        DiskWatch {
            store,
            every,
            low: false,
        }
    }
}

impl Worker for DiskWatch {
    fn name(&self) -> String {
        "disk".into()
    }

    fn work<'a>(
        &'a mut self,
        _stop: &'a CancellationToken,
    ) -> BoxFuture<'a, Result<State, String>> {
        Box::pin(async move {
            let s = &self.store;
            // Take the ballast (again) while there is room above the reserve.
            let reserve = s.min_free_bytes();
            if reserve > 0 {
                let path = s.path.clone();
                let ballast = (reserve / 2).min(BALLAST_MAX);
                let _ =
                    tokio::task::spawn_blocking(move || ensure_ballast(&path, ballast, reserve))
                        .await;
            }
            let free = s.check_space();
            let low = s.low_on_space();
            if low != self.low {
                self.low = low;
                let (free_mb, reserve_mb) = (free / (1 << 20), s.min_free_bytes() / (1 << 20));
                if low {
                    tracing::warn!(
                        free_mb,
                        reserve_mb,
                        "free space below the reserve ([store] min_free_mb): new evaluations \
                         are refused (507) and none is started until space is freed"
                    );
                } else {
                    tracing::info!(free_mb, reserve_mb, "free space is back above the reserve");
                }
            }
            if !s.is_healthy() {
                // The writer reopens the database before it answers.
                s.ping()
                    .await
                    .map_err(|e| format!("the store cannot write yet: {e}"))?;
            }
            Ok(State::Idle)
        })
    }

    fn wait_for_work(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(tokio::time::sleep(self.every))
    }

    fn backoff(&self) -> Backoff {
        Backoff {
            initial: self.every,
            max: self.every,
        }
    }
}
