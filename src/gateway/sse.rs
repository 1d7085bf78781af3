//! `GET /api/events`: Server-Sent Events from the durable log.
//!
//! The stream is driven by the log, not by an in-memory broadcast: on every new durable
//! head it reads the events after the last one sent, so a slow client never loses
//! events and a reconnecting client resumes exactly with `Last-Event-ID` (the seq).
//! Without it the stream starts at the current head (live events only).

use super::{ApiError, Body, State};
use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// `GET /api/events` parameters. A parameter that is given must have a valid,
/// non-empty value.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EventsParams {
    /// Only this evaluation's events.
    #[param(value_type = Option<String>, min_length = 1)]
    eval_id: Option<String>,
    /// Resume after this seq, for clients that cannot send `Last-Event-ID` (the header
    /// wins when both are given).
    #[param(value_type = Option<u64>, minimum = 0)]
    last_event_id: Option<String>,
}

/// One message of the stream, as an SSE client reads it.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct SseEvent {
    /// The event's `seq`: send it back as `Last-Event-ID` to resume after it.
    #[schema(pattern = "^[0-9]+$")]
    id: String,
    /// The event's `type`.
    event: crate::events::EventType,
    /// The event, as JSON.
    data: String,
}

/// A seq given as `Last-Event-ID` (or `last_event_id`): digits only. One beyond every
/// seq means "from the head".
fn parse_seq(s: &str, field: &str) -> Result<u64, ApiError> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ApiError::invalid_field(
            field,
            format!("{field} must be the seq of an event (digits only)"),
        ));
    }
    Ok(s.parse::<u64>().unwrap_or(u64::MAX))
}

/// Server-Sent Events from the durable log
///
/// A `text/event-stream` that does not end: each message has `id: <seq>`,
/// `event: <type>` and `data: <the Event as JSON>`; comments (`:`) keep the connection
/// alive. Without `Last-Event-ID` the stream starts at the current head (live events
/// only); with it, it resumes after that seq from the durable log (from the oldest
/// retained event if that seq was pruned, said in a comment).
#[utoipa::path(get, path = "/api/events", tag = "events",
    params(
        EventsParams,
        ("Last-Event-ID" = Option<u64>, Header, minimum = 0,
            description = "Resume after this seq (what an EventSource sends when it reconnects)"),
    ),
    responses(
        (status = 200, description = "The event stream; each message is one SseEvent",
            content_type = "text/event-stream", body = SseEvent),
    ))]
pub fn events(state: &Arc<State>, req: &Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let q: EventsParams = super::query::parse(req.uri().query())?;
    if q.eval_id.as_deref() == Some("") {
        return Err(ApiError::invalid_field(
            "eval_id",
            "`eval_id` must name an evaluation (leave it out for all)",
        ));
    }
    let filter = q.eval_id;
    let from_header = req
        .headers()
        .get("last-event-id")
        .map(|v| v.to_str().map(|s| s.trim().to_string()).unwrap_or_default());
    // Both are checked when both are given; the header wins. The parameter is named
    // like the header in errors: it is the same value.
    let from_param = q
        .last_event_id
        .map(|p| parse_seq(&p, "Last-Event-ID"))
        .transpose()?;
    let from_header = from_header
        .map(|h| parse_seq(&h, "Last-Event-ID"))
        .transpose()?;
    let mut cursor = match from_header.or(from_param) {
        Some(seq) => seq,
        None => state.service.head(),
    };
    let head = state.service.head();
    if cursor > head {
        cursor = head;
    }

    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(64);
    let st = state.clone();
    tokio::spawn(async move {
        st.stats.sse_clients.fetch_add(1, Ordering::Relaxed);
        pump(st.clone(), tx, cursor, filter).await;
        st.stats.sse_clients.fetch_sub(1, Ordering::Relaxed);
    });
    let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    let mut resp = Response::new(BodyExt::boxed(body));
    let h = resp.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache"),
    );
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(resp)
}

async fn send(tx: &mpsc::Sender<Result<Frame<Bytes>, Infallible>>, text: String) -> bool {
    tx.send(Ok(Frame::data(Bytes::from(text)))).await.is_ok()
}

async fn pump(
    st: Arc<State>,
    tx: mpsc::Sender<Result<Frame<Bytes>, Infallible>>,
    mut cursor: u64,
    filter: Option<String>,
) {
    let keepalive = Duration::from_secs(st.cfg.http.sse_keepalive_secs);
    let mut head_rx = st.service.subscribe_head();
    let oldest = st.service.oldest_seq().unwrap_or(1);
    // `after N`: the stream continues after seq N (a client that drops before the first
    // event resumes from there); `head`: the newest seq right now.
    let mut hello = format!(
        "retry: 2000\n: crucible event stream; after {cursor}; head {}\n",
        st.service.head()
    );
    if cursor + 1 < oldest {
        hello.push_str(&format!(
            ": events before seq {oldest} were pruned; resuming from there\n"
        ));
    }
    hello.push('\n');
    if !send(&tx, hello).await {
        return;
    }
    loop {
        let head = st.service.head();
        while cursor < head {
            let batch = match st.service.events(cursor, head, 256) {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %e, "event stream cannot read the log");
                    return;
                }
            };
            if batch.is_empty() {
                cursor = head;
                break;
            }
            for ev in batch {
                cursor = ev.seq;
                if filter.as_deref().is_some_and(|f| f != ev.eval_id) {
                    continue;
                }
                let frame = format!(
                    "id: {}\nevent: {}\ndata: {}\n\n",
                    ev.seq,
                    ev.kind.as_str(),
                    ev.to_json()
                );
                if !send(&tx, frame).await {
                    return;
                }
            }
        }
        tokio::select! {
            r = head_rx.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(keepalive) => {
                if !send(&tx, ": keep-alive\n\n".to_string()).await {
                    return;
                }
            }
            _ = tx.closed() => return,
            _ = st.shutdown.cancelled() => return,
        }
    }
}
