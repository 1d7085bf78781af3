//! Benchmark: the "1 GB" profile.
//!
//! 1. The appliance alone with 100,000 stored evaluations: peak RSS while accepting them
//!    and disk used per 100,000 evaluations.
//! 2. Appliance + Redis + PostgreSQL with the settings of packaging/examples/ + 2
//!    evaluations at a time that each hold 200 MB: the peak of the whole set's memory
//!    (PSS summed over every process: the appliance and its sandboxes, redis-server, the
//!    postmaster and its backends) while work flows through all of it.
//!
//! Run: `cargo bench --bench footprint` (static build: `CRUCIBLE_BIN=target/x86_64-unknown-linux-musl/release/crucible`).

#[path = "../tests/integration/common.rs"]
mod common;

use common::{PgServer, RedisServer, Server};
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

fn status_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn pss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Pss:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// `roots` and all their descendants.
fn tree(roots: &[u32]) -> Vec<u32> {
    let mut parent: HashMap<u32, u32> = HashMap::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // pid (comm) state ppid ...
            if let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) {
                if let Some(ppid) = rest.split_whitespace().nth(1).and_then(|p| p.parse().ok()) {
                    parent.insert(pid, ppid);
                }
            }
        }
    }
    let mut set: HashSet<u32> = roots.iter().copied().collect();
    loop {
        let before = set.len();
        for (pid, ppid) in &parent {
            if set.contains(ppid) {
                set.insert(*pid);
            }
        }
        if set.len() == before {
            break;
        }
    }
    set.into_iter().collect()
}

fn dir_size(p: &Path) -> u64 {
    let mut total = 0;
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            let path = e.path();
            if path.is_dir() {
                total += dir_size(&path);
            } else if let Ok(m) = e.metadata() {
                total += m.len();
            }
        }
    }
    total
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut out = String::new();
    rt.block_on(async {
        // 1. 100,000 stored evaluations.
        let s = Server::start("start_paused = true\nmax_queued = 1000000").await;
        let batch: Vec<Value> = (0..100)
            .map(|i| json!({"code": format!("print({i})"), "metadata": {"user": "bench"}}))
            .collect();
        let body = json!({ "evaluations": batch });
        let before = dir_size(&s.data_dir().join("store"));
        for _ in 0..1000 {
            assert_eq!(s.post("/api/eval-batch", &body).await.status, 202);
        }
        let after = dir_size(&s.data_dir().join("store"));
        let hwm = status_kb(s.pid(), "VmHWM:");
        let rss = status_kb(s.pid(), "VmRSS:");
        let _ = writeln!(out, "### The appliance with 100,000 stored evaluations\n");
        let _ = writeln!(out, "| measure | value |\n|---|---|");
        let _ = writeln!(out, "| peak RSS while accepting them (VmHWM) | {:.1} MiB |", hwm as f64 / 1024.0);
        let _ = writeln!(out, "| RSS afterwards | {:.1} MiB |", rss as f64 / 1024.0);
        let _ = writeln!(
            out,
            "| disk per 100,000 evaluations (queued: record + event, before pruning) | {:.0} MiB |",
            (after - before) as f64 / 1048576.0
        );
        drop(s);

        // 2. The whole 1 GB profile under load.
        let pg = PgServer::start_with(&[
            "max_connections=20",
            "shared_buffers=64MB",
            "effective_cache_size=256MB",
            "work_mem=2MB",
            "maintenance_work_mem=32MB",
            "wal_buffers=4MB",
            "max_wal_size=256MB",
        ]);
        let redis = RedisServer::start_volatile(common::free_port());
        redis.cli(&["CONFIG", "SET", "maxmemory", "128mb"]);
        let s = Server::start_with(
            "workers = 2\n[redis]\nstream_maxlen = 100000",
            &[("REDIS_URL", &redis.url()), ("DATABASE_URL", &pg.url())],
        )
        .await;
        let hog = "import time\nx = bytearray(200 * 1024 * 1024)\nfor i in range(0, len(x), 4096): x[i] = 1\ntime.sleep(1)\nprint('held 200 MB')";
        let roots = |s: &Server| {
            let mut r = vec![s.pid()];
            r.extend(redis.pid());
            r.extend(pg.pid());
            r
        };
        let mut peak = 0u64;
        let mut peak_parts = (0u64, 0u64, 0u64);
        let mut ids = Vec::new();
        let started = Instant::now();
        // 20 memory hogs (2 at a time) plus a stream of small evaluations.
        for i in 0..20 {
            ids.push(s.submit(json!({"code": hog, "timeout": 30})).await);
            for j in 0..20 {
                ids.push(s.submit(json!({"code": format!("print({i}*{j})")})).await);
            }
        }
        loop {
            let pids = tree(&roots(&s));
            let total: u64 = pids.iter().map(|p| pss_kb(*p)).sum();
            if total > peak {
                peak = total;
                let app: u64 = tree(&[s.pid()]).iter().map(|p| pss_kb(*p)).sum();
                let r: u64 = redis.pid().map(|p| tree(&[p]).iter().map(|q| pss_kb(*q)).sum()).unwrap_or(0);
                let p: u64 = pg.pid().map(|p| tree(&[p]).iter().map(|q| pss_kb(*q)).sum()).unwrap_or(0);
                peak_parts = (app, r, p);
            }
            let h = s.health().await;
            let idle = h["queue"]["depth"] == 0 && h["queue"]["running"] == 0;
            let synced = h["sinks"]["postgres"]["backlog"] == 0 && h["sinks"]["redis"]["backlog"] == 0;
            if idle && synced {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(600), "did not finish: {h}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let completed = {
            let mut n = 0;
            for id in &ids {
                if s.record(id).await["status"] == "completed" {
                    n += 1;
                }
            }
            n
        };
        let hwm = status_kb(s.pid(), "VmHWM:");
        let _ = writeln!(
            out,
            "\n### Appliance + Redis + PostgreSQL + 2 evaluations holding 200 MB each\n"
        );
        let _ = writeln!(
            out,
            "{} evaluations ({} completed: 20 that hold 200 MB for 1 s, 2 at a time, and 400 small ones), delivered to Redis and PostgreSQL; memory sampled every 100 ms as PSS summed over every process:\n",
            ids.len(),
            completed
        );
        let _ = writeln!(out, "| at the peak | MiB |\n|---|---|");
        let _ = writeln!(out, "| appliance + its sandboxes | {:.0} |", peak_parts.0 as f64 / 1024.0);
        let _ = writeln!(out, "| redis-server (maxmemory 128mb) | {:.0} |", peak_parts.1 as f64 / 1024.0);
        let _ = writeln!(out, "| PostgreSQL (shared_buffers 64MB, 20 connections) | {:.0} |", peak_parts.2 as f64 / 1024.0);
        let _ = writeln!(out, "| **total** | **{:.0}** |", peak as f64 / 1024.0);
        let _ = writeln!(out, "\nThe appliance process alone peaked at {:.1} MiB RSS (VmHWM).", hwm as f64 / 1024.0);
    });
    print!("{out}");
    let _ = std::fs::create_dir_all("target");
    let _ = std::fs::write("target/bench-footprint.md", out);
}
