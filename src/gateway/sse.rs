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

/// `GET /api/events` parameters.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsParams {
    eval_id: Option<String>,
    last_event_id: Option<String>,
}

pub fn events(state: &Arc<State>, req: &Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let q: EventsParams = super::query::parse(req.uri().query())?;
    let filter = q.eval_id.filter(|s| !s.is_empty());
    let from_header = req
        .headers()
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(|s| s.trim().to_string());
    let from = from_header.or(q.last_event_id);
    let mut cursor = match from.as_deref() {
        None | Some("") => state.service.head(),
        Some(s) => s.parse::<u64>().map_err(|_| {
            ApiError::invalid_field(
                "Last-Event-ID",
                "Last-Event-ID must be the seq of an event (an integer)",
            )
        })?,
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
