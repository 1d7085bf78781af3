//! The API gateway: a hyper 1.x HTTP/1.1 server with the JSON API, the SSE event stream,
//! /health, /metrics and the OpenAPI document.
//!
//! `routes` is the table of every route (matched by `matchit`), `query` reads query
//! strings into typed structs, `api` and `sse` are the handlers, `openapi` generates
//! the document from the types, the handlers' attributes and the route table.
//!
//! It validates input, asks the store and the queue to act, and shapes answers. It never
//! writes state itself and never runs code. Bodies are capped, connections are capped by
//! a semaphore before `accept`, and shutdown is graceful (in-flight requests finish, event
//! streams end).

mod api;
pub(crate) mod conns;
mod error;
mod openapi;
mod query;
mod routes;
mod sse;
mod ui;

pub use crate::error::ApiError;

use crate::config::Config;
use crate::ops::metrics::{Histogram, LabeledCounter};
use crate::ops::report::Reporters;
use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use routes::{Call, QueryRule, Resolved};
use std::convert::Infallible;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Response body type of every handler.
pub type Body = BoxBody<Bytes, Infallible>;

/// HTTP counters.
#[derive(Debug)]
pub struct HttpStats {
    /// Requests by route and status code.
    pub requests: LabeledCounter,
    /// Request latency.
    pub latency: Histogram,
    /// Open SSE streams.
    pub sse_clients: AtomicU64,
}

impl Default for HttpStats {
    fn default() -> Self {
        HttpStats {
            requests: LabeledCounter::default(),
            latency: Histogram::new(&[
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0,
            ]),
            sse_clients: AtomicU64::new(0),
        }
    }
}

/// Everything a handler can reach.
pub struct State {
    /// The transport-independent operations.
    pub service: Arc<crate::service::Service>,
    /// Every subsystem's /health entry and /metrics rows.
    pub reporters: Reporters,
    pub cfg: Arc<Config>,
    pub started: Instant,
    pub shutdown: CancellationToken,
    pub stats: HttpStats,
    /// Request-body memory budget, in KiB permits (`http.max_inflight_body_mb`).
    pub body_budget: Arc<Semaphore>,
    /// Open connections (for the cap under abuse).
    pub conns: Arc<conns::Conns>,
    /// The OpenAPI document, built on first request.
    pub openapi: std::sync::OnceLock<serde_json::Value>,
}

/// Serve HTTP on `listener` until `shutdown` fires; then let in-flight requests finish
/// (up to `drain`) and return.
pub async fn serve(state: Arc<State>, listener: TcpListener, drain: Duration) {
    let max = state.cfg.http.max_connections;
    let header_timeout = Duration::from_secs(state.cfg.http.header_timeout_secs);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let shutdown = state.shutdown.clone();
    let conns = state.conns.clone();
    'accept: loop {
        let (stream, _peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        // At the cap, make room: close the oldest connection that has no request in
        // progress (a half-sent request, an idle keep-alive). If every connection is busy
        // with a request, wait for one to finish.
        while conns.len() >= max && !conns.evict_oldest_idle() {
            let changed = conns.changed.notified();
            if conns.len() < max {
                break;
            }
            tokio::select! {
                _ = changed => {}
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = shutdown.cancelled() => break 'accept,
            }
        }
        let _ = stream.set_nodelay(true);
        let conn = conns.add();
        let local = stream.local_addr().ok();
        let st = state.clone();
        let this = conn.clone();
        let svc = hyper::service::service_fn(move |req| {
            let st = st.clone();
            let guard = conns::InProgress::start(this.clone(), st.conns.clone());
            async move {
                let resp = handle(st, req, local).await;
                Ok::<_, Infallible>(resp.map(|b| conns::track(b, guard)))
            }
        });
        let served = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout)
            .serve_connection(TokioIo::new(stream), svc);
        let served = graceful.watch(served);
        let registry = conns.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = served => {}
                _ = conn.kill.cancelled() => {}
            }
            registry.remove(&conn);
        });
    }
    drop(listener);
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("some HTTP connections did not finish in time");
    }
}

async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
    local: Option<std::net::SocketAddr>,
) -> Response<Body> {
    let t = Instant::now();
    let (route, resp) = if req
        .headers()
        .get_all(http::header::AUTHORIZATION)
        .iter()
        .count()
        > 1
    {
        // Which one would count? Refuse instead of guessing (a proxy and a client may both
        // have added one).
        (
            "other",
            Err(ApiError::new(
                crate::error::Code::BadRequest,
                "more than one Authorization header",
            )),
        )
    } else {
        route(&state, req, local).await
    };
    let mut resp = match resp {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    resp.headers_mut().insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    state
        .stats
        .requests
        .add(&[route, resp.status().as_str()], 1);
    state.stats.latency.observe(t.elapsed().as_secs_f64());
    resp
}

type Handled = (&'static str, Result<Response<Body>, ApiError>);

/// Find the route and call it: 404 for an unknown path, 405 (with `Allow`) for a known
/// path and another method, 401 without the token where one is needed.
async fn route(
    state: &Arc<State>,
    req: Request<Incoming>,
    local: Option<std::net::SocketAddr>,
) -> Handled {
    match routes::router().resolve(req.method(), req.uri().path()) {
        Resolved::NotFound => ("other", Err(ApiError::not_found("route"))),
        Resolved::WrongMethod(allow, label) => (label, Err(ApiError::method_not_allowed(allow))),
        Resolved::Route(r, param) => {
            if r.auth && !authorized(state, &req) {
                return (r.label, Err(ApiError::unauthorized()));
            }
            if r.query == QueryRule::None {
                if let Err(e) = query::parse::<query::NoParams>(req.uri().query()) {
                    return (r.label, Err(e));
                }
            }
            (
                r.label,
                (r.handler)(state, Call { req, param, local }).await,
            )
        }
    }
}

fn authorized<B>(state: &State, req: &Request<B>) -> bool {
    let cfg = state.service.live.get();
    let Some(token) = cfg.api_token.as_deref() else {
        return true;
    };
    let mut given = req.headers().get_all(http::header::AUTHORIZATION).iter();
    let (Some(h), None) = (given.next(), given.next()) else {
        return false;
    };
    let Ok(h) = h.to_str() else { return false };
    let given = h
        .strip_prefix("Bearer ")
        .or_else(|| h.strip_prefix("bearer "))
        .unwrap_or("")
        .trim();
    constant_time_eq(given.as_bytes(), token.as_bytes())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() != b.len()) as u8;
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= x ^ y;
    }
    diff == 0
}

/// A JSON response.
pub fn json_response(status: StatusCode, v: &serde_json::Value) -> Response<Body> {
    let bytes = serde_json::to_vec(v).unwrap_or_default();
    bytes_response(status, "application/json", Bytes::from(bytes))
}

/// A response with a body and content type.
pub fn bytes_response(
    status: StatusCode,
    content_type: &'static str,
    body: Bytes,
) -> Response<Body> {
    let mut r = Response::new(Full::new(body).map_err(|never| match never {}).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static(content_type),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"", b"a"));
    }
}
