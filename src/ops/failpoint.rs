//! Crash points for tests: `CRUCIBLE_FAILPOINTS="store.after_flush=3,relay.after_deliver=1"`
//! makes the process abort (like `kill -9`: no destructors, no flush) the Nth time it
//! passes the named point. Unset (always, in production), a hit is one lookup in an
//! empty map.
//!
//! Points: `store.before_flush` (batch applied, not flushed), `store.after_flush`
//! (flushed, nobody answered yet), `relay.after_deliver` (sink has the events, cursor
//! not saved), `outbox.prune` (after a pruning batch), `outbox.replay` (replay cursor
//! written, relay not yet told), `retention.prune` (after a batch of evaluations was
//! removed by retention).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

static POINTS: OnceLock<HashMap<String, AtomicU64>> = OnceLock::new();

fn points() -> &'static HashMap<String, AtomicU64> {
    POINTS.get_or_init(|| {
        let spec = std::env::var("CRUCIBLE_FAILPOINTS").unwrap_or_default();
        spec.split(',')
            .filter_map(|p| {
                let (name, n) = p.split_once('=')?;
                let n = n.trim().parse::<u64>().ok().filter(|n| *n > 0)?;
                Some((name.trim().to_string(), AtomicU64::new(n)))
            })
            .collect()
    })
}

/// Abort the process if `name` is armed and this is the hit it is armed for.
pub fn hit(name: &str) {
    if let Some(c) = points().get(name) {
        if c.fetch_sub(1, Ordering::SeqCst) == 1 {
            eprintln!("crucible: failpoint {name} reached: aborting");
            std::process::abort();
        }
    }
}
