//! The Redis request/reply transport (seed 004): requests on `crucible.request` carry
//! `correlation_id`, `reply_to`, `request_type` and `payload`; each is handled by the same
//! [`Service`] as HTTP, and the reply (`payload`, or `error` + `error_code` from the one
//! error table) is published on `reply_to` with the same `correlation_id`. A way in to
//! the service beside the HTTP gateway; it owns no state.

use crate::error::ApiError;
use crate::redis::Redis;
use crate::service::{check_idempotency_key, ListQuery, Service};
use fred::prelude::{ClientLike, Error as FredError, EventInterface, PubsubInterface};
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Serve requests on `cfg.request_channel` until `shutdown`: each request is handled by
/// the same [`Service`] as HTTP, and the reply is published on its `reply_to`.
pub async fn serve_requests(redis: Arc<Redis>, service: Arc<Service>, shutdown: CancellationToken) {
    let channel = redis.cfg.request_channel.clone();
    let sub = match redis.subscriber() {
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
