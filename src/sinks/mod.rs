//! Sinks: the one place that talks to each external destination of events. Each
//! implements [`crate::outbox::Sink`]; the outbox relays call them.

pub mod file;
pub mod postgres;
pub mod redis;
