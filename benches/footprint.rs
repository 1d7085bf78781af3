//! Benchmark: the "1 GB" profile.
//!
//! 1. The appliance alone with 100,000 stored evaluations: peak RSS while accepting them
//!    and disk used per 100,000 evaluations.
//! 2. Appliance + Redis + PostgreSQL with the settings of packaging/examples/ + 2
//!    evaluations at a time that each hold 200 MB: the peak of the whole set's memory
//!    (PSS summed over every process: the appliance and its sandboxes, redis-server, the
//!    postmaster and its backends) while work flows through all of it.
//!
//! 3. The hostile program of the containment issue: 12 processes of 200 MiB each, every
//!    one under a per-process limit, 2 at a time, with the shipped profile's limits
//!    (`memory_mb = 256`, `workers = 2`): the peak of the appliance's tree (PSS) against
//!    workers x memory_mb + the appliance, the slowest /health answer meanwhile, and the
//!    verdicts; side by side with the same program on the host under per-process
//!    limits only (what the sandbox enforced before a cgroup held each run).
//!
//! Run: `cargo bench --bench footprint` (static build: `CRUCIBLE_BIN=target/x86_64-unknown-linux-musl/release/crucible`);
//! `cargo bench --bench footprint -- hostile` runs part 3 only.

#[path = "../tests/integration/common.rs"]
mod common;
#[path = "measure.rs"]
mod measure;

use common::dir_size;
use common::{PgServer, RedisServer, Server};
use measure::{pss_kb, status_kb, tree, tree_pss_kb};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

/// The containment issue's program: 12 children of 200 MiB, all touched, held together.
const HOG12: &str = r#"
import os, time
r, w = os.pipe()
kids = []
for _ in range(12):
    pid = os.fork()
    if pid == 0:
        b = bytearray(200 << 20)
        for i in range(0, len(b), 4096):
            b[i] = 1
        os.write(w, b"x")
        time.sleep(2)
        os._exit(0)
    kids.append(pid)
os.close(w)
os.read(r, 12)
for k in kids:
    os.waitpid(k, 0)
print("held 12 x 200 MiB")
"#;

async fn hostile(out: &mut String) {
    // Baseline: the program on the host under per-process limits only (256 MiB of address
    // space each would not stop it; 1 GiB leaves room for the interpreter).
    let file = std::env::temp_dir().join(format!("crucible-hog12-{}.py", std::process::id()));
    std::fs::write(&file, HOG12).expect("write");
    let mut child = std::process::Command::new("prlimit")
        .args(["--as=1073741824", "python3", "-I", "-B"])
        .arg(&file)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("prlimit");
    let mut base_peak = 0u64;
    while child.try_wait().expect("wait").is_none() {
        let total: u64 = tree_pss_kb(&[child.id()]);
        base_peak = base_peak.max(total);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = std::fs::remove_file(&file);

    let s = Server::start(
        "workers = 2
[limits]
memory_mb = 256",
    )
    .await;
    let mode = s.health().await["executor"]["limits"].clone();
    let mut ids = Vec::new();
    for _ in 0..6 {
        ids.push(s.submit(json!({"code": HOG12, "timeout": 60})).await);
    }
    let (mut peak, mut slowest) = (0u64, Duration::ZERO);
    let started = Instant::now();
    loop {
        let total: u64 = tree_pss_kb(&[s.pid()]);
        peak = peak.max(total);
        let t = Instant::now();
        let h = s.health().await;
        slowest = slowest.max(t.elapsed());
        if h["queue"]["depth"] == 0 && h["queue"]["running"] == 0 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(600), "stuck: {h}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut verdicts: HashMap<String, usize> = HashMap::new();
    for id in &ids {
        let r = s.record(id).await;
        let v = format!("{}/{}", r["status"], r["failure_reason"]).replace('"', "");
        *verdicts.entry(v).or_default() += 1;
    }
    let app_rss = status_kb(s.pid(), "VmHWM:");
    let _ = writeln!(
        out,
        "### The hostile program: 12 processes x 200 MiB, 2 runs at a time (limits: {mode})\n"
    );
    let _ = writeln!(out, "| | peak memory (PSS of the whole tree) |\n|---|---|");
    let _ = writeln!(
        out,
        "| one run on the host, per-process limits only (baseline) | {:.0} MiB |",
        base_peak as f64 / 1024.0
    );
    let _ = writeln!(
        out,
        "| the appliance + 2 such runs (`workers = 2`, `memory_mb = 256`) | {:.0} MiB (bound: 2 x 256 + the appliance's {:.0} MiB) |",
        peak as f64 / 1024.0,
        app_rss as f64 / 1024.0
    );
    let _ = writeln!(
        out,
        "\nRatio appliance-with-two-runs / one-unbounded-run: {:.2}. Verdicts of the 6 runs: {verdicts:?}. Slowest /health answer meanwhile: {} ms.\n",
        peak as f64 / base_peak.max(1) as f64,
        slowest.as_millis()
    );
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut out = String::new();
    let only_hostile = std::env::args().any(|a| a == "hostile");
    rt.block_on(async {
        hostile(&mut out).await;
        if only_hostile {
            return;
        }
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
                let app: u64 = tree_pss_kb(&[s.pid()]);
                let r: u64 = redis.pid().map(|p| tree_pss_kb(&[p])).unwrap_or(0);
                let p: u64 = pg.pid().map(|p| tree_pss_kb(&[p])).unwrap_or(0);
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
