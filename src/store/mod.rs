//! The store: the one place that writes state.
//!
//! A single writer thread owns every change. Callers send it an operation and wait for
//! the answer; the writer drains whatever is pending, applies it as ONE atomic sled
//! batch (records, events with freshly assigned seqs, queue, indexes, cursors), flushes
//! once, and only then answers every waiter in that batch (group commit). So a caller
//! that hears `Ok` knows its change and its event are on disk, and there is never a
//! record without its event or the other way round.
//!
//! Reads go straight to sled from any task. Readers of the event log (relays, the SSE
//! stream) read only up to [`Store::head`], the last seq covered by a finished flush,
//! so nothing that could still be lost in a crash ever leaves the process.
//!
//! This module must never call the network, run code, or hold a lock across a flush
//! that an HTTP handler could wait on other than through the writer's reply.

mod keys;
mod space;
mod writer;

use crate::error::{ApiError, Code};
use crate::events::Confirmation;
use crate::events::Event;
use crate::model::{CompileInfo, Evaluation, Finish, NewEvaluation, Status, TestOutcome};
use crate::ops::metrics::Exposition;
use crate::ops::report::{Health, Level, Report};
use crate::BoxFuture;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};

pub use space::DiskWatch;
pub use writer::WriterStats;

/// Bytes one read of records or events returns at most (beyond its first item), so a page
/// of large records or a relay batch never balloons memory on a small machine.
pub const READ_BUDGET: usize = 4 * 1024 * 1024;

/// Errors of store operations. Each maps to one stable API error code.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("evaluation not found")]
    NotFound,
    #[error("the queue is full ({depth} of {max} queued)")]
    QueueFull { depth: u64, max: u64 },
    #[error("the evaluation is already {0}")]
    AlreadyTerminal(&'static str),
    #[error("the evaluation is {0}, not {1}")]
    WrongState(&'static str, &'static str),
    #[error("seq {from} is outside the replay window (oldest retained event is {oldest}, head is {head})")]
    ReplayOutOfWindow { from: u64, oldest: u64, head: u64 },
    #[error("the store is shut down")]
    Closed,
    #[error("this Idempotency-Key was used for a different request (evaluation {0})")]
    IdempotencyConflict(String),
    /// Free space on the data dir's filesystem is below `[store] min_free_mb`.
    #[error("the data directory has {free_mb} MiB free, below the reserve of {reserve_mb} MiB ([store] min_free_mb): new evaluations are refused until space is freed")]
    InsufficientStorage { free_mb: u64, reserve_mb: u64 },
    /// The backup destination cannot be used (the request's fault, not the disk's).
    #[error("{0}")]
    BackupRejected(String),
    /// The backup's directory exists and holds something already.
    #[error("{0}")]
    BackupExists(String),
    #[error("storage error: {0}")]
    Storage(String),
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound => ApiError::not_found("evaluation"),
            StoreError::QueueFull { .. } => {
                ApiError::new(Code::QueueFull, e.to_string()).with_retry_after(5)
            }
            StoreError::AlreadyTerminal(_) | StoreError::WrongState(..) => {
                ApiError::new(Code::AlreadyTerminal, e.to_string())
            }
            StoreError::ReplayOutOfWindow { .. } => {
                ApiError::new(Code::ReplayOutOfWindow, e.to_string()).with_field("from_seq")
            }
            StoreError::Closed => ApiError::shutting_down(),
            StoreError::IdempotencyConflict(_) => {
                ApiError::new(Code::IdempotencyKeyConflict, e.to_string())
            }
            StoreError::InsufficientStorage { .. } => {
                ApiError::new(Code::InsufficientStorage, e.to_string()).with_retry_after(10)
            }
            StoreError::BackupRejected(m) => {
                ApiError::new(Code::BackupFailed, m).with_field("path")
            }
            StoreError::BackupExists(m) => ApiError::new(Code::BackupExists, m).with_field("path"),
            StoreError::Storage(m) => ApiError::new(Code::StoreError, m),
        }
    }
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Storage(describe(&e))
    }
}

/// An idempotency key and the fingerprint of the request it came with: the same key with
/// a different request is a conflict, not a repeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdemKey {
    pub key: String,
    pub fingerprint: String,
}

/// A sled error in words. sled keeps the first I/O error and hands out copies of it
/// whose text is the Debug form of the original (`Os { code: 28, kind: StorageFull, ..}`);
/// say what it means instead.
pub fn describe(e: &sled::Error) -> String {
    match e {
        sled::Error::Io(io) => describe_io(io),
        other => other.to_string(),
    }
}

fn describe_io(io: &std::io::Error) -> String {
    if let Some(code) = io.raw_os_error() {
        return format!("I/O error: {}", std::io::Error::from_raw_os_error(code));
    }
    // A copy made by sled: the kind survives, the OS code only in the Debug text.
    let text = io.to_string();
    if let Some(code) = text
        .split("code: ")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|c| c.parse::<i32>().ok())
    {
        return format!("I/O error: {}", std::io::Error::from_raw_os_error(code));
    }
    if text.starts_with("Os {") || text.starts_with("Custom {") || text.starts_with("Kind(") {
        return format!("I/O error: {}", io.kind());
    }
    format!("I/O error: {text}")
}

/// Result of a submission: the id and the status it has now (`queued` for a new one; the
/// current status when an idempotency key matched an earlier submission).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Submitted {
    pub eval_id: String,
    pub status: Status,
    /// `true` when an idempotency key matched an existing evaluation.
    #[serde(skip)]
    pub existing: bool,
    /// Its place in the queue when it was accepted (1: the next to start); `None` for an
    /// idempotent repeat.
    #[serde(skip)]
    pub queue_position: Option<u64>,
}

/// A poison event parked for a sink.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeadLetter {
    /// The sink that refused it.
    pub sink: String,
    pub seq: u64,
    pub event_id: String,
    pub eval_id: String,
    #[serde(rename = "type")]
    #[schema(value_type = crate::events::EventType)]
    pub kind: String,
    /// Why the sink refused it.
    pub error: String,
    /// Delivery attempts before it was parked.
    pub attempts: u32,
    /// When it was parked (RFC 3339, UTC).
    #[schema(format = DateTime)]
    pub dead_at: String,
    pub event: Event,
}

/// Outcome of one pruning round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pruned {
    pub removed: u64,
    /// Lowest seq still in the log (head + 1 when the log is empty).
    pub oldest: u64,
}

/// Options for [`Store::open`].
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub path: PathBuf,
    pub cache_bytes: u64,
    pub flush_window: Duration,
    pub max_batch: usize,
    pub node_id: Option<String>,
    /// Free bytes the data dir's filesystem must keep: below it new submissions are
    /// refused (`insufficient_storage`) while everything else still writes. 0: no reserve.
    pub min_free_bytes: u64,
}

/// Where the writer sends an operation's answer, once the batch holding it is flushed.
pub(crate) type Tx<T> = oneshot::Sender<Result<T, StoreError>>;

/// An operation for the writer, each with a reply of its own type.
pub(crate) enum Op {
    Submit {
        evals: Vec<NewEvaluation>,
        idem_key: Option<IdemKey>,
        max_queued: u64,
        reply: Tx<Vec<Submitted>>,
    },
    Start {
        eval_id: String,
        reply: Tx<Evaluation>,
    },
    Finish {
        eval_id: String,
        fin: Box<Finish>,
        reply: Tx<Evaluation>,
    },
    Cancel {
        eval_id: String,
        reply: Tx<(Evaluation, Status)>,
    },
    Progress {
        eval_id: String,
        index: usize,
        outcome: Box<TestOutcome>,
        compile: Option<Box<CompileInfo>>,
        reply: Tx<Evaluation>,
    },
    InterruptRunning {
        reply: Tx<u64>,
    },
    SetCursor {
        sink: String,
        seq: u64,
        reply: Tx<()>,
    },
    Confirm {
        sink: String,
        seq: u64,
        confirmations: Vec<Confirmation>,
        reply: Tx<()>,
    },
    DeadLetter {
        sink: String,
        event: Box<Event>,
        error: String,
        attempts: u32,
        reply: Tx<()>,
    },
    Prune {
        sinks: Vec<String>,
        older_than: String,
        max: usize,
        reply: Tx<Pruned>,
    },
    Replay {
        sink: String,
        from_seq: u64,
        reply: Tx<u64>,
    },
    PruneEvaluations {
        sinks: Vec<String>,
        /// Terminal before this (RFC 3339); `None`: age does not count.
        older_than: Option<String>,
        /// Keep at most this many evaluations (0: no limit).
        keep: u64,
        max: usize,
        reply: Tx<u64>,
    },
    /// Liveness check of the writer (the systemd watchdog).
    Ping {
        reply: Tx<()>,
    },
    /// Copy the flushed store to a directory while no write can happen.
    Backup {
        dest: PathBuf,
        reply: Tx<BackupInfo>,
    },
    /// Stop after this batch.
    Shutdown {
        reply: Tx<()>,
    },
}

/// What `backup` wrote.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct BackupInfo {
    /// The directory written (usable as `--data-dir`).
    #[schema(value_type = String)]
    pub path: PathBuf,
    /// The log's head in the copy.
    pub head_seq: u64,
    /// Bytes written.
    pub bytes: u64,
    /// The node the copy belongs to.
    pub node: String,
    /// When it was written (RFC 3339, UTC).
    #[schema(format = DateTime)]
    pub created_at: String,
}

/// Live counters shared between the writer and readers.
#[derive(Debug, Default)]
pub struct Shared {
    /// Last seq covered by a completed flush.
    pub head: AtomicU64,
    /// Last seq of the batch handed to sled: visible to reads at once, durable only once
    /// `head` reaches it. Records change only together with an event, so a read that
    /// waits for `head >= applying` answers nothing a crash could take back.
    pub applying: AtomicU64,
    /// Counts batches the writer finished (flushed or failed), so readers in
    /// [`Store::settle`] wake after each one.
    pub batches_done: watch::Sender<u64>,
    pub queue_depth: AtomicU64,
    pub running: AtomicU64,
    /// Evaluations stored (every status).
    pub evaluations: AtomicU64,
    /// Evaluations removed by retention.
    pub evaluations_pruned: AtomicU64,
    /// Evaluations in each status, indexed by [`Status::index`].
    pub by_status: [AtomicU64; 5],
    pub healthy: AtomicBool,
    pub last_error: Mutex<Option<String>>,
    pub stats: WriterStats,
    /// Free bytes on the store's filesystem at the last check (u64::MAX: unknown).
    pub free_bytes: AtomicU64,
    /// Times the writer reopened the database after a failed write.
    pub reopens: AtomicU64,
}

/// The open database. The writer swaps it out after a failed write (sled keeps an I/O
/// error forever, so the only way back is to reopen) and readers take it from
/// [`Store::handles`], never keeping it across an await.
#[derive(Clone)]
pub(crate) struct Handles {
    pub(crate) db: sled::Db,
    pub(crate) tree: sled::Tree,
}

/// Where readers find the current [`Handles`] (`None` while the writer reopens).
pub(crate) type Slot = Arc<RwLock<Option<Handles>>>;

/// Open the sled database at `path` with the appliance's settings.
pub(crate) fn open_db(path: &std::path::Path, cache_bytes: u64) -> Result<Handles, sled::Error> {
    let db = sled::Config::new()
        .path(path)
        .cache_capacity(cache_bytes)
        .mode(sled::Mode::HighThroughput)
        .flush_every_ms(None)
        .open()?;
    let tree = db.open_tree("crucible")?;
    Ok(Handles { db, tree })
}

/// Handle to the store. Cheap to share behind an `Arc`.
pub struct Store {
    handles: Slot,
    tx: mpsc::Sender<Op>,
    shared: Arc<Shared>,
    head_rx: watch::Receiver<u64>,
    node: String,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    path: PathBuf,
    min_free_bytes: u64,
}

impl Store {
    /// Open (or create) the store, recover counters, and start the writer thread.
    pub fn open(opts: StoreOptions) -> Result<Arc<Store>, StoreError> {
        std::fs::create_dir_all(&opts.path).map_err(|e| {
            StoreError::Storage(format!("cannot create {}: {e}", opts.path.display()))
        })?;
        // Right after a crash the lock may still be held for a moment by a child of the
        // dead process that had not yet exec'd (it shares the descriptors until then): wait
        // a little before calling the store busy.
        let mut opened = open_db(&opts.path, opts.cache_bytes);
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        while matches!(&opened, Err(e) if e.to_string().contains("could not acquire lock"))
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(50));
            opened = open_db(&opts.path, opts.cache_bytes);
        }
        let Handles { db, tree } = opened.map_err(|e| {
            if e.to_string().contains("could not acquire lock") {
                StoreError::Storage(format!(
                    "{} is in use by another crucible process (its lock is held); \
                     stop that process or use another --data-dir",
                    opts.path.display()
                ))
            } else {
                StoreError::Storage(format!(
                    "cannot open the store at {}: {}",
                    opts.path.display(),
                    describe(&e)
                ))
            }
        })?;

        match tree.get(keys::META_SCHEMA)? {
            Some(v) => {
                let found = keys::tail_u64(&v).unwrap_or(0);
                if found > keys::SCHEMA_VERSION {
                    return Err(StoreError::Storage(format!(
                        "the store was written by a newer crucible (layout {found}, this build reads {}); \
                         restore a backup or upgrade",
                        keys::SCHEMA_VERSION
                    )));
                }
                if found < 2 {
                    upgrade_to_2(&tree)?;
                }
            }
            None => {
                tree.insert(keys::META_SCHEMA, &keys::SCHEMA_VERSION.to_be_bytes())?;
            }
        }

        let stored_node = tree
            .get(keys::META_NODE)?
            .map(|v| String::from_utf8_lossy(&v).to_string());
        let node = match (&opts.node_id, stored_node) {
            (Some(cfg), _) => cfg.clone(),
            (None, Some(stored)) => stored,
            (None, None) => {
                let id = uuid::Uuid::new_v4().simple().to_string();
                format!("node-{}", &id[..12])
            }
        };
        tree.insert(keys::META_NODE, node.as_bytes())?;

        let counts = recount(&tree)?;
        db.flush()?;

        let shared = Arc::new(Shared::default());
        shared.head.store(counts.head, Ordering::SeqCst);
        shared.applying.store(counts.head, Ordering::SeqCst);
        shared.queue_depth.store(counts.queued, Ordering::SeqCst);
        shared.running.store(counts.running, Ordering::SeqCst);
        shared
            .evaluations
            .store(counts.evaluations, Ordering::SeqCst);
        for (slot, n) in shared.by_status.iter().zip(counts.by_status) {
            slot.store(n, Ordering::SeqCst);
        }
        shared.healthy.store(true, Ordering::SeqCst);
        shared.free_bytes.store(
            space::free_bytes(&opts.path).unwrap_or(u64::MAX),
            Ordering::SeqCst,
        );
        let handles: Slot = Arc::new(RwLock::new(Some(Handles {
            db: db.clone(),
            tree: tree.clone(),
        })));

        let (tx, rx) = mpsc::channel(8192);
        let (head_tx, head_rx) = watch::channel(counts.head);
        let w = writer::Writer {
            h: Some(Handles { db, tree }),
            slot: handles.clone(),
            cache_bytes: opts.cache_bytes,
            min_free_bytes: opts.min_free_bytes,
            node: node.clone(),
            shared: shared.clone(),
            head_tx,
            window: opts.flush_window,
            max_batch: opts.max_batch,
            last_seq: counts.head,
            path: opts.path.clone(),
            wedged: false,
        };
        let handle = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || {
                // The writer is the only path to durable state: if it dies, answering
                // anything would be a lie. Abort and let the supervisor restart us; the
                // store on disk is consistent at every batch boundary.
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| w.run(rx)));
                if r.is_err() {
                    eprintln!("crucible: the store writer panicked; aborting");
                    std::process::abort();
                }
            })
            .map_err(|e| StoreError::Storage(format!("cannot start the writer thread: {e}")))?;

        Ok(Arc::new(Store {
            handles,
            tx,
            shared,
            head_rx,
            node,
            writer: Mutex::new(Some(handle)),
            path: opts.path,
            min_free_bytes: opts.min_free_bytes,
        }))
    }

    /// Send an operation to the writer and wait for its answer (after the flush).
    async fn call<T>(&self, op: impl FnOnce(Tx<T>) -> Op) -> Result<T, StoreError> {
        self.send(op).await?.await
    }

    /// Hand `op` to the writer; the returned future resolves once it is durable. Writes
    /// are applied in the order they were handed over.
    async fn send<T>(
        &self,
        op: impl FnOnce(Tx<T>) -> Op,
    ) -> Result<impl std::future::Future<Output = Result<T, StoreError>>, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(op(reply))
            .await
            .map_err(|_| StoreError::Closed)?;
        Ok(async move { rx.await.map_err(|_| StoreError::Closed)? })
    }

    /// This node's id (in every event's `node`).
    pub fn node_id(&self) -> &str {
        &self.node
    }

    /// Durably accept evaluations: records, events and queue entries in one batch,
    /// flushed before this returns. All or nothing: a full queue rejects the whole set.
    pub async fn submit(
        &self,
        evals: Vec<NewEvaluation>,
        idem_key: Option<IdemKey>,
        max_queued: u64,
    ) -> Result<Vec<Submitted>, StoreError> {
        self.call(|reply| Op::Submit {
            evals,
            idem_key,
            max_queued,
            reply,
        })
        .await
    }

    /// `queued -> running`, durably. Fails with `WrongState` if it is no longer queued.
    pub async fn start(&self, eval_id: &str) -> Result<Evaluation, StoreError> {
        self.begin_start(eval_id).await?.await
    }

    /// `queued -> running`, handed to the writer now (so every later write of this
    /// evaluation is applied after it); the returned future resolves once it is durable.
    pub async fn begin_start(
        &self,
        eval_id: &str,
    ) -> Result<impl std::future::Future<Output = Result<Evaluation, StoreError>>, StoreError> {
        let eval_id = eval_id.to_string();
        self.send(|reply| Op::Start { eval_id, reply }).await
    }

    /// `running -> completed | failed | cancelled`, durably.
    pub async fn finish(&self, eval_id: &str, fin: Finish) -> Result<Evaluation, StoreError> {
        let eval_id = eval_id.to_string();
        self.call(|reply| Op::Finish {
            eval_id,
            fin: Box::new(fin),
            reply,
        })
        .await
    }

    /// Test `index` of a running evaluation was judged (`evaluation:progress`), handed to
    /// the writer now (so it is applied before every later write of this evaluation); the
    /// returned future resolves once it is durable (a refused write answers there too).
    pub async fn begin_progress(
        &self,
        eval_id: &str,
        index: usize,
        outcome: TestOutcome,
        compile: Option<CompileInfo>,
    ) -> impl std::future::Future<Output = Result<Evaluation, StoreError>> + Send + 'static {
        let eval_id = eval_id.to_string();
        let sent = self
            .send(move |reply| Op::Progress {
                eval_id,
                index,
                outcome: Box::new(outcome),
                compile: compile.map(Box::new),
                reply,
            })
            .await;
        async move { sent?.await }
    }

    /// Cancel a queued or running evaluation, durably. Returns the record and the status
    /// it had before (so the caller knows whether a process must be killed).
    pub async fn cancel(&self, eval_id: &str) -> Result<(Evaluation, Status), StoreError> {
        let eval_id = eval_id.to_string();
        self.call(|reply| Op::Cancel { eval_id, reply }).await
    }

    /// Mark every `running` evaluation `failed` with `failure_reason = interrupted`
    /// (crash recovery at start-up). Returns how many.
    pub async fn interrupt_running(&self) -> Result<u64, StoreError> {
        self.call(|reply| Op::InterruptRunning { reply }).await
    }

    /// Save a sink's cursor (the last seq it has durably delivered).
    pub async fn set_cursor(&self, sink: &str, seq: u64) -> Result<(), StoreError> {
        let sink = sink.to_string();
        self.call(|reply| Op::SetCursor { sink, seq, reply }).await
    }

    /// Save a sink's cursor and append the confirmation events it produced, atomically:
    /// either both are on disk or neither (then the batch is redelivered and confirmed
    /// again).
    pub async fn confirm(
        &self,
        sink: &str,
        seq: u64,
        confirmations: Vec<Confirmation>,
    ) -> Result<(), StoreError> {
        let sink = sink.to_string();
        self.call(|reply| Op::Confirm {
            sink,
            seq,
            confirmations,
            reply,
        })
        .await
    }

    /// Park a poison event for `sink` and move its cursor past it, atomically.
    pub async fn dead_letter(
        &self,
        sink: &str,
        event: Event,
        error: String,
        attempts: u32,
    ) -> Result<(), StoreError> {
        let sink = sink.to_string();
        self.call(|reply| Op::DeadLetter {
            sink,
            event: Box::new(event),
            error,
            attempts,
            reply,
        })
        .await
    }

    /// Remove up to `max` events that every listed sink has delivered and that are older
    /// than `older_than` (RFC 3339). With no sinks, only age counts.
    pub async fn prune(
        &self,
        sinks: Vec<String>,
        older_than: String,
        max: usize,
    ) -> Result<Pruned, StoreError> {
        self.call(|reply| Op::Prune {
            sinks,
            older_than,
            max,
            reply,
        })
        .await
    }

    /// Remove up to `max` terminal evaluations, oldest first (by their terminal event):
    /// those that ended before `older_than`, or beyond the newest `keep`; only when every
    /// listed sink has delivered their terminal event. Record, status index, retention
    /// index and idempotency key go in one batch. Returns how many.
    pub async fn prune_evaluations(
        &self,
        sinks: Vec<String>,
        older_than: Option<String>,
        keep: u64,
        max: usize,
    ) -> Result<u64, StoreError> {
        self.call(|reply| Op::PruneEvaluations {
            sinks,
            older_than,
            keep,
            max,
            reply,
        })
        .await
    }

    /// Evaluations stored.
    pub fn evaluation_count(&self) -> u64 {
        self.shared.evaluations.load(Ordering::SeqCst)
    }

    /// Move `sink`'s cursor back so delivery restarts at `from_seq` (within the window).
    pub async fn replay(&self, sink: &str, from_seq: u64) -> Result<u64, StoreError> {
        let sink = sink.to_string();
        self.call(|reply| Op::Replay {
            sink,
            from_seq,
            reply,
        })
        .await
    }

    /// Round trip through the writer thread (proves it is alive and not stuck on disk).
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.call(|reply| Op::Ping { reply }).await
    }

    /// Write a consistent copy of the store to `dest/store` (plus `dest/backup.json`).
    /// Runs in the writer thread after everything before it is flushed, so no write can
    /// happen during the copy: writes wait for it instead. `dest` must be absolute and
    /// missing or empty.
    pub async fn backup(&self, dest: PathBuf) -> Result<BackupInfo, StoreError> {
        self.call(|reply| Op::Backup { dest, reply }).await
    }

    /// Stop the writer after everything already sent is applied and flushed.
    pub async fn close(&self) {
        let _ = self.call(|reply| Op::Shutdown { reply }).await;
        let handle = self.writer.lock().ok().and_then(|mut h| h.take());
        if let Some(h) = handle {
            let _ = tokio::task::spawn_blocking(move || h.join()).await;
        }
        if let Some(h) = self.current() {
            let _ = h.db.flush();
        }
    }

    // ---- reads -------------------------------------------------------------------

    /// Wait (at most one flush, normally a few ms) until everything a read just made
    /// may have seen is flushed. sled shows a batch as soon as it is applied; without
    /// this a reader could see `running` (or `completed`) that a crash before the flush
    /// takes back. Gives up after 5 s (a stuck disk): the store is then unhealthy.
    async fn settle(&self) {
        let sh = &self.shared;
        let target = sh.applying.load(Ordering::SeqCst);
        // Subscribe before checking, so a batch that finishes in between still wakes us.
        let mut done = sh.batches_done.subscribe();
        // A failed batch lowers `applying` back to `head`: nothing more will come.
        let settled = || {
            sh.head.load(Ordering::SeqCst) >= target || sh.applying.load(Ordering::SeqCst) < target
        };
        let wait = async {
            while !settled() {
                if done.changed().await.is_err() {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), wait).await;
    }

    /// One evaluation by id (as flushed: see [`Store::settle`]).
    pub async fn get(&self, eval_id: &str) -> Result<Option<Evaluation>, StoreError> {
        let rec = self.get_applied(eval_id);
        self.settle().await;
        rec
    }

    /// One evaluation by id as last applied, without waiting for its flush: for what
    /// never changes after submission (code, files, tests, limits), as a worker needs it.
    pub fn get_applied(&self, eval_id: &str) -> Result<Option<Evaluation>, StoreError> {
        match self.tree()?.get(keys::eval(eval_id))? {
            Some(v) => Ok(Some(decode(&v)?)),
            None => Ok(None),
        }
    }

    /// Newest first: at most `limit` records and about [`READ_BUDGET`] bytes, continuing
    /// after the evaluation `after` (the last one of the previous page), and after
    /// skipping `skip` more. Returns the page and the cursor for the next one (`None` on
    /// the last page).
    ///
    /// Without a status filter the record keys themselves are scanned: eval_ids are
    /// UUIDv7, assigned in order by the single writer, so key order is creation order and
    /// an evaluation changing status during paging is neither skipped nor repeated. With
    /// a filter the status index is scanned (an evaluation that leaves the status while
    /// paging simply no longer belongs to the list). `NotFound` if `after` is unknown.
    pub async fn list(
        &self,
        status: Option<Status>,
        limit: usize,
        after: Option<&str>,
        skip: usize,
    ) -> Result<(Vec<Evaluation>, Option<String>), StoreError> {
        let tree = self.tree()?;
        let mut out: Vec<Evaluation> = Vec::with_capacity(limit.min(256));
        let mut more = false;
        let mut bytes = 0usize;
        let mut take = |raw: &[u8], out: &mut Vec<Evaluation>| -> Result<bool, StoreError> {
            if out.len() == limit || (!out.is_empty() && bytes + raw.len() > READ_BUDGET) {
                return Ok(false);
            }
            bytes += raw.len();
            out.push(decode(raw)?);
            Ok(true)
        };
        match status {
            None => {
                let hi = match after {
                    Some(id) if !tree.contains_key(keys::eval(id))? => {
                        return Err(StoreError::NotFound)
                    }
                    Some(id) => keys::eval(id),
                    None => {
                        let mut k = keys::EVAL.to_vec();
                        k.push(0xff);
                        k
                    }
                };
                // Skipped entries are stepped over without being read back or decoded.
                for item in tree.range(keys::EVAL.to_vec()..hi).rev().skip(skip) {
                    let (_, raw) = item?;
                    if !take(&raw, &mut out)? {
                        more = true;
                        break;
                    }
                }
            }
            Some(st) => {
                let below = match after {
                    Some(id) => match tree.get(keys::eval(id))? {
                        Some(raw) => decode::<Evaluation>(&raw)?.created_seq,
                        None => return Err(StoreError::NotFound),
                    },
                    None => u64::MAX,
                };
                let lo = keys::status(st.code(), 0);
                let hi = keys::status(st.code(), below);
                for item in tree.range(lo..hi).rev().skip(skip) {
                    let (_, id) = item?;
                    let Some(raw) = tree.get(keys::eval(&String::from_utf8_lossy(&id)))? else {
                        continue;
                    };
                    if !take(&raw, &mut out)? {
                        more = true;
                        break;
                    }
                }
            }
        }
        let next = if more {
            out.last().map(|r| r.eval_id.clone())
        } else {
            None
        };
        self.settle().await;
        Ok((out, next))
    }

    /// Events with `after < seq <= upto`, at most `max` and about [`READ_BUDGET`] bytes
    /// (always at least one), in seq order.
    pub fn events(&self, after: u64, upto: u64, max: usize) -> Result<Vec<Event>, StoreError> {
        if upto <= after {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for item in self
            .tree()?
            .range(keys::log(after.saturating_add(1))..=keys::log(upto))
            .take(max)
        {
            let (_, v) = item?;
            if !out.is_empty() && bytes + v.len() > READ_BUDGET {
                break;
            }
            bytes += v.len();
            out.push(decode_event(&v)?);
        }
        Ok(out)
    }

    /// The event at `seq`, if still retained.
    pub fn event(&self, seq: u64) -> Result<Option<Event>, StoreError> {
        match self.tree()?.get(keys::log(seq))? {
            Some(v) => Ok(Some(decode_event(&v)?)),
            None => Ok(None),
        }
    }

    /// Lowest retained seq (head + 1 when the log is empty).
    pub fn oldest_seq(&self) -> Result<u64, StoreError> {
        match self.tree()?.scan_prefix(keys::LOG).next().transpose()? {
            Some((k, _)) => Ok(keys::tail_u64(&k).unwrap_or(0)),
            None => Ok(self.head() + 1),
        }
    }

    /// A sink's saved cursor, if it has one.
    pub fn cursor(&self, sink: &str) -> Result<Option<u64>, StoreError> {
        Ok(self
            .tree()?
            .get(keys::cursor(sink))?
            .and_then(|v| keys::tail_u64(&v)))
    }

    /// Queued evaluation ids in FIFO order, skipping `claimed`, at most `max`.
    pub fn next_queued(
        &self,
        claimed: &HashSet<String>,
        max: usize,
    ) -> Result<Vec<String>, StoreError> {
        let mut out = Vec::new();
        for item in self
            .tree()?
            .scan_prefix(keys::status_prefix(Status::Queued.code()))
        {
            let (_, id) = item?;
            let id = String::from_utf8_lossy(&id).to_string();
            if !claimed.contains(&id) {
                out.push(id);
                if out.len() >= max {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Dead letters of one sink (or all), oldest first.
    pub fn dead_letters(
        &self,
        sink: Option<&str>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        let prefix = match sink {
            Some(s) => keys::dead_prefix(s),
            None => keys::DEAD.to_vec(),
        };
        let mut out = Vec::new();
        for item in self.tree()?.scan_prefix(prefix).take(limit) {
            let (_, v) = item?;
            out.push(decode(&v)?);
        }
        Ok(out)
    }

    /// Number of dead letters of a sink.
    pub fn dead_letter_count(&self, sink: &str) -> u64 {
        self.tree()
            .map(|t| t.scan_prefix(keys::dead_prefix(sink)).count() as u64)
            .unwrap_or(0)
    }

    /// Last seq covered by a completed flush.
    pub fn head(&self) -> u64 {
        self.shared.head.load(Ordering::SeqCst)
    }

    /// Watch the durable head (changes after every flush that added events).
    pub fn subscribe_head(&self) -> watch::Receiver<u64> {
        self.head_rx.clone()
    }

    /// Evaluations waiting in the queue.
    pub fn queue_depth(&self) -> u64 {
        self.shared.queue_depth.load(Ordering::SeqCst)
    }

    /// Evaluations in `status` (all of them for `None`), as of the last flush.
    pub fn count(&self, status: Option<Status>) -> u64 {
        match status {
            Some(s) => self.shared.by_status[s.index()].load(Ordering::SeqCst),
            None => self
                .shared
                .by_status
                .iter()
                .map(|c| c.load(Ordering::SeqCst))
                .sum(),
        }
    }

    /// Evaluations in `running`.
    pub fn running_count(&self) -> u64 {
        self.shared.running.load(Ordering::SeqCst)
    }

    /// Counters, health and the last write error.
    pub fn shared(&self) -> &Shared {
        &self.shared
    }

    /// Bytes the store occupies on disk.
    pub fn size_on_disk(&self) -> u64 {
        self.current()
            .and_then(|h| h.db.size_on_disk().ok())
            .unwrap_or(0)
    }

    /// The open database, unless the writer is reopening it.
    fn current(&self) -> Option<Handles> {
        self.handles.read().ok().and_then(|h| h.clone())
    }

    /// The tree for a read.
    fn tree(&self) -> Result<sled::Tree, StoreError> {
        self.current().map(|h| h.tree).ok_or_else(|| {
            StoreError::Storage(
                "the store is reopening after a failed write (is the disk full?)".into(),
            )
        })
    }

    /// Measure the free space of the store's filesystem now; returns it.
    pub fn check_space(&self) -> u64 {
        let free = space::free_bytes(&self.path).unwrap_or(u64::MAX);
        self.shared.free_bytes.store(free, Ordering::SeqCst);
        free
    }

    /// Free bytes at the last check.
    pub fn free_bytes(&self) -> u64 {
        self.shared.free_bytes.load(Ordering::SeqCst)
    }

    /// The reserve (`[store] min_free_mb`) in bytes.
    pub fn min_free_bytes(&self) -> u64 {
        self.min_free_bytes
    }

    /// Whether free space is below the reserve (new work is refused).
    pub fn low_on_space(&self) -> bool {
        self.free_bytes() < self.min_free_bytes
    }

    /// Whether the last write succeeded.
    pub fn is_healthy(&self) -> bool {
        self.shared.healthy.load(Ordering::SeqCst)
    }

    /// The error to refuse new work with while space is below the reserve.
    pub fn space_error(&self) -> Option<StoreError> {
        self.low_on_space()
            .then(|| space::insufficient(self.free_bytes(), self.min_free_bytes))
    }
}

/// Layout 1 -> 2: index the terminal evaluations for retention (in one group after
/// everything already logged, since the seq of their terminal event is not known) and
/// the idempotency keys by evaluation. One atomic batch, then the layout version.
fn upgrade_to_2(tree: &sled::Tree) -> Result<(), StoreError> {
    let head = tree
        .get(keys::META_HEAD)?
        .and_then(|v| keys::tail_u64(&v))
        .unwrap_or(0);
    let mut batch = sled::Batch::default();
    let mut n = 0u64;
    for st in [Status::Completed, Status::Failed, Status::Cancelled] {
        for item in tree.scan_prefix(keys::status_prefix(st.code())) {
            let (_, id) = item?;
            batch.insert(keys::terminal(head, &String::from_utf8_lossy(&id)), &[]);
            n += 1;
        }
    }
    for item in tree.scan_prefix(keys::IDEM) {
        let (k, value) = item?;
        let (id, _) = keys::parse_idem_value(&value);
        batch.insert(keys::idem_of(&id), &k[keys::IDEM.len()..]);
    }
    batch.insert(keys::META_SCHEMA, &keys::SCHEMA_VERSION.to_be_bytes());
    tree.apply_batch(batch)?;
    tracing::info!(
        terminal = n,
        "store layout upgraded to 2 (retention indexes)"
    );
    Ok(())
}

/// Counters derived from the tree: the last seq ever assigned and how many evaluations
/// are queued and running.
struct Counts {
    head: u64,
    queued: u64,
    running: u64,
    evaluations: u64,
    /// Evaluations in each status, indexed by [`Status::index`].
    by_status: [u64; 5],
}

/// Recompute [`Counts`] from the tree (at open, and after a failed batch). The head is
/// the larger of the stored `m/head` and the last event key, so seqs are never reused
/// even after every event was pruned.
fn recount(tree: &sled::Tree) -> Result<Counts, StoreError> {
    let mut head = tree
        .get(keys::META_HEAD)?
        .and_then(|v| keys::tail_u64(&v))
        .unwrap_or(0);
    if let Some((k, _)) = tree.scan_prefix(keys::LOG).next_back().transpose()? {
        head = head.max(keys::tail_u64(&k).unwrap_or(0));
    }
    let count = |s: Status| tree.scan_prefix(keys::status_prefix(s.code())).count() as u64;
    let by_status = Status::ALL.map(count);
    Ok(Counts {
        head,
        queued: by_status[Status::Queued.index()],
        running: by_status[Status::Running.index()],
        evaluations: by_status.iter().sum(),
        by_status,
    })
}

/// An event from the log, keeping its stored JSON for sinks that forward it as is.
fn decode_event(bytes: &[u8]) -> Result<Event, StoreError> {
    let mut e: Event = decode(bytes)?;
    e.raw = std::str::from_utf8(bytes).ok().map(Arc::from);
    Ok(e)
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Storage(format!("corrupt entry: {e}")))
}

#[cfg(test)]
mod tests;

impl Report for Store {
    fn key(&self) -> &'static str {
        "store"
    }

    fn health(&self) -> BoxFuture<'_, Health> {
        Box::pin(async move {
            let ok = self.shared.healthy.load(Ordering::SeqCst);
            let free = self.free_bytes();
            let low = self.low_on_space();
            let detail = serde_json::json!({
                "ok": ok,
                "head_seq": self.head(),
                "oldest_seq": self.oldest_seq().ok(),
                "size_on_disk_bytes": self.size_on_disk(),
                "free_bytes": (free != u64::MAX).then_some(free),
                "min_free_bytes": self.min_free_bytes,
                "low_space": low,
                "reopens": self.shared.reopens.load(Ordering::Relaxed),
                "evaluations": self.evaluation_count(),
                "evaluations_pruned": self.shared.evaluations_pruned.load(Ordering::Relaxed),
                "last_error": self.shared.last_error.lock().ok().and_then(|e| e.clone()),
            });
            // Low on space: reads, results and deliveries go on; only new work waits.
            let level = if !ok {
                Level::Unhealthy
            } else if low {
                Level::Degraded
            } else {
                Level::Ok
            };
            Health::new(level, detail)
        })
    }

    fn metrics(&self, e: &mut Exposition) {
        let s = &self.shared;
        e.flag(
            "crucible_store_healthy",
            "1 when the last store write succeeded.",
            s.healthy.load(Ordering::SeqCst),
        );
        e.gauge(
            "crucible_outbox_head_seq",
            "Last durable event seq.",
            self.head() as f64,
        );
        e.gauge(
            "crucible_store_size_bytes",
            "Bytes the sled store occupies on disk.",
            self.size_on_disk() as f64,
        );
        let free = self.free_bytes();
        if free != u64::MAX {
            e.gauge(
                "crucible_store_free_bytes",
                "Free bytes on the data dir's filesystem (for unprivileged use).",
                free as f64,
            );
        }
        e.gauge(
            "crucible_store_min_free_bytes",
            "The reserve ([store] min_free_mb): below it new evaluations are refused.",
            self.min_free_bytes as f64,
        );
        e.gauge(
            "crucible_store_evaluations",
            "Evaluations stored (every status).",
            self.evaluation_count() as f64,
        );
        e.counter(
            "crucible_store_evaluations_pruned_total",
            "Terminal evaluations removed by retention.",
            s.evaluations_pruned.load(Ordering::Relaxed),
        );
        e.counter(
            "crucible_store_reopens_total",
            "Times the store was reopened after a failed write.",
            s.reopens.load(Ordering::Relaxed),
        );
        e.counter(
            "crucible_store_batches_total",
            "Group-commit batches applied and flushed.",
            s.stats.batches.load(Ordering::Relaxed),
        );
        e.counter(
            "crucible_store_ops_total",
            "Store operations applied.",
            s.stats.ops.load(Ordering::Relaxed),
        );
        e.counter(
            "crucible_store_events_total",
            "Events appended to the log.",
            s.stats.events.load(Ordering::Relaxed),
        );
        e.counter(
            "crucible_store_errors_total",
            "Failed store batches.",
            s.stats.errors.load(Ordering::Relaxed),
        );
        e.histogram(
            "crucible_store_flush_seconds",
            "Time of each group-commit flush.",
            &s.stats.flush_seconds,
        );
        e.histogram(
            "crucible_store_batch_ops",
            "Operations per group-commit batch.",
            &s.stats.batch_size,
        );
    }
}
