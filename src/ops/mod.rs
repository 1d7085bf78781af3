//! Operations plumbing: logging setup, metrics primitives and rendering, signals.
//! Nothing here owns product state; it observes the other modules.

pub mod failpoint;
pub mod logging;
pub mod metrics;
pub mod report;
pub mod signals;
pub mod systemd;
pub mod worker;
