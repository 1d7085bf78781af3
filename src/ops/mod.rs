//! Operations plumbing: logging setup, metrics primitives and rendering, the seam through
//! which every subsystem reports its health and metrics ([`report`]), the runner of
//! background loops ([`worker`]), signals, systemd notifications and test failpoints.
//! Nothing here owns product state; it observes and drives the other modules.

pub mod failpoint;
pub mod logging;
pub mod metrics;
pub mod reload;
pub mod report;
pub mod signals;
pub mod systemd;
pub mod worker;
