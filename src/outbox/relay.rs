//! One relay: a [`Worker`] that moves one sink's cursor through the event log.
//!
//! Each step reads the events after the cursor (only up to the durable head), delivers
//! them, and only then saves the new cursor (with the sink's confirmations, atomically),
//! so a crash in between redelivers the same events with the same `event_id`s. An outage
//! is an error of the step: the runner backs off. A batch that fails without saying why is
//! narrowed down one event at a time; an event the sink keeps refusing on its own is
//! poison and, after `max_attempts`, moves to the dead letters while the cursor passes it.
//! Replays are applied between steps, through the store writer.

use super::{ReplayRequest, Sink, SinkError, SinkStatus};
use crate::config::OutboxConfig;
use crate::events::{Confirmation, Event};
use crate::ops::worker::{Backoff, State, Worker};
use crate::store::{Store, StoreError};
use crate::BoxFuture;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

pub(super) struct Relay {
    pub(super) store: Arc<Store>,
    pub(super) sink: Arc<dyn Sink>,
    pub(super) status: Arc<SinkStatus>,
    pub(super) cfg: OutboxConfig,
    pub(super) control: mpsc::Receiver<ReplayRequest>,
    pub(super) head: watch::Receiver<u64>,
    /// The last seq delivered; read from the store at the first step.
    pub(super) cursor: Option<u64>,
    /// Replay requests received while waiting, applied at the next step.
    pub(super) replays: Vec<ReplayRequest>,
    /// Narrowing a failed batch down: deliver one event at a time.
    pub(super) single: bool,
    /// The seq that keeps failing on its own and how often it failed.
    pub(super) poison: Option<(u64, u32)>,
}

impl Relay {
    fn name(&self) -> &str {
        &self.status.name
    }

    fn initial_cursor(&self) -> Result<u64, StoreError> {
        match self.store.cursor(self.name())? {
            Some(c) => Ok(c),
            // A new sink starts at the oldest retained event.
            None => Ok(self.store.oldest_seq()?.saturating_sub(1)),
        }
    }

    fn set_cursor(&mut self, c: u64) {
        self.cursor = Some(c);
        self.status.cursor.store(c, Ordering::SeqCst);
    }

    fn note_failure(&self, err: &SinkError) {
        self.status.retries.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut l) = self.status.last_error.lock() {
            *l = Some(err.to_string());
        }
        self.status
            .consecutive_failures
            .fetch_add(1, Ordering::SeqCst);
    }

    async fn handle_replay(&mut self, req: ReplayRequest) {
        let res = self.store.replay(self.name(), req.from_seq).await;
        crate::ops::failpoint::hit("outbox.replay");
        if let Ok(c) = res {
            self.set_cursor(c);
            tracing::info!(
                sink = self.name(),
                from_seq = req.from_seq,
                "replay: cursor moved back"
            );
        }
        let _ = req.reply.send(res);
    }

    /// Save the cursor with the sink's confirmations. They must not be lost: retry until
    /// they are on disk (the store only fails when the disk does), unless stopping: then
    /// the batch is redelivered and confirmed after the restart.
    async fn save_cursor_with(
        &mut self,
        seq: u64,
        confirmations: Vec<Confirmation>,
        stop: &CancellationToken,
    ) {
        if confirmations.is_empty() {
            return self.save_cursor(seq).await;
        }
        let backoff = Backoff::millis(50, 5_000);
        let mut failures = 0;
        while let Err(e) = self
            .store
            .confirm(self.name(), seq, confirmations.clone())
            .await
        {
            if matches!(e, StoreError::Closed) || stop.is_cancelled() {
                return;
            }
            failures += 1;
            tracing::warn!(sink = self.name(), error = %e, "cannot record confirmations; retrying");
            tokio::select! {
                _ = tokio::time::sleep(backoff.delay(failures)) => {}
                _ = stop.cancelled() => return,
            }
        }
        self.set_cursor(seq);
    }

    async fn save_cursor(&mut self, seq: u64) {
        if let Err(e) = self.store.set_cursor(self.name(), seq).await {
            // Not fatal: the cursor is saved with the next batch; at worst a restart
            // redelivers (at-least-once).
            tracing::warn!(sink = self.name(), error = %e, "cannot save cursor");
        }
        self.set_cursor(seq);
    }

    fn delivered(&mut self, n: usize) {
        self.status.delivered.fetch_add(n as u64, Ordering::Relaxed);
        if self.status.consecutive_failures.swap(0, Ordering::SeqCst) > 0 {
            tracing::info!(sink = self.name(), "sink delivering again");
            if let Ok(mut l) = self.status.last_error.lock() {
                *l = None;
            }
        }
    }

    /// One round: apply replays, read the next batch, deliver it.
    async fn step(&mut self, stop: &CancellationToken) -> Result<State, String> {
        let mut cursor = match self.cursor {
            Some(c) => c,
            None => {
                let c = self
                    .initial_cursor()
                    .map_err(|e| format!("cannot read the cursor: {e}"))?;
                self.set_cursor(c);
                tracing::info!(sink = self.name(), cursor = c, "relay started");
                c
            }
        };
        while let Ok(req) = self.control.try_recv() {
            self.replays.push(req);
        }
        for req in std::mem::take(&mut self.replays) {
            self.handle_replay(req).await;
            cursor = self.cursor.unwrap_or(cursor);
        }
        let head = self.store.head();
        if cursor >= head {
            return Ok(State::Idle);
        }
        let max = if self.single { 1 } else { self.cfg.batch_size };
        let events = self
            .store
            .events(cursor, head, max)
            .map_err(|e| format!("cannot read the event log: {e}"))?;
        if events.is_empty() {
            // Nothing retained after the cursor (pruned while this sink was not
            // configured): jump to the oldest retained event.
            return match self.store.oldest_seq() {
                Ok(o) if o > cursor + 1 => {
                    self.save_cursor(o - 1).await;
                    Ok(State::Busy)
                }
                _ => Ok(State::Idle),
            };
        }
        match self.sink.deliver(&events).await {
            Ok(()) => {
                crate::ops::failpoint::hit("relay.after_deliver");
                let last = events[events.len() - 1].seq;
                let confirmations = self.sink.confirmations(&events);
                self.save_cursor_with(last, confirmations, stop).await;
                self.delivered(events.len());
                self.single = false;
                self.poison = None;
                Ok(State::Busy)
            }
            Err(err @ SinkError::Unavailable(_)) => {
                self.note_failure(&err);
                Err(format!("sink {}: {err}", self.name()))
            }
            Err(err @ SinkError::Failed(_)) if events.len() > 1 => {
                self.note_failure(&err);
                tracing::warn!(sink = self.name(), error = %err, "batch failed; retrying one event at a time");
                self.single = true;
                Ok(State::Busy)
            }
            Err(err) => self.refused(&events, err).await,
        }
    }

    /// The sink refused an event (or a single-event batch failed): deliver what came
    /// before it, count the attempt, and park it once it is poison.
    async fn refused(&mut self, events: &[Event], err: SinkError) -> Result<State, String> {
        let (index, message) = match &err {
            SinkError::Rejected { index, message } => (*index, message.clone()),
            SinkError::Failed(m) | SinkError::Unavailable(m) => (0, m.clone()),
        };
        let index = index.min(events.len() - 1);
        if index > 0 {
            self.save_cursor(events[index - 1].seq).await;
            self.status
                .delivered
                .fetch_add(index as u64, Ordering::Relaxed);
        }
        let bad = &events[index];
        let attempts = match self.poison {
            Some((seq, n)) if seq == bad.seq => n + 1,
            _ => 1,
        };
        self.poison = Some((bad.seq, attempts));
        self.note_failure(&err);
        if attempts < self.cfg.max_attempts {
            self.single = true;
            return Err(format!(
                "sink {} refused seq {} (attempt {attempts}): {message}",
                self.name(),
                bad.seq
            ));
        }
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
        self.store
            .dead_letter(self.name(), bad.clone(), message, attempts)
            .await
            .map_err(|e| format!("cannot park dead letter: {e}"))?;
        let cursor = self.cursor.unwrap_or(0).max(bad.seq);
        self.set_cursor(cursor);
        self.status.dead_letters.fetch_add(1, Ordering::Relaxed);
        self.status.consecutive_failures.store(0, Ordering::SeqCst);
        self.poison = None;
        self.single = false;
        Ok(State::Busy)
    }

    /// Wait for a replay request and keep it for the next step (cancel-safe).
    async fn next_replay(&mut self) {
        match self.control.recv().await {
            Some(r) => self.replays.push(r),
            None => std::future::pending().await,
        }
    }
}

impl Worker for Relay {
    fn name(&self) -> String {
        format!("relay:{}", self.status.name)
    }

    fn work<'a>(&'a mut self, stop: &'a CancellationToken) -> BoxFuture<'a, Result<State, String>> {
        Box::pin(self.step(stop))
    }

    fn wait_for_work(&mut self) -> BoxFuture<'_, ()> {
        let poll = Duration::from_millis(self.cfg.poll_interval_ms);
        Box::pin(async move {
            let replay = tokio::select! {
                r = self.head.changed() => {
                    if r.is_err() {
                        // The store is closing: only the poll timer is left.
                        tokio::time::sleep(poll).await;
                    }
                    None
                }
                _ = tokio::time::sleep(poll) => None,
                r = self.control.recv() => r,
            };
            self.replays.extend(replay);
        })
    }

    fn interrupt(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(self.next_replay())
    }

    fn backoff(&self) -> Backoff {
        Backoff::millis(self.cfg.backoff_initial_ms, self.cfg.backoff_max_ms)
    }

    fn stopped(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            tracing::info!(sink = self.name(), cursor = self.cursor, "relay stopped");
        })
    }
}
