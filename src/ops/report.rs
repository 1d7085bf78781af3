//! The one way a subsystem reports itself: its entry in `/health` and its rows in
//! `/metrics`. Each subsystem (store, queue, executor, the outbox with its sinks, each
//! external connection) implements [`Report`]; `app` registers them in [`Reporters`], and
//! the gateway loops over the list. A new sink or subsystem reports itself without
//! touching the gateway.

use crate::ops::metrics::Exposition;
use crate::BoxFuture;
use serde_json::{Map, Value};
use std::sync::Arc;

/// How a subsystem's state weighs on the appliance's `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Working.
    Ok,
    /// Working partly (a sink is down, the executor cannot run): `status` = `degraded`.
    Degraded,
    /// Cannot do its job (the store cannot write): `status` = `unhealthy`, 503.
    Unhealthy,
}

/// A subsystem's entry in `/health`.
#[derive(Debug, Clone)]
pub struct Health {
    pub level: Level,
    pub detail: Value,
}

impl Health {
    /// `detail` at `level`.
    pub fn new(level: Level, detail: Value) -> Health {
        Health { level, detail }
    }
}

/// A subsystem that reports its health and metrics.
pub trait Report: Send + Sync {
    /// The key of its entry in `/health` (`store`, `queue`, `executor`, `sinks`, ...).
    fn key(&self) -> &'static str;
    /// Its state now.
    fn health(&self) -> BoxFuture<'_, Health>;
    /// Its rows in `/metrics`.
    fn metrics(&self, out: &mut Exposition);
}

/// The last connection-level check of an external server (Redis, PostgreSQL), made every
/// second by a [`crate::ops::worker::Worker`] independently of deliveries, so an outage
/// shows in `/health` within about two seconds rather than after a command timeout.
#[derive(Debug, Default)]
pub struct Probe {
    /// Whether the last check reached the server (false until the first one did).
    pub up: std::sync::atomic::AtomicBool,
    /// Whether a check has completed at all.
    pub checked: std::sync::atomic::AtomicBool,
    /// Why the last check failed.
    pub error: std::sync::Mutex<Option<String>>,
}

impl Probe {
    /// Record a check's outcome; logs changes (warning when the server goes away).
    pub fn record(&self, what: &str, result: Result<(), String>) {
        use std::sync::atomic::Ordering;
        let was_checked = self.checked.swap(true, Ordering::SeqCst);
        let up = result.is_ok();
        let was_up = self.up.swap(up, Ordering::SeqCst);
        if let Ok(mut e) = self.error.lock() {
            *e = result.as_ref().err().cloned();
        }
        match (&result, was_up) {
            (Err(e), true) => {
                tracing::warn!(server = what, error = %e, "connection check failed: the server is unreachable")
            }
            (Err(e), false) if !was_checked => {
                tracing::warn!(server = what, error = %e, "connection check failed: the server is unreachable")
            }
            (Ok(()), false) if was_checked => {
                tracing::info!(server = what, "the server is reachable again")
            }
            _ => {}
        }
    }

    /// Whether the last check succeeded.
    pub fn is_up(&self) -> bool {
        self.up.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Whether a check has completed.
    pub fn checked(&self) -> bool {
        self.checked.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The last check's error.
    pub fn last_error(&self) -> Option<String> {
        self.error.lock().ok().and_then(|e| e.clone())
    }

    /// The level for `/health`: degraded once a check has failed.
    pub fn level(&self) -> Level {
        let checked = self.checked.load(std::sync::atomic::Ordering::SeqCst);
        if checked && !self.is_up() {
            Level::Degraded
        } else {
            Level::Ok
        }
    }
}

/// A subsystem's state in `/health`'s `services` map, derived from its [`Health`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ServiceState {
    /// Working.
    Healthy,
    /// Working partly.
    Degraded,
    /// Cannot do its job.
    Unhealthy,
    /// Not configured (its entry is `null`).
    Disabled,
}

impl ServiceState {
    fn of(h: &Health) -> ServiceState {
        match (h.level, h.detail.is_null()) {
            (Level::Ok, true) => ServiceState::Disabled,
            (Level::Ok, false) => ServiceState::Healthy,
            (Level::Degraded, _) => ServiceState::Degraded,
            (Level::Unhealthy, _) => ServiceState::Unhealthy,
        }
    }
}

/// Every subsystem's health at one moment.
#[derive(Debug, Clone)]
pub struct HealthReport {
    /// The worst level among them.
    pub level: Level,
    /// Each subsystem's entry by its key, in registration order.
    pub entries: Map<String, Value>,
    /// Each subsystem's state by its key, in the same order.
    pub services: Map<String, Value>,
}

/// A subsystem that is not configured: `null` in `/health`, no metrics. Keeps the shape
/// of `/health` the same whether or not an optional subsystem (Redis, PostgreSQL) is on.
pub struct NotConfigured(pub &'static str);

impl Report for NotConfigured {
    fn key(&self) -> &'static str {
        self.0
    }

    fn health(&self) -> BoxFuture<'_, Health> {
        Box::pin(async { Health::new(Level::Ok, Value::Null) })
    }

    fn metrics(&self, _out: &mut Exposition) {}
}

/// The registered reporters, in the order their entries appear.
#[derive(Default, Clone)]
pub struct Reporters {
    list: Vec<Arc<dyn Report>>,
}

impl Reporters {
    /// Register a reporter.
    pub fn add(&mut self, r: Arc<dyn Report>) {
        self.list.push(r);
    }

    /// Every entry, each one's state, and the worst level among them.
    pub async fn health(&self) -> HealthReport {
        let mut report = HealthReport {
            level: Level::Ok,
            entries: Map::new(),
            services: Map::new(),
        };
        for r in &self.list {
            let h = r.health().await;
            report.level = report.level.max(h.level);
            let state = serde_json::to_value(ServiceState::of(&h)).unwrap_or(Value::Null);
            report.services.insert(r.key().to_string(), state);
            report.entries.insert(r.key().to_string(), h.detail);
        }
        report
    }

    /// Every reporter's metric rows.
    pub fn metrics(&self, out: &mut Exposition) {
        for r in &self.list {
            r.metrics(out);
        }
    }
}
