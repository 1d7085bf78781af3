//! Redis: the one place that talks to Redis.
//!
//! - [`RedisSink`], an outbox sink: for every event, PUBLISH its JSON on the seed channel
//!   named by its type, and XADD it to a capped stream (`crucible:events`) with its
//!   `event_id`, so consumers that must not miss an event read the stream through a
//!   consumer group. A batch goes out as one pipeline; the relay moves the cursor only
//!   after Redis answered every command. Redis errors are outages (retried with backoff),
//!   never poison: no single event makes PUBLISH or XADD fail.
//! - [`serve_requests`], the request/reply responder of seed 004 on `crucible.request`.
//! - [`tail`], the consumer behind `crucible events tail`.
//!
//! The client reconnects by itself (exponential policy) and never retries an in-flight
//! command (`max_command_attempts = 1`: a resend could reorder or duplicate; the relay
//! retries whole batches instead). The API never waits for Redis.

use crate::config::RedisConfig;
use crate::error::ApiError;
use crate::events::Event;
use crate::ops::metrics::LabeledCounter;
use crate::outbox::{Sink, SinkError};
use crate::service::{check_idempotency_key, ListQuery, Service};
use crate::BoxFuture;
use fred::prelude::{
    Builder, Client, ClientLike, Config as FredConfig, Error as FredError, EventInterface,
    PubsubInterface, ReconnectPolicy, StreamsInterface, Value as FredValue,
};
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet, VecDeque};
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
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
    client: Client,
    builder: Builder,
    pub stats: RedisStats,
}

fn builder(url: &str, cfg: &RedisConfig, fail_fast: bool) -> Result<Builder, String> {
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
        }))
    }

    /// Whether the command connection is up.
    pub fn is_connected(&self) -> bool {
        self.client.is_connected()
    }

    /// Close the connections (without waiting long for a Redis that is down).
    pub async fn quit(&self) {
        let _ = tokio::time::timeout(Duration::from_secs(1), self.client.quit()).await;
    }

    /// State for /health.
    pub fn health(&self) -> Value {
        json!({
            "connected": self.is_connected(),
            "stream": self.cfg.stream,
            "request_channel": self.cfg.request_channel,
            "requests": self.stats.requests.snapshot().iter().map(|(_, n)| n).sum::<u64>(),
            "malformed": self.stats.malformed.load(Ordering::Relaxed),
            "dropped": self.stats.dropped.load(Ordering::Relaxed),
        })
    }
}

/// The outbox sink (`redis`).
pub struct RedisSink {
    redis: Arc<Redis>,
}

impl RedisSink {
    pub fn new(redis: Arc<Redis>) -> RedisSink {
        RedisSink { redis }
    }
}

fn unavailable(e: FredError) -> SinkError {
    SinkError::Unavailable(format!("redis: {e}"))
}

impl Sink for RedisSink {
    fn name(&self) -> &str {
        "redis"
    }

    fn deliver<'a>(&'a self, events: &'a [Event]) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            let r = &self.redis;
            if !r.client.is_connected() {
                // Wait briefly for the next connection attempt rather than failing at
                // once: at start-up and after an outage delivery resumes the moment the
                // connection is back instead of after the next backoff sleep.
                let attempt =
                    tokio::time::timeout(Duration::from_secs(1), r.client.wait_for_connect()).await;
                if !matches!(attempt, Ok(Ok(()))) || !r.client.is_connected() {
                    return Err(SinkError::Unavailable("redis: not connected".into()));
                }
            }
            let cap = ("MAXLEN", "~", r.cfg.stream_maxlen as i64);
            let p = r.client.pipeline();
            for e in events {
                // One shared buffer for the PUBLISH payload and the stream field.
                let body = FredValue::String(e.to_json().into_owned().into());
                if r.cfg.publish {
                    let _: () = p
                        .publish(e.kind.as_str(), body.clone())
                        .await
                        .map_err(unavailable)?;
                }
                let fields: Vec<(&str, FredValue)> = vec![
                    ("event_id", e.event_id.as_str().into()),
                    ("seq", (e.seq as i64).into()),
                    ("type", e.kind.as_str().into()),
                    ("eval_id", e.eval_id.as_str().into()),
                    ("event", body),
                ];
                let _: () = p
                    .xadd(r.cfg.stream.as_str(), false, cap, "*", fields)
                    .await
                    .map_err(unavailable)?;
            }
            for res in p.try_all::<FredValue>().await {
                res.map_err(unavailable)?;
            }
            Ok(())
        })
    }
}

// ---- request/reply -------------------------------------------------------------------

/// Serve requests on `cfg.request_channel` until `shutdown`: each request is handled by
/// the same [`Service`] as HTTP, and the reply is published on its `reply_to`.
pub async fn serve_requests(redis: Arc<Redis>, service: Arc<Service>, shutdown: CancellationToken) {
    let channel = redis.cfg.request_channel.clone();
    let sub = match redis.builder.build_subscriber_client() {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "redis subscriber cannot be built; request/reply is off");
            return;
        }
    };
    let _conn = sub.connect();
    // Re-subscribe after every reconnect.
    let _resub = sub.manage_subscriptions();
    let mut rx = sub.message_rx();
    let mut delay = Duration::from_millis(100);
    loop {
        match sub.subscribe(channel.as_str()).await {
            Ok(()) => break,
            Err(e) => {
                tracing::warn!(error = %e, channel = %channel, "cannot subscribe yet; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => return,
                }
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    }
    tracing::info!(channel = %channel, "redis request/reply responder listening");
    let slots = Arc::new(Semaphore::new(redis.cfg.max_inflight_requests));
    loop {
        let msg = tokio::select! {
            m = rx.recv() => m,
            _ = shutdown.cancelled() => break,
        };
        match msg {
            Ok(m) => {
                let Some(text) = m.value.as_string() else {
                    redis.stats.malformed.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                let permit = tokio::select! {
                    p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
                    _ = shutdown.cancelled() => break,
                };
                let (r, s) = (redis.clone(), service.clone());
                tokio::spawn(async move {
                    handle_request(&r, &s, &text).await;
                    drop(permit);
                });
            }
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                redis.stats.dropped.fetch_add(n, Ordering::Relaxed);
                tracing::warn!(
                    dropped = n,
                    "request/reply responder fell behind; requests dropped"
                );
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
        }
    }
    // Redis may be down at shutdown: never wait for it long.
    let bye = async {
        let _ = sub.unsubscribe(channel.as_str()).await;
        let _ = sub.quit().await;
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), bye).await;
}

fn field_err(field: &str, message: &str) -> ApiError {
    ApiError::invalid_field(field, message)
}

/// A payload value as text for [`ListQuery::parse`] (numbers are accepted too).
fn text(v: Option<&Value>) -> Option<String> {
    match v {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => Some(other.to_string()),
    }
}

async fn dispatch(service: &Service, kind: &str, payload: &Value) -> Result<Value, ApiError> {
    match kind {
        "get_evaluation" => {
            let id = payload
                .get("eval_id")
                .and_then(|v| v.as_str())
                .ok_or_else(|| field_err("payload.eval_id", "`eval_id` (a string) is required"))?;
            Ok(serde_json::to_value(service.get(id).await?).unwrap_or(Value::Null))
        }
        "list_evaluations" => {
            let (s, l, c) = (
                text(payload.get("status")),
                text(payload.get("limit")),
                text(payload.get("cursor")),
            );
            let q = ListQuery::parse(s.as_deref(), l.as_deref(), c.as_deref())?;
            Ok(serde_json::to_value(service.list(&q).await?).unwrap_or(Value::Null))
        }
        "submit_evaluation" => {
            let key = match payload.get("idempotency_key") {
                None | Some(Value::Null) => None,
                Some(Value::String(k)) => Some(check_idempotency_key(k, "idempotency_key")?),
                Some(_) => return Err(field_err("idempotency_key", "must be a string")),
            };
            let s = service.submit(payload, key).await?;
            Ok(json!({"eval_id": s.eval_id, "status": s.status}))
        }
        other => Err(field_err(
            "request_type",
            &format!(
                "unknown request_type `{}`; expected get_evaluation, list_evaluations or submit_evaluation",
                other.chars().take(64).collect::<String>()
            ),
        )),
    }
}

async fn handle_request(redis: &Redis, service: &Service, text: &str) {
    let Ok(req) = serde_json::from_str::<Value>(text) else {
        redis.stats.malformed.fetch_add(1, Ordering::Relaxed);
        tracing::warn!("redis request is not JSON; no reply_to to answer");
        return;
    };
    let reply_to = req
        .get("reply_to")
        .and_then(|v| v.as_str())
        .filter(|s| !s.is_empty() && s.len() <= 512)
        .map(|s| s.to_string());
    let Some(reply_to) = reply_to else {
        redis.stats.malformed.fetch_add(1, Ordering::Relaxed);
        tracing::warn!("redis request without a usable reply_to; dropped");
        return;
    };
    let correlation_id = req.get("correlation_id").cloned().unwrap_or(Value::Null);
    let kind = req
        .get("request_type")
        .and_then(|v| v.as_str())
        .unwrap_or("")
        .to_string();
    let empty = json!({});
    let payload = req.get("payload").unwrap_or(&empty);
    let result = if correlation_id.is_null() {
        Err(field_err("correlation_id", "`correlation_id` is required"))
    } else if kind.is_empty() {
        Err(field_err(
            "request_type",
            "`request_type` (a string) is required",
        ))
    } else if !payload.is_object() {
        Err(field_err("payload", "`payload` must be an object"))
    } else {
        dispatch(service, &kind, payload).await
    };
    let mut reply = json!({
        "correlation_id": correlation_id,
        "source": format!("crucible:{}", service.store.node_id()),
        "timestamp": crate::model::now(),
    });
    let known = matches!(
        kind.as_str(),
        "get_evaluation" | "list_evaluations" | "submit_evaluation"
    );
    let label = if known { kind.as_str() } else { "invalid" };
    match result {
        Ok(p) => {
            reply["payload"] = p;
            redis.stats.requests.add(&[label, "ok"], 1);
        }
        Err(e) => {
            reply["error"] = json!(e.message);
            reply["error_code"] = json!(e.code.as_str());
            if let Some(f) = e.field {
                reply["field"] = json!(f);
            }
            redis.stats.requests.add(&[label, "error"], 1);
        }
    }
    let body = reply.to_string();
    let sent: Result<(), FredError> = redis.client.publish(reply_to.as_str(), body).await;
    if let Err(e) = sent {
        redis.stats.reply_errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(error = %e, reply_to = %reply_to, "cannot publish reply");
    }
}

// ---- events tail ---------------------------------------------------------------------

/// Options of `crucible events tail`.
#[derive(Debug, Clone)]
pub struct TailOptions {
    pub url: String,
    pub stream: String,
    pub group: String,
    pub consumer: String,
    /// Stop after this many (distinct) events.
    pub count: Option<u64>,
    /// Claim entries other consumers left pending for longer than this.
    pub claim_idle_ms: u64,
}

/// Bounded memory of recently seen event ids (consumers dedupe on `event_id`).
struct Seen {
    set: HashSet<String>,
    order: VecDeque<String>,
    cap: usize,
}

impl Seen {
    fn insert(&mut self, id: &str) -> bool {
        if self.set.contains(id) {
            return false;
        }
        self.set.insert(id.to_string());
        self.order.push_back(id.to_string());
        if self.order.len() > self.cap {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        true
    }
}

type Entries = Vec<(String, HashMap<String, String>)>;

/// Entries of an XREADGROUP answer: `[[stream, [[id, [k, v, ...]], ...]], ...]`.
fn entries_of(v: FredValue) -> Entries {
    let mut out = Vec::new();
    for stream in v.into_array() {
        let mut parts = stream.into_array();
        if parts.len() < 2 {
            continue;
        }
        for entry in parts.swap_remove(1).into_array() {
            let mut e = entry.into_array();
            if e.len() < 2 {
                continue;
            }
            let kv = e.swap_remove(1).into_array();
            let id = e.swap_remove(0).as_string().unwrap_or_default();
            let mut fields = HashMap::new();
            let mut it = kv.into_iter();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                fields.insert(
                    k.as_string().unwrap_or_default(),
                    v.as_string().unwrap_or_default(),
                );
            }
            out.push((id, fields));
        }
    }
    out
}

/// Read the stream through a consumer group, print each event (one JSON line) and
/// acknowledge it. Entries this consumer received but never acknowledged (a crash) are
/// handled first; entries other consumers left pending for `claim_idle_ms` are claimed.
/// Duplicates (same `event_id`) are acknowledged but printed once.
pub async fn tail(
    opts: TailOptions,
    out: &mut (dyn Write + Send),
    shutdown: CancellationToken,
) -> Result<u64, String> {
    let cfg = RedisConfig {
        url: Some(opts.url.clone()),
        ..RedisConfig::default()
    };
    let client = builder(&opts.url, &cfg, true)?
        .build()
        .map_err(|e| e.to_string())?;
    client
        .init()
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", opts.url))?;
    let created: Result<(), FredError> = client
        .xgroup_create(opts.stream.as_str(), opts.group.as_str(), "0", true)
        .await;
    if let Err(e) = created {
        if !e.to_string().contains("BUSYGROUP") {
            return Err(format!("cannot create group {}: {e}", opts.group));
        }
    }
    let mut seen = Seen {
        set: HashSet::new(),
        order: VecDeque::new(),
        cap: 100_000,
    };
    let mut printed = 0u64;
    let done = |n: u64| opts.count.is_some_and(|c| n >= c);

    // 1. Our own pending entries (delivered before a crash, never acknowledged).
    // 2. Entries other consumers left pending too long.
    // 3. New entries.
    let mut phase = 0;
    let mut autoclaim_from = "0-0".to_string();
    while !done(printed) && !shutdown.is_cancelled() {
        let batch: Result<FredValue, FredError> = match phase {
            0 => {
                client
                    .xreadgroup(
                        opts.group.as_str(),
                        opts.consumer.as_str(),
                        Some(100),
                        None,
                        false,
                        opts.stream.as_str(),
                        "0",
                    )
                    .await
            }
            1 => {
                let r: Result<FredValue, FredError> = client
                    .xautoclaim(
                        opts.stream.as_str(),
                        opts.group.as_str(),
                        opts.consumer.as_str(),
                        opts.claim_idle_ms,
                        autoclaim_from.as_str(),
                        Some(100),
                        false,
                    )
                    .await;
                r.map(|v| {
                    // Reshape [next, entries, deleted] like an XREADGROUP answer.
                    let mut parts = v.into_array();
                    if !parts.is_empty() {
                        autoclaim_from = parts[0].as_string().unwrap_or_else(|| "0-0".into());
                    }
                    let entries = if parts.len() >= 2 {
                        parts.remove(1)
                    } else {
                        FredValue::Null
                    };
                    FredValue::Array(vec![FredValue::Array(vec![
                        FredValue::from(opts.stream.as_str()),
                        entries,
                    ])])
                })
            }
            _ => {
                tokio::select! {
                    r = client.xreadgroup(
                        opts.group.as_str(),
                        opts.consumer.as_str(),
                        Some(100),
                        Some(2000),
                        false,
                        opts.stream.as_str(),
                        ">",
                    ) => r,
                    _ = shutdown.cancelled() => break,
                }
            }
        };
        let entries = entries_of(batch.map_err(|e| format!("XREADGROUP failed: {e}"))?);
        if entries.is_empty() {
            if phase == 0 || (phase == 1 && autoclaim_from == "0-0") {
                phase += 1;
            }
            continue;
        }
        if phase == 1 && autoclaim_from == "0-0" {
            phase = 2;
        }
        let mut ids = Vec::with_capacity(entries.len());
        for (id, fields) in entries {
            if done(printed) {
                // Left pending: the next run of this consumer starts with them.
                break;
            }
            let event_id = fields.get("event_id").cloned().unwrap_or_default();
            if seen.insert(&event_id) {
                let line = fields.get("event").cloned().unwrap_or_default();
                writeln!(out, "{line}").map_err(|e| e.to_string())?;
                printed += 1;
            }
            ids.push(id);
        }
        if ids.is_empty() {
            break;
        }
        out.flush().map_err(|e| e.to_string())?;
        let acked: Result<i64, FredError> = client
            .xack(opts.stream.as_str(), opts.group.as_str(), ids)
            .await;
        acked.map_err(|e| format!("XACK failed: {e}"))?;
    }
    let _ = client.quit().await;
    Ok(printed)
}
