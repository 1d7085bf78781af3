//! JSON handlers of the API.

use super::{bytes_response, json_response, query, ApiError, Body, State};
use crate::error::Code;
use crate::ops::metrics::{rss_bytes, Exposition};
use crate::ops::report::Level;
use crate::service::{check_idempotency_key, ListQuery};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde_json::{json, Value};
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

/// `GET /api/evaluations` parameters.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ListParams {
    status: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
}

pub async fn list(state: &State, query: Option<&str>) -> Result<Response<Body>, ApiError> {
    let q: ListParams = query::parse(query)?;
    let lq = ListQuery::parse(q.status.as_deref(), q.limit.as_deref(), q.cursor.as_deref())?;
    let page = state.service.list(&lq).await?;
    Ok(json_response(StatusCode::OK, &to_value(&page)))
}

pub async fn health(state: &State) -> Response<Body> {
    let (level, entries) = state.reporters.health().await;
    let shutting_down = state.shutdown.is_cancelled();
    let status = match level {
        _ if shutting_down => "unhealthy",
        Level::Unhealthy => "unhealthy",
        Level::Degraded => "degraded",
        Level::Ok => "ok",
    };
    let mut body = json!({
        "status": status,
        "version": env!("CARGO_PKG_VERSION"),
        "node": state.service.node_id(),
        "uptime_secs": state.started.elapsed().as_secs(),
        "shutting_down": shutting_down,
    });
    if let Value::Object(m) = &mut body {
        m.extend(entries);
    }
    let code = if status == "unhealthy" {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    json_response(code, &body)
}

pub async fn metrics(state: &State) -> Response<Body> {
    let mut e = Exposition::default();
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
    state.reporters.metrics(&mut e);
    e.labeled(
        "crucible_http_requests_total",
        "HTTP requests by route and status.",
        &["route", "code"],
        &state.stats.requests,
    );
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
    json_response(StatusCode::OK, &json!({ "sinks": state.service.sinks() }))
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
    let cursor = state.service.replay(name, from).await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({"sink": name, "cursor": cursor, "from_seq": from}),
    ))
}

/// `GET /api/admin/dead-letters` parameters.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DeadLetterParams {
    sink: Option<String>,
    limit: Option<String>,
}

pub fn dead_letters(state: &State, query: Option<&str>) -> Result<Response<Body>, ApiError> {
    let q: DeadLetterParams = query::parse(query)?;
    let limit = match q.limit {
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
    let sink = q.sink.as_deref().filter(|s| !s.is_empty());
    let items = state.service.dead_letters(sink, limit)?;
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
        None | Some(Value::Null) => None,
        Some(Value::String(p)) if p.starts_with('/') => Some(std::path::PathBuf::from(p)),
        Some(_) => {
            return Err(ApiError::invalid_field(
                "path",
                "`path` must be an absolute directory path (missing or empty)",
            ))
        }
    };
    let info = state.service.backup(dest).await?;
    Ok(json_response(StatusCode::OK, &to_value(&info)))
}

pub fn pause_resume(state: &State, pause: bool) -> Response<Body> {
    let paused = state.service.set_paused(pause);
    json_response(StatusCode::OK, &json!({ "paused": paused }))
}
