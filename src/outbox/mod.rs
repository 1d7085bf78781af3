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
use crate::ops::worker::{Runner, State, Worker};
use crate::store::{Store, StoreError};
use crate::BoxFuture;
use relay::Relay;
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

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
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct SinkReport {
    /// `file`, `redis` or `postgres`.
    pub name: String,
    /// Delivering (no outage right now).
    pub ok: bool,
    /// Last seq delivered.
    pub cursor: u64,
    /// The log's durable head.
    pub head: u64,
    /// Events not yet delivered (`head - cursor`).
    pub backlog: u64,
    /// Age of the oldest undelivered event, in seconds.
    pub oldest_undelivered_age_secs: Option<f64>,
    /// Events delivered since start.
    pub delivered: u64,
    /// Failed delivery attempts since start.
    pub retries: u64,
    /// Events parked as dead letters.
    pub dead_letters: u64,
    /// The last delivery error.
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
    /// Evaluation retention: (`retain_evaluations_secs`, `max_evaluations`), 0 = off.
    retention: (u64, u64),
    relays: Vec<RelayHandle>,
    /// Events removed by pruning.
    pub pruned: AtomicU64,
}

impl Outbox {
    /// An outbox feeding `sinks` from `store`.
    pub fn new(
        store: Arc<Store>,
        cfg: OutboxConfig,
        retention: (u64, u64),
        sinks: Vec<Arc<dyn Sink>>,
    ) -> Arc<Outbox> {
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
            retention,
            relays,
            pruned: AtomicU64::new(0),
        })
    }

    /// Names of the configured sinks.
    pub fn sink_names(&self) -> Vec<String> {
        self.relays.iter().map(|r| r.status.name.clone()).collect()
    }

    /// Start every relay and the pruner on `runner`; they stop with it.
    pub fn start(self: &Arc<Self>, runner: &Runner) {
        for r in &self.relays {
            let rx = r.control_rx.lock().ok().and_then(|mut g| g.take());
            let Some(rx) = rx else { continue };
            runner.spawn(Relay {
                store: self.store.clone(),
                sink: r.sink.clone(),
                status: r.status.clone(),
                cfg: self.cfg.clone(),
                control: rx,
                head: self.store.subscribe_head(),
                cursor: None,
                replays: Vec::new(),
                single: false,
                poison: None,
            });
        }
        runner.spawn(Pruner {
            outbox: self.clone(),
            every: Duration::from_secs(self.cfg.prune_interval_secs),
            next: tokio::time::Instant::now() + Duration::from_secs(self.cfg.prune_interval_secs),
        });
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
        self.prune_evaluations().await?;
        Ok(total)
    }

    /// Remove terminal evaluations past the retention (age or count), in batches, once
    /// every sink has delivered their events. Returns how many.
    pub async fn prune_evaluations(&self) -> Result<u64, StoreError> {
        let (secs, keep) = self.retention;
        if secs == 0 && keep == 0 {
            return Ok(0);
        }
        let older_than = (secs > 0).then(|| {
            (chrono::Utc::now() - chrono::Duration::seconds(secs as i64))
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
        });
        let mut total = 0;
        loop {
            let n = self
                .store
                .prune_evaluations(self.sink_names(), older_than.clone(), keep, 1000)
                .await?;
            total += n;
            if n > 0 {
                crate::ops::failpoint::hit("retention.prune");
            }
            if n < 1000 {
                break;
            }
            tokio::task::yield_now().await;
        }
        if total > 0 {
            tracing::info!(removed = total, "retention: removed terminal evaluations");
        }
        Ok(total)
    }
}

/// Prunes delivered events every `prune_interval_secs`.
struct Pruner {
    outbox: Arc<Outbox>,
    every: Duration,
    next: tokio::time::Instant,
}

impl Worker for Pruner {
    fn name(&self) -> String {
        "pruner".into()
    }

    fn work<'a>(
        &'a mut self,
        _stop: &'a CancellationToken,
    ) -> BoxFuture<'a, Result<State, String>> {
        Box::pin(async move {
            if tokio::time::Instant::now() < self.next {
                return Ok(State::Idle);
            }
            self.next = tokio::time::Instant::now() + self.every;
            self.outbox
                .prune_once()
                .await
                .map_err(|e| format!("pruning failed: {e}"))?;
            Ok(State::Idle)
        })
    }

    fn wait_for_work(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(tokio::time::sleep_until(self.next))
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

mod relay;

#[cfg(test)]
mod tests;
