//! Benchmark: durable submissions/s and latency at 1, 16 and 64 connections, the effect of
//! the group-commit window, end-to-end `print(1)` through the sandbox next to bare
//! `python3 -c 'print(1)'`, and the appliance's RSS idle and under load.
//!
//! Run: `cargo bench --bench submit` (env `BENCH_SECS`, default 10 s per load step).
//! It starts the real release binary on loopback ports with throwaway data dirs and
//! prints a Markdown report (also written to `target/bench-submit.md`).

#[path = "../tests/integration/common.rs"]
mod common;
#[path = "measure.rs"]
mod measure;

use common::dir_size;
use common::Server;
use crucible::client::Client;
use measure::{env, machine, status_kb};
use serde_json::json;
use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// A server with `extra` config plus `BENCH_CONFIG`
/// (e.g. `BENCH_CONFIG=$'[store]\ncache_mb = 32'`).
fn start(rt: &tokio::runtime::Runtime, extra: &str) -> Server {
    let more = std::env::var("BENCH_CONFIG").unwrap_or_default();
    rt.block_on(Server::start(&format!("{extra}\n{more}")))
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

struct Load {
    rps: f64,
    p50: f64,
    p99: f64,
    errors: u64,
    peak_rss_mb: f64,
}

async fn load(server: &Server, conns: usize, secs: u64) -> Load {
    let body = bytes::Bytes::from(
        json!({"code": "print(1)", "language": "python", "timeout": 5}).to_string(),
    );
    let stop = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for _ in 0..conns {
        // One client per task: exactly one keep-alive connection each.
        let c = Client::new(server.client.base(), None).expect("client");
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(100_000);
            let mut errors = 0u64;
            while Instant::now() < stop {
                let t = Instant::now();
                let req = Some(("application/json", body.clone()));
                match c.request(http::Method::POST, "/api/eval", req, &[]).await {
                    Ok(r) if r.status == 202 => lat.push(t.elapsed().as_micros() as u64),
                    _ => errors += 1,
                }
            }
            (lat, errors)
        }));
    }
    let mut peak = 0u64;
    while Instant::now() < stop {
        peak = peak.max(status_kb(server.pid(), "VmRSS:"));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await.expect("join");
        all.extend(l);
        errors += e;
    }
    all.sort_unstable();
    Load {
        rps: all.len() as f64 / secs as f64,
        p50: pct(&all, 0.50),
        p99: pct(&all, 0.99),
        errors,
        peak_rss_mb: peak.max(status_kb(server.pid(), "VmRSS:")) as f64 / 1024.0,
    }
}

/// Submit `print(1)` and wait for its result; returns (end-to-end ms, runtime_ms).
async fn e2e(c: &Client) -> (f64, f64) {
    let t = Instant::now();
    let r = c
        .post_json("/api/eval", &json!({"code": "print(1)", "timeout": 10}))
        .await
        .expect("submit");
    let id = r.json().expect("json")["eval_id"]
        .as_str()
        .expect("id")
        .to_string();
    loop {
        let rec = c
            .get(&format!("/api/eval/{id}"))
            .await
            .expect("get")
            .json()
            .expect("json");
        if rec["status"] == "completed" {
            assert_eq!(rec["output"], "1\n");
            return (
                t.elapsed().as_secs_f64() * 1000.0,
                rec["runtime_ms"].as_f64().unwrap_or(0.0),
            );
        }
        assert!(rec["status"] != "failed", "{rec}");
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn p99f(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * 0.99).round() as usize]
}

fn main() {
    let secs: u64 = env("BENCH_SECS", 10);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Machine: {}; load generator on the same machine.\n",
        machine()
    );

    // Durable submissions: the queue is paused, so only the accept path is measured.
    let _ = writeln!(
        out,
        "### Durable submissions (`POST /api/eval`, 202 after the flush)\n"
    );
    let _ = writeln!(
        out,
        "| connections | submissions/s | p50 ms | p99 ms | errors | peak RSS MiB |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|");
    let s = start(&rt, "start_paused = true\nmax_queued = 100000000");
    let idle_rss = status_kb(s.pid(), "VmRSS:") as f64 / 1024.0;
    for conns in [1usize, 16, 64] {
        let l = rt.block_on(load(&s, conns, secs));
        let _ = writeln!(
            out,
            "| {conns} | {:.0} | {:.2} | {:.2} | {} | {:.1} |",
            l.rps, l.p50, l.p99, l.errors, l.peak_rss_mb
        );
    }
    let hwm = status_kb(s.pid(), "VmHWM:") as f64 / 1024.0;
    let disk = dir_size(&s.data_dir());
    drop(s);
    let _ = writeln!(
        out,
        "\nRSS idle after start: {idle_rss:.1} MiB; peak (VmHWM) over the whole run: {hwm:.1} MiB; store on disk afterwards: {:.0} MiB.\n",
        disk as f64 / 1048576.0
    );

    // The group-commit window.
    let _ = writeln!(
        out,
        "### Group-commit window (`store.flush_window_us`), 64 connections\n"
    );
    let _ = writeln!(out, "| flush_window_us | submissions/s | p50 ms | p99 ms |");
    let _ = writeln!(out, "|---|---|---|---|");
    for w in [0u64, 250, 1000] {
        let s = start(
            &rt,
            &format!("start_paused = true\nmax_queued = 100000000\n[store]\nflush_window_us = {w}"),
        );
        let l = rt.block_on(load(&s, 64, secs));
        let _ = writeln!(out, "| {w} | {:.0} | {:.2} | {:.2} |", l.rps, l.p50, l.p99);
    }

    // End to end through the sandbox vs bare python3.
    let runs = 40;
    let mut bare = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let o = Command::new("/usr/bin/python3")
            .args(["-I", "-B", "-c", "print(1)"])
            .output()
            .expect("python3");
        assert_eq!(o.stdout, b"1\n");
        bare.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let s = start(&rt, "");
    let c = s.client.clone();
    let (mut total, mut runtime) = (Vec::new(), Vec::new());
    rt.block_on(async {
        e2e(&c).await;
        for _ in 0..runs {
            let (t, r) = e2e(&c).await;
            total.push(t);
            runtime.push(r);
        }
    });
    drop(s);
    let _ = writeln!(
        out,
        "\n### `print(1)`: sandbox vs bare ({runs} sequential runs)\n"
    );
    let _ = writeln!(out, "| what | median ms | p99 ms |");
    let _ = writeln!(out, "|---|---|---|");
    let _ = writeln!(
        out,
        "| bare `/usr/bin/python3 -I -B -c 'print(1)'` | {:.1} | {:.1} |",
        median(&mut bare.clone()),
        p99f(&mut bare)
    );
    let _ = writeln!(
        out,
        "| crucible `runtime_ms` (helper + namespaces + python) | {:.1} | {:.1} |",
        median(&mut runtime.clone()),
        p99f(&mut runtime)
    );
    let _ = writeln!(
        out,
        "| crucible end to end (submit, run, poll until completed) | {:.1} | {:.1} |",
        median(&mut total.clone()),
        p99f(&mut total)
    );
    print!("{out}");
    let _ = std::fs::create_dir_all("target");
    let _ = std::fs::write(Path::new("target").join("bench-submit.md"), out);
}
