//! JSON handlers of the API.

use super::{bytes_response, json_response, ApiError, Body, State};
use crate::error::Code;
use crate::ops::metrics::{rss_bytes, Exposition};
use crate::service::{check_idempotency_key, ListQuery};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// The OpenAPI document, kept next to the code it describes.
const OPENAPI: &str = include_str!("../../assets/openapi.json");

pub fn openapi() -> Response<Body> {
    bytes_response(
        StatusCode::OK,
        "application/json",
        Bytes::from_static(OPENAPI.as_bytes()),
    )
}

/// A parsed JSON body and its share of the body memory budget (held until dropped).
struct JsonBody {
    headers: http::HeaderMap,
    value: Value,
    _budget: tokio::sync::OwnedSemaphorePermit,
}

/// Read a JSON body: 415 unless `application/json`, 413 over the cap, 400 if malformed.
/// Waits for its share of `http.max_inflight_body_mb` first.
async fn read_json(state: &State, req: Request<Incoming>) -> Result<JsonBody, ApiError> {
    let (parts, body) = req.into_parts();
    let ct = parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if mime != "application/json" {
        return Err(ApiError::new(
            Code::UnsupportedMediaType,
            "the body must be JSON with `Content-Type: application/json`",
        ));
    }
    let cap = state.cfg.http.max_body_bytes;
    let too_large = || {
        ApiError::new(
            Code::PayloadTooLarge,
            format!("the body is larger than {cap} bytes"),
        )
    };
    let declared = parts
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > cap as u64) {
        return Err(too_large());
    }
    // Reserve the declared size (or the cap when unknown), in KiB, before reading.
    let reserve = declared.map(|l| l as usize).unwrap_or(cap);
    let kib = reserve.div_ceil(1024).max(1) as u32;
    let budget = state
        .body_budget
        .clone()
        .acquire_many_owned(kib)
        .await
        .map_err(|_| ApiError::internal("the body budget is closed"))?;
    let bytes = match Limited::new(body, cap).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                return Err(too_large());
            }
            return Err(ApiError::new(
                Code::BadRequest,
                format!("cannot read the body: {e}"),
            ));
        }
    };
    let v: Value = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::new(
            Code::MalformedJson,
            format!("the body is not valid JSON: {e}"),
        )
    })?;
    Ok(JsonBody {
        headers: parts.headers,
        value: v,
        _budget: budget,
    })
}

fn idempotency_key(headers: &http::HeaderMap) -> Result<Option<String>, ApiError> {
    match headers.get("idempotency-key") {
        None => Ok(None),
        Some(v) => {
            let s = v.to_str().unwrap_or("\u{0}");
            check_idempotency_key(s, "Idempotency-Key").map(Some)
        }
    }
}

pub async fn submit(
    state: &Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let body = read_json(state, req).await?;
    let key = idempotency_key(&body.headers)?;
    let s = state.service.submit(&body.value, key).await?;
    Ok(json_response(
        StatusCode::ACCEPTED,
        &json!({"eval_id": s.eval_id, "status": s.status}),
    ))
}

pub async fn submit_batch(
    state: &Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let body = read_json(state, req).await?;
    let res = state.service.submit_batch(&body.value).await?;
    Ok(json_response(
        StatusCode::ACCEPTED,
        &json!({ "evaluations": res }),
    ))
}

pub async fn get_eval(state: &State, id: &str) -> Result<Response<Body>, ApiError> {
    let rec = state.service.get(id).await?;
    Ok(json_response(StatusCode::OK, &to_value(&rec)))
}

fn to_value<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

pub async fn cancel(state: &Arc<State>, id: &str) -> Result<Response<Body>, ApiError> {
    let rec = state.service.cancel(id).await?;
    Ok(json_response(StatusCode::OK, &to_value(&rec)))
}

pub(super) fn query_map(q: Option<&str>) -> HashMap<String, String> {
    let mut m = HashMap::new();
    for pair in q.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        m.insert(percent_decode(k), percent_decode(v));
    }
    m
}

/// Decode `%XX` escapes and `+` in a query component.
pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(v) => {
                        out.push(v);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub async fn list(state: &State, query: Option<&str>) -> Result<Response<Body>, ApiError> {
    let q = query_map(query);
    let lq = ListQuery::parse(
        q.get("status").map(|s| s.as_str()),
        q.get("limit").map(|s| s.as_str()),
        q.get("cursor").map(|s| s.as_str()),
    )?;
    let page = state.service.list(&lq).await?;
    Ok(json_response(StatusCode::OK, &to_value(&page)))
}

pub async fn health(state: &State) -> Response<Body> {
    let shared = state.store.shared();
    let store_ok = shared.healthy.load(Ordering::SeqCst);
    let exec = state.executor.health().await;
    let sinks = state.outbox.reports();
    let sinks_ok = sinks.iter().all(|s| s.ok);
    let redis = state.redis.as_ref().map(|r| r.health());
    let postgres = state.postgres.as_ref().map(|p| p.health());
    let shutting_down = state.shutdown.is_cancelled();
    let status = if !store_ok || shutting_down {
        "unhealthy"
    } else if !exec.ok || !sinks_ok {
        "degraded"
    } else {
        "ok"
    };
    let mut sink_map = serde_json::Map::new();
    for s in sinks {
        sink_map.insert(s.name.clone(), to_value(&s));
    }
    let body = json!({
        "status": status,
        "version": env!("CARGO_PKG_VERSION"),
        "node": state.store.node_id(),
        "uptime_secs": state.started.elapsed().as_secs(),
        "shutting_down": shutting_down,
        "store": {
            "ok": store_ok,
            "head_seq": state.store.head(),
            "oldest_seq": state.store.oldest_seq().ok(),
            "size_on_disk_bytes": state.store.size_on_disk(),
            "last_error": shared.last_error.lock().ok().and_then(|e| e.clone()),
        },
        "queue": {
            "depth": state.store.queue_depth(),
            "max_queued": state.cfg.max_queued,
            "running": state.store.running_count(),
            "workers": state.queue.workers(),
            "paused": state.queue.is_paused(),
        },
        "executor": exec,
        "sinks": sink_map,
        "redis": redis,
        "postgres": postgres,
    });
    let code = if status == "unhealthy" {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    json_response(code, &body)
}

pub async fn metrics(state: &State) -> Response<Body> {
    let mut e = Exposition::default();
    let s = state.store.shared();
    e.gauge("crucible_up", "1 while the appliance is serving.", 1.0);
    e.gauge(
        "crucible_uptime_seconds",
        "Seconds since start.",
        state.started.elapsed().as_secs_f64(),
    );
    e.gauge(
        "crucible_process_resident_memory_bytes",
        "Resident set size of the appliance process.",
        rss_bytes() as f64,
    );
    e.counter(
        "crucible_evaluations_accepted_total",
        "Evaluations durably accepted (HTTP and Redis request/reply).",
        state.service.accepted.load(Ordering::Relaxed),
    );
    e.labeled(
        "crucible_evaluations_finished_total",
        "Evaluations that reached a terminal state through a worker.",
        &["status", "failure_reason"],
        &state.queue.stats.finished,
    );
    e.histogram(
        "crucible_execution_seconds",
        "Wall-clock time of executions.",
        &state.queue.stats.run_seconds,
    );
    e.gauge(
        "crucible_queue_depth",
        "Evaluations waiting to run.",
        state.store.queue_depth() as f64,
    );
    e.gauge(
        "crucible_queue_capacity",
        "max_queued.",
        state.cfg.max_queued as f64,
    );
    e.gauge(
        "crucible_running",
        "Evaluations running.",
        state.store.running_count() as f64,
    );
    e.gauge(
        "crucible_workers",
        "Concurrency cap.",
        state.queue.workers() as f64,
    );
    e.flag(
        "crucible_queue_paused",
        "1 when dispatching is paused.",
        state.queue.is_paused(),
    );
    e.flag(
        "crucible_store_healthy",
        "1 when the last store write succeeded.",
        s.healthy.load(Ordering::SeqCst),
    );
    e.gauge(
        "crucible_outbox_head_seq",
        "Last durable event seq.",
        state.store.head() as f64,
    );
    e.gauge(
        "crucible_store_size_bytes",
        "Bytes the sled store occupies on disk.",
        state.store.size_on_disk() as f64,
    );
    e.counter(
        "crucible_store_batches_total",
        "Group-commit batches applied and flushed.",
        s.stats.batches.load(Ordering::Relaxed),
    );
    e.counter(
        "crucible_store_ops_total",
        "Store operations applied.",
        s.stats.ops.load(Ordering::Relaxed),
    );
    e.counter(
        "crucible_store_events_total",
        "Events appended to the log.",
        s.stats.events.load(Ordering::Relaxed),
    );
    e.counter(
        "crucible_store_errors_total",
        "Failed store batches.",
        s.stats.errors.load(Ordering::Relaxed),
    );
    e.histogram(
        "crucible_store_flush_seconds",
        "Time of each group-commit flush.",
        &s.stats.flush_seconds,
    );
    e.histogram(
        "crucible_store_batch_ops",
        "Operations per group-commit batch.",
        &s.stats.batch_size,
    );
    e.counter(
        "crucible_outbox_pruned_total",
        "Delivered events pruned from the log.",
        state.outbox.pruned.load(Ordering::Relaxed),
    );
    let reports = state.outbox.reports();
    let rows = |f: &dyn Fn(&crate::outbox::SinkReport) -> f64| -> Vec<(Vec<String>, f64)> {
        reports
            .iter()
            .map(|r| (vec![r.name.clone()], f(r)))
            .collect()
    };
    e.family(
        "crucible_outbox_cursor",
        "gauge",
        "Last seq delivered to the sink.",
        &["sink"],
        &rows(&|r| r.cursor as f64),
    );
    e.family(
        "crucible_outbox_backlog",
        "gauge",
        "Events not yet delivered to the sink.",
        &["sink"],
        &rows(&|r| r.backlog as f64),
    );
    e.family(
        "crucible_outbox_oldest_undelivered_age_seconds",
        "gauge",
        "Age of the oldest event not yet delivered (0 when none).",
        &["sink"],
        &rows(&|r| r.oldest_undelivered_age_secs.unwrap_or(0.0)),
    );
    e.family(
        "crucible_outbox_delivered_total",
        "counter",
        "Events delivered to the sink.",
        &["sink"],
        &rows(&|r| r.delivered as f64),
    );
    e.family(
        "crucible_outbox_retries_total",
        "counter",
        "Failed delivery attempts.",
        &["sink"],
        &rows(&|r| r.retries as f64),
    );
    e.family(
        "crucible_outbox_dead_letters",
        "gauge",
        "Events parked as dead letters.",
        &["sink"],
        &rows(&|r| r.dead_letters as f64),
    );
    e.family(
        "crucible_outbox_sink_up",
        "gauge",
        "1 when the last delivery to the sink succeeded.",
        &["sink"],
        &rows(&|r| if r.ok { 1.0 } else { 0.0 }),
    );
    e.labeled(
        "crucible_http_requests_total",
        "HTTP requests by route and status.",
        &["route", "code"],
        &state.stats.requests,
    );
    state.executor.metrics(&mut e);
    if let Some(p) = &state.postgres {
        e.flag(
            "crucible_postgres_connected",
            "1 while the PostgreSQL sync is connected and its last write succeeded.",
            p.is_connected(),
        );
    }
    if let Some(r) = &state.redis {
        e.flag(
            "crucible_redis_connected",
            "1 while the Redis connection is up.",
            r.is_connected(),
        );
        e.labeled(
            "crucible_redis_requests_total",
            "Request/reply requests by type and outcome.",
            &["type", "outcome"],
            &r.stats.requests,
        );
        e.counter(
            "crucible_redis_requests_malformed_total",
            "Messages on the request channel that were not requests (no JSON or no reply_to).",
            r.stats.malformed.load(Ordering::Relaxed),
        );
        e.counter(
            "crucible_redis_requests_dropped_total",
            "Requests dropped by the subscriber buffer because the responder fell behind.",
            r.stats.dropped.load(Ordering::Relaxed),
        );
        e.counter(
            "crucible_redis_reply_errors_total",
            "Replies that could not be published.",
            r.stats.reply_errors.load(Ordering::Relaxed),
        );
    }
    e.histogram(
        "crucible_http_request_seconds",
        "HTTP request latency.",
        &state.stats.latency,
    );
    e.gauge(
        "crucible_sse_clients",
        "Open /api/events streams.",
        state.stats.sse_clients.load(Ordering::Relaxed) as f64,
    );
    bytes_response(
        StatusCode::OK,
        "text/plain; version=0.0.4; charset=utf-8",
        Bytes::from(e.finish()),
    )
}

pub fn sinks(state: &State) -> Response<Body> {
    json_response(StatusCode::OK, &json!({ "sinks": state.outbox.reports() }))
}

pub async fn replay(
    state: &Arc<State>,
    name: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let body = read_json(state, req).await?;
    let from = body
        .value
        .get("from_seq")
        .and_then(|f| f.as_u64())
        .ok_or_else(|| {
            ApiError::invalid_field("from_seq", "`from_seq` must be a positive integer")
        })?;
    match state.outbox.replay(name, from).await {
        Ok(cursor) => {
            tracing::info!(sink = name, from_seq = from, "replay requested");
            Ok(json_response(
                StatusCode::OK,
                &json!({"sink": name, "cursor": cursor, "from_seq": from}),
            ))
        }
        Err(crate::outbox::ReplayError::UnknownSink(_)) => Err(ApiError::not_found("sink")),
        Err(crate::outbox::ReplayError::Store(e)) => Err(e.into()),
    }
}

pub fn dead_letters(state: &State, query: Option<&str>) -> Result<Response<Body>, ApiError> {
    let q = query_map(query);
    let limit = match q.get("limit") {
        None => 100,
        Some(l) => match l.parse::<usize>() {
            Ok(n) if (1..=1000).contains(&n) => n,
            _ => {
                return Err(ApiError::invalid_field(
                    "limit",
                    "`limit` must be an integer from 1 to 1000",
                ))
            }
        },
    };
    let sink = q.get("sink").map(|s| s.as_str()).filter(|s| !s.is_empty());
    let items = state.store.dead_letters(sink, limit)?;
    Ok(json_response(
        StatusCode::OK,
        &json!({ "dead_letters": items }),
    ))
}

/// `POST /api/admin/backup {"path"?}`: a consistent copy of the store, written by the
/// server (so `path` must be writable by it; default `<data_dir>/backups/<time>`).
pub async fn backup(
    state: &Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let body = read_json(state, req).await?;
    let dest = match body.value.get("path") {
        None | Some(Value::Null) => {
            let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%SZ").to_string();
            let base = std::path::absolute(&state.cfg.data_dir)
                .unwrap_or_else(|_| state.cfg.data_dir.clone());
            base.join("backups").join(stamp)
        }
        Some(Value::String(p)) if p.starts_with('/') => std::path::PathBuf::from(p),
        Some(_) => {
            return Err(ApiError::invalid_field(
                "path",
                "`path` must be an absolute directory path (missing or empty)",
            ))
        }
    };
    let info = state.store.backup(dest).await?;
    Ok(json_response(StatusCode::OK, &to_value(&info)))
}

pub fn pause_resume(state: &State, action: &str) -> Response<Body> {
    if action == "pause" {
        state.queue.pause();
    } else {
        state.queue.resume();
    }
    json_response(StatusCode::OK, &json!({"paused": state.queue.is_paused()}))
}

#[cfg(test)]
mod tests {
    use super::percent_decode;

    #[test]
    fn decodes_query_components() {
        assert_eq!(percent_decode("a%20b+c"), "a b c");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
        assert_eq!(percent_decode("%41"), "A");
    }
}
