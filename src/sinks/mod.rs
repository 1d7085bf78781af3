//! Sinks: the destinations of events, each a leaf that only delivers. Each implements
//! [`crate::outbox::Sink`] and is fed by its own outbox relay: [`file`] (JSON lines),
//! [`redis`] (PUBLISH + capped stream), [`postgres`] (a queryable copy). A sink never
//! calls the service or the store; its connection reports its own health
//! ([`crate::ops::report`]).

pub mod file;
pub mod postgres;
pub mod redis;
