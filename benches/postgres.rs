//! Benchmark: the PostgreSQL sync.
//!
//! - rows/s and events/s while draining a backlog of 100,000 evaluations accepted while
//!   PostgreSQL was down (each batch also produces its storage confirmations, which are
//!   events the sync then stores too);
//! - lag (event timestamp -> `synced_at` of its row in `evaluation_events`, one clock) at
//!   a steady submission rate.
//!
//! Run: `cargo bench --bench postgres` (needs the Debian package postgresql; the harness
//! runs its own cluster on a loopback port). Env `BENCH_EVENTS` (default 100000),
//! `BENCH_RATE` (default 1000/s), `BENCH_SECS` (default 10).

#[path = "../tests/integration/common.rs"]
mod common;
#[path = "measure.rs"]
mod measure;

use common::{PgServer, Server};
use measure::env;
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

async fn sink(s: &Server) -> (u64, u64) {
    let h: Value = s.get("/health").await.json().expect("health");
    (
        h["sinks"]["postgres"]["cursor"].as_u64().unwrap_or(0),
        h["store"]["head_seq"].as_u64().unwrap_or(0),
    )
}

fn main() {
    let n = env("BENCH_EVENTS", 100_000);
    let rate = env("BENCH_RATE", 1000);
    let secs = env("BENCH_SECS", 10);
    let more = std::env::var("BENCH_CONFIG").unwrap_or_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut out = String::new();

    rt.block_on(async {
        // 1. Drain.
        let mut pg = PgServer::start();
        pg.kill();
        let s = Server::start_with(
            &format!("start_paused = true\nmax_queued = 10000000\n{more}"),
            &[("DATABASE_URL", &pg.url())],
        )
        .await;
        let batch: Vec<Value> = (0..100)
            .map(|i| json!({"code": format!("print({i})"), "metadata": {"bench": "pg"}}))
            .collect();
        let body = json!({ "evaluations": batch });
        for _ in 0..n / 100 {
            let r = s.post("/api/eval-batch", &body).await;
            assert_eq!(r.status, 202, "{}", r.text());
        }
        pg.restart();
        let t0 = Instant::now();
        let mut first = None;
        let (events, secs_total) = loop {
            let (cursor, head) = sink(&s).await;
            if cursor > 0 && first.is_none() {
                first = Some(Instant::now());
            }
            if cursor == head && cursor > n {
                // Stable: the last confirmations are delivered too.
                tokio::time::sleep(Duration::from_millis(100)).await;
                let (c2, h2) = sink(&s).await;
                if c2 == h2 {
                    break (h2, first.unwrap_or(t0).elapsed().as_secs_f64());
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let c = pg.client().await;
        let rows: i64 = c
            .query_one("SELECT count(*) FROM evaluations", &[])
            .await
            .expect("count")
            .get(0);
        assert_eq!(rows as u64, n);
        let _ = writeln!(out, "### Draining a backlog into PostgreSQL\n");
        let _ = writeln!(
            out,
            "{n} evaluations accepted while PostgreSQL was down, then PostgreSQL started. The sync stored {n} rows and {events} events ({} storage confirmations appended along the way):\n",
            events - n
        );
        let _ = writeln!(out, "| measure | value |\n|---|---|");
        let _ = writeln!(out, "| evaluations (rows) / s | {:.0} |", n as f64 / secs_total);
        let _ = writeln!(out, "| events / s (rows of evaluation_events) | {:.0} |", events as f64 / secs_total);
        let _ = writeln!(out, "| first delivery to caught up (s) | {secs_total:.2} |");
        drop(s);
        drop(pg);

        // 2. Lag at a steady rate (queue paused: the sync path alone).
        let pg = PgServer::start();
        let s = Server::start_with(
            &format!("start_paused = true\nmax_queued = 10000000\n{more}"),
            &[("DATABASE_URL", &pg.url())],
        )
        .await;
        let body = bytes::Bytes::from(json!({"code": "print(1)"}).to_string());
        let interval = Duration::from_secs_f64(1.0 / rate as f64);
        let start = Instant::now();
        let total = rate * secs;
        for i in 0..total {
            let due = start + interval * i as u32;
            if let Some(d) = due.checked_duration_since(Instant::now()) {
                tokio::time::sleep(d).await;
            }
            let c = s.client.clone();
            let body = body.clone();
            tokio::spawn(async move {
                let _ = c
                    .request(http::Method::POST, "/api/eval", Some(("application/json", body)), &[])
                    .await;
            });
        }
        loop {
            let (cursor, head) = sink(&s).await;
            if cursor == head && head >= total {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let c = pg.client().await;
        let r = c
            .query_one(
                "SELECT count(*),
                    percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM synced_at - timestamp)),
                    percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM synced_at - timestamp)),
                    max(extract(epoch FROM synced_at - timestamp))::float8
                 FROM evaluation_events WHERE type = 'evaluation:queued'",
                &[],
            )
            .await
            .expect("lag query");
        let (count, p50, p99, max): (i64, f64, f64, f64) = (r.get(0), r.get(1), r.get(2), r.get(3));
        let _ = writeln!(out, "\n### Sync lag at a steady {rate} submissions/s for {secs} s\n");
        let _ = writeln!(
            out,
            "Lag = `synced_at` (PostgreSQL's now() in the inserting transaction) minus the event's timestamp (written in the batch that made it durable), same machine clock.\n"
        );
        let _ = writeln!(out, "| events | p50 ms | p99 ms | max ms |\n|---|---|---|---|");
        let _ = writeln!(out, "| {count} | {:.2} | {:.2} | {:.2} |", p50 * 1000.0, p99 * 1000.0, max * 1000.0);
    });
    print!("{out}");
    let _ = std::fs::create_dir_all("target");
    let _ = std::fs::write("target/bench-postgres.md", out);
}
