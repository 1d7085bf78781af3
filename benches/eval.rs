//! Benchmark: the speed of an evaluation itself, next to the same program run bare by the
//! same interpreter (or binary) on this machine, measured side by side in one run.
//!
//! - latency of `print(1)`, submit -> terminal, one at a time (median of `RUNS`), with a
//!   client that polls `GET /api/eval-status/{id}` every 2 ms and with one that asks
//!   `GET /api/eval/{id}?wait=10`; bare: `python3 -E -s -B main.py` from a file;
//! - throughput: 300 `print(1)` queued at once, N workers (N = 2 and 4), against 300 bare
//!   runs N at a time;
//! - a C `int main(){return 0;}` already compiled (a compile-cache hit) against the same
//!   binary run bare.
//!
//! Run: `cargo bench --bench eval` (env `RUNS`, default 30; `BENCH_CONFIG` adds config,
//! e.g. `BENCH_CONFIG=$'[sandbox]\npool = 0'` for the numbers without the pool). The report
//! is printed and written to `target/bench-eval.md`.

#[path = "../tests/integration/common.rs"]
mod common;

use common::Server;
use crucible::client::Client;
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const PY: &str = "print(1)\n";
const C: &str = "int main(void){return 0;}\n";

fn start(rt: &tokio::runtime::Runtime, extra: &str) -> Server {
    let more = std::env::var("BENCH_CONFIG").unwrap_or_default();
    rt.block_on(Server::start(&format!(
        "log_level = \"warn\"\nmax_queued = 100000\n{extra}\n{more}"
    )))
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s.get(s.len() / 2).copied().unwrap_or(0.0)
}

fn p90(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s.get(((s.len() as f64 - 1.0) * 0.9).round() as usize)
        .copied()
        .unwrap_or(0.0)
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

fn terminal(v: &Value) -> bool {
    matches!(
        v["status"].as_str(),
        Some("completed" | "failed" | "cancelled")
    )
}

async fn submit(c: &Client, body: &Value) -> String {
    let r = c.post_json("/api/eval", body).await.expect("submit");
    assert_eq!(r.status, 202, "{}", r.text());
    r.json().expect("json")["eval_id"]
        .as_str()
        .expect("id")
        .to_string()
}

/// How the client learns that an evaluation ended.
#[derive(Clone, Copy)]
enum Wait {
    /// `GET /api/eval-status/{id}` every 2 ms.
    Poll,
    /// `GET /api/eval/{id}?wait=10`.
    LongPoll,
}

async fn until_terminal(c: &Client, id: &str, how: Wait) -> Value {
    loop {
        let path = match how {
            Wait::Poll => format!("/api/eval-status/{id}"),
            Wait::LongPoll => format!("/api/eval/{id}?wait=10"),
        };
        let rec: Value = c.get(&path).await.expect("get").json().expect("json");
        if terminal(&rec) {
            return rec;
        }
        if let Wait::Poll = how {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

/// One evaluation end to end: (ms, the record).
async fn one(c: &Client, body: &Value, how: Wait) -> (f64, Value) {
    let t = Instant::now();
    let id = submit(c, body).await;
    let rec = until_terminal(c, &id, how).await;
    (ms(t), rec)
}

fn bare_run(argv: &[&str]) -> f64 {
    let t = Instant::now();
    let o = Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .expect("bare run");
    assert!(o.status.success(), "{argv:?}: {o:?}");
    ms(t)
}

/// `total` bare runs, `n` at a time: runs/s.
fn bare_throughput(argv: &[&str], n: usize, total: usize) -> f64 {
    let t = Instant::now();
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..n {
            s.spawn(|| {
                while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < total {
                    bare_run(argv);
                }
            });
        }
    });
    total as f64 / t.elapsed().as_secs_f64()
}

/// `total` evaluations queued at once (batches of 100), then until the last is terminal:
/// evaluations/s.
async fn throughput(c: &Client, body: &Value, total: usize) -> f64 {
    let t = Instant::now();
    let mut ids = Vec::new();
    while ids.len() < total {
        let n = (total - ids.len()).min(100);
        let batch = json!({"evaluations": vec![body.clone(); n]});
        let r = c.post_json("/api/eval-batch", &batch).await.expect("batch");
        assert_eq!(r.status, 202, "{}", r.text());
        for e in r.json().expect("json")["evaluations"]
            .as_array()
            .expect("list")
        {
            ids.push(e["eval_id"].as_str().expect("id").to_string());
        }
    }
    for id in &ids {
        let rec = until_terminal(c, id, Wait::LongPoll).await;
        assert_eq!(rec["status"], "completed", "{rec}");
    }
    total as f64 / t.elapsed().as_secs_f64()
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    format!("{cores} cores ({cpu})")
}

fn main() {
    let runs: usize = std::env::var("RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let py_file = dir.path().join("main.py");
    std::fs::write(&py_file, PY).expect("write");
    let py_path = py_file.to_string_lossy().to_string();
    let bare_py = ["/usr/bin/python3", "-E", "-s", "-B", py_path.as_str()];
    let c_src = dir.path().join("main.c");
    std::fs::write(&c_src, C).expect("write");
    let c_bin = dir.path().join("main");
    let ok = Command::new("gcc")
        .args(["-O2", "-o"])
        .arg(&c_bin)
        .arg(&c_src)
        .status()
        .expect("gcc");
    assert!(ok.success());
    let c_bin = c_bin.to_string_lossy().to_string();

    let mut out = String::new();
    let config = std::env::var("BENCH_CONFIG").unwrap_or_default();
    let _ = writeln!(
        out,
        "Machine: {}; client on the same machine. Extra config: `{}`.\n",
        machine(),
        config.replace('\n', "; ")
    );

    // Latency, one at a time.
    let py = json!({"code": PY, "timeout": 10});
    let cc = json!({"language": "c", "code": C, "timeout": 10});
    let s = start(&rt, "workers = 2");
    let c = s.client.clone();
    let (mut poll, mut long, mut c_e2e, mut py_rt, mut c_rt) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut bare_py_ms, mut bare_c_ms) = (Vec::new(), Vec::new());
    rt.block_on(async {
        // Warm up: the first runs of each (and the C compile: later ones are cache hits).
        for _ in 0..3 {
            one(&c, &py, Wait::LongPoll).await;
            let (_, r) = one(&c, &cc, Wait::LongPoll).await;
            assert_eq!(r["status"], "completed", "{r}");
        }
        // Interleaved, so that a slow moment of the machine hits every column alike.
        for _ in 0..runs {
            bare_py_ms.push(bare_run(&bare_py));
            let (t, r) = one(&c, &py, Wait::Poll).await;
            assert_eq!(r["output"], "1\n", "{r}");
            poll.push(t);
            let (t, r) = one(&c, &py, Wait::LongPoll).await;
            long.push(t);
            py_rt.push(r["runtime_ms"].as_f64().unwrap_or(0.0));
            bare_c_ms.push(bare_run(&[c_bin.as_str()]));
            let (t, r) = one(&c, &cc, Wait::LongPoll).await;
            assert_eq!(r["status"], "completed", "{r}");
            assert_eq!(r["compile"]["cached"], true, "{r}");
            c_e2e.push(t);
            c_rt.push(r["runtime_ms"].as_f64().unwrap_or(0.0));
        }
    });
    drop(s);
    let bp = median(&bare_py_ms);
    let bc = median(&bare_c_ms);
    let _ = writeln!(
        out,
        "### Latency, one at a time ({runs} runs, interleaved)\n"
    );
    let _ = writeln!(out, "| what | median ms | p90 ms | ratio to bare |");
    let _ = writeln!(out, "|---|---|---|---|");
    let row = |out: &mut String, what: &str, v: &[f64], base: f64| {
        let _ = writeln!(
            out,
            "| {what} | {:.2} | {:.2} | {:.2}x |",
            median(v),
            p90(v),
            median(v) / base
        );
    };
    row(&mut out, "bare `python3 -E -s -B main.py`", &bare_py_ms, bp);
    row(
        &mut out,
        "crucible `print(1)`, polling every 2 ms",
        &poll,
        bp,
    );
    row(&mut out, "crucible `print(1)`, `?wait=10`", &long, bp);
    row(&mut out, "(its `runtime_ms`)", &py_rt, bp);
    row(
        &mut out,
        "bare C binary (`int main(){return 0;}`)",
        &bare_c_ms,
        bc,
    );
    row(
        &mut out,
        "crucible C, compile-cache hit, `?wait=10`",
        &c_e2e,
        bc,
    );
    row(&mut out, "(its `runtime_ms`)", &c_rt, bc);

    // Throughput.
    let total = 300;
    let _ = writeln!(out, "\n### Throughput: {total} `print(1)` queued at once\n");
    let _ = writeln!(
        out,
        "| N | bare runs/s, N at a time | crucible evaluations/s, N workers | ratio |"
    );
    let _ = writeln!(out, "|---|---|---|---|");
    for n in [2usize, 4] {
        let s = start(&rt, &format!("workers = {n}"));
        let c = s.client.clone();
        let ours = rt.block_on(async {
            for _ in 0..3 {
                one(&c, &py, Wait::LongPoll).await;
            }
            throughput(&c, &py, total).await
        });
        drop(s);
        let bare = bare_throughput(&bare_py, n, total);
        let _ = writeln!(out, "| {n} | {bare:.0} | {ours:.0} | {:.2} |", ours / bare);
    }
    print!("{out}");
    let _ = std::fs::create_dir_all("target");
    let _ = std::fs::write(Path::new("target").join("bench-eval.md"), out);
}
