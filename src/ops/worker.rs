//! One runner for every background loop (the queue dispatcher, each outbox relay, the
//! pruner, the Docker warm pool, the watchdog, the Redis request/reply listener), in the
//! style of garage's `Worker`: a worker does one step of [`Worker::work`] at a time and
//! says whether there is more ([`State::Busy`]), whether it should be woken later
//! ([`State::Idle`], then [`Worker::wait_for_work`]), or slowed down
//! ([`State::Throttled`]). An error is logged and retried after a back-off that grows with
//! consecutive errors ([`Backoff`]: exponential, jittered, capped), the same for every
//! worker. One stop signal per group ([`Runner`]) ends them all; each worker's state is
//! visible in `/health` and `/metrics`.

use crate::ops::metrics::Exposition;
use crate::ops::report::{Health, Level, Report};
use crate::BoxFuture;
use rand::Rng;
use serde::Serialize;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// What a step of work found.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum State {
    /// There may be more to do at once.
    Busy,
    /// Nothing to do: wait for [`Worker::wait_for_work`].
    Idle,
    /// Slow down: wait this long (or for [`Worker::interrupt`]) before the next step.
    Throttled(Duration),
    /// Finished for good.
    Done,
}

/// A background loop.
pub trait Worker: Send + 'static {
    /// Name in logs, `/health` and `/metrics` (`relay:redis`, `queue`, ...).
    fn name(&self) -> String;
    /// One step of work. It may wait, but must return soon after `stop` fires.
    fn work<'a>(&'a mut self, stop: &'a CancellationToken) -> BoxFuture<'a, Result<State, String>>;
    /// Wait until there may be work again (after [`State::Idle`]).
    fn wait_for_work(&mut self) -> BoxFuture<'_, ()>;
    /// Completes when something must cut a back-off or throttle short (a replay request,
    /// say). Must be cancel-safe. Default: never.
    fn interrupt(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(std::future::pending())
    }
    /// The back-off after errors.
    fn backoff(&self) -> Backoff {
        Backoff::default()
    }
    /// Called once after the last step (the stop signal fired or the work is done).
    fn stopped(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

/// Exponential back-off with jitter: the n-th consecutive failure waits a random time in
/// `[c/2, c]` where `c = min(initial * 2^(n-1), max)`.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(5),
        }
    }
}

impl Backoff {
    /// Back-off from `initial_ms` to `max_ms`.
    pub fn millis(initial_ms: u64, max_ms: u64) -> Backoff {
        Backoff {
            initial: Duration::from_millis(initial_ms),
            max: Duration::from_millis(max_ms),
        }
    }

    /// How long to wait after `failures` consecutive failures (at least 1 ms).
    pub fn delay(&self, failures: u64) -> Duration {
        let exp = failures.clamp(1, 31) - 1;
        let base = self.initial.as_secs_f64() * 2f64.powi(exp as i32);
        let capped = base.min(self.max.as_secs_f64());
        let jittered = capped / 2.0 + rand::rng().random_range(0.0..=capped / 2.0);
        Duration::from_secs_f64(jittered.max(0.001))
    }
}

/// A worker's state for `/health`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WorkerStatus {
    pub name: String,
    /// `busy`, `idle`, `throttled`, `backoff` or `stopped`.
    pub state: &'static str,
    /// Errors since start.
    pub errors: u64,
    /// Errors since the last success.
    pub consecutive_errors: u64,
    pub last_error: Option<String>,
}

type Shared = Arc<Mutex<WorkerStatus>>;

/// A group of workers sharing one stop signal.
pub struct Runner {
    stop: CancellationToken,
    tracker: TaskTracker,
    statuses: Mutex<Vec<Shared>>,
}

impl Runner {
    /// A group that stops when `stop` fires.
    pub fn new(stop: CancellationToken) -> Arc<Runner> {
        Arc::new(Runner {
            stop,
            tracker: TaskTracker::new(),
            statuses: Mutex::new(Vec::new()),
        })
    }

    /// Start a worker.
    pub fn spawn(&self, w: impl Worker) {
        let status: Shared = Arc::new(Mutex::new(WorkerStatus {
            name: w.name(),
            state: "busy",
            ..WorkerStatus::default()
        }));
        if let Ok(mut s) = self.statuses.lock() {
            s.push(status.clone());
        }
        self.tracker.spawn(run(w, status, self.stop.clone()));
    }

    /// Every worker's state.
    pub fn statuses(&self) -> Vec<WorkerStatus> {
        self.statuses
            .lock()
            .map(|v| {
                v.iter()
                    .filter_map(|s| s.lock().ok().map(|s| s.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Fire the stop signal and wait (at most `deadline`) for every worker to end.
    /// Returns whether they all did.
    pub async fn stop(&self, deadline: Duration) -> bool {
        self.stop.cancel();
        self.tracker.close();
        tokio::time::timeout(deadline, self.tracker.wait())
            .await
            .is_ok()
    }
}

fn set(status: &Shared, f: impl FnOnce(&mut WorkerStatus)) {
    if let Ok(mut s) = status.lock() {
        f(&mut s);
    }
}

async fn run(mut w: impl Worker, status: Shared, stop: CancellationToken) {
    let name = w.name();
    let backoff = w.backoff();
    let mut state = State::Busy;
    let mut failures = 0u64;
    loop {
        match state {
            State::Busy => {}
            State::Done => break,
            State::Idle => {
                set(&status, |s| s.state = "idle");
                tokio::select! {
                    _ = w.wait_for_work() => {}
                    _ = stop.cancelled() => break,
                }
            }
            State::Throttled(d) => {
                set(&status, |s| {
                    s.state = if failures > 0 { "backoff" } else { "throttled" }
                });
                tokio::select! {
                    _ = tokio::time::sleep(d) => {}
                    _ = w.interrupt() => {}
                    _ = stop.cancelled() => break,
                }
            }
        }
        if stop.is_cancelled() {
            break;
        }
        set(&status, |s| s.state = "busy");
        state = match w.work(&stop).await {
            Ok(next) => {
                if failures > 0 {
                    tracing::info!(worker = %name, after_failures = failures, "working again");
                    failures = 0;
                    set(&status, |s| {
                        s.consecutive_errors = 0;
                        s.last_error = None;
                    });
                }
                next
            }
            Err(e) => {
                failures += 1;
                if failures == 1 || failures % 20 == 0 {
                    tracing::warn!(worker = %name, error = %e, failures, "background work failed; backing off");
                }
                set(&status, |s| {
                    s.errors += 1;
                    s.consecutive_errors = failures;
                    s.last_error = Some(e);
                });
                State::Throttled(backoff.delay(failures))
            }
        };
    }
    w.stopped().await;
    set(&status, |s| s.state = "stopped");
}

/// The workers of one or more groups, as a `/health` entry (`workers`) and metrics.
pub struct WorkersReport(pub Vec<Arc<Runner>>);

impl Report for WorkersReport {
    fn key(&self) -> &'static str {
        "workers"
    }

    fn health(&self) -> BoxFuture<'_, Health> {
        Box::pin(async move {
            let mut map = serde_json::Map::new();
            for r in &self.0 {
                for s in r.statuses() {
                    let v = serde_json::to_value(&s).unwrap_or_default();
                    map.insert(s.name.clone(), v);
                }
            }
            // A worker's own failures show in the subsystem it serves (a sink, the
            // executor); this entry only explains them.
            Health::new(Level::Ok, serde_json::Value::Object(map))
        })
    }

    fn metrics(&self, out: &mut Exposition) {
        let rows: Vec<(Vec<String>, f64)> = self
            .0
            .iter()
            .flat_map(|r| r.statuses())
            .map(|s| (vec![s.name], s.errors as f64))
            .collect();
        out.family(
            "crucible_worker_errors_total",
            "counter",
            "Failed steps of background workers (each followed by a back-off).",
            &["worker"],
            &rows,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[test]
    fn backoff_grows_and_is_capped() {
        let b = Backoff::millis(100, 1000);
        for _ in 0..50 {
            let d1 = b.delay(1);
            assert!(d1 >= Duration::from_millis(50) && d1 <= Duration::from_millis(100));
            let d10 = b.delay(10);
            assert!(d10 >= Duration::from_millis(500) && d10 <= Duration::from_millis(1000));
            assert!(b.delay(u64::MAX) <= Duration::from_millis(1000));
        }
    }

    struct Flaky {
        calls: Arc<AtomicU64>,
        fail_first: u64,
    }

    impl Worker for Flaky {
        fn name(&self) -> String {
            "flaky".into()
        }
        fn work<'a>(
            &'a mut self,
            _stop: &'a CancellationToken,
        ) -> BoxFuture<'a, Result<State, String>> {
            Box::pin(async move {
                let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
                if n <= self.fail_first {
                    Err(format!("failure {n}"))
                } else if n < 10 {
                    Ok(State::Busy)
                } else {
                    Ok(State::Done)
                }
            })
        }
        fn wait_for_work(&mut self) -> BoxFuture<'_, ()> {
            Box::pin(std::future::pending())
        }
        fn backoff(&self) -> Backoff {
            Backoff::millis(1, 2)
        }
    }

    #[tokio::test]
    async fn errors_back_off_then_work_resumes_until_done() {
        let calls = Arc::new(AtomicU64::new(0));
        let runner = Runner::new(CancellationToken::new());
        runner.spawn(Flaky {
            calls: calls.clone(),
            fail_first: 3,
        });
        runner.tracker.close();
        runner.tracker.wait().await;
        assert_eq!(calls.load(Ordering::SeqCst), 10);
        let st = &runner.statuses()[0];
        assert_eq!(
            (st.errors, st.consecutive_errors, st.state),
            (3, 0, "stopped")
        );
    }

    #[tokio::test]
    async fn stop_ends_an_idle_worker() {
        struct Sleepy;
        impl Worker for Sleepy {
            fn name(&self) -> String {
                "sleepy".into()
            }
            fn work<'a>(
                &'a mut self,
                _stop: &'a CancellationToken,
            ) -> BoxFuture<'a, Result<State, String>> {
                Box::pin(async { Ok(State::Idle) })
            }
            fn wait_for_work(&mut self) -> BoxFuture<'_, ()> {
                Box::pin(std::future::pending())
            }
        }
        let runner = Runner::new(CancellationToken::new());
        runner.spawn(Sleepy);
        assert!(runner.stop(Duration::from_secs(10)).await);
        assert_eq!(runner.statuses()[0].state, "stopped");
    }
}
