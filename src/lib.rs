//! Crucible: a self-hosted code-evaluation appliance in one binary.
//!
//! The seed platform's eight services, one module each:
//!
//! | seed service            | module                 |
//! |-------------------------|------------------------|
//! | API gateway             | [`gateway`] (hyper: JSON API, SSE, /health, /metrics) |
//! | Queue service + worker  | [`queue`] (durable FIFO in the store, worker pool)   |
//! | Executor + Docker proxy | [`executor`] (trait; [`executor::sandbox`] backend)   |
//! | Redis pub/sub, storage worker | [`outbox`] relays feeding [`sinks`]            |
//! | PostgreSQL              | (a sink, later)                                        |
//! | (new) durable outbox    | [`store`] (single writer, group commit) + [`outbox`]   |
//!
//! Supporting modules: [`service`] (the operations, shared by every transport),
//! [`error`] (errors with an HTTP status and a stable code), [`config`] (TOML < env < flags), [`model`] (the record and
//! validation), [`events`] (the one event type), [`ops`] (logging, metrics, signals),
//! [`client`] (the HTTP client used by the CLI and the tests), [`app`] (wiring and
//! ordered shutdown), [`cli`] (the command line).
//!
//! Rules the layout keeps: only [`store`] writes state; every state change and its event
//! are one atomic, flushed batch; only [`sinks`] talk to external destinations; only the
//! sandbox helper process ([`executor::helper`]) runs user code.

pub mod app;
pub mod cli;
pub mod client;
pub mod config;
pub mod error;
pub mod events;
pub mod executor;
pub mod gateway;
pub mod model;
pub mod ops;
pub mod outbox;
pub mod queue;
pub mod redis;
pub mod redis_rr;
pub mod service;
pub mod sinks;
pub mod store;

/// A boxed future, so traits with async methods stay object-safe.
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;
