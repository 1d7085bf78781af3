//! The writer thread: drains pending operations, applies them as one sled batch, flushes
//! once, answers every waiter (group commit), then announces the new durable head.
//!
//! Seqs are assigned here and only here, so they are strictly increasing without gaps:
//! a batch that fails to apply leaves no trace and its seqs are reused by the next one.

use super::{keys, DeadLetter, Op, Pruned, Shared, StoreError, Submitted, Tx};
use crate::events::{Confirmation, Event, EventType};
use crate::model::{now, Evaluation, Finish, NewEvaluation, Status, TransitionError};
use crate::ops::metrics::Histogram;
use std::collections::HashMap;
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
    pub(super) db: sled::Db,
    pub(super) tree: sled::Tree,
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
}

/// The in-progress batch and the overlay of what it changes, so that two operations on
/// the same evaluation in one batch see each other.
struct Pending<'a> {
    tree: &'a sled::Tree,
    node: &'a str,
    batch: sled::Batch,
    evals: HashMap<String, Evaluation>,
    idem: HashMap<String, String>,
    cursors: HashMap<String, u64>,
    next_seq: u64,
    depth: u64,
    running: u64,
    /// Evaluations in each status, indexed by `Status::index`.
    by_status: [u64; 5],
    pruned_upto: u64,
    events: u64,
}

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
        let _ = self.db.flush();
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
        let mut p = Pending {
            tree: &self.tree,
            node: &self.node,
            batch: sled::Batch::default(),
            evals: HashMap::new(),
            idem: HashMap::new(),
            cursors: HashMap::new(),
            next_seq: self.last_seq,
            depth: self.shared.queue_depth.load(Ordering::SeqCst),
            running: self.shared.running.load(Ordering::SeqCst),
            by_status: self
                .shared
                .by_status
                .each_ref()
                .map(|c| c.load(Ordering::SeqCst)),
            pruned_upto: 0,
            events: 0,
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
            p.batch.insert(keys::META_HEAD, &new_seq.to_be_bytes());
        }
        let (depth, running, by_status, events) = (p.depth, p.running, p.by_status, p.events);
        let batch = p.batch;

        let stats = &self.shared.stats;
        // Readers wait for the flush of anything they may see from here on.
        self.shared.applying.store(new_seq, Ordering::SeqCst);
        let applied = self.tree.apply_batch(batch);
        crate::ops::failpoint::hit("store.before_flush");
        let t = Instant::now();
        let flushed = applied.and_then(|_| self.db.flush());
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
                let msg = format!("store write failed: {e}");
                tracing::error!(error = %e, "store batch failed");
                stats.errors.fetch_add(1, Ordering::Relaxed);
                self.shared.healthy.store(false, Ordering::SeqCst);
                if let Ok(mut last) = self.shared.last_error.lock() {
                    *last = Some(msg.clone());
                }
                // Re-read what is actually there so counters and seqs stay truthful.
                self.resync();
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
                return Err(reject("the directory exists and is not empty"));
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

    /// After a failed batch: recompute the last seq and the counters from the tree.
    fn resync(&mut self) {
        match super::recount(&self.tree) {
            Ok(c) => {
                self.last_seq = c.head.max(self.last_seq);
                self.shared.queue_depth.store(c.queued, Ordering::SeqCst);
                self.shared.running.store(c.running, Ordering::SeqCst);
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
            Op::Shutdown { reply } | Op::Ping { reply } => answer(reply, Ok(())),
            Op::Backup { reply, .. } => answer(
                reply,
                Err(StoreError::Storage(
                    "backup is handled by the writer".into(),
                )),
            ),
        }
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
        self.append_event(kind, &rec, &rec_json);
        match prev {
            None => self.by_status[rec.status.index()] += 1,
            Some(old) if old != rec.status => {
                self.batch.remove(keys::status(old.code(), rec.created_seq));
                self.by_status[old.index()] = self.by_status[old.index()].saturating_sub(1);
                self.by_status[rec.status.index()] += 1;
            }
            Some(_) => {}
        }
        self.batch.insert(
            keys::status(rec.status.code(), rec.created_seq),
            rec.eval_id.as_bytes(),
        );
        self.batch.insert(keys::eval(&rec.eval_id), rec_json);
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
        self.batch.insert(keys::log(seq), event_json);
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
        idem_key: Option<String>,
        max_queued: u64,
    ) -> Result<Vec<Submitted>, StoreError> {
        if let Some(key) = &idem_key {
            let existing = match self.idem.get(key) {
                Some(id) => Some(id.clone()),
                None => self
                    .tree
                    .get(keys::idem(key))?
                    .map(|v| String::from_utf8_lossy(&v).to_string()),
            };
            if let Some(id) = existing {
                if let Some(rec) = self.load(&id)? {
                    return Ok(vec![Submitted {
                        eval_id: id,
                        status: rec.status,
                        existing: true,
                        queue_position: None,
                    }]);
                }
            }
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
            out.push(Submitted {
                eval_id: id,
                status: Status::Queued,
                existing: false,
                // The queue is FIFO by creation and this one is its newest entry.
                queue_position: Some(self.depth),
            });
        }
        if let (Some(key), Some(first)) = (idem_key, out.first()) {
            self.batch
                .insert(keys::idem(&key), first.eval_id.as_bytes());
            self.idem.insert(key, first.eval_id.clone());
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
        self.batch.insert(keys::cursor(sink), &seq.to_be_bytes());
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
        self.batch.insert(keys::dead(sink, seq), json(&dl));
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
                self.batch.remove(k);
                self.pruned_upto = seq;
                removed += 1;
            }
        }
        let oldest = self.oldest()?;
        Ok(Pruned { removed, oldest })
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
