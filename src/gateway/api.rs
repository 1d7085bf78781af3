//! JSON handlers of the API. Each carries its part of the OpenAPI document in its
//! `#[utoipa::path]` attribute: what it reads and answers, and the statuses only it can
//! answer (the ones every route shares are added from the route table, see
//! [`super::openapi`]).

use super::openapi::{E404, E409, E500, E503, E507};
use super::{bytes_response, json_response, query, ApiError, Body, State};
use crate::error::Code;
use crate::model::{Evaluation, SubmitRequest};
use crate::ops::metrics::{rss_bytes, Exposition};
use crate::ops::report::Level;
use crate::outbox::SinkReport;
use crate::service::{check_idempotency_key, Accepted, BatchAccepted, ListQuery, Page};
use crate::store::{BackupInfo, DeadLetter};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde::Serialize;
use serde_json::Value;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use utoipa::ToSchema;

/// This document
///
/// OpenAPI 3.1, generated from the server's own types and route table. `servers` names
/// the address the request came to.
#[utoipa::path(get, path = "/api/openapi.json", tag = "ops",
    responses((status = 200, description = "The OpenAPI document", body = Object)))]
pub fn openapi(
    state: &State,
    req: &Request<Incoming>,
    local: Option<std::net::SocketAddr>,
) -> Response<Body> {
    let doc = state.openapi.get_or_init(|| {
        super::openapi::document(&super::openapi::Settings {
            document_submission: &|schemas| state.service.document_submission(schemas),
        })
    });
    let host = req
        .headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok());
    let doc = super::openapi::with_server(doc, host, local);
    json_response(StatusCode::OK, &doc)
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
    let deadline = Duration::from_secs(state.cfg.http.body_timeout_secs);
    let read = tokio::time::timeout(deadline, Limited::new(body, cap).collect()).await;
    let Ok(read) = read else {
        return Err(ApiError::new(
            Code::RequestTimeout,
            format!("the body did not arrive within {} s", deadline.as_secs()),
        ));
    };
    let bytes = match read {
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

/// Submit an evaluation
///
/// Answers 202 only after the evaluation and its `evaluation:queued` event are flushed
/// to disk. A repeated `Idempotency-Key` answers the first submission's `eval_id` (and its
/// current status) instead of accepting another.
#[utoipa::path(post, path = "/api/eval", tag = "evaluations",
    params(("Idempotency-Key" = Option<String>, Header,
        description = "Makes a retry safe: the same key answers the same `eval_id`. 1 to 255 visible ASCII characters.",
        min_length = 1, max_length = 255, pattern = "^[\\x21-\\x7e]+$")),
    request_body(content = SubmitRequest, content_type = "application/json"),
    responses(
        (status = 202, description = "Durably accepted", body = Accepted),
        (status = 409, response = E409),
        (status = 500, response = E500),
        (status = 503, response = E503),
        (status = 507, response = E507),
    ))]
pub async fn submit(
    state: &Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let body = read_json(state, req).await?;
    let key = idempotency_key(&body.headers)?;
    let s = state.service.submit(&body.value, key).await?;
    Ok(json_response(StatusCode::ACCEPTED, &to_value(&s)))
}

/// The body of `POST /api/eval-batch`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct BatchRequest {
    /// 1 to 100 submissions, accepted all together or not at all.
    #[schema(min_items = 1, max_items = 100)] // = MAX_BATCH
    evaluations: Vec<SubmitRequest>,
}

/// Submit up to 100 evaluations at once
///
/// All or nothing: one invalid item (the error names it, e.g. `evaluations[3].code`)
/// refuses the whole batch.
#[utoipa::path(post, path = "/api/eval-batch", tag = "evaluations",
    request_body(content = BatchRequest, content_type = "application/json"),
    responses(
        (status = 202, description = "Durably accepted, in the order given", body = BatchAccepted),
        (status = 500, response = E500),
        (status = 503, response = E503),
        (status = 507, response = E507),
    ))]
pub async fn submit_batch(
    state: &Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let body = read_json(state, req).await?;
    let res = state.service.submit_batch(&body.value).await?;
    Ok(json_response(StatusCode::ACCEPTED, &to_value(&res)))
}

/// `GET /api/eval/{id}` and `/api/eval-status/{id}` parameters.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct WaitParams {
    /// Seconds to wait for the evaluation to reach a terminal status: the answer leaves as
    /// soon as it has (its terminal state on disk), else with the record as it stands
    /// after this long. Longer waits are cut to `[limits] max_wait_secs` (60 s by
    /// default); 0 or absent: answer at once.
    #[param(value_type = Option<f64>, minimum = 0)]
    wait: Option<String>,
}

/// The `wait` of a read, as a duration (the service cuts it to `[limits] max_wait_secs`).
fn wait_param(query: Option<&str>) -> Result<std::time::Duration, ApiError> {
    let q: WaitParams = query::parse(query)?;
    let Some(text) = q.wait else {
        return Ok(std::time::Duration::ZERO);
    };
    match text.trim().parse::<f64>() {
        Ok(secs) if secs.is_finite() && secs >= 0.0 => {
            // Cut here already: a duration of 1e308 seconds would overflow.
            Ok(std::time::Duration::from_secs_f64(
                secs.min(crate::config::MAX_WAIT_SECS as f64),
            ))
        }
        _ => Err(ApiError::invalid_field(
            "wait",
            "`wait` must be a number of seconds, 0 or more",
        )),
    }
}

/// Read an evaluation
///
/// With `?wait=SECS`, the answer waits (up to 60 s) for the evaluation to end: a client
/// learns the result as soon as it is on disk, without polling.
#[utoipa::path(get, path = "/api/eval/{id}", tag = "evaluations",
    params(("id" = String, Path, description = "The `eval_id`"), WaitParams),
    responses(
        (status = 200, description = "The record", body = Evaluation),
        (status = 404, response = E404),
        (status = 500, response = E500),
    ))]
pub async fn get_eval(
    state: &State,
    id: &str,
    query: Option<&str>,
) -> Result<Response<Body>, ApiError> {
    let wait = wait_param(query)?;
    let rec = if wait.is_zero() {
        state.service.get(id).await?
    } else {
        state.service.get_waiting(id, wait).await?
    };
    Ok(json_response(StatusCode::OK, &to_value(&rec)))
}

/// Read an evaluation (the seed platform's path)
///
/// The same as `GET /api/eval/{id}`, `?wait=SECS` included.
#[utoipa::path(get, path = "/api/eval-status/{id}", tag = "evaluations",
    params(("id" = String, Path, description = "The `eval_id`"), WaitParams),
    responses(
        (status = 200, description = "The record", body = Evaluation),
        (status = 404, response = E404),
        (status = 500, response = E500),
    ))]
pub async fn get_eval_status(
    state: &State,
    id: &str,
    query: Option<&str>,
) -> Result<Response<Body>, ApiError> {
    get_eval(state, id, query).await
}

/// Read an evaluation (the seed platform's later path)
///
/// The whole record, always with 200 (the seed answered 202 while it ran; `status` says
/// that here).
#[utoipa::path(get, path = "/api/eval/{id}/status", tag = "evaluations",
    params(("id" = String, Path, description = "The `eval_id`")),
    responses(
        (status = 200, description = "The record", body = Evaluation),
        (status = 404, response = E404),
        (status = 500, response = E500),
    ))]
pub async fn get_eval_seed_status(state: &State, id: &str) -> Result<Response<Body>, ApiError> {
    get_eval(state, id, None).await
}

fn to_value<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

/// Cancel a queued evaluation or kill a running one
///
/// The record is `cancelled` on disk before the answer. A terminal evaluation cannot be
/// cancelled (409 `already_terminal`).
#[utoipa::path(post, path = "/api/eval/{id}/cancel", tag = "evaluations",
    params(("id" = String, Path, description = "The `eval_id`")),
    responses(
        (status = 200, description = "Now cancelled", body = Evaluation),
        (status = 404, response = E404),
        (status = 409, response = E409),
        (status = 500, response = E500),
    ))]
pub async fn cancel(state: &Arc<State>, id: &str) -> Result<Response<Body>, ApiError> {
    let rec = state.service.cancel(id).await?;
    Ok(json_response(StatusCode::OK, &to_value(&rec)))
}

/// `GET /api/evaluations` parameters. A parameter that is given must have a valid,
/// non-empty value.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Only evaluations in this status.
    #[param(value_type = Option<crate::model::Status>)]
    status: Option<String>,
    /// Page size.
    #[param(value_type = Option<u32>, minimum = 1, maximum = 100)] // = MAX_PAGE
    limit: Option<String>,
    /// The `next_cursor` of the previous page; an evaluation that does not exist is a 404.
    #[param(value_type = Option<String>, pattern = "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")]
    cursor: Option<String>,
    /// Skip this many first (after `cursor`, if given): the seed platform's paging, where
    /// the next page starts at `offset` + the number of evaluations in this page.
    #[param(value_type = Option<u32>, minimum = 0, maximum = 1_000_000)] // = MAX_OFFSET
    offset: Option<String>,
}

/// List evaluations, newest first
///
/// Page with `cursor` (pass `next_cursor` back; `null` on the last page) or with
/// `offset` (the seed platform's way: `offset` + the number of evaluations in the page).
/// `count` is how many match in all; `has_more` whether a next page exists.
#[utoipa::path(get, path = "/api/evaluations", tag = "evaluations",
    params(ListParams),
    responses(
        (status = 200, description = "A page", body = Page),
        (status = 404, response = E404),
        (status = 500, response = E500),
    ))]
pub async fn list(state: &State, query: Option<&str>) -> Result<Response<Body>, ApiError> {
    let q: ListParams = query::parse(query)?;
    let lq = ListQuery::parse(
        q.status.as_deref(),
        q.limit.as_deref(),
        q.cursor.as_deref(),
        q.offset.as_deref(),
    )?;
    let page = state.service.list(&lq).await?;
    Ok(json_response(StatusCode::OK, &to_value(&page)))
}

/// The appliance's state, the worst of its subsystems'.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum HealthStatus {
    /// Everything works.
    Ok,
    /// It works partly (e.g. a sink is down, the executor cannot run now).
    Degraded,
    /// The store cannot write, or the appliance is stopping (answered with 503).
    Unhealthy,
}

/// The answer of `GET /health`: the appliance, `services`, and one entry per subsystem
/// (`store`, `queue`, `executor`, `sinks`, `redis`, `postgres`, `workers`; `null` when it
/// is not configured), each owned by that subsystem.
#[derive(Serialize, ToSchema)]
pub struct Health {
    pub status: HealthStatus,
    /// The crucible version.
    pub version: String,
    /// This node's id.
    pub node: String,
    pub uptime_secs: u64,
    /// The appliance got SIGTERM and is finishing its work.
    pub shutting_down: bool,
    /// When this answer was made (RFC 3339, UTC).
    #[schema(format = DateTime)]
    pub timestamp: String,
    /// Each subsystem's entry, by its key.
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub subsystems: serde_json::Map<String, Value>,
    /// Each subsystem's state, by the key of its entry.
    #[schema(value_type = std::collections::BTreeMap<String, crate::ops::report::ServiceState>)]
    pub services: serde_json::Map<String, Value>,
}

/// Liveness and each subsystem
///
/// `status` is the worst of the subsystems; `services` says each one's state. Never
/// needs the token.
#[utoipa::path(get, path = "/health", tag = "ops",
    responses(
        (status = 200, description = "`ok` or `degraded`", body = Health),
        (status = 503, description = "`unhealthy`", body = Health),
    ))]
pub async fn health(state: &State) -> Response<Body> {
    let report = state.reporters.health().await;
    let shutting_down = state.shutdown.is_cancelled();
    let status = match report.level {
        _ if shutting_down => HealthStatus::Unhealthy,
        Level::Unhealthy => HealthStatus::Unhealthy,
        Level::Degraded => HealthStatus::Degraded,
        Level::Ok => HealthStatus::Ok,
    };
    let body = Health {
        status,
        version: env!("CARGO_PKG_VERSION").to_string(),
        node: state.service.node_id().to_string(),
        uptime_secs: state.started.elapsed().as_secs(),
        shutting_down,
        timestamp: crate::model::now(),
        subsystems: report.entries,
        services: report.services,
    };
    let code = if status == HealthStatus::Unhealthy {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    json_response(code, &to_value(&body))
}

/// Liveness and each subsystem (the seed platform's path)
///
/// The same answer as `GET /health`.
#[utoipa::path(get, path = "/api/health", tag = "ops",
    responses(
        (status = 200, description = "`ok` or `degraded`", body = Health),
        (status = 503, description = "`unhealthy`", body = Health),
    ))]
pub async fn api_health(state: &State) -> Response<Body> {
    health(state).await
}

/// Prometheus metrics
#[utoipa::path(get, path = "/metrics", tag = "ops",
    responses((status = 200, description = "The Prometheus text exposition format 0.0.4",
        content_type = "text/plain", body = String)))]
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
        "crucible_http_connections",
        "Open HTTP connections.",
        state.conns.len() as f64,
    );
    e.counter(
        "crucible_http_connections_evicted_total",
        "Connections with no request in progress closed to make room at http.max_connections.",
        state.conns.evicted.load(Ordering::Relaxed),
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

/// The answer of `GET /api/languages`.
#[derive(Serialize, ToSchema)]
pub struct Languages {
    /// Every configured language, by name.
    languages: Vec<crate::executor::LanguageInfo>,
}

/// The languages: whether each can run here, its toolchain's version, its default limits
#[utoipa::path(get, path = "/api/languages", tag = "evaluations",
    responses((status = 200, description = "Every configured language", body = Languages)))]
pub async fn languages(state: &State) -> Response<Body> {
    let answer = Languages {
        languages: state.service.languages().await,
    };
    json_response(StatusCode::OK, &to_value(&answer))
}

/// The answer of `GET /api/admin/sinks`.
#[derive(Serialize, ToSchema)]
pub struct Sinks {
    /// Every configured sink, in configuration order.
    sinks: Vec<SinkReport>,
}

/// Outbox sinks: cursor, backlog, lag, retries, dead letters
#[utoipa::path(get, path = "/api/admin/sinks", tag = "admin",
    responses((status = 200, description = "Every sink", body = Sinks)))]
pub fn sinks(state: &State) -> Response<Body> {
    let answer = Sinks {
        sinks: state.service.sinks(),
    };
    json_response(StatusCode::OK, &to_value(&answer))
}

/// The body of `POST /api/admin/sinks/{name}/replay`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ReplayRequest {
    /// Redeliver from this seq on (at least the oldest retained seq, at most head + 1).
    #[schema(minimum = 1)]
    from_seq: u64,
}

/// The answer of a replay.
#[derive(Serialize, ToSchema)]
pub struct Replayed {
    /// The sink.
    sink: String,
    /// Its cursor now (`from_seq` - 1): delivery resumes after it.
    cursor: u64,
    /// As requested.
    from_seq: u64,
}

/// The body as a JSON object, or a 422 naming `body`.
fn object(v: &Value) -> Result<&serde_json::Map<String, Value>, ApiError> {
    v.as_object()
        .ok_or_else(|| ApiError::invalid_field("body", "the body must be a JSON object"))
}

/// Redeliver a sink's events from a seq (within the retained log)
#[utoipa::path(post, path = "/api/admin/sinks/{name}/replay", tag = "admin",
    params(("name" = String, Path, description = "A configured sink (`file`, `redis`, `postgres`)")),
    request_body(content = ReplayRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "Cursor moved", body = Replayed),
        (status = 404, response = E404),
        (status = 500, response = E500),
    ))]
pub async fn replay(
    state: &Arc<State>,
    name: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let body = read_json(state, req).await?;
    let from = object(&body.value)?
        .get("from_seq")
        .and_then(crate::model::whole_number)
        .filter(|n| *n >= 1)
        .ok_or_else(|| {
            ApiError::invalid_field("from_seq", "`from_seq` must be a positive integer")
        })?;
    let cursor = state.service.replay(name, from).await?;
    let answer = Replayed {
        sink: name.to_string(),
        cursor,
        from_seq: from,
    };
    Ok(json_response(StatusCode::OK, &to_value(&answer)))
}

/// Most dead letters in one answer.
pub const MAX_DEAD_LETTERS: usize = 1000;

/// `GET /api/admin/dead-letters` parameters. A parameter that is given must have a
/// valid, non-empty value.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeadLetterParams {
    /// Only this sink's dead letters.
    #[param(value_type = Option<String>, min_length = 1)]
    sink: Option<String>,
    /// At most this many (default 100).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 1000)] // = MAX_DEAD_LETTERS
    limit: Option<String>,
}

/// The answer of `GET /api/admin/dead-letters`.
#[derive(Serialize, ToSchema)]
pub struct DeadLetters {
    /// Oldest first.
    dead_letters: Vec<DeadLetter>,
}

/// Poison events parked per sink
#[utoipa::path(get, path = "/api/admin/dead-letters", tag = "admin",
    params(DeadLetterParams),
    responses(
        (status = 200, description = "Dead letters, oldest first", body = DeadLetters),
        (status = 500, response = E500),
    ))]
pub fn dead_letters(state: &State, query: Option<&str>) -> Result<Response<Body>, ApiError> {
    let q: DeadLetterParams = query::parse(query)?;
    let limit = match q.limit {
        None => 100,
        Some(l) => match crate::service::digits(&l) {
            Some(n) if (1..=MAX_DEAD_LETTERS).contains(&n) => n,
            _ => {
                return Err(ApiError::invalid_field(
                    "limit",
                    format!("`limit` must be an integer from 1 to {MAX_DEAD_LETTERS}"),
                ))
            }
        },
    };
    if q.sink.as_deref() == Some("") {
        return Err(ApiError::invalid_field(
            "sink",
            "`sink` must name a sink (leave it out for all)",
        ));
    }
    let items = state.service.dead_letters(q.sink.as_deref(), limit)?;
    let answer = DeadLetters {
        dead_letters: items,
    };
    Ok(json_response(StatusCode::OK, &to_value(&answer)))
}

/// The body of `POST /api/admin/backup`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct BackupRequest {
    /// A new directory inside the server's `backup_dir`: a relative name, or an absolute
    /// path within it (no `..`); absent or `null`: the current time.
    path: Option<String>,
}

/// Write a consistent copy of the store under `backup_dir`
///
/// The server writes it, only under its `backup_dir`; the directory becomes a usable
/// `--data-dir`.
#[utoipa::path(post, path = "/api/admin/backup", tag = "admin",
    request_body(content = BackupRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "Written and verified", body = BackupInfo),
        (status = 409, response = E409),
        (status = 500, response = E500),
    ))]
pub async fn backup(
    state: &Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let body = read_json(state, req).await?;
    let name = match object(&body.value)?.get("path") {
        None | Some(Value::Null) => None,
        Some(Value::String(p)) => Some(p.as_str()),
        Some(_) => {
            return Err(ApiError::invalid_field(
                "path",
                "`path` must be a string: a name inside the backup directory",
            ))
        }
    };
    let info = state.service.backup(name).await?;
    Ok(json_response(StatusCode::OK, &to_value(&info)))
}

/// Whether the queue is paused.
#[derive(Serialize, ToSchema)]
pub struct Paused {
    /// `true`: submissions are accepted, nothing starts.
    paused: bool,
}

/// Stop starting evaluations (submissions are still accepted)
#[utoipa::path(post, path = "/api/admin/queue/pause", tag = "admin",
    responses((status = 200, description = "Paused", body = Paused)))]
pub fn pause(state: &State) -> Response<Body> {
    pause_resume(state, true)
}

/// Start evaluations again
#[utoipa::path(post, path = "/api/admin/queue/resume", tag = "admin",
    responses((status = 200, description = "Resumed", body = Paused)))]
pub fn resume(state: &State) -> Response<Body> {
    pause_resume(state, false)
}

fn pause_resume(state: &State, pause: bool) -> Response<Body> {
    let paused = state.service.set_paused(pause);
    json_response(StatusCode::OK, &to_value(&Paused { paused }))
}
