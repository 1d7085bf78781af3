//! The open connections, for `http.max_connections` under abuse.
//!
//! Every connection is registered with the time it was accepted and the number of its
//! requests in progress (from the moment its request headers are complete until its
//! response body is dropped, so an event stream counts as busy for its whole life). At the
//! cap, the accept loop makes room by closing the oldest connection with no request in
//! progress: a half-sent request (slowloris) or an idle keep-alive. So a stream of
//! half-open connections, even from the same address as well-formed ones (a reverse
//! proxy, loopback), cannot keep a new request from being answered; each of them also
//! dies on its own after `http.header_timeout_secs`.

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// One connection.
pub struct Conn {
    id: u64,
    accepted: Instant,
    /// Requests whose headers arrived and whose response is not finished.
    active: AtomicUsize,
    /// Fired to close the connection.
    pub kill: CancellationToken,
}

/// The registry.
pub struct Conns {
    map: Mutex<HashMap<u64, Arc<Conn>>>,
    next: AtomicU64,
    /// Signalled when a connection closes or a request finishes.
    pub changed: Notify,
    /// Connections closed to make room.
    pub evicted: AtomicU64,
}

impl Default for Conns {
    fn default() -> Self {
        Conns {
            map: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
            changed: Notify::new(),
            evicted: AtomicU64::new(0),
        }
    }
}

impl Conns {
    /// Open connections.
    pub fn len(&self) -> usize {
        self.map.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// Register a new connection.
    pub fn add(&self) -> Arc<Conn> {
        let c = Arc::new(Conn {
            id: self.next.fetch_add(1, Ordering::Relaxed),
            accepted: Instant::now(),
            active: AtomicUsize::new(0),
            kill: CancellationToken::new(),
        });
        if let Ok(mut m) = self.map.lock() {
            m.insert(c.id, c.clone());
        }
        c
    }

    /// Forget a closed connection.
    pub fn remove(&self, c: &Conn) {
        if let Ok(mut m) = self.map.lock() {
            m.remove(&c.id);
        }
        self.changed.notify_waiters();
    }

    /// Close the oldest connection with no request in progress; false if every open
    /// connection is busy with a request.
    pub fn evict_oldest_idle(&self) -> bool {
        let victim = {
            let Ok(mut m) = self.map.lock() else {
                return false;
            };
            let oldest = m
                .values()
                .filter(|c| c.active.load(Ordering::SeqCst) == 0)
                .min_by_key(|c| c.accepted)
                .map(|c| c.id);
            oldest.and_then(|id| m.remove(&id))
        };
        match victim {
            Some(c) => {
                c.kill.cancel();
                self.evicted.fetch_add(1, Ordering::Relaxed);
                true
            }
            None => false,
        }
    }
}

/// Marks a request of a connection as in progress until dropped.
pub struct InProgress {
    conn: Arc<Conn>,
    conns: Arc<Conns>,
}

impl InProgress {
    /// A request of `conn` has its headers.
    pub fn start(conn: Arc<Conn>, conns: Arc<Conns>) -> InProgress {
        conn.active.fetch_add(1, Ordering::SeqCst);
        InProgress { conn, conns }
    }
}

impl Drop for InProgress {
    fn drop(&mut self) {
        self.conn.active.fetch_sub(1, Ordering::SeqCst);
        self.conns.changed.notify_waiters();
    }
}

/// A response body that keeps its request marked in progress until it is dropped (fully
/// written, or abandoned).
pub struct Tracked<B> {
    inner: B,
    _guard: InProgress,
}

impl<B> Tracked<B> {
    pub fn new(inner: B, guard: InProgress) -> Tracked<B> {
        Tracked {
            inner,
            _guard: guard,
        }
    }
}

impl<B> HttpBody for Tracked<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Box a tracked body again as the handlers' body type.
pub fn track(body: super::Body, guard: InProgress) -> super::Body {
    Tracked::new(body, guard).boxed()
}
