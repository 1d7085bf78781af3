//! The read side of the durable outbox: one relay per sink, the pruner, and replay.
//!
//! A relay reads the events after its sink's cursor (only up to the durable head),
//! delivers them, and only then saves the new cursor, so a crash in between redelivers
//! the same events with the same `event_id`s (at-least-once). A failing sink backs off
//! (exponential, jittered, capped) without blocking the API or other sinks. An event
//! that keeps failing on its own (the sink attributes the failure to it, or it fails
//! alone) is poison: after `max_attempts` it moves to the dead-letter list and the cursor
//! passes it. An outage (the sink is unreachable) is never poison.
//!
//! Relays never write records or events; cursors, dead letters and pruning go through
//! the store's writer like every other change.

use crate::config::OutboxConfig;
use crate::events::{Confirmation, Event};
use crate::ops::metrics::Exposition;
use crate::ops::report::{Health, Level, Report};
use crate::store::{Store, StoreError};
use crate::BoxFuture;
use rand::Rng;
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Why a delivery failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkError {
    /// The sink cannot be reached (connection refused, disk unavailable, ...): an outage.
    /// Retried forever with backoff; never dead-lettered.
    Unavailable(String),
    /// The sink refused the event at `index`; events before it were delivered.
    Rejected { index: usize, message: String },
    /// The batch failed and the sink cannot say which event caused it.
    Failed(String),
}

impl std::fmt::Display for SinkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SinkError::Unavailable(m) => write!(f, "unavailable: {m}"),
            SinkError::Rejected { index, message } => {
                write!(f, "rejected event #{index}: {message}")
            }
            SinkError::Failed(m) => write!(f, "failed: {m}"),
        }
    }
}

/// A destination for events. Delivery must be idempotent per `event_id`.
pub trait Sink: Send + Sync + 'static {
    /// Unique name; also the key of its cursor.
    fn name(&self) -> &str;
    /// Deliver `events` (in seq order). `Ok` means every one of them is durably handed over.
    fn deliver<'a>(&'a self, events: &'a [Event]) -> BoxFuture<'a, Result<(), SinkError>>;
    /// Confirmations to append, atomically with the new cursor, after `delivered` went
    /// through. Computed from the batch alone, so a redelivery after a crash confirms
    /// again rather than never. Default: none.
    fn confirmations(&self, _delivered: &[Event]) -> Vec<Confirmation> {
        Vec::new()
    }
}

/// Live state of one relay, for /health and /metrics.
#[derive(Debug, Default)]
pub struct SinkStatus {
    pub name: String,
    pub cursor: AtomicU64,
    pub delivered: AtomicU64,
    pub retries: AtomicU64,
    pub dead_letters: AtomicU64,
    pub consecutive_failures: AtomicU64,
    pub last_error: Mutex<Option<String>>,
}

/// A point-in-time report of one sink.
#[derive(Debug, Clone, Serialize)]
pub struct SinkReport {
    pub name: String,
    pub ok: bool,
    pub cursor: u64,
    pub head: u64,
    pub backlog: u64,
    pub oldest_undelivered_age_secs: Option<f64>,
    pub delivered: u64,
    pub retries: u64,
    pub dead_letters: u64,
    pub last_error: Option<String>,
}

/// Replay failures.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("no sink named `{0}` is configured")]
    UnknownSink(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

struct ReplayRequest {
    from_seq: u64,
    reply: oneshot::Sender<Result<u64, StoreError>>,
}

struct RelayHandle {
    sink: Arc<dyn Sink>,
    status: Arc<SinkStatus>,
    control: mpsc::Sender<ReplayRequest>,
    control_rx: Mutex<Option<mpsc::Receiver<ReplayRequest>>>,
}

/// All relays plus the pruner.
pub struct Outbox {
    store: Arc<Store>,
    cfg: OutboxConfig,
    relays: Vec<RelayHandle>,
    /// Events removed by pruning.
    pub pruned: AtomicU64,
}

impl Outbox {
    /// An outbox feeding `sinks` from `store`.
    pub fn new(store: Arc<Store>, cfg: OutboxConfig, sinks: Vec<Arc<dyn Sink>>) -> Arc<Outbox> {
        let relays = sinks
            .into_iter()
            .map(|sink| {
                let (tx, rx) = mpsc::channel(8);
                RelayHandle {
                    status: Arc::new(SinkStatus {
                        name: sink.name().to_string(),
                        ..SinkStatus::default()
                    }),
                    sink,
                    control: tx,
                    control_rx: Mutex::new(Some(rx)),
                }
            })
            .collect();
        Arc::new(Outbox {
            store,
            cfg,
            relays,
            pruned: AtomicU64::new(0),
        })
    }

    /// Names of the configured sinks.
    pub fn sink_names(&self) -> Vec<String> {
        self.relays.iter().map(|r| r.status.name.clone()).collect()
    }

    /// Start every relay and the pruner on `tracker`; they stop when `shutdown` fires.
    pub fn start(self: &Arc<Self>, tracker: &TaskTracker, shutdown: CancellationToken) {
        for r in &self.relays {
            let rx = r.control_rx.lock().ok().and_then(|mut g| g.take());
            let Some(rx) = rx else { continue };
            let relay = Relay {
                store: self.store.clone(),
                sink: r.sink.clone(),
                status: r.status.clone(),
                cfg: self.cfg.clone(),
                control: rx,
                shutdown: shutdown.clone(),
            };
            tracker.spawn(relay.run());
        }
        let me = self.clone();
        tracker.spawn(async move { me.prune_loop(shutdown).await });
    }

    /// Move `sink`'s cursor back so delivery restarts at `from_seq`. The relay applies it
    /// between batches, through the store writer, so it never races a delivery or pruning.
    pub async fn replay(&self, sink: &str, from_seq: u64) -> Result<u64, ReplayError> {
        let r = self
            .relays
            .iter()
            .find(|r| r.status.name == sink)
            .ok_or_else(|| ReplayError::UnknownSink(sink.to_string()))?;
        let (tx, rx) = oneshot::channel();
        r.control
            .send(ReplayRequest {
                from_seq,
                reply: tx,
            })
            .await
            .map_err(|_| StoreError::Closed)?;
        Ok(rx.await.map_err(|_| StoreError::Closed)??)
    }

    /// Report every sink.
    pub fn reports(&self) -> Vec<SinkReport> {
        let head = self.store.head();
        self.relays
            .iter()
            .map(|r| {
                let s = &r.status;
                let cursor = s.cursor.load(Ordering::SeqCst);
                let backlog = head.saturating_sub(cursor);
                let age = if backlog > 0 {
                    self.store
                        .event(cursor + 1)
                        .ok()
                        .flatten()
                        .and_then(|e| chrono::DateTime::parse_from_rfc3339(&e.timestamp).ok())
                        .map(|t| {
                            (chrono::Utc::now() - t.with_timezone(&chrono::Utc))
                                .num_milliseconds()
                                .max(0) as f64
                                / 1000.0
                        })
                } else {
                    None
                };
                SinkReport {
                    name: s.name.clone(),
                    ok: s.consecutive_failures.load(Ordering::SeqCst) == 0,
                    cursor,
                    head,
                    backlog,
                    oldest_undelivered_age_secs: age,
                    delivered: s.delivered.load(Ordering::Relaxed),
                    retries: s.retries.load(Ordering::Relaxed),
                    dead_letters: self.store.dead_letter_count(&s.name),
                    last_error: s.last_error.lock().ok().and_then(|e| e.clone()),
                }
            })
            .collect()
    }

    async fn prune_loop(self: Arc<Self>, shutdown: CancellationToken) {
        let every = Duration::from_secs(self.cfg.prune_interval_secs);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = shutdown.cancelled() => return,
            }
            if let Err(e) = self.prune_once().await {
                tracing::warn!(error = %e, "pruning failed");
            }
        }
    }

    /// One pruning pass: remove, in batches, events every sink has delivered that are
    /// older than the retention window. Returns how many were removed.
    pub async fn prune_once(&self) -> Result<u64, StoreError> {
        let cutoff = chrono::Utc::now() - chrono::Duration::seconds(self.cfg.retain_secs as i64);
        let cutoff = cutoff.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let mut total = 0;
        loop {
            let r = self
                .store
                .prune(self.sink_names(), cutoff.clone(), 1000)
                .await?;
            total += r.removed;
            if r.removed > 0 {
                crate::ops::failpoint::hit("outbox.prune");
            }
            if r.removed < 1000 {
                break;
            }
            tokio::task::yield_now().await;
        }
        if total > 0 {
            self.pruned.fetch_add(total, Ordering::Relaxed);
            tracing::info!(removed = total, "pruned delivered events");
        }
        Ok(total)
    }
}

impl Report for Outbox {
    fn key(&self) -> &'static str {
        "sinks"
    }

    fn health(&self) -> BoxFuture<'_, Health> {
        Box::pin(async move {
            let reports = self.reports();
            let level = if reports.iter().all(|r| r.ok) {
                Level::Ok
            } else {
                Level::Degraded
            };
            let mut map = serde_json::Map::new();
            for r in reports {
                map.insert(r.name.clone(), serde_json::to_value(&r).unwrap_or_default());
            }
            Health::new(level, serde_json::Value::Object(map))
        })
    }

    fn metrics(&self, e: &mut Exposition) {
        e.counter(
            "crucible_outbox_pruned_total",
            "Delivered events pruned from the log.",
            self.pruned.load(Ordering::Relaxed),
        );
        let reports = self.reports();
        let rows = |f: &dyn Fn(&SinkReport) -> f64| -> Vec<(Vec<String>, f64)> {
            reports
                .iter()
                .map(|r| (vec![r.name.clone()], f(r)))
                .collect()
        };
        type Column<'a> = &'a dyn Fn(&SinkReport) -> f64;
        let families: [(&str, &str, &str, Column); 7] = [
            (
                "crucible_outbox_cursor",
                "gauge",
                "Last seq delivered to the sink.",
                &|r| r.cursor as f64,
            ),
            (
                "crucible_outbox_backlog",
                "gauge",
                "Events not yet delivered to the sink.",
                &|r| r.backlog as f64,
            ),
            (
                "crucible_outbox_oldest_undelivered_age_seconds",
                "gauge",
                "Age of the oldest event not yet delivered (0 when none).",
                &|r| r.oldest_undelivered_age_secs.unwrap_or(0.0),
            ),
            (
                "crucible_outbox_delivered_total",
                "counter",
                "Events delivered to the sink.",
                &|r| r.delivered as f64,
            ),
            (
                "crucible_outbox_retries_total",
                "counter",
                "Failed delivery attempts.",
                &|r| r.retries as f64,
            ),
            (
                "crucible_outbox_dead_letters",
                "gauge",
                "Events parked as dead letters.",
                &|r| r.dead_letters as f64,
            ),
            (
                "crucible_outbox_sink_up",
                "gauge",
                "1 when the last delivery to the sink succeeded.",
                &|r| if r.ok { 1.0 } else { 0.0 },
            ),
        ];
        for (name, kind, help, f) in families {
            e.family(name, kind, help, &["sink"], &rows(f));
        }
    }
}

struct Relay {
    store: Arc<Store>,
    sink: Arc<dyn Sink>,
    status: Arc<SinkStatus>,
    cfg: OutboxConfig,
    control: mpsc::Receiver<ReplayRequest>,
    shutdown: CancellationToken,
}

enum Wake {
    Go,
    Replay(ReplayRequest),
    Stop,
}

impl Relay {
    fn name(&self) -> &str {
        &self.status.name
    }

    async fn initial_cursor(&self) -> u64 {
        loop {
            let c = match self.store.cursor(self.name()) {
                Ok(Some(c)) => Ok(c),
                // A new sink starts at the oldest retained event.
                Ok(None) => self.store.oldest_seq().map(|o| o.saturating_sub(1)),
                Err(e) => Err(e),
            };
            match c {
                Ok(c) => return c,
                Err(e) => {
                    tracing::error!(sink = self.name(), error = %e, "cannot read cursor");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// Sleep for `d`, but wake for a replay request or shutdown.
    async fn pause(
        &mut self,
        d: Duration,
        head: Option<&mut tokio::sync::watch::Receiver<u64>>,
    ) -> Wake {
        let head_changed = async {
            match head {
                Some(h) => {
                    let _ = h.changed().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(d) => Wake::Go,
            _ = head_changed => Wake::Go,
            r = self.control.recv() => match r {
                Some(r) => Wake::Replay(r),
                None => Wake::Go,
            },
            _ = self.shutdown.cancelled() => Wake::Stop,
        }
    }

    fn backoff(&self, failures: u64) -> Duration {
        let base = self.cfg.backoff_initial_ms as f64 * 2f64.powi(failures.min(30) as i32 - 1);
        let capped = base.min(self.cfg.backoff_max_ms as f64);
        // Full jitter in [capped/2, capped].
        let jittered = capped / 2.0 + rand::rng().random_range(0.0..=capped / 2.0);
        Duration::from_millis(jittered.max(1.0) as u64)
    }

    fn note_failure(&self, err: &SinkError) -> u64 {
        self.status.retries.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut l) = self.status.last_error.lock() {
            *l = Some(err.to_string());
        }
        self.status
            .consecutive_failures
            .fetch_add(1, Ordering::SeqCst)
            + 1
    }

    async fn handle_replay(&mut self, cursor: &mut u64, req: ReplayRequest) {
        let res = self.store.replay(self.name(), req.from_seq).await;
        crate::ops::failpoint::hit("outbox.replay");
        if let Ok(c) = res {
            *cursor = c;
            self.status.cursor.store(c, Ordering::SeqCst);
            tracing::info!(
                sink = self.name(),
                from_seq = req.from_seq,
                "replay: cursor moved back"
            );
        }
        let _ = req.reply.send(res);
    }

    async fn save_cursor_with(&self, seq: u64, confirmations: Vec<Confirmation>) {
        if confirmations.is_empty() {
            return self.save_cursor(seq).await;
        }
        // The confirmations must not be lost: retry until they are on disk (the store
        // only fails when the disk does; the relay cannot go on without them).
        let mut delay = Duration::from_millis(50);
        while let Err(e) = self
            .store
            .confirm(self.name(), seq, confirmations.clone())
            .await
        {
            if matches!(e, StoreError::Closed) || self.shutdown.is_cancelled() {
                // Not saved: the batch is redelivered and confirmed after the restart.
                return;
            }
            tracing::warn!(sink = self.name(), error = %e, "cannot record confirmations; retrying");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
        }
        self.status.cursor.store(seq, Ordering::SeqCst);
    }

    async fn save_cursor(&self, seq: u64) {
        if let Err(e) = self.store.set_cursor(self.name(), seq).await {
            // Not fatal: the cursor is saved with the next batch; at worst a restart
            // redelivers (at-least-once).
            tracing::warn!(sink = self.name(), error = %e, "cannot save cursor");
        }
        self.status.cursor.store(seq, Ordering::SeqCst);
    }

    async fn run(mut self) {
        let mut cursor = self.initial_cursor().await;
        self.status.cursor.store(cursor, Ordering::SeqCst);
        let mut head_rx = self.store.subscribe_head();
        let poll = Duration::from_millis(self.cfg.poll_interval_ms);
        let mut single = false;
        let mut poison: Option<(u64, u32)> = None;
        tracing::info!(sink = self.name(), cursor, "relay started");
        loop {
            while let Ok(req) = self.control.try_recv() {
                self.handle_replay(&mut cursor, req).await;
            }
            if self.shutdown.is_cancelled() {
                break;
            }
            let head = self.store.head();
            if cursor >= head {
                match self.pause(poll, Some(&mut head_rx)).await {
                    Wake::Go => {}
                    Wake::Replay(r) => self.handle_replay(&mut cursor, r).await,
                    Wake::Stop => break,
                }
                continue;
            }
            let max = if single { 1 } else { self.cfg.batch_size };
            let events = match self.store.events(cursor, head, max) {
                Ok(e) => e,
                Err(e) => {
                    tracing::error!(sink = self.name(), error = %e, "cannot read the event log");
                    if let Wake::Stop = self.pause(Duration::from_secs(1), None).await {
                        break;
                    }
                    continue;
                }
            };
            if events.is_empty() {
                // Nothing retained after the cursor (pruned while this sink was not
                // configured): jump to the oldest retained event.
                match self.store.oldest_seq() {
                    Ok(o) if o > cursor + 1 => {
                        cursor = o - 1;
                        self.save_cursor(cursor).await;
                    }
                    _ => {
                        if let Wake::Stop = self.pause(poll, None).await {
                            break;
                        }
                    }
                }
                continue;
            }
            match self.sink.deliver(&events).await {
                Ok(()) => {
                    crate::ops::failpoint::hit("relay.after_deliver");
                    let last = events[events.len() - 1].seq;
                    let confirmations = self.sink.confirmations(&events);
                    self.save_cursor_with(last, confirmations).await;
                    cursor = last;
                    self.status
                        .delivered
                        .fetch_add(events.len() as u64, Ordering::Relaxed);
                    if self.status.consecutive_failures.swap(0, Ordering::SeqCst) > 0 {
                        tracing::info!(sink = self.name(), "sink delivering again");
                        if let Ok(mut l) = self.status.last_error.lock() {
                            *l = None;
                        }
                    }
                    single = false;
                    poison = None;
                }
                Err(SinkError::Unavailable(msg)) => {
                    let err = SinkError::Unavailable(msg);
                    let n = self.note_failure(&err);
                    if n == 1 || n % 20 == 0 {
                        tracing::warn!(sink = self.name(), error = %err, failures = n, "sink unavailable; backing off");
                    }
                    match self.pause(self.backoff(n), None).await {
                        Wake::Go => {}
                        Wake::Replay(r) => self.handle_replay(&mut cursor, r).await,
                        Wake::Stop => break,
                    }
                }
                Err(SinkError::Failed(msg)) if events.len() > 1 => {
                    // Find the culprit: retry one event at a time.
                    let err = SinkError::Failed(msg);
                    self.note_failure(&err);
                    tracing::warn!(sink = self.name(), error = %err, "batch failed; retrying one event at a time");
                    single = true;
                }
                Err(err) => {
                    let (index, message) = match &err {
                        SinkError::Rejected { index, message } => (*index, message.clone()),
                        SinkError::Failed(m) => (0, m.clone()),
                        SinkError::Unavailable(m) => (0, m.clone()),
                    };
                    let index = index.min(events.len() - 1);
                    if index > 0 {
                        let delivered_upto = events[index - 1].seq;
                        self.save_cursor(delivered_upto).await;
                        cursor = delivered_upto;
                        self.status
                            .delivered
                            .fetch_add(index as u64, Ordering::Relaxed);
                    }
                    let bad = &events[index];
                    let attempts = match poison {
                        Some((seq, n)) if seq == bad.seq => n + 1,
                        _ => 1,
                    };
                    poison = Some((bad.seq, attempts));
                    let n = self.note_failure(&err);
                    if attempts >= self.cfg.max_attempts {
                        tracing::error!(
                            sink = self.name(),
                            seq = bad.seq,
                            event_id = %bad.event_id,
                            eval_id = %bad.eval_id,
                            event_type = bad.kind.as_str(),
                            attempts,
                            error = %message,
                            "poison event moved to dead letters"
                        );
                        match self
                            .store
                            .dead_letter(self.name(), bad.clone(), message, attempts)
                            .await
                        {
                            Ok(()) => {
                                cursor = cursor.max(bad.seq);
                                self.status.cursor.store(cursor, Ordering::SeqCst);
                                self.status.dead_letters.fetch_add(1, Ordering::Relaxed);
                                self.status.consecutive_failures.store(0, Ordering::SeqCst);
                                poison = None;
                                single = false;
                            }
                            Err(e) => {
                                tracing::error!(sink = self.name(), error = %e, "cannot park dead letter");
                            }
                        }
                        continue;
                    }
                    single = true;
                    match self.pause(self.backoff(n), None).await {
                        Wake::Go => {}
                        Wake::Replay(r) => self.handle_replay(&mut cursor, r).await,
                        Wake::Stop => break,
                    }
                }
            }
        }
        tracing::info!(sink = self.name(), cursor, "relay stopped");
    }
}

#[cfg(test)]
mod tests;
