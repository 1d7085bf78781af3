//! Integration tests: the real `crucible` binary over HTTP, one module per area, linked
//! into one test binary. Each test starts its own server on a loopback port with its own
//! data directory (see `common`).

mod abuse;
mod api;
mod bad_input;
mod cli;
mod common;
mod containment;
mod corpus;
mod crash;
mod disk;
mod docker;
mod hostile;
mod judge;
mod ops;
mod pool;
mod postgres;
mod redis_rr;
mod redis_sink;
mod seed;
mod sessions;
mod soak;
mod ui;
