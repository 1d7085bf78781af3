//! The writer thread: drains pending operations, applies them as one sled batch, flushes
//! once, answers every waiter (group commit), then announces the new durable head.
//!
//! Seqs are assigned here and only here, so they are strictly increasing without gaps:
//! a batch that fails to apply leaves no trace and its seqs are reused by the next one.

use super::{
    describe, keys, open_db, DeadLetter, Handles, IdemKey, Op, Pruned, Shared, Slot, StoreError,
    Submitted, Tx,
};
use crate::events::{Confirmation, Event, EventType};
use crate::model::{now, Evaluation, Finish, NewEvaluation, Status, TransitionError};
use crate::ops::metrics::Histogram;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// Counters of the group commit, for /metrics and the benchmark report.
#[derive(Debug)]
pub struct WriterStats {
    /// Batches applied and flushed.
    pub batches: AtomicU64,
    /// Operations applied (successful or refused).
    pub ops: AtomicU64,
    /// Events appended to the log.
    pub events: AtomicU64,
    /// Failed batch applications or flushes.
    pub errors: AtomicU64,
    /// Time of each flush.
    pub flush_seconds: Histogram,
    /// Operations per batch.
    pub batch_size: Histogram,
}

impl Default for WriterStats {
    fn default() -> Self {
        WriterStats {
            batches: AtomicU64::new(0),
            ops: AtomicU64::new(0),
            events: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            flush_seconds: Histogram::new(&[
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5,
            ]),
            batch_size: Histogram::new(&[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]),
        }
    }
}

pub(super) struct Writer {
    /// The open database; `None` after a failed write until it is reopened.
    pub(super) h: Option<Handles>,
    /// Where readers find it.
    pub(super) slot: Slot,
    pub(super) cache_bytes: u64,
    /// New submissions are refused below this much free space.
    pub(super) min_free_bytes: u64,
    pub(super) node: String,
    pub(super) shared: Arc<Shared>,
    pub(super) head_tx: watch::Sender<u64>,
    /// Group-commit window.
    pub(super) window: Duration,
    pub(super) max_batch: usize,
    /// Last seq written (applied, and flushed unless the last flush failed).
    pub(super) last_seq: u64,
    /// Directory of the sled database (for backups).
    pub(super) path: std::path::PathBuf,
    /// The old database could not be let go after a failed write: only a restart helps.
    pub(super) wedged: bool,
}

/// The in-progress batch and the overlay of what it changes, so that two operations on
/// the same evaluation in one batch see each other.
struct Pending<'a> {
    tree: &'a sled::Tree,
    node: &'a str,
    /// Set when free space is below the reserve: submissions are refused with it.
    refuse_new: Option<StoreError>,
    batch: sled::Batch,
    evals: HashMap<String, Evaluation>,
    /// Idempotency keys written in this batch: key -> (eval_id, fingerprint).
    idem: HashMap<String, (String, String)>,
    cursors: HashMap<String, u64>,
    next_seq: u64,
    depth: u64,
    running: u64,
    /// Evaluations stored, and how many this batch removed.
    evaluations: u64,
    evaluations_pruned: u64,
    /// Evaluations in each status, indexed by `Status::index`.
    by_status: [u64; 5],
    pruned_upto: u64,
    events: u64,
    /// Every key the batch writes or removes, with the length of its new value (0 for a
    /// removal): what [`flush_bound`] needs to bound what sled writes for the batch.
    written: BTreeMap<Vec<u8>, u64>,
}

/// sled 0.34's log segment (its default `segment_size`, which the store keeps): an I/O
/// buffer that fills is written whole, padding included, and the next one starts a new
/// segment; a value (or a whole node) larger than a quarter of it is written as a blob
/// file of its own instead.
const SEGMENT: u64 = 512 * 1024;

/// Room any flush needs beyond what [`flush_bound`] counts for its nodes: the segment
/// being filled and a new one.
const SEGMENT_SLACK: u64 = 2 * SEGMENT;

/// sled splits a leaf once it holds more than 16 entries, on the next traversal of it:
/// a leaf never holds more than this many.
const LEAF_ENTRIES: usize = 17;

/// What sled adds to each entry of a serialized node or fragment (lengths, header).
const ENTRY_OVERHEAD: u64 = 32;

/// An index node (up to 256 children with short keys) rewritten by a split or a merge.
const INDEX_NODE: u64 = 64 * 1024;

/// Above this much free space the exact bound is not computed: a flush writing a GiB
/// would need leaves of 17 values of about 30 MiB each (records are bounded far below
/// that by `http.max_body_bytes` and the output limits).
const FAR_FROM_FULL: u64 = 1 << 30;

/// The answer to one operation, sent once the batch's flush is known: the flush error
/// if it failed, else the operation's own result.
type Answer = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

fn answer<T: Send + 'static>(tx: Tx<T>, res: Result<T, StoreError>) -> Answer {
    Box::new(move |flushed| {
        let _ = tx.send(flushed.and(res));
    })
}

impl From<TransitionError> for StoreError {
    fn from(e: TransitionError) -> Self {
        match e {
            TransitionError::AlreadyTerminal(s) => StoreError::AlreadyTerminal(s),
            TransitionError::WrongState(a, b) => StoreError::WrongState(a, b),
            TransitionError::NoSuchTest(_) => StoreError::NotFound,
        }
    }
}

impl Writer {
    pub(super) fn run(mut self, mut rx: mpsc::Receiver<Op>) {
        let mut stop = false;
        while !stop {
            let Some(first) = rx.blocking_recv() else {
                break;
            };
            let mut cmds = vec![first];
            self.gather(&mut rx, &mut cmds);
            if cmds.iter().any(|op| matches!(op, Op::Shutdown { .. })) {
                stop = true;
            }
            self.commit(cmds);
        }
        if let Some(h) = &self.h {
            let _ = h.db.flush();
        }
    }

    /// Take whatever else is pending, waiting up to the flush window for more.
    fn gather(&self, rx: &mut mpsc::Receiver<Op>, cmds: &mut Vec<Op>) {
        let deadline = Instant::now() + self.window;
        loop {
            while cmds.len() < self.max_batch {
                match rx.try_recv() {
                    Ok(c) => cmds.push(c),
                    Err(_) => break,
                }
            }
            if cmds.len() >= self.max_batch || self.window.is_zero() {
                return;
            }
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            std::thread::sleep((deadline - now).min(Duration::from_micros(50)));
        }
    }

    fn commit(&mut self, cmds: Vec<Op>) {
        if self.h.is_none() {
            if let Err(e) = self.reopen() {
                return self.refuse_all(cmds, &e);
            }
        }
        // Free space is checked for every batch that would add evaluations (one statvfs
        // next to a flush): the reserve keeps room for results of running ones.
        let refuse_new =
            if self.min_free_bytes > 0 && cmds.iter().any(|op| matches!(op, Op::Submit { .. })) {
                let free = super::space::free_bytes(&self.path).unwrap_or(u64::MAX);
                self.shared.free_bytes.store(free, Ordering::SeqCst);
                (free < self.min_free_bytes)
                    .then(|| super::space::insufficient(free, self.min_free_bytes))
            } else {
                None
            };
        let Some(h) = self.h.clone() else {
            return;
        };
        let mut p = Pending {
            tree: &h.tree,
            node: &self.node,
            refuse_new,
            batch: sled::Batch::default(),
            evals: HashMap::new(),
            idem: HashMap::new(),
            cursors: HashMap::new(),
            next_seq: self.last_seq,
            depth: self.shared.queue_depth.load(Ordering::SeqCst),
            running: self.shared.running.load(Ordering::SeqCst),
            evaluations: self.shared.evaluations.load(Ordering::SeqCst),
            evaluations_pruned: 0,
            by_status: self
                .shared
                .by_status
                .each_ref()
                .map(|c| c.load(Ordering::SeqCst)),
            pruned_upto: 0,
            events: 0,
            written: BTreeMap::new(),
        };
        let mut answers: Vec<Answer> = Vec::with_capacity(cmds.len());
        let mut backups: Vec<(Tx<super::BackupInfo>, std::path::PathBuf)> = Vec::new();
        let n_ops = cmds.len() as u64;
        for op in cmds {
            match op {
                Op::Backup { dest, reply } => backups.push((reply, dest)),
                op => answers.push(p.apply(op)),
            }
        }
        let new_seq = p.next_seq;
        if new_seq != self.last_seq {
            p.insert(keys::META_HEAD, new_seq.to_be_bytes());
        }
        let (depth, running, by_status, events) = (p.depth, p.running, p.by_status, p.events);
        let (evaluations, evaluations_pruned) = (p.evaluations, p.evaluations_pruned);
        let Pending { batch, written, .. } = p;
        // sled must never meet a full disk: after a failed write it keeps the error
        // forever and cannot even be closed cleanly. So a batch is applied only when the
        // filesystem has room for everything sled may write for it (see `flush_bound`:
        // not only its own bytes but the whole leaves it touches, rewritten when sled
        // consolidates, splits or merges them, often as blob files); else it is refused
        // before sled sees it, the store stays sound, and the same write succeeds once
        // space is back.
        if !written.is_empty() {
            if let Err(e) = self.ensure_room(&h.tree, &written) {
                for a in answers {
                    a(Err(e.clone()));
                }
                for (reply, _) in backups {
                    let _ = reply.send(Err(e.clone()));
                }
                self.shared.stats.errors.fetch_add(1, Ordering::Relaxed);
                self.shared.batches_done.send_modify(|n| *n += 1);
                return;
            }
        }
        let stats = &self.shared.stats;
        // Readers wait for the flush of anything they may see from here on.
        self.shared.applying.store(new_seq, Ordering::SeqCst);
        let applied = h
            .tree
            .apply_batch(batch)
            .and_then(|_| settle_nodes(&h.tree, &written));
        crate::ops::failpoint::hit("store.before_flush");
        let t = Instant::now();
        let flushed = applied.and_then(|_| h.db.flush());
        crate::ops::failpoint::hit("store.after_flush");
        stats.flush_seconds.observe(t.elapsed().as_secs_f64());
        stats.batches.fetch_add(1, Ordering::Relaxed);
        stats.ops.fetch_add(n_ops, Ordering::Relaxed);
        stats.batch_size.observe(n_ops as f64);

        match flushed {
            Ok(_) => {
                self.last_seq = new_seq;
                self.shared.queue_depth.store(depth, Ordering::SeqCst);
                self.shared.running.store(running, Ordering::SeqCst);
                self.shared.evaluations.store(evaluations, Ordering::SeqCst);
                self.shared
                    .evaluations_pruned
                    .fetch_add(evaluations_pruned, Ordering::Relaxed);
                for (slot, n) in self.shared.by_status.iter().zip(by_status) {
                    slot.store(n, Ordering::SeqCst);
                }
                self.shared.head.store(new_seq, Ordering::SeqCst);
                self.shared.healthy.store(true, Ordering::SeqCst);
                stats.events.fetch_add(events, Ordering::Relaxed);
                for a in answers {
                    a(Ok(()));
                }
                self.head_tx.send_if_modified(|h| {
                    if *h != new_seq {
                        *h = new_seq;
                        true
                    } else {
                        false
                    }
                });
                for (reply, dest) in backups {
                    let _ = reply.send(self.backup(&dest));
                }
            }
            Err(e) => {
                // The batch may or may not be on disk. Nobody is told "ok"; callers retry
                // (submissions with an Idempotency-Key get the same id back).
                let msg = format!("store write failed: {}", describe(&e));
                tracing::error!(error = %msg, "store batch failed");
                stats.errors.fetch_add(1, Ordering::Relaxed);
                self.shared.healthy.store(false, Ordering::SeqCst);
                if let Ok(mut last) = self.shared.last_error.lock() {
                    *last = Some(msg.clone());
                }
                // sled keeps an I/O error forever: every later write would fail with it.
                // Drop the database and open it again (now, or at the next operation or
                // DiskWatch ping): what it then holds is what the disk holds, exactly as
                // after a crash, and counters and seqs are recounted from it.
                drop(h);
                if let Err(e) = self.reopen() {
                    tracing::warn!(error = %e, "the store cannot be reopened yet; retrying every second");
                }
                // Nothing more is coming for this batch: readers stop waiting for it.
                let head = self.shared.head.load(Ordering::SeqCst);
                self.shared.applying.store(head, Ordering::SeqCst);
                for a in answers {
                    a(Err(StoreError::Storage(msg.clone())));
                }
                for (reply, _) in backups {
                    let _ = reply.send(Err(StoreError::Storage(msg.clone())));
                }
            }
        }
        // Wake the readers waiting in `Store::settle` for this flush.
        self.shared.batches_done.send_modify(|n| *n += 1);
    }

    /// Copy the (flushed, quiescent) database directory to `dest/store`, then open the
    /// copy to check it before reporting success.
    fn backup(&self, dest: &std::path::Path) -> Result<super::BackupInfo, StoreError> {
        let fail = |m: String| StoreError::Storage(format!("backup to {}: {m}", dest.display()));
        let reject =
            |m: &str| StoreError::BackupRejected(format!("backup to {}: {m}", dest.display()));
        if !dest.is_absolute() {
            return Err(reject("the path must be absolute"));
        }
        if dest.starts_with(&self.path) {
            return Err(reject("the path is inside the live store"));
        }
        if let Ok(mut rd) = std::fs::read_dir(dest) {
            if rd.next().is_some() {
                return Err(StoreError::BackupExists(format!(
                    "backup to {}: the directory exists and is not empty",
                    dest.display()
                )));
            }
        }
        // A destination the server cannot create is the request's fault; a failure while
        // copying is the disk's (a server error).
        std::fs::create_dir_all(dest).map_err(|e| reject(&format!("cannot create it: {e}")))?;
        let target = dest.join("store");
        let bytes = copy_dir(&self.path, &target).map_err(|e| fail(e.to_string()))?;
        let copy = sled::Config::new()
            .path(&target)
            .open()
            .map_err(|e| fail(format!("the copy does not open: {e}")))?;
        let head = copy
            .open_tree("crucible")
            .ok()
            .and_then(|t| t.get(keys::META_HEAD).ok().flatten())
            .and_then(|v| keys::tail_u64(&v))
            .unwrap_or(0);
        drop(copy);
        release_wait(&target.join("db"));
        if head != self.last_seq {
            return Err(fail(format!(
                "the copy ends at seq {head}, the store at {}",
                self.last_seq
            )));
        }
        let info = super::BackupInfo {
            path: dest.to_path_buf(),
            head_seq: head,
            bytes,
            node: self.node.clone(),
            created_at: now(),
        };
        let manifest = serde_json::json!({
            "node": info.node,
            "head_seq": info.head_seq,
            "bytes": info.bytes,
            "created_at": info.created_at,
            "crucible_version": env!("CARGO_PKG_VERSION"),
            "store_layout": keys::SCHEMA_VERSION,
        });
        std::fs::write(dest.join("backup.json"), manifest.to_string() + "\n")
            .map_err(|e| fail(e.to_string()))?;
        tracing::info!(path = %dest.display(), head_seq = head, bytes, "backup written");
        Ok(info)
    }

    /// Whether the filesystem has room for what sled may write for a batch writing
    /// `written` (see [`flush_bound`]). Below that, the ballast file kept for this moment
    /// is given back first; if that is not enough either, the batch is refused.
    fn ensure_room(
        &mut self,
        tree: &sled::Tree,
        written: &BTreeMap<Vec<u8>, u64>,
    ) -> Result<(), StoreError> {
        let mut free = super::space::free_bytes(&self.path).unwrap_or(u64::MAX);
        let own: u64 = written
            .iter()
            .map(|(k, v)| k.len() as u64 + v + ENTRY_OVERHEAD)
            .sum();
        if free >= FAR_FROM_FULL.saturating_add(own.saturating_mul(2)) {
            self.shared.free_bytes.store(free, Ordering::SeqCst);
            return Ok(());
        }
        let need = flush_bound(tree, written)?;
        if free < need && super::space::release_ballast(&self.path) {
            tracing::warn!(
                free_bytes = free,
                "the disk is nearly full: released the store's ballast to finish writes"
            );
            free = super::space::free_bytes(&self.path).unwrap_or(u64::MAX);
        }
        self.shared.free_bytes.store(free, Ordering::SeqCst);
        if free < need {
            let msg = format!(
                "no space left for this write on the data dir's filesystem ({} KiB free, \
                 {} KiB needed); it was refused before reaching the store and will succeed \
                 once space is freed",
                free / 1024,
                need.div_ceil(1024)
            );
            if let Ok(mut last) = self.shared.last_error.lock() {
                *last = Some(msg.clone());
            }
            return Err(StoreError::Storage(msg));
        }
        Ok(())
    }

    /// Drop the database (readers see "reopening" meanwhile) and open it again; then
    /// recount, and announce whatever the disk holds as durable.
    fn reopen(&mut self) -> Result<(), StoreError> {
        let old = self.h.take();
        let shared_old = self.slot.write().ok().and_then(|mut slot| slot.take());
        if old.is_some() || shared_old.is_some() {
            // Dropping a database after a failed write flushes what it still holds,
            // which may wait for a write that never completes: drop it on a thread of
            // its own and wait a bounded time for it (and its file lock) to go.
            let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
            let _ = std::thread::Builder::new()
                .name("store-drop".into())
                .spawn(move || {
                    drop(old);
                    drop(shared_old);
                    let _ = done_tx.send(());
                });
            if done_rx.recv_timeout(Duration::from_secs(3)).is_err() {
                self.wedged = true;
            }
        }
        if self.wedged {
            return Err(StoreError::Storage(
                "the store cannot be reopened in this process after a failed write (sled \
                 still holds the database); the appliance must be restarted"
                    .into(),
            ));
        }
        // sled's own threads let go of the dropped database a moment later.
        let mut attempt = 0;
        let h = loop {
            match open_db(&self.path, self.cache_bytes) {
                Ok(h) => break h,
                Err(e) if attempt < 100 && e.to_string().contains("could not acquire lock") => {
                    attempt += 1;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => {
                    return Err(StoreError::Storage(format!(
                        "the store cannot be reopened: {}",
                        describe(&e)
                    )))
                }
            }
        };
        self.h = Some(h.clone());
        self.resync();
        let head = self.last_seq;
        self.shared.head.store(head, Ordering::SeqCst);
        self.shared.applying.store(head, Ordering::SeqCst);
        self.head_tx.send_if_modified(|x| {
            let changed = *x != head;
            *x = head;
            changed
        });
        if let Ok(mut slot) = self.slot.write() {
            *slot = Some(h);
        }
        self.shared.reopens.fetch_add(1, Ordering::Relaxed);
        tracing::info!(head_seq = head, "store reopened after a failed write");
        Ok(())
    }

    /// Answer every operation of a batch that cannot be applied (the database is not
    /// open). A ping still succeeds: the writer is alive (the systemd watchdog must not
    /// restart a service that is only waiting for disk space).
    fn refuse_all(&mut self, cmds: Vec<Op>, e: &StoreError) {
        for op in cmds {
            match op {
                Op::Submit { reply, .. } => drop(reply.send(Err(e.clone()))),
                Op::Start { reply, .. } | Op::Finish { reply, .. } | Op::Progress { reply, .. } => {
                    drop(reply.send(Err(e.clone())))
                }
                Op::Cancel { reply, .. } => drop(reply.send(Err(e.clone()))),
                Op::InterruptRunning { reply } => drop(reply.send(Err(e.clone()))),
                Op::SetCursor { reply, .. }
                | Op::Confirm { reply, .. }
                | Op::DeadLetter { reply, .. } => drop(reply.send(Err(e.clone()))),
                Op::Prune { reply, .. } => drop(reply.send(Err(e.clone()))),
                Op::Replay { reply, .. } => drop(reply.send(Err(e.clone()))),
                Op::PruneEvaluations { reply, .. } => drop(reply.send(Err(e.clone()))),
                Op::Backup { reply, .. } => drop(reply.send(Err(e.clone()))),
                // A wedged store fails the watchdog's ping: systemd restarts the service.
                Op::Ping { reply } if self.wedged => drop(reply.send(Err(e.clone()))),
                Op::Ping { reply } | Op::Shutdown { reply } => drop(reply.send(Ok(()))),
            }
        }
        self.shared.batches_done.send_modify(|n| *n += 1);
    }

    /// After a failed batch: recompute the last seq and the counters from the tree.
    fn resync(&mut self) {
        let Some(h) = &self.h else { return };
        match super::recount(&h.tree) {
            Ok(c) => {
                self.last_seq = c.head.max(self.last_seq);
                self.shared.queue_depth.store(c.queued, Ordering::SeqCst);
                self.shared.running.store(c.running, Ordering::SeqCst);
                self.shared
                    .evaluations
                    .store(c.evaluations, Ordering::SeqCst);
                for (slot, n) in self.shared.by_status.iter().zip(c.by_status) {
                    slot.store(n, Ordering::SeqCst);
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot recount the store"),
        }
    }
}

impl Pending<'_> {
    fn apply(&mut self, op: Op) -> Answer {
        match op {
            Op::Submit {
                evals,
                idem_key,
                max_queued,
                reply,
            } => answer(reply, self.submit(evals, idem_key, max_queued)),
            Op::Start { eval_id, reply } => answer(reply, self.start(&eval_id)),
            Op::Finish {
                eval_id,
                fin,
                reply,
            } => answer(reply, self.finish(&eval_id, *fin)),
            Op::Cancel { eval_id, reply } => answer(reply, self.cancel(&eval_id)),
            Op::Progress {
                eval_id,
                index,
                outcome,
                compile,
                reply,
            } => answer(
                reply,
                self.progress(&eval_id, index, &outcome, compile.as_deref()),
            ),
            Op::InterruptRunning { reply } => answer(reply, self.interrupt_running()),
            Op::SetCursor { sink, seq, reply } => {
                self.put_cursor(&sink, seq);
                answer(reply, Ok(()))
            }
            Op::Confirm {
                sink,
                seq,
                confirmations,
                reply,
            } => {
                self.confirm(&sink, seq, confirmations);
                answer(reply, Ok(()))
            }
            Op::DeadLetter {
                sink,
                event,
                error,
                attempts,
                reply,
            } => answer(reply, self.dead_letter(&sink, *event, error, attempts)),
            Op::Prune {
                sinks,
                older_than,
                max,
                reply,
            } => answer(reply, self.prune(&sinks, &older_than, max)),
            Op::Replay {
                sink,
                from_seq,
                reply,
            } => answer(reply, self.replay(&sink, from_seq)),
            Op::PruneEvaluations {
                sinks,
                older_than,
                keep,
                max,
                reply,
            } => answer(
                reply,
                self.prune_evaluations(&sinks, older_than.as_deref(), keep, max),
            ),
            Op::Shutdown { reply } | Op::Ping { reply } => answer(reply, Ok(())),
            Op::Backup { reply, .. } => answer(
                reply,
                Err(StoreError::Storage(
                    "backup is handled by the writer".into(),
                )),
            ),
        }
    }

    /// Put `key` -> `value` in the batch, and note it for the room check.
    fn insert(&mut self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) {
        let (key, value) = (key.as_ref(), value.as_ref());
        self.written.insert(key.to_vec(), value.len() as u64);
        self.batch.insert(key, value);
    }

    /// Remove `key` in the batch, and note it for the room check.
    fn remove(&mut self, key: impl AsRef<[u8]>) {
        let key = key.as_ref();
        self.written.insert(key.to_vec(), 0);
        self.batch.remove(key);
    }

    fn load(&self, id: &str) -> Result<Option<Evaluation>, StoreError> {
        if let Some(e) = self.evals.get(id) {
            return Ok(Some(e.clone()));
        }
        match self.tree.get(keys::eval(id))? {
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| StoreError::Storage(format!("corrupt record {id}: {e}"))),
            None => Ok(None),
        }
    }

    /// Write the record as a transition left it (its version already raised) and its
    /// event; move its status index entry. The record is serialized once and embedded
    /// as-is in the event's `data`.
    fn put(&mut self, mut rec: Evaluation, prev: Option<Status>, kind: EventType) -> &Evaluation {
        if prev.is_none() {
            rec.created_seq = self.next_seq + 1;
        }
        let rec_json = json(&rec);
        let seq = self.append_event(kind, &rec, &rec_json);
        if rec.status.is_terminal() && prev.is_some_and(|p| !p.is_terminal()) {
            self.insert(keys::terminal(seq, &rec.eval_id), b"");
        }
        match prev {
            None => self.by_status[rec.status.index()] += 1,
            Some(old) if old != rec.status => {
                self.remove(keys::status(old.code(), rec.created_seq));
                self.by_status[old.index()] = self.by_status[old.index()].saturating_sub(1);
                self.by_status[rec.status.index()] += 1;
            }
            Some(_) => {}
        }
        self.insert(
            keys::status(rec.status.code(), rec.created_seq),
            rec.eval_id.as_bytes(),
        );
        self.insert(keys::eval(&rec.eval_id), rec_json);
        let id = rec.eval_id.clone();
        self.evals.entry(id).insert_entry(rec).into_mut()
    }

    /// Append one event carrying `rec` (already serialized as `rec_json`) with the next seq.
    fn append_event(&mut self, kind: EventType, rec: &Evaluation, rec_json: &[u8]) -> u64 {
        self.next_seq += 1;
        let seq = self.next_seq;
        let event_json = event_json(
            &EventHead {
                event_id: &uuid::Uuid::new_v4().to_string(),
                seq,
                kind,
                eval_id: &rec.eval_id,
                version: rec.version,
                timestamp: &now(),
                node: self.node,
            },
            rec_json,
        );
        self.insert(keys::log(seq), event_json);
        self.events += 1;
        seq
    }

    /// A sink's cursor and the confirmations it asked for, in one batch: the
    /// confirmations are events that do not change the record (`version` is the one they
    /// confirm).
    fn confirm(&mut self, sink: &str, seq: u64, confirmations: Vec<Confirmation>) {
        for c in confirmations {
            let rec_json = json(&c.data);
            self.append_event(c.kind, &c.data, &rec_json);
        }
        self.put_cursor(sink, seq);
    }

    fn submit(
        &mut self,
        evals: Vec<NewEvaluation>,
        idem_key: Option<IdemKey>,
        max_queued: u64,
    ) -> Result<Vec<Submitted>, StoreError> {
        if let Some(k) = &idem_key {
            let existing = match self.idem.get(&k.key) {
                Some((id, fp)) => Some((id.clone(), Some(fp.clone()))),
                None => self
                    .tree
                    .get(keys::idem(&k.key))?
                    .map(|v| keys::parse_idem_value(&v)),
            };
            if let Some((id, fp)) = existing {
                if let Some(rec) = self.load(&id)? {
                    if fp.is_some_and(|fp| fp != k.fingerprint) {
                        return Err(StoreError::IdempotencyConflict(id));
                    }
                    return Ok(vec![Submitted {
                        eval_id: id,
                        status: rec.status,
                        existing: true,
                        queue_position: None,
                    }]);
                }
            }
        }
        // A retry of an accepted submission still finds it; only new ones are refused.
        if let Some(e) = &self.refuse_new {
            return Err(e.clone());
        }
        let n = evals.len() as u64;
        if self.depth + n > max_queued {
            return Err(StoreError::QueueFull {
                depth: self.depth,
                max: max_queued,
            });
        }
        let created_at = now();
        let mut out = Vec::with_capacity(evals.len());
        for e in evals {
            // Time-ordered (UUIDv7): record keys append at the right edge of the tree
            // instead of touching random leaves, and key order is creation order.
            let (rec, kind) = Evaluation::submitted(
                uuid::Uuid::now_v7().to_string(),
                self.node.to_string(),
                created_at.clone(),
                e,
            );
            let id = rec.eval_id.clone();
            self.put(rec, None, kind);
            self.depth += 1;
            self.evaluations += 1;
            out.push(Submitted {
                eval_id: id,
                status: Status::Queued,
                existing: false,
                // The queue is FIFO by creation and this one is its newest entry.
                queue_position: Some(self.depth),
            });
        }
        if let (Some(k), Some(first)) = (idem_key, out.first()) {
            let value = keys::idem_value(&first.eval_id, &k.fingerprint);
            self.insert(keys::idem(&k.key), value.as_bytes());
            self.insert(keys::idem_of(&first.eval_id), k.key.as_bytes());
            self.idem
                .insert(k.key, (first.eval_id.clone(), k.fingerprint));
        }
        Ok(out)
    }

    fn start(&mut self, id: &str) -> Result<Evaluation, StoreError> {
        let rec = self.load(id)?.ok_or(StoreError::NotFound)?;
        let (next, kind) = rec.start(&now())?;
        self.depth = self.depth.saturating_sub(1);
        self.running += 1;
        Ok(self.put(next, Some(rec.status), kind).clone())
    }

    fn finish(&mut self, id: &str, fin: Finish) -> Result<Evaluation, StoreError> {
        let rec = self.load(id)?.ok_or(StoreError::NotFound)?;
        let (next, kind) = rec.finish(fin, &now())?;
        self.running = self.running.saturating_sub(1);
        Ok(self.put(next, Some(rec.status), kind).clone())
    }

    fn progress(
        &mut self,
        id: &str,
        index: usize,
        outcome: &crate::model::TestOutcome,
        compile: Option<&crate::model::CompileInfo>,
    ) -> Result<Evaluation, StoreError> {
        let rec = self.load(id)?.ok_or(StoreError::NotFound)?;
        let (next, kind) = rec.progress(index, outcome, compile)?;
        Ok(self.put(next, Some(rec.status), kind).clone())
    }

    fn cancel(&mut self, id: &str) -> Result<(Evaluation, Status), StoreError> {
        let rec = self.load(id)?.ok_or(StoreError::NotFound)?;
        let (next, kind) = rec.cancel(&now())?;
        match rec.status {
            Status::Queued => self.depth = self.depth.saturating_sub(1),
            _ => self.running = self.running.saturating_sub(1),
        }
        Ok((self.put(next, Some(rec.status), kind).clone(), rec.status))
    }

    fn interrupt_running(&mut self) -> Result<u64, StoreError> {
        let mut ids = Vec::new();
        for item in self
            .tree
            .scan_prefix(keys::status_prefix(Status::Running.code()))
        {
            let (_, id) = item?;
            ids.push(String::from_utf8_lossy(&id).to_string());
        }
        let mut n = 0;
        for id in ids {
            let Some(rec) = self.load(&id)? else { continue };
            let Ok((next, kind)) = rec.interrupt(&now()) else {
                continue;
            };
            self.running = self.running.saturating_sub(1);
            self.put(next, Some(rec.status), kind);
            n += 1;
        }
        Ok(n)
    }

    fn cursor_of(&self, sink: &str) -> Result<Option<u64>, StoreError> {
        if let Some(c) = self.cursors.get(sink) {
            return Ok(Some(*c));
        }
        Ok(self
            .tree
            .get(keys::cursor(sink))?
            .and_then(|v| keys::tail_u64(&v)))
    }

    fn put_cursor(&mut self, sink: &str, seq: u64) {
        self.insert(keys::cursor(sink), seq.to_be_bytes());
        self.cursors.insert(sink.to_string(), seq);
    }

    fn dead_letter(
        &mut self,
        sink: &str,
        event: Event,
        error: String,
        attempts: u32,
    ) -> Result<(), StoreError> {
        let seq = event.seq;
        let dl = DeadLetter {
            sink: sink.to_string(),
            seq,
            event_id: event.event_id.clone(),
            eval_id: event.eval_id.clone(),
            kind: event.kind.as_str().to_string(),
            error,
            attempts,
            dead_at: now(),
            event,
        };
        let dl = json(&dl);
        self.insert(keys::dead(sink, seq), dl);
        let cur = self.cursor_of(sink)?.unwrap_or(0);
        if seq > cur {
            self.put_cursor(sink, seq);
        }
        Ok(())
    }

    fn oldest(&self) -> Result<u64, StoreError> {
        let from = keys::log(self.pruned_upto.saturating_add(1));
        let mut to = keys::LOG.to_vec();
        to.extend_from_slice(&u64::MAX.to_be_bytes());
        match self.tree.range(from..=to).next().transpose()? {
            Some((k, _)) => Ok(keys::tail_u64(&k).unwrap_or(0)),
            None => Ok(self.next_seq + 1),
        }
    }

    fn prune(
        &mut self,
        sinks: &[String],
        older_than: &str,
        max: usize,
    ) -> Result<Pruned, StoreError> {
        let oldest = self.oldest()?;
        let mut floor = self.next_seq;
        for s in sinks {
            // A sink without a cursor starts at the oldest retained event.
            let c = self.cursor_of(s)?.unwrap_or(oldest.saturating_sub(1));
            floor = floor.min(c);
        }
        #[derive(serde::Deserialize)]
        struct Stamp {
            timestamp: String,
        }
        let mut removed = 0u64;
        let from = keys::log(oldest);
        let to = keys::log(floor);
        if floor >= oldest {
            for item in self.tree.range(from..=to) {
                if removed as usize >= max {
                    break;
                }
                let (k, v) = item?;
                let seq = keys::tail_u64(&k).unwrap_or(0);
                let stamp: Stamp = serde_json::from_slice(&v)
                    .map_err(|e| StoreError::Storage(format!("corrupt event {seq}: {e}")))?;
                if stamp.timestamp.as_str() >= older_than {
                    break;
                }
                self.remove(k);
                self.pruned_upto = seq;
                removed += 1;
            }
        }
        let oldest = self.oldest()?;
        Ok(Pruned { removed, oldest })
    }

    fn prune_evaluations(
        &mut self,
        sinks: &[String],
        older_than: Option<&str>,
        keep: u64,
        max: usize,
    ) -> Result<u64, StoreError> {
        // Everything up to `floor` has reached every sink.
        let oldest = self.oldest()?;
        let mut floor = self.next_seq;
        for s in sinks {
            let c = self.cursor_of(s)?.unwrap_or(oldest.saturating_sub(1));
            floor = floor.min(c);
        }
        let mut removed = 0u64;
        for item in self.tree.scan_prefix(keys::TERMINAL) {
            if removed as usize >= max {
                break;
            }
            let (k, _) = item?;
            let rest = &k[keys::TERMINAL.len()..];
            if rest.len() < 8 {
                continue;
            }
            let seq = keys::tail_u64(&rest[..8]).unwrap_or(u64::MAX);
            if seq > floor {
                break; // not delivered everywhere yet; nor is anything after it
            }
            let id = String::from_utf8_lossy(&rest[8..]).to_string();
            let Some(rec) = self.load(&id)? else {
                // A record already gone: drop its index entry.
                self.remove(k);
                continue;
            };
            let over = keep > 0 && self.evaluations > keep;
            let old =
                older_than.is_some_and(|t| rec.completed_at.as_deref().is_some_and(|c| c < t));
            if !(over || old) {
                break; // everything after it ended later
            }
            self.remove(keys::eval(&id));
            self.remove(keys::status(rec.status.code(), rec.created_seq));
            self.remove(k);
            if let Some(key) = self.tree.get(keys::idem_of(&id))? {
                let ik = keys::idem(&String::from_utf8_lossy(&key));
                if self
                    .tree
                    .get(&ik)?
                    .is_some_and(|v| keys::parse_idem_value(&v).0 == id)
                {
                    self.remove(ik);
                }
                self.remove(keys::idem_of(&id));
            }
            self.evals.remove(&id);
            self.evaluations = self.evaluations.saturating_sub(1);
            let i = rec.status.index();
            self.by_status[i] = self.by_status[i].saturating_sub(1);
            self.evaluations_pruned += 1;
            removed += 1;
        }
        Ok(removed)
    }

    fn replay(&mut self, sink: &str, from_seq: u64) -> Result<u64, StoreError> {
        let oldest = self.oldest()?;
        let head = self.next_seq;
        if from_seq < oldest.max(1) || from_seq > head + 1 {
            return Err(StoreError::ReplayOutOfWindow {
                from: from_seq,
                oldest,
                head,
            });
        }
        let cursor = from_seq - 1;
        self.put_cursor(sink, cursor);
        Ok(cursor)
    }
}

/// A bound of the bytes sled may add to the filesystem when the batch writing `written`
/// (key -> new value length, 0 for a removal) is applied, its nodes settled
/// ([`settle_nodes`]) and flushed.
///
/// sled does not write key/value pairs but B-tree nodes. An insert normally adds a
/// fragment (the pair) to its leaf, but every 10th fragment the whole leaf is rewritten
/// (consolidated); a leaf that grew past 16 entries is split (both halves and the parent
/// rewritten) and one that shrank below 4 is merged into its neighbour (rewritten whole);
/// each such rewrite also lets the segment cleaner rewrite one more node; anything larger
/// than 128 KiB (a large value, or a leaf holding a few) goes to a blob file of its own,
/// and the blobs it replaces are deleted only once the current log segment is full. So
/// one small update next to large records can write several MiB.
///
/// The written keys are taken in clusters (keys fewer than 17 stored entries apart may
/// share a leaf). A cluster's leaves all lie within its region: its keys and the 16
/// entries on either side. Counted: the fragments; every leaf of the region rewritten
/// once, and once more per 10 writes; a split per 8 new keys and a merge per 4 removed
/// ones, each the size of the largest leaf possible there (17 consecutive entries) plus
/// a parent index node; two such leaves for the segment cleaner; two log segments.
fn flush_bound(tree: &sled::Tree, written: &BTreeMap<Vec<u8>, u64>) -> sled::Result<u64> {
    use std::ops::Bound::{Excluded, Included, Unbounded};
    let near = LEAF_ENTRIES - 1;
    let entry = |k: &[u8], v: u64| k.len() as u64 + v + ENTRY_OVERHEAD;
    let mut need = SEGMENT_SLACK;
    let mut largest = 0u64;
    let keys: Vec<&Vec<u8>> = written.keys().collect();
    let mut i = 0;
    while i < keys.len() {
        // Grow the cluster while the next written key is within `near` stored entries.
        let mut j = i;
        while j + 1 < keys.len() {
            let between = tree
                .range::<&[u8], _>((
                    Excluded(keys[j].as_slice()),
                    Excluded(keys[j + 1].as_slice()),
                ))
                .take(near)
                .count();
            if between >= near {
                break;
            }
            j += 1;
        }
        let (first, last) = (keys[i].as_slice(), keys[j].as_slice());
        // The region: `near` entries before, the cluster's span, `near` after; stored
        // entries and the batch's, each at the larger of its old and new size.
        let mut region: BTreeMap<Vec<u8>, u64> = BTreeMap::new();
        for item in tree
            .range::<&[u8], _>((Unbounded, Excluded(first)))
            .rev()
            .take(near)
        {
            let (k, v) = item?;
            region.insert(k.to_vec(), entry(&k, v.len() as u64));
        }
        for item in tree.range::<&[u8], _>((Included(first), Included(last))) {
            let (k, v) = item?;
            region.insert(k.to_vec(), entry(&k, v.len() as u64));
        }
        for item in tree
            .range::<&[u8], _>((Excluded(last), Unbounded))
            .take(near)
        {
            let (k, v) = item?;
            region.insert(k.to_vec(), entry(&k, v.len() as u64));
        }
        let (mut writes, mut new_keys, mut removed) = (0u64, 0u64, 0u64);
        for k in &keys[i..=j] {
            let len = written[*k];
            let e = region.entry(k.to_vec()).or_insert(0);
            if *e == 0 {
                new_keys += 1;
            }
            if len == 0 {
                removed += 1;
            }
            *e = (*e).max(entry(k, len));
            writes += 1;
            need = need.saturating_add(entry(k, len));
        }
        let sizes: Vec<u64> = region.values().copied().collect();
        let region_bytes: u64 = sizes.iter().sum();
        let leaf = sizes
            .windows(LEAF_ENTRIES.min(sizes.len()).max(1))
            .map(|w| w.iter().sum::<u64>())
            .max()
            .unwrap_or(0);
        largest = largest.max(leaf);
        let splits = if new_keys > 0 { 1 + new_keys / 8 } else { 0 };
        let merges = if removed > 0 { 1 + removed / 4 } else { 0 };
        let rewrites = writes / 10 + splits + merges;
        need = need
            .saturating_add(region_bytes)
            .saturating_add(leaf.saturating_mul(rewrites))
            .saturating_add(INDEX_NODE.saturating_mul(1 + splits + merges));
        i = j + 1;
    }
    // The segment cleaner rewrites one node per node rewrite, and may pick any node with
    // a fragment in a half-empty segment. Not knowable from here; this allows for two
    // nodes as large as the largest leaf the batch touches (the store's writes cluster
    // at the right edge of each key range, where the cleaned nodes were written too).
    Ok(need.saturating_add(largest.saturating_mul(2)))
}

/// Traverse to every key the batch wrote, so that the splits and merges it made due
/// happen here, in the writer and before its flush (and within [`flush_bound`]), and
/// not later in whichever reader next walks that leaf: a reader must never write (a
/// large leaf splits into blob files of megabytes, written at once, with no room check).
fn settle_nodes(tree: &sled::Tree, written: &BTreeMap<Vec<u8>, u64>) -> sled::Result<()> {
    for key in written.keys() {
        tree.get(key)?;
    }
    Ok(())
}

/// Wait (a few seconds at most) until nothing in this process holds the sled lock on
/// `db` any more: sled's background threads release a dropped database a moment later,
/// and the backup must be openable by another process as soon as it is reported.
fn release_wait(db: &std::path::Path) {
    use std::os::fd::AsRawFd;
    let Ok(f) = std::fs::File::open(db) else {
        return;
    };
    for _ in 0..500 {
        // SAFETY: flock on a file descriptor we own.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            // SAFETY: as above.
            unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_UN) };
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    tracing::warn!(path = %db.display(), "the verified backup copy is still locked");
}

/// Copy a directory tree; returns the bytes copied.
fn copy_dir(from: &std::path::Path, to: &std::path::Path) -> std::io::Result<u64> {
    std::fs::create_dir_all(to)?;
    let mut bytes = 0;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        let ty = entry.file_type()?;
        if ty.is_dir() {
            bytes += copy_dir(&entry.path(), &target)?;
        } else if ty.is_file() {
            bytes += std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(bytes)
}

/// The envelope of an event; `data` is spliced in as already-serialized record JSON.
#[derive(serde::Serialize)]
struct EventHead<'a> {
    event_id: &'a str,
    seq: u64,
    #[serde(rename = "type")]
    kind: EventType,
    eval_id: &'a str,
    version: u64,
    timestamp: &'a str,
    node: &'a str,
}

/// `{...envelope, "data": <record>}` without re-serializing the record. The field order
/// matches [`Event`], so the bytes parse back into one.
fn event_json(head: &EventHead<'_>, record_json: &[u8]) -> Vec<u8> {
    let mut out = json(head);
    out.pop(); // the closing brace
    out.extend_from_slice(b",\"data\":");
    out.extend_from_slice(record_json);
    out.push(b'}');
    out
}

fn json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    // Plain data with string keys: serialization cannot fail.
    serde_json::to_vec(v).unwrap_or_default()
}
