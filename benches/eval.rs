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
//! - judging: a C program and a Python program, each judged against 100 tests end to end
//!   (C compiled each time: a fresh source), against the same compile + 100 bare runs fed
//!   the same stdin, outputs compared (`ONLY=judge` runs only this part).
//!
//! Run: `cargo bench --bench eval` (env `RUNS`, default 30; `BENCH_CONFIG` adds config,
//! e.g. `BENCH_CONFIG=$'[sandbox]\npool = 0'` for the numbers without the pool). The report
//! is printed and written to `target/bench-eval.md`.

#[path = "../tests/integration/common.rs"]
mod common;
#[path = "measure.rs"]
mod measure;

use common::Server;
use crucible::client::Client;
use measure::{env, machine};
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

/// Doubles the number on stdin.
const JUDGE_C: &str = "#include <stdio.h>\nint main(void){long x; if (scanf(\"%ld\", &x) != 1) return 1; printf(\"%ld\\n\", 2 * x); return 0;}\n";
const JUDGE_PY: &str = "print(2 * int(input()))\n";
const TESTS: usize = 100;

/// One judged evaluation with `TESTS` tests: ms end to end (asserts every test passed).
async fn judged(c: &Client, language: &str, code: &str) -> f64 {
    let tests: Vec<Value> = (0..TESTS)
        .map(|i| json!({"stdin": format!("{i}\n"), "expected_output": format!("{}\n", 2 * i)}))
        .collect();
    let body = json!({"language": language, "code": code, "tests": tests, "timeout": 5});
    let (t, rec) = one(c, &body, Wait::LongPoll).await;
    assert_eq!(rec["status"], "completed", "{rec}");
    assert_eq!(rec["success"], true, "{rec}");
    t
}

/// The same bare: (compile, if any) + `TESTS` runs with the same stdin, output compared.
fn judged_bare(argv: &[&str], compile: Option<&[&str]>) -> f64 {
    use std::io::Write as _;
    let t = Instant::now();
    if let Some(cc) = compile {
        let ok = Command::new(cc[0])
            .args(&cc[1..])
            .status()
            .expect("compile");
        assert!(ok.success());
    }
    for i in 0..TESTS {
        let mut child = Command::new(argv[0])
            .args(&argv[1..])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("bare run");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(format!("{i}\n").as_bytes())
            .expect("stdin");
        let out = child.wait_with_output().expect("wait");
        assert_eq!(String::from_utf8_lossy(&out.stdout), format!("{}\n", 2 * i));
    }
    ms(t)
}

fn judge_section(rt: &tokio::runtime::Runtime, dir: &Path, out: &mut String) {
    let trials = 5;
    let s = start(rt, "workers = 2");
    let c = s.client.clone();
    let py_file = dir.join("judge.py");
    std::fs::write(&py_file, JUDGE_PY).expect("write");
    let py = py_file.to_string_lossy().to_string();
    let c_src = dir.join("judge.c");
    let c_bin = dir.join("judge");
    let (c_src_s, c_bin_s) = (
        c_src.to_string_lossy().to_string(),
        c_bin.to_string_lossy().to_string(),
    );
    let gcc = [
        "gcc",
        "-O2",
        "-pipe",
        "-std=gnu17",
        "-o",
        c_bin_s.as_str(),
        c_src_s.as_str(),
        "-lm",
    ];
    let (mut ours_c, mut bare_c, mut ours_py, mut bare_py) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    rt.block_on(async {
        judged(&c, "python", JUDGE_PY).await;
    });
    for trial in 0..trials + 1 {
        // A fresh source each time: the compile is part of both columns.
        let code = format!("{JUDGE_C}/* {trial} {} */\n", std::process::id());
        std::fs::write(&c_src, &code).expect("write");
        let b = judged_bare(&[c_bin_s.as_str()], Some(&gcc));
        let o = rt.block_on(judged(&c, "c", &code));
        let bp = judged_bare(&["/usr/bin/python3", "-E", "-s", "-B", py.as_str()], None);
        let op = rt.block_on(judged(&c, "python", JUDGE_PY));
        if trial > 0 {
            bare_c.push(b);
            ours_c.push(o);
            bare_py.push(bp);
            ours_py.push(op);
        }
    }
    drop(s);
    let _ = writeln!(
        out,
        "\n### Judging: {TESTS} tests per evaluation, end to end (median of {trials})\n"
    );
    let _ = writeln!(out, "| program | bare: compile + {TESTS} runs, ms | crucible: one evaluation with {TESTS} tests, ms | ratio |");
    let _ = writeln!(out, "|---|---|---|---|");
    for (what, b, o) in [
        ("C (gcc -O2, compiled each time)", &bare_c, &ours_c),
        ("Python", &bare_py, &ours_py),
    ] {
        let (b, o) = (median(b), median(o));
        let _ = writeln!(out, "| {what} | {b:.0} | {o:.0} | {:.2}x |", o / b);
    }
}

fn main() {
    let runs: usize = env("RUNS", 30);
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

    if std::env::var("ONLY").is_ok_and(|v| v == "judge") {
        judge_section(&rt, dir.path(), &mut out);
        print!("{out}");
        return;
    }

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
    judge_section(&rt, dir.path(), &mut out);
    print!("{out}");
    let _ = std::fs::create_dir_all("target");
    let _ = std::fs::write(Path::new("target").join("bench-eval.md"), out);
}
