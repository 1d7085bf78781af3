//! Benchmark: the long-run footprint under the "1 GB" profile.
//!
//! The appliance (`workers = 2`) with all three sinks on (a file, a Redis and a
//! PostgreSQL started here on loopback with the settings of `packaging/examples/*-1gb.conf`),
//! retention shortened so that a day's churn fits in minutes, takes a steady open-loop
//! mix of evaluations (short Python and sh programs, some with a few KB of output, runtime
//! errors, C judged on 3 tests from the compile cache, time limits, cancellations) for
//! `SOAK_SECS`, then stays idle for `SOAK_IDLE_SECS`. Every 2 s it samples the
//! appliance's RSS, the data dir's allocated bytes, each sink's backlog, the queue, the
//! rates and Redis' memory; at the end it checks that no sandbox directory is left
//! behind and reports the event sizes seen by each sink.
//!
//! Writes `target/soak/soak.csv`, `target/soak/soak.png` (with gnuplot, Debian's
//! `gnuplot-nox`, which tests/run.sh installs) and `target/soak/soak.md`.
//!
//! Run: `cargo bench --bench soak` (extra top-level config: `BENCH_CONFIG`; the sled
//! cache: `SOAK_CACHE_MB`; defaults: `SOAK_RATE=25 SOAK_SECS=600
//! SOAK_IDLE_SECS=120 SOAK_RETAIN_SECS=120 SOAK_STREAM_MAXLEN=20000`; the stream cap is
//! lower than the profile's so that the run reaches it and Redis' memory per entry at the
//! cap is measured).

#[path = "../tests/integration/common.rs"]
mod common;
#[path = "measure.rs"]
mod measure;

use common::{PgServer, RedisServer, Server};
use crucible::client::Client;
use measure::{env, machine, status_kb};
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// `key value` or `key = value` lines of a shipped example file, comments skipped.
fn profile(path: &str) -> Vec<(String, String)> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.split_once(|c: char| c == '=' || c.is_whitespace())?;
            let v = v.trim().trim_start_matches('=').trim();
            Some((k.trim().to_string(), v.trim_matches('\'').to_string()))
        })
        .collect()
}

const C_SUM: &str = "#include <stdio.h>\nint main(void){long a,b;if(scanf(\"%ld %ld\",&a,&b)!=2)return 1;printf(\"%ld\\n\",a+b);return 0;}\n";

/// The n-th evaluation of the mix, and whether it is cancelled right after submission.
fn body(n: u64) -> (Value, bool) {
    let meta = json!({"user": format!("u{}", n % 17), "n": n});
    match n % 50 {
        0 => (
            json!({"code": "import time\ntime.sleep(5)", "timeout": 1, "metadata": meta}),
            false,
        ),
        25 => (
            json!({"code": "import time\ntime.sleep(5)", "timeout": 10, "metadata": meta}),
            true,
        ),
        _ => match n % 10 {
            1 => (
                json!({"language": "c", "code": C_SUM, "metadata": meta, "tests": [
                    {"name": "small", "stdin": "1 2", "expected_output": "3"},
                    {"name": "neg", "stdin": "-5 2", "expected_output": "-3"},
                    {"name": "big", "stdin": "4000000000 1", "expected_output": "4000000001"},
                ]}),
                false,
            ),
            2 => (
                json!({"code": format!("def f(x):\n    return 1 / x\nprint(f({}))", n % 2), "metadata": meta}),
                false,
            ),
            3 => (
                json!({"language": "sh", "code": format!("echo {n}; ls / | wc -l"), "metadata": meta}),
                false,
            ),
            4 => (
                json!({"code": "for i in range(100):\n    print('line', i, 'x' * 12)", "metadata": meta}),
                false,
            ),
            _ => (
                json!({"code": format!("print({n})"), "metadata": meta}),
                false,
            ),
        },
    }
}

#[derive(Default)]
struct Counters {
    submitted: AtomicU64,
    refused: AtomicU64,
    cancelled: AtomicU64,
}

/// Submit `rate`/s for `secs`, on schedule whatever the answers take (each submission
/// its own task).
async fn load(c: Client, rate: u64, secs: u64, counters: Arc<Counters>) {
    let start = tokio::time::Instant::now();
    let total = rate * secs;
    let mut tasks = Vec::new();
    for n in 0..total {
        tokio::time::sleep_until(start + Duration::from_secs_f64(n as f64 / rate as f64)).await;
        let c = c.clone();
        let counters = counters.clone();
        tasks.push(tokio::spawn(async move {
            let (b, cancel) = body(n);
            match c.post_json("/api/eval", &b).await {
                Ok(r) if r.status == 202 => {
                    counters.submitted.fetch_add(1, Ordering::Relaxed);
                    if cancel {
                        let id = r
                            .json()
                            .ok()
                            .and_then(|v| v["eval_id"].as_str().map(String::from));
                        if let Some(id) = id {
                            if let Ok(r) = c
                                .post_json(&format!("/api/eval/{id}/cancel"), &json!({}))
                                .await
                            {
                                if r.status == 200 {
                                    counters.cancelled.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                    }
                }
                Ok(r) => {
                    counters.refused.fetch_add(1, Ordering::Relaxed);
                    eprintln!("refused: {} {}", r.status, r.text());
                }
                Err(e) => {
                    counters.refused.fetch_add(1, Ordering::Relaxed);
                    eprintln!("submit failed: {e}");
                }
            }
        }));
        tasks.retain(|t| !t.is_finished());
    }
    for t in tasks {
        let _ = t.await;
    }
}

struct Sample {
    t: f64,
    rss_mib: f64,
    data_mib: f64,
    sled_mib: f64,
    queue: u64,
    running: u64,
    backlog: [u64; 3],
    submitted_per_s: f64,
    finished_per_s: f64,
    stored: u64,
    redis_mib: f64,
    stream_len: u64,
}

fn redis_info(redis: &RedisServer, field: &str) -> u64 {
    redis
        .cli(&["INFO", "memory"])
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Evaluations a worker brought to a terminal state so far (the metric, every label).
async fn finished(s: &Server) -> u64 {
    let text = s.get("/metrics").await.text();
    text.lines()
        .filter(|l| l.starts_with("crucible_evaluations_finished_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

fn plot(dir: &Path, load_secs: u64) -> Result<PathBuf, String> {
    let png = dir.join("soak.png");
    let script = format!(
        r#"set terminal pngcairo size 1400,1000 font ",10" noenhanced
set output "{png}"
set datafile separator ","
set key autotitle columnhead top left
set grid
set xlabel "seconds"
set arrow from {load_secs}, graph 0 to {load_secs}, graph 1 nohead dashtype 2 lc "gray"
set multiplot layout 3,2 title "crucible soak: 1 GB profile, file + Redis + PostgreSQL sinks (load ends at the dashed line)"
set title "appliance RSS (MiB)"
set yrange [0:*]
plot "{csv}" using 1:2 with lines lw 2, 64 title "64 MiB" with lines dashtype 3 lc "red"
set title "data dir (allocated, incl. the disk-full ballast) and sled (MiB)"
plot "{csv}" using 1:3 with lines lw 2, "" using 1:4 with lines lw 2, "" using 1:11 with lines
set title "sink backlogs (events) and queue"
plot "{csv}" using 1:7 with lines, "" using 1:8 with lines, "" using 1:9 with lines, "" using 1:5 with lines
set title "rate (evaluations/s)"
plot "{csv}" using 1:12 with lines, "" using 1:13 with lines
set title "Redis used_memory (MiB)"
plot "{csv}" using 1:14 with lines lw 2
set title "Redis stream length (entries)"
plot "{csv}" using 1:15 with lines lw 2
unset multiplot
"#,
        png = png.display(),
        csv = dir.join("soak.csv").display(),
    );
    let gp = dir.join("soak.gp");
    std::fs::write(&gp, &script).map_err(|e| format!("{}: {e}", gp.display()))?;
    let out = std::process::Command::new("gnuplot")
        .arg(&gp)
        .output()
        .map_err(|e| format!("gnuplot (Debian: gnuplot-nox): {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(png)
}

fn main() {
    let rate = env("SOAK_RATE", 25);
    let secs = env("SOAK_SECS", 600);
    let idle = env("SOAK_IDLE_SECS", 120);
    let retain = env("SOAK_RETAIN_SECS", 120);
    let maxlen = env("SOAK_STREAM_MAXLEN", 20_000);
    let out_dir = PathBuf::from("target/soak");
    std::fs::create_dir_all(&out_dir).expect("target/soak");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut md = String::new();
    rt.block_on(async {
        let pg_settings: Vec<String> = profile("packaging/examples/postgresql-1gb.conf")
            .into_iter()
            .filter(|(k, _)| k != "listen_addresses")
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let pg_refs: Vec<&str> = pg_settings.iter().map(String::as_str).collect();
        let pg = PgServer::start_with(&pg_refs);
        let redis = RedisServer::start_volatile(common::free_port());
        for (k, v) in profile("packaging/examples/redis-1gb.conf") {
            if k != "bind" {
                redis.cli(&["CONFIG", "SET", &k, &v]);
            }
        }
        let sink = tempfile::tempdir().expect("tempdir");
        let events = sink.path().join("events.jsonl");
        let more = std::env::var("BENCH_CONFIG").unwrap_or_default();
        let cache = std::env::var("SOAK_CACHE_MB")
            .map(|v| format!("cache_mb = {v}\n"))
            .unwrap_or_default();
        let s = Server::start_with(
            &format!(
                "workers = 2\nlog_level = \"warn\"\n{more}\n[store]\n{cache}retain_evaluations_secs = {retain}\n\
                 [outbox]\nretain_secs = {retain}\nprune_interval_secs = 5\n\
                 [redis]\nstream_maxlen = {maxlen}\n[sinks.file]\npath = \"{}\"",
                events.display()
            ),
            &[("REDIS_URL", &redis.url()), ("DATABASE_URL", &pg.url())],
        )
        .await;
        let h = s.health().await;
        let work = PathBuf::from(h["executor"]["work_dir"].as_str().unwrap_or_default());
        let rss_start = status_kb(s.pid(), "VmRSS:");
        let redis_start = redis_info(&redis, "used_memory");

        let counters = Arc::new(Counters::default());
        let loader = tokio::spawn(load(s.client.clone(), rate, secs, counters.clone()));
        let started = Instant::now();
        let mut samples: Vec<Sample> = Vec::new();
        let (mut last_t, mut last_sub, mut last_fin) = (0.0, 0u64, 0u64);
        let mut csv = String::from("secs,rss_mib,data_mib,sled_mib,queue,running,file_backlog,redis_backlog,postgres_backlog,stored,stored_per_100,submitted_per_s,finished_per_s,redis_used_mib,stream_len\n");
        while started.elapsed() < Duration::from_secs(secs + idle) {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let h = s.health().await;
            let t = started.elapsed().as_secs_f64();
            let sub = counters.submitted.load(Ordering::Relaxed);
            let fin = finished(&s).await;
            let dt = t - last_t;
            let sm = Sample {
                t,
                rss_mib: status_kb(s.pid(), "VmRSS:") as f64 / 1024.0,
                data_mib: common::dir_allocated(&s.data_dir()) as f64 / 1048576.0,
                sled_mib: h["store"]["size_on_disk_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
                queue: h["queue"]["depth"].as_u64().unwrap_or(0),
                running: h["queue"]["running"].as_u64().unwrap_or(0),
                backlog: ["file", "redis", "postgres"]
                    .map(|k| h["sinks"][k]["backlog"].as_u64().unwrap_or(0)),
                submitted_per_s: (sub - last_sub) as f64 / dt,
                finished_per_s: fin.saturating_sub(last_fin) as f64 / dt,
                stored: h["store"]["evaluations"].as_u64().unwrap_or(0),
                redis_mib: redis_info(&redis, "used_memory") as f64 / 1048576.0,
                stream_len: redis.cli(&["XLEN", "crucible:events"]).trim().parse().unwrap_or(0),
            };
            (last_t, last_sub, last_fin) = (t, sub, fin);
            let _ = writeln!(
                csv,
                "{:.1},{:.1},{:.1},{:.1},{},{},{},{},{},{},{:.1},{:.1},{:.1},{:.2},{}",
                sm.t, sm.rss_mib, sm.data_mib, sm.sled_mib, sm.queue, sm.running, sm.backlog[0], sm.backlog[1],
                sm.backlog[2], sm.stored, sm.stored as f64 / 100.0, sm.submitted_per_s,
                sm.finished_per_s, sm.redis_mib, sm.stream_len
            );
            samples.push(sm);
        }
        let _ = loader.await;
        std::fs::write(out_dir.join("soak.csv"), &csv).expect("soak.csv");

        // Drained: nothing queued or running, every sink caught up.
        let h = s.health().await;
        let drained = h["queue"]["depth"] == 0
            && h["queue"]["running"] == 0
            && ["file", "redis", "postgres"].iter().all(|k| h["sinks"][k]["backlog"] == 0);
        let pool = h["executor"]["pool"]["size"].as_u64().unwrap_or(0) as usize;
        let left = common::dir_entries(&work);
        let rss_end = status_kb(s.pid(), "VmRSS:");
        let hwm = status_kb(s.pid(), "VmHWM:");
        let lines = std::fs::read_to_string(&events).unwrap_or_default();
        let n_events = lines.lines().count().max(1);
        let event_bytes = lines.len() as f64 / n_events as f64;
        let xlen: u64 = redis.cli(&["XLEN", "crucible:events"]).trim().parse().unwrap_or(0);
        let stream_bytes: u64 = redis
            .cli(&["MEMORY", "USAGE", "crucible:events", "SAMPLES", "0"])
            .trim()
            .parse()
            .unwrap_or(0);
        let redis_used = redis_info(&redis, "used_memory");
        let per_entry = stream_bytes as f64 / xlen.max(1) as f64;
        let maxmemory = redis.cli(&["CONFIG", "GET", "maxmemory"]);
        let maxmemory: u64 = maxmemory.lines().nth(1).and_then(|v| v.trim().parse().ok()).unwrap_or(0);
        let pg_client = pg.client().await;
        let pg_rows: i64 = pg_client
            .query_one("SELECT count(*) FROM evaluation_events", &[])
            .await
            .map(|r| r.get(0))
            .unwrap_or(-1);
        let pg_size: i64 = pg_client
            .query_one("SELECT pg_database_size(current_database())", &[])
            .await
            .map(|r| r.get(0))
            .unwrap_or(-1);

        let loaded: Vec<&Sample> = samples.iter().filter(|x| x.t <= secs as f64).collect();
        let half = loaded.len() / 2;
        let max_of = |xs: &[&Sample], f: fn(&Sample) -> f64| xs.iter().map(|x| f(x)).fold(0.0, f64::max);
        let rss_peak = max_of(&loaded, |x| x.rss_mib);
        let data_first = max_of(&loaded[..half], |x| x.data_mib);
        let data_second = max_of(&loaded[half..], |x| x.data_mib);
        let sled_first = max_of(&loaded[..half], |x| x.sled_mib);
        let sled_second = max_of(&loaded[half..], |x| x.sled_mib);
        let fin_rate = loaded.iter().skip(5).map(|x| x.finished_per_s).sum::<f64>()
            / loaded.len().saturating_sub(5).max(1) as f64;
        let backlog_peak = loaded.iter().map(|x| *x.backlog.iter().max().unwrap_or(&0)).max().unwrap_or(0);
        let submitted = counters.submitted.load(Ordering::Relaxed);

        let _ = writeln!(md, "Machine: {}; `{}`; {} s at {}/s then {} s idle; retention {} s; `stream_maxlen = {}`.\n",
            machine(), common::bin(), secs, rate, idle, retain, maxlen);
        let _ = writeln!(md, "| measure | value |\n|---|---|");
        let _ = writeln!(md, "| evaluations accepted / refused / cancelled by the client | {submitted} / {} / {} |",
            counters.refused.load(Ordering::Relaxed), counters.cancelled.load(Ordering::Relaxed));
        let _ = writeln!(md, "| evaluations finished by a worker per second (mean under load) | {fin_rate:.1} |");
        let _ = writeln!(md, "| appliance RSS: after start / peak under load / after {idle} s idle (VmHWM) | {:.1} / {rss_peak:.1} / {:.1} MiB ({:.1}) |",
            rss_start as f64 / 1024.0, rss_end as f64 / 1024.0, hwm as f64 / 1024.0);
        let _ = writeln!(md, "| data dir (allocated), peak of the first / second half of the load | {data_first:.1} / {data_second:.1} MiB |");
        let _ = writeln!(md, "| sled's files, peak of the first / second half of the load | {sled_first:.1} / {sled_second:.1} MiB |");
        let _ = writeln!(md, "| largest sink backlog under load (events) | {backlog_peak} |");
        let _ = writeln!(md, "| drained at the end (queue empty, every backlog 0) | {drained} |");
        let _ = writeln!(md, "| sandbox directories left after the drain (the pool's waiting ones: {pool}) | {} |", left.len());
        let _ = writeln!(md, "| events delivered to the file sink; mean size (JSON line) | {n_events}; {event_bytes:.0} B |");
        let _ = writeln!(md, "| events per evaluation | {:.2} |", n_events as f64 / submitted.max(1) as f64);
        let _ = writeln!(md, "| Redis: stream entries; stream memory per entry (MEMORY USAGE) | {xlen}; {per_entry:.0} B |");
        let _ = writeln!(md, "| Redis used_memory: at start / at the end | {:.1} / {:.1} MiB |",
            redis_start as f64 / 1048576.0, redis_used as f64 / 1048576.0);
        if per_entry > 0.0 && maxmemory > 0 {
            let _ = writeln!(md, "| stream entries that fit in `maxmemory` {} MiB at 80 % | {:.0} |",
                maxmemory / 1048576, maxmemory as f64 * 0.8 / per_entry);
        }
        let _ = writeln!(md, "| PostgreSQL: event rows kept; database size | {pg_rows}; {:.1} MiB |", pg_size as f64 / 1048576.0);
        if left.len() > pool {
            let _ = writeln!(md, "\nLeft behind: {left:?}");
        }
        match plot(&out_dir, secs) {
            Ok(p) => {
                let _ = writeln!(md, "\nPlot: {}", p.display());
            }
            Err(e) => {
                let _ = writeln!(md, "\nNo plot: {e}");
            }
        }
        drop(s);
    });
    print!("{md}");
    let _ = std::fs::write(out_dir.join("soak.md"), md);
}
