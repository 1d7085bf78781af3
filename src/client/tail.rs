//! `crucible events tail`: a consumer of the Redis event stream through a consumer group,
//! printing each event once (deduplicated on `event_id`) and acknowledging it.

use crate::config::RedisConfig;
use fred::prelude::{ClientLike, Error as FredError, StreamsInterface, Value as FredValue};
use std::collections::{HashMap, HashSet, VecDeque};
use std::io::Write;
use tokio_util::sync::CancellationToken;

/// Options of `crucible events tail`.
#[derive(Debug, Clone)]
pub struct TailOptions {
    pub url: String,
    pub stream: String,
    pub group: String,
    pub consumer: String,
    /// Stop after this many (distinct) events.
    pub count: Option<u64>,
    /// Claim entries other consumers left pending for longer than this.
    pub claim_idle_ms: u64,
}

/// Bounded memory of recently seen event ids (consumers dedupe on `event_id`).
struct Seen {
    set: HashSet<String>,
    order: VecDeque<String>,
    cap: usize,
}

impl Seen {
    fn insert(&mut self, id: &str) -> bool {
        if self.set.contains(id) {
            return false;
        }
        self.set.insert(id.to_string());
        self.order.push_back(id.to_string());
        if self.order.len() > self.cap {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        true
    }
}

type Entries = Vec<(String, HashMap<String, String>)>;

/// Entries of an XREADGROUP answer: `[[stream, [[id, [k, v, ...]], ...]], ...]`.
fn entries_of(v: FredValue) -> Entries {
    let mut out = Vec::new();
    for stream in v.into_array() {
        let mut parts = stream.into_array();
        if parts.len() < 2 {
            continue;
        }
        for entry in parts.swap_remove(1).into_array() {
            let mut e = entry.into_array();
            if e.len() < 2 {
                continue;
            }
            let kv = e.swap_remove(1).into_array();
            let id = e.swap_remove(0).as_string().unwrap_or_default();
            let mut fields = HashMap::new();
            let mut it = kv.into_iter();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                fields.insert(
                    k.as_string().unwrap_or_default(),
                    v.as_string().unwrap_or_default(),
                );
            }
            out.push((id, fields));
        }
    }
    out
}

/// Read the stream through a consumer group, print each event (one JSON line) and
/// acknowledge it. Entries this consumer received but never acknowledged (a crash) are
/// handled first; entries other consumers left pending for `claim_idle_ms` are claimed.
/// Duplicates (same `event_id`) are acknowledged but printed once.
pub async fn tail(
    opts: TailOptions,
    out: &mut (dyn Write + Send),
    shutdown: CancellationToken,
) -> Result<u64, String> {
    let cfg = RedisConfig {
        url: Some(opts.url.clone()),
        ..RedisConfig::default()
    };
    let client = crate::redis::builder(&opts.url, &cfg, true)?
        .build()
        .map_err(|e| e.to_string())?;
    client
        .init()
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", opts.url))?;
    let created: Result<(), FredError> = client
        .xgroup_create(opts.stream.as_str(), opts.group.as_str(), "0", true)
        .await;
    if let Err(e) = created {
        if !e.to_string().contains("BUSYGROUP") {
            return Err(format!("cannot create group {}: {e}", opts.group));
        }
    }
    let mut seen = Seen {
        set: HashSet::new(),
        order: VecDeque::new(),
        cap: 100_000,
    };
    let mut printed = 0u64;
    let done = |n: u64| opts.count.is_some_and(|c| n >= c);

    // 1. Our own pending entries (delivered before a crash, never acknowledged).
    // 2. Entries other consumers left pending too long.
    // 3. New entries.
    let mut phase = 0;
    let mut autoclaim_from = "0-0".to_string();
    while !done(printed) && !shutdown.is_cancelled() {
        let batch: Result<FredValue, FredError> = match phase {
            0 => {
                client
                    .xreadgroup(
                        opts.group.as_str(),
                        opts.consumer.as_str(),
                        Some(100),
                        None,
                        false,
                        opts.stream.as_str(),
                        "0",
                    )
                    .await
            }
            1 => {
                let r: Result<FredValue, FredError> = client
                    .xautoclaim(
                        opts.stream.as_str(),
                        opts.group.as_str(),
                        opts.consumer.as_str(),
                        opts.claim_idle_ms,
                        autoclaim_from.as_str(),
                        Some(100),
                        false,
                    )
                    .await;
                r.map(|v| {
                    // Reshape [next, entries, deleted] like an XREADGROUP answer.
                    let mut parts = v.into_array();
                    if !parts.is_empty() {
                        autoclaim_from = parts[0].as_string().unwrap_or_else(|| "0-0".into());
                    }
                    let entries = if parts.len() >= 2 {
                        parts.remove(1)
                    } else {
                        FredValue::Null
                    };
                    FredValue::Array(vec![FredValue::Array(vec![
                        FredValue::from(opts.stream.as_str()),
                        entries,
                    ])])
                })
            }
            _ => {
                tokio::select! {
                    r = client.xreadgroup(
                        opts.group.as_str(),
                        opts.consumer.as_str(),
                        Some(100),
                        Some(2000),
                        false,
                        opts.stream.as_str(),
                        ">",
                    ) => r,
                    _ = shutdown.cancelled() => break,
                }
            }
        };
        let entries = entries_of(batch.map_err(|e| format!("XREADGROUP failed: {e}"))?);
        if entries.is_empty() {
            if phase == 0 || (phase == 1 && autoclaim_from == "0-0") {
                phase += 1;
            }
            continue;
        }
        if phase == 1 && autoclaim_from == "0-0" {
            phase = 2;
        }
        let mut ids = Vec::with_capacity(entries.len());
        for (id, fields) in entries {
            if done(printed) {
                // Left pending: the next run of this consumer starts with them.
                break;
            }
            let event_id = fields.get("event_id").cloned().unwrap_or_default();
            if seen.insert(&event_id) {
                let line = fields.get("event").cloned().unwrap_or_default();
                writeln!(out, "{line}").map_err(|e| e.to_string())?;
                printed += 1;
            }
            ids.push(id);
        }
        if ids.is_empty() {
            break;
        }
        out.flush().map_err(|e| e.to_string())?;
        let acked: Result<i64, FredError> = client
            .xack(opts.stream.as_str(), opts.group.as_str(), ids)
            .await;
        acked.map_err(|e| format!("XACK failed: {e}"))?;
    }
    let _ = client.quit().await;
    Ok(printed)
}
