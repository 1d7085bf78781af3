//! The queue service and its worker pool.
//!
//! The queue itself is durable: it is the `queued` part of the store's status index, in FIFO order of
//! acceptance, and it survives restarts. This module dispatches from it: a dispatcher
//! waits for a free worker slot (the concurrency cap), claims the oldest queued
//! evaluation, and a worker moves it to `running` (durably, before any code runs), runs
//! it on the executor, and records the terminal state.
//!
//! Crash policy: an evaluation that was `running` when the process died is NOT re-run
//! (its code may have had effects, and re-running hostile code on every restart would
//! turn a crash into a loop); it ends `failed` with `failure_reason = "interrupted"` at
//! the next start. At a graceful shutdown running work gets `shutdown_grace_secs` to
//! finish, then it is killed and recorded the same way.
//!
//! This module never writes the store except through the store's operations.

use crate::config::Config;
use crate::executor::Executor;
use crate::judge::Judge;
use crate::model::Status;
use crate::ops::metrics::{Exposition, Histogram, LabeledCounter};
use crate::ops::report::{Health, Level, Report};
use crate::ops::worker::{Backoff, Runner, State, Worker};
use crate::store::{Store, StoreError};
use crate::BoxFuture;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Queue and worker counters.
#[derive(Debug)]
pub struct QueueStats {
    /// Terminal states recorded by workers, by status and failure reason.
    pub finished: LabeledCounter,
    /// Wall-clock time of executions.
    pub run_seconds: Histogram,
}

impl Default for QueueStats {
    fn default() -> Self {
        QueueStats {
            finished: LabeledCounter::default(),
            run_seconds: Histogram::new(&[
                0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
            ]),
        }
    }
}

/// The dispatcher and worker pool.
pub struct Queue {
    store: Arc<Store>,
    executor: Arc<dyn Executor>,
    judge: Arc<Judge>,
    workers: usize,
    max_queued: usize,
    paused: AtomicBool,
    wake: Notify,
    /// Evaluations claimed by a worker but maybe not yet `running` in the store.
    claimed: Mutex<HashSet<String>>,
    /// Kill switches of evaluations being executed.
    running: Mutex<HashMap<String, CancellationToken>>,
    /// The evaluations being worked on (each its own task).
    tracker: TaskTracker,
    /// The dispatcher's runner; stopping it stops starting new work.
    dispatch: Arc<Runner>,
    /// Fired when shutdown can wait no longer for results that cannot be written (a full
    /// or failing disk): they stay `running` on disk and become `interrupted` at the next
    /// start.
    give_up: CancellationToken,
    pub stats: QueueStats,
}

impl Queue {
    /// A queue over `store` running at most `cfg.workers` evaluations at once.
    pub fn new(
        store: Arc<Store>,
        executor: Arc<dyn Executor>,
        judge: Arc<Judge>,
        cfg: Arc<Config>,
    ) -> Arc<Queue> {
        Arc::new(Queue {
            store,
            executor,
            judge,
            workers: cfg.workers,
            max_queued: cfg.max_queued,
            paused: AtomicBool::new(cfg.start_paused),
            wake: Notify::new(),
            claimed: Mutex::new(HashSet::new()),
            running: Mutex::new(HashMap::new()),
            tracker: TaskTracker::new(),
            dispatch: Runner::new(CancellationToken::new()),
            give_up: CancellationToken::new(),
            stats: QueueStats::default(),
        })
    }

    /// Concurrency cap.
    pub fn workers(&self) -> usize {
        self.workers
    }

    /// Whether dispatching is paused.
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    /// Stop starting new evaluations (running ones continue).
    pub fn pause(&self) {
        self.paused.store(true, Ordering::SeqCst);
        tracing::info!("queue paused");
    }

    /// Start dispatching again.
    pub fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
        self.wake.notify_one();
        tracing::info!("queue resumed");
    }

    /// Kill the process tree of a running evaluation. Returns whether one was running.
    pub fn kill(&self, eval_id: &str) -> bool {
        let token = self
            .running
            .lock()
            .ok()
            .and_then(|m| m.get(eval_id).cloned());
        match token {
            Some(t) => {
                t.cancel();
                true
            }
            None => false,
        }
    }

    /// Evaluations being executed right now by this process.
    pub fn executing(&self) -> usize {
        self.running.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// Start the dispatcher.
    pub fn start(self: &Arc<Self>) {
        self.dispatch.spawn(Dispatcher {
            queue: self.clone(),
            slots: Arc::new(Semaphore::new(self.workers)),
            head: self.store.subscribe_head(),
        });
    }

    /// The dispatcher's runner (for /health).
    pub fn runner(&self) -> Arc<Runner> {
        self.dispatch.clone()
    }

    /// Graceful stop: no new starts; running work gets `grace` to finish, then it is
    /// killed and recorded as `failed`/`interrupted`. Returns once every worker is done.
    pub async fn shutdown(&self, grace: Duration) {
        self.dispatch.stop(Duration::from_secs(5)).await;
        self.tracker.close();
        let n = self.executing();
        if n > 0 {
            tracing::info!(
                running = n,
                grace_secs = grace.as_secs(),
                "waiting for running evaluations"
            );
        }
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_err()
        {
            let tokens: Vec<CancellationToken> = self
                .running
                .lock()
                .map(|m| m.values().cloned().collect())
                .unwrap_or_default();
            tracing::warn!(
                killed = tokens.len(),
                "shutdown grace over: killing running evaluations"
            );
            for t in tokens {
                t.cancel();
            }
        }
        // Killed runs end at once; what is left is recording results. A disk that takes
        // no write must not hold the shutdown: give up after a few seconds.
        if tokio::time::timeout(Duration::from_secs(3), self.tracker.wait())
            .await
            .is_err()
        {
            self.give_up.cancel();
            if tokio::time::timeout(Duration::from_secs(2), self.tracker.wait())
                .await
                .is_err()
            {
                tracing::warn!("evaluations still recording results at shutdown; leaving them");
            }
        }
    }

    /// An evaluation that could not be started stays queued. Cancelled or removed
    /// meanwhile is not an error; a store fault is logged and slows the next attempt.
    async fn start_failed(&self, id: &str, e: StoreError) {
        if !matches!(e, StoreError::WrongState(..) | StoreError::NotFound) {
            tracing::error!(eval_id = %id, error = %e, "cannot start evaluation");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn work(&self, id: String) {
        let token = CancellationToken::new();
        if let Ok(mut m) = self.running.lock() {
            m.insert(id.clone(), token.clone());
        }
        let forget = || {
            if let Ok(mut m) = self.running.lock() {
                m.remove(&id);
            }
            if let Ok(mut c) = self.claimed.lock() {
                c.remove(&id);
            }
        };
        // The run begins while its `running` write is being flushed (one flush less on
        // every evaluation's path): the write is handed to the store's writer first, so
        // the run's own writes (progress, result) are applied after it. Should it fail
        // (cancelled meanwhile, a store error) the run is killed and its result dropped;
        // the program itself can reach nothing outside the sandbox. After a crash before
        // it was durable the evaluation is still queued and runs again.
        let rec = match self.store.get_applied(&id) {
            Ok(Some(r)) if r.status == Status::Queued => r,
            Ok(_) => return forget(), // cancelled or removed meanwhile
            Err(e) => {
                forget();
                return self.start_failed(&id, e).await;
            }
        };
        let durable = match self.store.begin_start(&id).await {
            Ok(d) => d,
            Err(e) => {
                forget();
                return self.start_failed(&id, e).await;
            }
        };
        let started = async {
            let r = durable.await;
            if let Ok(mut c) = self.claimed.lock() {
                c.remove(&id);
            }
            match &r {
                Ok(rec) => tracing::info!(
                    eval_id = %id,
                    language = %rec.language,
                    status = "running",
                    event_type = "evaluation:started",
                    "evaluation started"
                ),
                Err(_) => token.cancel(),
            }
            r
        };
        let run_started = std::time::Instant::now();
        let (started, fin) = tokio::join!(
            started,
            self.judge.evaluate(&rec, &self.store, token.clone())
        );
        if let Ok(mut m) = self.running.lock() {
            m.remove(&id);
        }
        if let Err(e) = started {
            return self.start_failed(&id, e).await;
        }
        self.stats
            .run_seconds
            .observe(run_started.elapsed().as_secs_f64());
        let (status, reason) = (fin.status, fin.failure_reason);
        // A finish that cannot be written now is retried: the evaluation must not stay
        // `running` while the process lives. A user cancel already wrote `cancelled`.
        let backoff = Backoff::millis(100, 5_000);
        let mut failures = 0;
        loop {
            match self.store.finish(&id, fin.clone()).await {
                Ok(r) => {
                    let reason_s = reason.map(|r| r.as_str()).unwrap_or("");
                    self.stats.finished.add(&[status.as_str(), reason_s], 1);
                    tracing::info!(
                        eval_id = %id,
                        status = status.as_str(),
                        event_type = crate::events::EventType::for_status(status).as_str(),
                        failure_reason = reason_s,
                        exit_code = r.exit_code,
                        runtime_ms = r.runtime_ms,
                        cpu_ms = r.cpu_ms,
                        memory_peak_kb = r.memory_peak_kb,
                        "evaluation finished"
                    );
                    break;
                }
                Err(StoreError::AlreadyTerminal(s)) => {
                    tracing::info!(eval_id = %id, status = s, "evaluation ended elsewhere (cancelled)");
                    break;
                }
                Err(StoreError::Closed)
                | Err(StoreError::NotFound)
                | Err(StoreError::WrongState(..)) => break,
                Err(e) => {
                    if self.give_up.is_cancelled() {
                        tracing::error!(eval_id = %id, error = %e, "cannot record the result before shutdown; it will be recorded interrupted at the next start");
                        break;
                    }
                    tracing::error!(eval_id = %id, error = %e, "cannot record the result; retrying");
                    failures += 1;
                    tokio::select! {
                        _ = tokio::time::sleep(backoff.delay(failures)) => {}
                        _ = self.give_up.cancelled() => {}
                    }
                }
            }
        }
        self.wake.notify_one();
    }
}

/// Starts queued evaluations while a worker slot is free (the concurrency cap).
struct Dispatcher {
    queue: Arc<Queue>,
    slots: Arc<Semaphore>,
    head: tokio::sync::watch::Receiver<u64>,
}

impl Dispatcher {
    async fn step(&mut self, stop: &CancellationToken) -> Result<State, String> {
        let q = &self.queue;
        if q.is_paused() {
            return Ok(State::Idle);
        }
        let permit = tokio::select! {
            p = self.slots.clone().acquire_owned() => p.map_err(|e| e.to_string())?,
            _ = stop.cancelled() => return Ok(State::Done),
        };
        if q.store.queue_depth() > 0 && (q.store.low_on_space() || !q.store.is_healthy()) {
            // A run needs room for its result: nothing new starts until space is back
            // (DiskWatch measures it every second) and the store writes again.
            return Ok(State::Throttled(Duration::from_secs(1)));
        }
        if q.store.queue_depth() > 0 {
            if let Err(e) = q.executor.ready().await {
                // Nothing starts while the executor cannot run it: the work stays queued
                // (the executor logs the outage once).
                tracing::debug!(error = %e, "executor not ready; work stays queued");
                return Ok(State::Throttled(Duration::from_secs(1)));
            }
        }
        let claimed = q.claimed.lock().map(|c| c.clone()).unwrap_or_default();
        let ids = q
            .store
            .next_queued(&claimed, 1)
            .map_err(|e| format!("cannot read the queue: {e}"))?;
        let Some(id) = ids.into_iter().next() else {
            return Ok(State::Idle);
        };
        if let Ok(mut c) = q.claimed.lock() {
            c.insert(id.clone());
        }
        let worker = q.clone();
        q.tracker.spawn(async move {
            worker.work(id).await;
            drop(permit);
        });
        Ok(State::Busy)
    }
}

impl Worker for Dispatcher {
    fn name(&self) -> String {
        "queue".into()
    }

    fn work<'a>(&'a mut self, stop: &'a CancellationToken) -> BoxFuture<'a, Result<State, String>> {
        Box::pin(self.step(stop))
    }

    fn wait_for_work(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            tokio::select! {
                _ = self.head.changed() => {}
                _ = self.queue.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        })
    }
}

impl Report for Queue {
    fn key(&self) -> &'static str {
        "queue"
    }

    fn health(&self) -> BoxFuture<'_, Health> {
        Box::pin(async move {
            Health::new(
                Level::Ok,
                serde_json::json!({
                    "depth": self.store.queue_depth(),
                    "max_queued": self.max_queued,
                    "running": self.store.running_count(),
                    "workers": self.workers,
                    "paused": self.is_paused(),
                }),
            )
        })
    }

    fn metrics(&self, e: &mut Exposition) {
        e.labeled(
            "crucible_evaluations_finished_total",
            "Evaluations that reached a terminal state through a worker.",
            &["status", "failure_reason"],
            &self.stats.finished,
        );
        e.histogram(
            "crucible_execution_seconds",
            "Wall-clock time of executions.",
            &self.stats.run_seconds,
        );
        e.gauge(
            "crucible_queue_depth",
            "Evaluations waiting to run.",
            self.store.queue_depth() as f64,
        );
        e.gauge(
            "crucible_queue_capacity",
            "max_queued.",
            self.max_queued as f64,
        );
        e.gauge(
            "crucible_running",
            "Evaluations running.",
            self.store.running_count() as f64,
        );
        e.gauge("crucible_workers", "Concurrency cap.", self.workers as f64);
        e.flag(
            "crucible_queue_paused",
            "1 when dispatching is paused.",
            self.is_paused(),
        );
    }
}
