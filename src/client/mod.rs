//! Clients of a running appliance: a small HTTP client for the API (plain HTTP on a local
//! address), used by the client commands of the CLI and by the integration tests, and
//! [`tail`], the Redis stream consumer behind `crucible events tail`.

pub mod tail;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::{connect::HttpConnector, Client as Hyper};
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use std::time::Duration;

/// Client errors.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("bad server URL `{0}` (expected http://host:port)")]
    Url(String),
    #[error("cannot reach the server: {0}")]
    Connect(String),
    #[error("cannot read the answer: {0}")]
    Body(String),
    #[error("the answer is not JSON: {0}")]
    Json(String),
}

/// An answer: status, headers and the whole body.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    /// The body as JSON.
    pub fn json(&self) -> Result<Value, ClientError> {
        serde_json::from_slice(&self.body).map_err(|e| ClientError::Json(e.to_string()))
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// `error.code` of an error answer, if any.
    pub fn error_code(&self) -> Option<String> {
        self.json()
            .ok()
            .and_then(|v| v["error"]["code"].as_str().map(|s| s.to_string()))
    }
}

/// The API client.
#[derive(Clone)]
pub struct Client {
    base: String,
    token: Option<String>,
    http: Hyper<HttpConnector, Full<Bytes>>,
}

impl Client {
    /// A client for `base` (e.g. `http://127.0.0.1:8080`).
    pub fn new(base: &str, token: Option<String>) -> Result<Client, ClientError> {
        let base = base.trim_end_matches('/').to_string();
        if !base.starts_with("http://") || base.parse::<http::Uri>().is_err() {
            return Err(ClientError::Url(base));
        }
        let mut conn = HttpConnector::new();
        conn.set_nodelay(true);
        conn.set_connect_timeout(Some(Duration::from_secs(10)));
        let http = Hyper::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(conn);
        Ok(Client { base, token, http })
    }

    /// The server's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    fn build(
        &self,
        method: Method,
        path: &str,
        body: Option<(&str, Bytes)>,
        headers: &[(&str, &str)],
    ) -> Result<Request<Full<Bytes>>, ClientError> {
        let uri = format!("{}{}", self.base, path);
        let mut b = Request::builder().method(method).uri(&uri);
        if let Some(t) = &self.token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let body = match body {
            Some((ct, bytes)) => {
                b = b.header("content-type", ct);
                bytes
            }
            None => Bytes::new(),
        };
        b.body(Full::new(body))
            .map_err(|e| ClientError::Url(format!("{uri}: {e}")))
    }

    /// Send a request and read the whole answer.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<(&str, Bytes)>,
        headers: &[(&str, &str)],
    ) -> Result<Reply, ClientError> {
        let req = self.build(method, path, body, headers)?;
        let resp = self
            .http
            .request(req)
            .await
            .map_err(|e| ClientError::Connect(format!("{}: {e}", self.base)))?;
        let (parts, body) = resp.into_parts();
        let bytes = body
            .collect()
            .await
            .map_err(|e| ClientError::Body(e.to_string()))?
            .to_bytes();
        Ok(Reply {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body: bytes,
        })
    }

    /// GET `path`.
    pub async fn get(&self, path: &str) -> Result<Reply, ClientError> {
        self.request(Method::GET, path, None, &[]).await
    }

    /// POST a JSON value.
    pub async fn post_json(&self, path: &str, v: &Value) -> Result<Reply, ClientError> {
        let bytes = Bytes::from(serde_json::to_vec(v).unwrap_or_default());
        self.request(Method::POST, path, Some(("application/json", bytes)), &[])
            .await
    }

    /// Start a streaming GET (for `/api/events`); the caller reads the body frames.
    pub async fn stream(
        &self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<Response<Incoming>, ClientError> {
        let req = self.build(Method::GET, path, None, headers)?;
        self.http
            .request(req)
            .await
            .map_err(|e| ClientError::Connect(format!("{}: {e}", self.base)))
    }
}

/// Reads Server-Sent Events from a streaming response, one event at a time.
pub struct SseReader {
    body: Incoming,
    buf: String,
}

/// One SSE event.
#[derive(Debug, Clone, Default)]
pub struct SseEvent {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: String,
}

impl SseReader {
    /// Wrap a streaming response.
    pub fn new(resp: Response<Incoming>) -> SseReader {
        SseReader {
            body: resp.into_body(),
            buf: String::new(),
        }
    }

    /// The next event (comments skipped); `None` when the stream ends.
    pub async fn next(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(i) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..i + 2).collect();
                let mut ev = SseEvent::default();
                let mut data = Vec::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id: ") {
                        ev.id = Some(v.to_string());
                    } else if let Some(v) = line.strip_prefix("event: ") {
                        ev.event = Some(v.to_string());
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data.push(v.to_string());
                    }
                }
                if ev.id.is_none() && ev.event.is_none() && data.is_empty() {
                    continue;
                }
                ev.data = data.join("\n");
                return Some(ev);
            }
            match self.body.frame().await {
                Some(Ok(f)) => {
                    if let Ok(d) = f.into_data() {
                        self.buf.push_str(&String::from_utf8_lossy(&d));
                    }
                }
                _ => return None,
            }
        }
    }
}
