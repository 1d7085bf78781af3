//! Benchmark: Redis delivery.
//!
//! - drain rate of a 100,000-event backlog into Redis (PUBLISH + XADD per event);
//! - delivery lag (event timestamp -> message received by a subscriber) at a steady
//!   submission rate;
//! - next to `redis-benchmark` PUBLISH and XADD with the same payload size and pipelining
//!   (the limit of this Redis on this machine).
//!
//! Run: `cargo bench --bench redis` (needs redis-server and redis-benchmark:
//! `apt install redis-server redis-tools`). Env `BENCH_EVENTS` (default 100000),
//! `BENCH_RATE` (default 1000 submissions/s), `BENCH_SECS` (default 10).

#[path = "../tests/integration/common.rs"]
mod common;
#[path = "measure.rs"]
mod measure;

use common::{free_port, RedisServer, Server};
use crucible::client::Client;
use fred::prelude::{ClientLike, EventInterface, PubsubInterface};
use measure::env;
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::process::Command;
use std::time::{Duration, Instant};

async fn sink(c: &Client) -> (u64, u64) {
    let h: Value = c
        .get("/health")
        .await
        .expect("health")
        .json()
        .expect("json");
    (
        h["sinks"]["redis"]["cursor"].as_u64().unwrap_or(0),
        h["store"]["head_seq"].as_u64().unwrap_or(0),
    )
}

fn redis_benchmark(port: u16, args: &[&str]) -> f64 {
    let out = Command::new("redis-benchmark")
        .args(["-p", &port.to_string(), "-n", "200000", "-P", "64", "-q"])
        .args(args)
        .output()
        .expect("redis-benchmark (apt install redis-tools)");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    // "...: 123456.79 requests per second, p50=..."
    text.split_whitespace()
        .zip(text.split_whitespace().skip(1))
        .find(|(_, next)| *next == "requests")
        .and_then(|(n, _)| n.parse().ok())
        .unwrap_or(0.0)
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    let n_events: u64 = env("BENCH_EVENTS", 100_000);
    let rate: u64 = env("BENCH_RATE", 1000);
    let secs: u64 = env("BENCH_SECS", 10);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut out = String::new();
    // BENCH_CONFIG adds TOML to every server, e.g. BENCH_CONFIG=$'[outbox]\nbatch_size = 2048'.
    let cfg = format!(
        "start_paused = true\nmax_queued = 10000000\n{}",
        std::env::var("BENCH_CONFIG").unwrap_or_default()
    );

    // 1. Backlog drain: accept events while Redis is down, then start Redis.
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}");
    let s = rt.block_on(Server::start_with(&cfg, &[("REDIS_URL", &url)]));
    let c = s.client.clone();
    let (drain_secs, first_to_last) = rt.block_on(async {
        let batch: Vec<Value> = (0..100)
            .map(|i| json!({"code": format!("print({i})"), "metadata": {"bench": "redis"}}))
            .collect();
        let body = json!({ "evaluations": batch });
        let mut head = 0;
        while head < n_events {
            let r = c.post_json("/api/eval-batch", &body).await.expect("batch");
            assert_eq!(r.status, 202, "{}", r.text());
            head += 100;
        }
        let redis = RedisServer::start_volatile(port);
        let t0 = Instant::now();
        let mut first: Option<Instant> = None;
        loop {
            let (cursor, head) = sink(&c).await;
            if cursor > 0 && first.is_none() {
                first = Some(Instant::now());
            }
            if cursor >= head && head > 0 {
                let end = Instant::now();
                drop(redis);
                return (
                    (end - t0).as_secs_f64(),
                    (end - first.unwrap_or(t0)).as_secs_f64(),
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    drop(s);
    let _ = writeln!(out, "### Draining a backlog into Redis\n");
    let _ = writeln!(
        out,
        "{n_events} events (about 900 bytes of JSON each) accepted while Redis was down, then Redis started:\n"
    );
    let _ = writeln!(out, "| measure | value |\n|---|---|");
    let _ = writeln!(
        out,
        "| first delivery to last (events/s) | {:.0} |",
        n_events as f64 / first_to_last
    );
    let _ = writeln!(
        out,
        "| Redis start to last, including reconnect (s) | {drain_secs:.2} |"
    );

    // 2. Lag at a steady rate (queue paused: the delivery path alone is measured).
    let port = free_port();
    let redis = RedisServer::start_volatile(port);
    let url = format!("redis://127.0.0.1:{}", redis.port);
    let s = rt.block_on(Server::start_with(&cfg, &[("REDIS_URL", &url)]));
    let c = s.client.clone();
    let mut lags = rt.block_on(async {
        let cfg = fred::prelude::Config::from_url(&url).expect("u");
        let sub = fred::prelude::Builder::from_config(cfg)
            .with_performance_config(|p| p.broadcast_channel_capacity = 1 << 16)
            .build_subscriber_client()
            .expect("sub");
        sub.init().await.expect("connect");
        let mut rx = sub.message_rx();
        sub.subscribe("evaluation:queued").await.expect("subscribe");
        let total = rate * secs;
        let collector = tokio::spawn(async move {
            let mut lags = Vec::with_capacity(total as usize);
            while (lags.len() as u64) < total {
                let m = match tokio::time::timeout(Duration::from_secs(30), rx.recv()).await {
                    Ok(Ok(m)) => m,
                    Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(n))) => {
                        eprintln!("bench subscriber lagged by {n} messages");
                        continue;
                    }
                    _ => break,
                };
                let now = chrono::Utc::now();
                let v: Value = serde_json::from_str(&m.value.as_string().unwrap_or_default())
                    .unwrap_or_default();
                if let Some(ts) = v["timestamp"]
                    .as_str()
                    .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                {
                    let lag = now - ts.with_timezone(&chrono::Utc);
                    lags.push(lag.num_microseconds().unwrap_or(0) as f64 / 1000.0);
                }
            }
            lags
        });
        // Steady state: start once the appliance's Redis connection is up.
        loop {
            let h: Value = c
                .get("/health")
                .await
                .expect("health")
                .json()
                .expect("json");
            if h["redis"]["connected"] == true {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let body = bytes::Bytes::from(json!({"code": "print(1)"}).to_string());
        let interval = Duration::from_secs_f64(1.0 / rate as f64);
        let start = Instant::now();
        for i in 0..total {
            let due = start + interval * i as u32;
            if let Some(d) = due.checked_duration_since(Instant::now()) {
                tokio::time::sleep(d).await;
            }
            let c = c.clone();
            let body = body.clone();
            tokio::spawn(async move {
                let _ = c
                    .request(
                        http::Method::POST,
                        "/api/eval",
                        Some(("application/json", body)),
                        &[],
                    )
                    .await;
            });
        }
        collector.await.expect("collector")
    });
    drop(s);
    let _ = writeln!(
        out,
        "\n### Delivery lag at a steady {rate} submissions/s for {secs} s\n"
    );
    let _ = writeln!(
        out,
        "Lag = when a subscriber received the `evaluation:queued` message minus the event's timestamp (written in the same batch that made it durable).\n"
    );
    let _ = writeln!(
        out,
        "| events | p50 ms | p99 ms | max ms |\n|---|---|---|---|"
    );
    if let Ok(path) = std::env::var("BENCH_LAG_DUMP") {
        let text: Vec<String> = lags.iter().map(|l| format!("{l:.3}")).collect();
        let _ = std::fs::write(path, text.join("\n"));
    }
    let n = lags.len();
    let (p50, p99, max) = (
        pct(&mut lags, 0.5),
        pct(&mut lags, 0.99),
        pct(&mut lags, 1.0),
    );
    let _ = writeln!(out, "| {n} | {p50:.2} | {p99:.2} | {max:.2} |");

    // 3. The limit: redis-benchmark on the same machine, same payload size, pipeline 64.
    let payload = "x".repeat(900);
    let publish = redis_benchmark(redis.port, &["PUBLISH", "evaluation:queued", &payload]);
    let xadd = redis_benchmark(
        redis.port,
        &[
            "XADD", "bench", "MAXLEN", "~", "1000000", "*", "event", &payload,
        ],
    );
    let _ = writeln!(
        out,
        "\n### redis-benchmark, same machine (200,000 requests, -P 64, 900-byte payload)\n"
    );
    let _ = writeln!(out, "| command | requests/s |\n|---|---|");
    let _ = writeln!(out, "| PUBLISH | {publish:.0} |");
    let _ = writeln!(out, "| XADD MAXLEN ~ | {xadd:.0} |");
    let _ = writeln!(
        out,
        "| PUBLISH + XADD per event (the sink's work), combined | {:.0} events/s |",
        1.0 / (1.0 / publish + 1.0 / xadd)
    );
    drop(redis);
    print!("{out}");
    let _ = std::fs::create_dir_all("target");
    let _ = std::fs::write("target/bench-redis.md", out);
}
