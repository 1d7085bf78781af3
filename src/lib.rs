//! Crucible: a self-hosted code-evaluation appliance in one binary.
//!
//! The seed platform's services, one module each:
//!
//! | seed service                  | module |
//! |-------------------------------|--------|
//! | API gateway                   | [`gateway`] (hyper: JSON API, SSE, web UI, /health, /metrics, the generated OpenAPI document) |
//! | Queue service + queue worker  | [`queue`] (durable FIFO in the store, dispatcher, worker pool) |
//! | Executor + Docker proxy       | [`executor`]: [`executor::sandbox`] (namespaces, no daemon; [`executor::helper`] runs the code) and [`executor::docker`] (one hardened container per run) |
//! | Redis pub/sub                 | [`sinks::redis`] (PUBLISH + XADD), fed by an [`outbox`] relay |
//! | Storage worker + PostgreSQL   | [`sinks::postgres`] (batched idempotent upserts), fed by an [`outbox`] relay |
//! | Redis request/reply (seed 004)| [`redis_rr`], a second way in to [`service`] beside the gateway |
//! | (new) durable outbox          | [`store`] (single writer, group commit) + [`outbox`] (relays, pruning, replay) |
//!
//! Supporting modules: [`service`] (the operations, shared by every transport),
//! [`model`] (the record, its state machine and validation), [`events`] (the one event
//! type), [`error`] (the table of stable error codes), [`config`] (TOML < env < flags),
//! [`redis`] (the Redis connection), [`sinks::file`] (JSON-lines sink), [`ops`] (logging,
//! metrics, the health/metrics seam [`ops::report`], the background [`ops::worker`]
//! runner, signals, systemd), [`client`] (the HTTP client of the CLI and the tests, and
//! `events tail`), [`app`] (wiring and ordered shutdown), [`cli`] (the command line).
//!
//! Dependencies run one way: transports ([`gateway`], [`redis_rr`]) -> [`service`] ->
//! [`queue`] / [`outbox`] -> [`store`] -> [`model`] / [`events`]; relays -> [`sinks`];
//! every subsystem reports through [`ops::report`]; nothing imports upward.
//!
//! Rules the layout keeps: only [`store`] writes state; every state change and its event
//! are one atomic, flushed batch; only [`sinks`] deliver events to external destinations;
//! only the sandbox helper process ([`executor::helper`]) and the container run user code.

pub mod app;
pub mod cli;
pub mod client;
pub mod config;
pub mod error;
pub mod events;
pub mod executor;
pub mod gateway;
pub mod judge;
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
