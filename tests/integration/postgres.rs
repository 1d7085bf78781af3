//! The PostgreSQL sync against a real PostgreSQL started by the test: rows equal the
//! API's records field by field; crashes and database outages lose nothing and double
//! nothing; migrations are idempotent; several appliances share one database.

use crate::common::{PgServer, Server, DEADLINE};
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

/// Wait until the postgres sink has delivered everything, including the confirmations it
/// appended itself (they are events too), and the head is stable.
async fn wait_synced(s: &Server) -> u64 {
    let started = Instant::now();
    loop {
        let h = s.health().await;
        let head = h["store"]["head_seq"].as_u64().unwrap_or(0);
        let running =
            h["queue"]["running"].as_u64().unwrap_or(1) + h["queue"]["depth"].as_u64().unwrap_or(1);
        if running == 0 && h["sinks"]["postgres"]["cursor"].as_u64() == Some(head) {
            // Confirmations of the last batch may be appended after this read; settle.
            tokio::time::sleep(Duration::from_millis(50)).await;
            let again = s.health().await;
            if again["store"]["head_seq"].as_u64() == Some(head)
                && again["sinks"]["postgres"]["cursor"].as_u64() == Some(head)
            {
                return head;
            }
        }
        assert!(started.elapsed() < DEADLINE, "postgres sink stuck: {h}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A row of `evaluations` as the API would render it.
async fn row(c: &tokio_postgres::Client, id: &str) -> Value {
    let r = c
        .query_one(
            "SELECT to_jsonb(e) - 'synced_at' FROM (
                SELECT eval_id, node, status, language, code, stdin, timeout,
                  to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') AS created_at,
                  to_char(started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') AS started_at,
                  to_char(completed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') AS completed_at,
                  runtime_ms, exit_code, success, output, stderr, error, output_truncated,
                  failure_reason, metadata, version, created_seq, cpu_ms, memory_peak_kb,
                  limits, files, args, tests, compare, float_tolerance, stop_on_failure,
                  compile, verdict, score, synced_at
                FROM evaluations WHERE eval_id = $1) e",
            &[&id],
        )
        .await
        .unwrap_or_else(|e| panic!("no row for {id}: {e}"));
    r.get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_match_the_api_records_field_by_field() {
    let pg = PgServer::start();
    let s = Server::start_with("workers = 2", &[("DATABASE_URL", &pg.url())]).await;
    let mut ids = vec![
        s.submit(
            json!({"code": "import sys; print(sys.stdin.read()); print('e', file=sys.stderr)",
                        "stdin": "in", "metadata": {"team": "a", "n": [1, 2]}}),
        )
        .await,
        s.submit(json!({"code": "raise SystemExit(4)", "timeout": 7.5}))
            .await,
        s.submit(json!({"code": "while True: pass", "timeout": 1}))
            .await,
        s.submit(json!({"code": "echo sh; printf 'nul\\000byte'", "language": "sh"}))
            .await,
        s.submit(
            json!({"code": "print(input())", "files": [{"name": "m.py", "content": "x=1"}],
                        "tests": [{"name": "a", "stdin": "1", "expected_output": "1"},
                                  {"stdin": "2", "expected_output": "3"}],
                        "compare": "tokens", "args": ["-v"]}),
        )
        .await,
    ];
    for id in &ids {
        s.wait_terminal(id).await;
    }
    let paused = s.post("/api/admin/queue/pause", &json!({})).await;
    assert_eq!(paused.status, 200);
    ids.push(s.submit(json!({"code": "print('never')"})).await);
    s.post(&format!("/api/eval/{}/cancel", ids[5]), &json!({}))
        .await;
    wait_synced(&s).await;

    let c = pg.client().await;
    for id in &ids {
        let api = s.record(id).await;
        let db = row(&c, id).await;
        for (k, v) in api.as_object().expect("object") {
            let got = &db[k];
            match k.as_str() {
                // The NUL byte cannot be stored in PostgreSQL text; it becomes U+FFFD.
                "output" => assert_eq!(
                    got.as_str(),
                    v.as_str().map(|s| s.replace('\0', "\u{FFFD}")).as_deref(),
                    "{id}.{k}"
                ),
                _ if got.is_number() && v.is_number() => {
                    assert_eq!(got.as_f64(), v.as_f64(), "{id}.{k}")
                }
                _ => assert_eq!(got, v, "{id}.{k}: db {got} api {v}"),
            }
        }
    }
    // Every event once, keyed by event_id; confirmations were published too.
    let n: i64 = c
        .query_one("SELECT count(*) FROM evaluation_events", &[])
        .await
        .expect("count")
        .get(0);
    let head = s.health().await["store"]["head_seq"].as_u64().unwrap_or(0);
    assert_eq!(n as u64, head);
    let kinds: Vec<String> = c
        .query(
            "SELECT DISTINCT type FROM evaluation_events ORDER BY 1",
            &[],
        )
        .await
        .expect("types")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        kinds.contains(&"storage:evaluation:created".to_string()),
        "{kinds:?}"
    );
    assert!(
        kinds.contains(&"storage:evaluation:updated".to_string()),
        "{kinds:?}"
    );
}

/// Rows and events against the appliance's view: nothing missing, nothing doubled, every
/// evaluation at its final version, every seq of the log exactly once.
async fn check_consistent(s: &Server, pg: &PgServer) {
    let head = wait_synced(s).await;
    let c = pg.client().await;
    let recs = s.all_records().await;
    let rows = c
        .query("SELECT eval_id, version, status FROM evaluations", &[])
        .await
        .expect("rows");
    let db: HashMap<String, (i64, String)> = rows
        .iter()
        .map(|r| {
            (
                r.get::<_, String>(0),
                (r.get::<_, i64>(1), r.get::<_, String>(2)),
            )
        })
        .collect();
    assert_eq!(db.len(), recs.len(), "one row per evaluation");
    for r in &recs {
        let id = r["eval_id"].as_str().unwrap_or("");
        let (v, st) = db.get(id).unwrap_or_else(|| panic!("row {id} missing"));
        assert_eq!(
            *v as u64,
            r["version"].as_u64().unwrap_or(0),
            "{id} at its final version"
        );
        assert_eq!(st.as_str(), r["status"].as_str().unwrap_or(""));
    }
    let seqs: Vec<i64> = c
        .query("SELECT seq FROM evaluation_events ORDER BY seq", &[])
        .await
        .expect("seqs")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        seqs,
        (1..=head as i64).collect::<Vec<_>>(),
        "every seq once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_mid_drain_loses_and_doubles_nothing() {
    let mut pg = PgServer::start();
    pg.kill();
    // Build a backlog while PostgreSQL is down, then crash after the third delivered batch
    // (committed in PostgreSQL, cursor not saved).
    let mut s = Server::start_with(
        "[outbox]\nbatch_size = 50",
        &[
            ("DATABASE_URL", &pg.url()),
            ("CRUCIBLE_FAILPOINTS", "relay.after_deliver=3"),
        ],
    )
    .await;
    for b in 0..3 {
        let items: Vec<Value> = (0..100)
            .map(|i| json!({"code": format!("print({b}*{i})")}))
            .collect();
        assert_eq!(
            s.post("/api/eval-batch", &json!({ "evaluations": items }))
                .await
                .status,
            202
        );
    }
    let started = Instant::now();
    while s.health().await["queue"]["depth"].as_u64() != Some(0)
        || s.health().await["queue"]["running"].as_u64() != Some(0)
    {
        assert!(started.elapsed() < DEADLINE, "evaluations did not finish");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    pg.restart();
    assert!(
        !s.wait_exit().success(),
        "the failpoint aborts mid-drain:\n{}",
        s.log()
    );
    let c = pg.client().await;
    let partial: i64 = c
        .query_one("SELECT count(*) FROM evaluation_events", &[])
        .await
        .expect("count")
        .get(0);
    assert!(partial > 0, "some batches were committed before the crash");
    s.set_env("CRUCIBLE_FAILPOINTS", None);
    s.restart().await;
    check_consistent(&s, &pg).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_during_load_delays_but_loses_nothing() {
    let mut pg = PgServer::start();
    let s = Server::start_with("", &[("DATABASE_URL", &pg.url())]).await;
    let mut ids = Vec::new();
    for i in 0..10 {
        ids.push(s.submit(json!({"code": format!("print({i})")})).await);
    }
    pg.kill();
    for i in 10..30 {
        ids.push(s.submit(json!({"code": format!("print({i})")})).await);
    }
    for id in &ids {
        s.wait_terminal(id).await;
    }
    let started = Instant::now();
    loop {
        let h = s.health().await;
        let sink = &h["sinks"]["postgres"];
        if sink["ok"] == false && sink["backlog"].as_u64().unwrap_or(0) > 0 {
            assert_eq!(h["status"], "degraded");
            assert_eq!(h["postgres"]["connected"], false);
            break;
        }
        assert!(started.elapsed() < DEADLINE, "outage not visible: {h}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    pg.restart();
    check_consistent(&s, &pg).await;
    assert_eq!(s.health().await["status"], "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_are_idempotent_and_two_appliances_share_one_database() {
    let pg = PgServer::start();
    let a = Server::start_with("node_id = \"edge-a\"", &[("DATABASE_URL", &pg.url())]).await;
    let b = Server::start_with("node_id = \"edge-b\"", &[("DATABASE_URL", &pg.url())]).await;
    let mut ids = HashSet::new();
    for i in 0..5 {
        ids.insert(a.submit(json!({"code": format!("print('a{i}')")})).await);
        ids.insert(b.submit(json!({"code": format!("print('b{i}')")})).await);
    }
    for id in &ids {
        if a.get(&format!("/api/eval/{id}")).await.status == 200 {
            a.wait_terminal(id).await;
        } else {
            b.wait_terminal(id).await;
        }
    }
    check_consistent_both(&a, &b, &pg).await;

    // Running the migrations again changes nothing.
    let mut c = pg.client().await;
    let before: i64 = c
        .query_one("SELECT count(*) FROM crucible_schema_migrations", &[])
        .await
        .expect("count")
        .get(0);
    let v1 = crucible::sinks::postgres::migrate(&mut c)
        .await
        .expect("migrate");
    let v2 = crucible::sinks::postgres::migrate(&mut c)
        .await
        .expect("migrate");
    let after: i64 = c
        .query_one("SELECT count(*) FROM crucible_schema_migrations", &[])
        .await
        .expect("count")
        .get(0);
    let migrations = crucible::sinks::postgres::MIGRATIONS;
    let newest = migrations.last().map(|m| m.0).unwrap_or(0);
    let n = migrations.len() as i64;
    assert_eq!((v1, v2, before, after), (newest, newest, n, n));
    let rows: i64 = c
        .query_one("SELECT count(*) FROM evaluations", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(rows, 10);
}

async fn check_consistent_both(a: &Server, b: &Server, pg: &PgServer) {
    wait_synced(a).await;
    wait_synced(b).await;
    let c = pg.client().await;
    for (s, node) in [(a, "edge-a"), (b, "edge-b")] {
        let recs = s.all_records().await;
        assert_eq!(recs.len(), 5);
        for r in &recs {
            let row = c
                .query_one(
                    "SELECT node, version FROM evaluations WHERE eval_id = $1",
                    &[&r["eval_id"].as_str().unwrap_or("")],
                )
                .await
                .expect("row");
            assert_eq!(row.get::<_, String>(0), node);
            assert_eq!(
                row.get::<_, i64>(1) as u64,
                r["version"].as_u64().unwrap_or(0)
            );
        }
        let head = s.health().await["store"]["head_seq"].as_u64().unwrap_or(0) as i64;
        let n: i64 = c
            .query_one(
                "SELECT count(*) FROM evaluation_events WHERE node = $1",
                &[&node],
            )
            .await
            .expect("count")
            .get(0);
        assert_eq!(n, head, "{node}: every event of its log once");
    }
}
