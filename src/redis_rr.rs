//! The Redis request/reply transport (seed 004): requests on `crucible.request` carry
//! `correlation_id`, `reply_to`, `request_type` and `payload`; each is handled by the same
//! [`Service`] as HTTP, and the reply (`payload`, or `error` + `error_code` from the one
//! error table) is published on `reply_to` with the same `correlation_id`. A way in to
//! the service beside the HTTP gateway; it owns no state.

use crate::error::ApiError;
use crate::ops::worker::{Backoff, State, Worker};
use crate::redis::Redis;
use crate::service::{check_idempotency_key, ListQuery, Service};
use crate::BoxFuture;
use fred::clients::SubscriberClient;
use fred::prelude::{ClientLike, Error as FredError, EventInterface, PubsubInterface};
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

type Message = Result<fred::types::Message, tokio::sync::broadcast::error::RecvError>;

/// The responder: a [`Worker`] that subscribes to `cfg.request_channel` (retrying with
/// the runner's back-off while Redis is down) and hands each request to a task of its
/// own, at most `max_inflight_requests` at once.
pub struct Responder {
    redis: Arc<Redis>,
    service: Arc<Service>,
    channel: String,
    sub: SubscriberClient,
    rx: tokio::sync::broadcast::Receiver<fred::types::Message>,
    subscribed: bool,
    slots: Arc<Semaphore>,
    /// A message received while waiting, handled at the next step.
    pending: Option<Message>,
}

impl Responder {
    /// A responder for `redis`'s request channel (connecting in the background).
    pub fn new(redis: Arc<Redis>, service: Arc<Service>) -> Result<Responder, String> {
        let sub = redis
            .subscriber()
            .map_err(|e| format!("redis subscriber cannot be built: {e}"))?;
        let _conn = sub.connect();
        // Re-subscribe after every reconnect.
        let _resub = sub.manage_subscriptions();
        let rx = sub.message_rx();
        Ok(Responder {
            channel: redis.cfg.request_channel.clone(),
            slots: Arc::new(Semaphore::new(redis.cfg.max_inflight_requests)),
            redis,
            service,
            sub,
            rx,
            subscribed: false,
            pending: None,
        })
    }

    async fn step(&mut self, stop: &CancellationToken) -> Result<State, String> {
        if !self.subscribed {
            let r: Result<(), FredError> = self.sub.subscribe(self.channel.as_str()).await;
            r.map_err(|e| format!("cannot subscribe to {} yet: {e}", self.channel))?;
            self.subscribed = true;
            tracing::info!(channel = %self.channel, "redis request/reply responder listening");
        }
        let Some(msg) = self.pending.take() else {
            return Ok(State::Idle);
        };
        let m = match msg {
            Ok(m) => m,
            Err(RecvError::Lagged(n)) => {
                self.redis.stats.dropped.fetch_add(n, Ordering::Relaxed);
                tracing::warn!(
                    dropped = n,
                    "request/reply responder fell behind; requests dropped"
                );
                return Ok(State::Idle);
            }
            Err(RecvError::Closed) => return Ok(State::Done),
        };
        let Some(text) = m.value.as_string() else {
            self.redis.stats.malformed.fetch_add(1, Ordering::Relaxed);
            return Ok(State::Idle);
        };
        let permit = tokio::select! {
            p = self.slots.clone().acquire_owned() => p.map_err(|e| e.to_string())?,
            _ = stop.cancelled() => return Ok(State::Done),
        };
        let (r, s) = (self.redis.clone(), self.service.clone());
        tokio::spawn(async move {
            handle_request(&r, &s, &text).await;
            drop(permit);
        });
        Ok(State::Idle)
    }
}

impl Worker for Responder {
    fn name(&self) -> String {
        "redis-requests".into()
    }

    fn work<'a>(&'a mut self, stop: &'a CancellationToken) -> BoxFuture<'a, Result<State, String>> {
        Box::pin(self.step(stop))
    }

    fn wait_for_work(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let m = self.rx.recv().await;
            self.pending = Some(m);
        })
    }

    fn backoff(&self) -> Backoff {
        Backoff::millis(100, 10_000)
    }

    fn stopped(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            // Redis may be down at shutdown: never wait for it long.
            let bye = async {
                let _ = self.sub.unsubscribe(self.channel.as_str()).await;
                let _ = self.sub.quit().await;
            };
            let _ = tokio::time::timeout(Duration::from_secs(1), bye).await;
        })
    }
}

fn field_err(field: &str, message: &str) -> ApiError {
    ApiError::invalid_field(field, message)
}

/// A payload value as text for [`ListQuery::parse`] (numbers are accepted too).
fn text(v: Option<&Value>) -> Option<String> {
    match v {
        // An empty string counts as absent here (over HTTP an empty parameter is an error).
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
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
            let (s, l, c, o) = (
                text(payload.get("status")),
                text(payload.get("limit")),
                text(payload.get("cursor")),
                text(payload.get("offset")),
            );
            let q = ListQuery::parse(s.as_deref(), l.as_deref(), c.as_deref(), o.as_deref())?;
            Ok(serde_json::to_value(service.list(&q).await?).unwrap_or(Value::Null))
        }
        "submit_evaluation" => {
            let key = match payload.get("idempotency_key") {
                None | Some(Value::Null) => None,
                Some(Value::String(k)) => Some(check_idempotency_key(k, "idempotency_key")?),
                Some(_) => return Err(field_err("idempotency_key", "must be a string")),
            };
            let s = service.submit(payload, key).await?;
            Ok(serde_json::to_value(s).unwrap_or(Value::Null))
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
