//! Redis: the one place that opens connections to Redis.
//!
//! [`Redis`] is the appliance's connection, shared by the outbox sink
//! ([`crate::sinks::redis`]) and the request/reply transport ([`crate::redis_rr`]);
//! [`builder`] also serves `crucible events tail` ([`crate::client::tail`]). Every client
//! reconnects by itself (exponential policy) and never retries an in-flight command
//! (`max_command_attempts = 1`: a resend could reorder or duplicate; callers retry whole
//! operations instead).

use crate::config::RedisConfig;
use crate::ops::metrics::Exposition;
use crate::ops::metrics::LabeledCounter;
use crate::ops::report::{Health, Level, Probe, Report};
use crate::ops::worker::{State, Worker};
use crate::BoxFuture;
use fred::prelude::{Builder, Client, ClientLike, Config as FredConfig, ReconnectPolicy};
use serde_json::json;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Counters of the request/reply responder.
#[derive(Debug, Default)]
pub struct RedisStats {
    /// Requests by type and outcome (`ok`, `error`).
    pub requests: LabeledCounter,
    /// Messages that were not a request at all (not JSON, or no `reply_to`).
    pub malformed: AtomicU64,
    /// Messages the subscriber buffer dropped because the responder fell behind.
    pub dropped: AtomicU64,
    /// Replies that could not be published.
    pub reply_errors: AtomicU64,
}

/// The Redis connection shared by the sink and the responder.
pub struct Redis {
    pub cfg: RedisConfig,
    pub(crate) client: Client,
    builder: Builder,
    pub stats: RedisStats,
    /// The connection check (PING every second, 1 s timeout).
    pub probe: Probe,
}

/// A client builder with the settings every Redis connection of the appliance shares:
/// one attempt per command (the callers retry whole operations), bounded buffers, a
/// reconnect policy. `fail_fast` makes the first connection attempt an error instead
/// of a retry loop (for the CLI).
pub fn builder(url: &str, cfg: &RedisConfig, fail_fast: bool) -> Result<Builder, String> {
    let mut config =
        FredConfig::from_url(url).map_err(|e| format!("invalid redis.url `{url}`: {e}"))?;
    config.fail_fast = fail_fast;
    let buffer = cfg.subscriber_buffer;
    let mut b = Builder::from_config(config);
    b.with_connection_config(|c| {
        c.max_command_attempts = 1;
        c.max_command_buffer_len = 100_000;
        c.connection_timeout = Duration::from_secs(5);
        c.internal_command_timeout = Duration::from_secs(5);
    })
    .with_performance_config(|c| {
        c.default_command_timeout = Duration::from_secs(10);
        c.broadcast_channel_capacity = buffer;
    })
    .set_policy(ReconnectPolicy::new_exponential(0, 100, 2_000, 2));
    Ok(b)
}

impl Redis {
    /// Build the client and start connecting in the background (Redis may be down; the
    /// client keeps trying).
    pub fn start(cfg: &RedisConfig) -> Result<Arc<Redis>, String> {
        let url = cfg.url.clone().ok_or("redis.url is not set")?;
        let b = builder(&url, cfg, false)?;
        let client = b.build().map_err(|e| format!("redis client: {e}"))?;
        let _connection = client.connect();
        Ok(Arc::new(Redis {
            cfg: cfg.clone(),
            client,
            builder: b,
            stats: RedisStats::default(),
            probe: Probe::default(),
        }))
    }

    /// A subscriber client on the same server (for the request/reply transport).
    pub fn subscriber(&self) -> Result<fred::clients::SubscriberClient, String> {
        self.builder
            .build_subscriber_client()
            .map_err(|e| e.to_string())
    }

    /// Whether the command connection is up.
    pub fn is_connected(&self) -> bool {
        self.client.is_connected()
    }

    /// Close the connections (without waiting long for a Redis that is down).
    pub async fn quit(&self) {
        let _ = tokio::time::timeout(Duration::from_secs(1), self.client.quit()).await;
    }
}

impl Redis {
    /// One check: connected, and a PING answered within 1 s.
    async fn check(&self) -> Result<(), String> {
        if !self.client.is_connected() {
            return Err("not connected".to_string());
        }
        let ping = self.client.ping::<String>(None);
        match tokio::time::timeout(Duration::from_secs(1), ping).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("no answer to PING within 1 s".to_string()),
        }
    }
}

/// PINGs Redis every second over the appliance's connection (1 s timeout), so a dead
/// server shows in `/health` at once, not when a delivery times out.
pub struct RedisProbe(pub Arc<Redis>);

impl Worker for RedisProbe {
    fn name(&self) -> String {
        "probe:redis".into()
    }

    fn work<'a>(
        &'a mut self,
        _stop: &'a CancellationToken,
    ) -> BoxFuture<'a, Result<State, String>> {
        Box::pin(async move {
            let r = &self.0;
            r.probe.record("redis", r.check().await);
            Ok(State::Idle)
        })
    }

    fn wait_for_work(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(tokio::time::sleep(Duration::from_secs(1)))
    }
}

impl Report for Redis {
    fn key(&self) -> &'static str {
        "redis"
    }

    fn health(&self) -> BoxFuture<'_, Health> {
        Box::pin(async move {
            // Down at the last check: look again now, so that a server that is back shows
            // as back (at most 1 s more for this request).
            if self.probe.checked() && !self.probe.is_up() {
                self.probe.record("redis", self.check().await);
            }
            // Down: working partly (events wait in the outbox, requests go unanswered).
            let up = self.is_connected() && (self.probe.is_up() || !self.probe.checked());
            let level = if !up { Level::Degraded } else { Level::Ok };
            Health::new(
                level,
                json!({
                    "connected": self.is_connected() && self.probe.is_up(),
                    "last_check_error": self.probe.last_error(),
                    "stream": self.cfg.stream,
                    "request_channel": self.cfg.request_channel,
                    "requests": self.stats.requests.snapshot().iter().map(|(_, n)| n).sum::<u64>(),
                    "malformed": self.stats.malformed.load(Ordering::Relaxed),
                    "dropped": self.stats.dropped.load(Ordering::Relaxed),
                }),
            )
        })
    }

    fn metrics(&self, e: &mut Exposition) {
        e.flag(
            "crucible_redis_connected",
            "1 while the Redis connection is up (and answered the last PING).",
            self.is_connected() && self.probe.is_up(),
        );
        e.labeled(
            "crucible_redis_requests_total",
            "Request/reply requests by type and outcome.",
            &["type", "outcome"],
            &self.stats.requests,
        );
        e.counter(
            "crucible_redis_requests_malformed_total",
            "Messages on the request channel that were not requests (no JSON or no reply_to).",
            self.stats.malformed.load(Ordering::Relaxed),
        );
        e.counter(
            "crucible_redis_requests_dropped_total",
            "Requests dropped by the subscriber buffer because the responder fell behind.",
            self.stats.dropped.load(Ordering::Relaxed),
        );
        e.counter(
            "crucible_redis_reply_errors_total",
            "Replies that could not be published.",
            self.stats.reply_errors.load(Ordering::Relaxed),
        );
    }
}
