//! Benchmark: the Docker executor.
//!
//! Side by side, in one run: end-to-end latency of `print(1)` through crucible (cold: a
//! container created per evaluation; warm: from the warm pool) against
//! `docker run --rm --network none IMAGE python3 -c 'print(1)'`, and evaluations/s at
//! concurrency 2, 4 and 8.
//!
//! Run: `cargo bench --bench docker` (needs the test image: `tests/images.sh`).
//! Env `BENCH_RUNS` (default 30 sequential runs per latency row).

#[path = "../tests/integration/common.rs"]
mod common;
#[path = "measure.rs"]
mod measure;

use common::{docker_config, test_image, Server};
use measure::env;
use serde_json::json;
use std::fmt::Write as _;
use std::process::Command;
use std::time::{Duration, Instant};

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

async fn e2e(s: &Server) -> f64 {
    let t = Instant::now();
    let id = s.submit(json!({"code": "print(1)", "timeout": 30})).await;
    loop {
        let r = s.record(&id).await;
        match r["status"].as_str() {
            Some("completed") => return t.elapsed().as_secs_f64() * 1000.0,
            Some("failed") | Some("cancelled") => panic!("{r}"),
            _ => tokio::time::sleep(Duration::from_millis(2)).await,
        }
    }
}

/// Wait until `n` warm containers of the server's node exist.
async fn wait_warm(s: &Server, n: usize) {
    let node = s.health().await["node"].as_str().unwrap_or("").to_string();
    let started = Instant::now();
    loop {
        let o = Command::new("docker")
            .args(["ps", "-aq", "--filter"])
            .arg(format!("label=crucible.node={node}"))
            .args(["--filter", "label=crucible.eval_id=warm"])
            .output()
            .expect("docker ps");
        if String::from_utf8_lossy(&o.stdout).lines().count() >= n {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "pool not filled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn main() {
    let runs: usize = env("BENCH_RUNS", 30);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let image = test_image();
    let mut out = String::new();

    // Raw docker run.
    let mut raw = Vec::new();
    for _ in 0..runs + 1 {
        let t = Instant::now();
        let o = Command::new("docker")
            .args([
                "run",
                "--rm",
                "--network",
                "none",
                &image,
                "python3",
                "-c",
                "print(1)",
            ])
            .output()
            .expect("docker run");
        assert_eq!(o.stdout, b"1\n", "{}", String::from_utf8_lossy(&o.stderr));
        raw.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    raw.remove(0);

    let (mut cold, mut warm, hits) = rt.block_on(async {
        let s = Server::start(&docker_config("workers = 1")).await;
        e2e(&s).await;
        let mut cold = Vec::new();
        for _ in 0..runs {
            cold.push(e2e(&s).await);
        }
        drop(s);
        let s = Server::start(&docker_config("workers = 1\n[docker]\nwarm_pool = 2")).await;
        let mut warm = Vec::new();
        wait_warm(&s, 2).await;
        for _ in 0..runs {
            // Measure the steady state of a pool that keeps up: wait for the refill.
            wait_warm(&s, 1).await;
            warm.push(e2e(&s).await);
        }
        let m = s.get("/metrics").await.text();
        let hits = m
            .lines()
            .find(|l| l.starts_with("crucible_docker_warm_hits_total "))
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap_or("?")
            .to_string();
        (cold, warm, hits)
    });
    let _ = writeln!(
        out,
        "### `print(1)` end to end ({runs} sequential runs each, image {image})\n"
    );
    let _ = writeln!(out, "| path | median ms | p99 ms |\n|---|---|---|");
    let rm = pct(&mut raw, 0.5);
    let _ = writeln!(
        out,
        "| `docker run --rm --network none IMAGE python3 -c 'print(1)'` | {rm:.0} | {:.0} |",
        pct(&mut raw, 0.99)
    );
    let cm = pct(&mut cold, 0.5);
    let _ = writeln!(
        out,
        "| crucible, cold (create + start per evaluation; submit and poll over HTTP) | {cm:.0} ({:+.0} %) | {:.0} |",
        (cm / rm - 1.0) * 100.0,
        pct(&mut cold, 0.99)
    );
    let wm = pct(&mut warm, 0.5);
    let _ = writeln!(
        out,
        "| crucible, warm pool (container created and started ahead; {hits} pool hits) | {wm:.0} ({:.0} % of docker run) | {:.0} |",
        wm / rm * 100.0,
        pct(&mut warm, 0.99)
    );

    let _ = writeln!(
        out,
        "\n### Evaluations/s (40 `print(1)` per row, workers = concurrency)\n"
    );
    let _ = writeln!(
        out,
        "| concurrency | cold eval/s | warm pool (= concurrency) eval/s |\n|---|---|---|"
    );
    for c in [2usize, 4, 8] {
        let mut row = Vec::new();
        for warm in [0usize, c] {
            let rate = rt.block_on(async {
                let s = Server::start(&docker_config(&format!(
                    "workers = {c}\nmax_queued = 1000\n[docker]\nwarm_pool = {warm}"
                )))
                .await;
                if warm > 0 {
                    wait_warm(&s, warm).await;
                }
                let t = Instant::now();
                let items: Vec<_> = (0..40)
                    .map(|_| json!({"code": "print(1)", "timeout": 60}))
                    .collect();
                let r = s
                    .post("/api/eval-batch", &json!({"evaluations": items}))
                    .await;
                let ids: Vec<String> = r.json().expect("json")["evaluations"]
                    .as_array()
                    .expect("array")
                    .iter()
                    .map(|e| e["eval_id"].as_str().unwrap_or("").to_string())
                    .collect();
                for id in &ids {
                    let rec = s.wait_terminal(id).await;
                    assert_eq!(rec["status"], "completed", "{rec}");
                }
                40.0 / t.elapsed().as_secs_f64()
            });
            row.push(rate);
        }
        let _ = writeln!(out, "| {c} | {:.1} | {:.1} |", row[0], row[1]);
    }
    print!("{out}");
    let _ = std::fs::create_dir_all("target");
    let _ = std::fs::write("target/bench-docker.md", out);
}
