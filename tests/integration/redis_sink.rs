//! Delivery to a real redis-server: every event PUBLISHed on its seed channel and XADDed
//! to the stream, in order, surviving Redis outages and appliance crashes (at least
//! once; duplicates only as repeated event_ids).

use crate::common::{RedisServer, Server, DEADLINE};
use fred::prelude::{ClientLike, EventInterface, PubsubInterface};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

/// The stream deduplicated by event_id: copies must be identical; seqs 1..=head each once.
fn check_stream(entries: &[(String, Value)], head: u64) -> BTreeMap<u64, Value> {
    let mut by_id: HashMap<&str, &Value> = HashMap::new();
    for (id, ev) in entries {
        assert_eq!(
            ev["event_id"].as_str(),
            Some(id.as_str()),
            "field and JSON agree"
        );
        if let Some(prev) = by_id.insert(id, ev) {
            assert_eq!(prev, ev, "a redelivered event changed");
        }
    }
    let mut by_seq = BTreeMap::new();
    for ev in by_id.values() {
        let seq = ev["seq"].as_u64().expect("seq");
        assert!(
            by_seq.insert(seq, (*ev).clone()).is_none(),
            "two ids share seq {seq}"
        );
    }
    let seqs: Vec<u64> = by_seq.keys().copied().collect();
    assert_eq!(
        seqs,
        (1..=head).collect::<Vec<_>>(),
        "every seq exactly once"
    );
    by_seq
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_channel_gets_its_events_in_order_and_the_stream_gets_all() {
    let redis = RedisServer::start();
    let sub = {
        let cfg = fred::prelude::Config::from_url(&redis.url()).expect("url");
        let c = fred::prelude::Builder::from_config(cfg)
            .build_subscriber_client()
            .expect("subscriber");
        c.init().await.expect("connect");
        c
    };
    let mut rx = sub.message_rx();
    sub.psubscribe(vec!["evaluation:*", "storage:*"])
        .await
        .expect("psubscribe");
    let s = Server::start_with("start_paused = true", &[("REDIS_URL", &redis.url())]).await;
    let ok = s.submit(json!({"code": "print('ok')"})).await;
    let bad = s.submit(json!({"code": "raise SystemExit(2)"})).await;
    let gone = s.submit(json!({"code": "print('never')"})).await;
    assert_eq!(
        s.post(&format!("/api/eval/{gone}/cancel"), &json!({}))
            .await
            .status,
        200
    );
    s.post("/api/admin/queue/resume", &json!({})).await;
    s.wait_terminal(&ok).await;
    s.wait_terminal(&bad).await;
    let head = s.wait_sink_caught_up("redis").await;
    assert_eq!(head, 8);

    let mut got: Vec<(String, Value)> = Vec::new();
    let started = Instant::now();
    while got.len() < 8 {
        let left = DEADLINE.saturating_sub(started.elapsed());
        let m = tokio::time::timeout(left, rx.recv())
            .await
            .expect("all 8 messages")
            .expect("message");
        let v: Value = serde_json::from_str(&m.value.as_string().expect("text")).expect("json");
        got.push((m.channel.to_string(), v));
    }
    for (channel, ev) in &got {
        assert_eq!(
            ev["type"].as_str(),
            Some(channel.as_str()),
            "channel = type"
        );
        for k in [
            "event_id",
            "seq",
            "type",
            "eval_id",
            "version",
            "timestamp",
            "node",
            "data",
        ] {
            assert!(ev.get(k).is_some(), "{k} missing: {ev}");
        }
        assert_eq!(ev["data"]["eval_id"], ev["eval_id"]);
        assert_eq!(ev["data"]["version"], ev["version"]);
    }
    let per = |id: &str| -> Vec<String> {
        got.iter()
            .filter(|(_, e)| e["eval_id"] == id)
            .map(|(c, _)| c.clone())
            .collect()
    };
    assert_eq!(
        per(&ok),
        [
            "evaluation:queued",
            "evaluation:started",
            "evaluation:completed"
        ]
    );
    assert_eq!(
        per(&bad),
        [
            "evaluation:queued",
            "evaluation:started",
            "evaluation:failed"
        ]
    );
    assert_eq!(per(&gone), ["evaluation:queued", "evaluation:cancelled"]);
    let seqs: Vec<u64> = got
        .iter()
        .map(|(_, e)| e["seq"].as_u64().unwrap_or(0))
        .collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "published in seq order: {seqs:?}"
    );

    let stream = redis.stream("crucible:events").await;
    let by_seq = check_stream(&stream, head);
    for (_, ev) in &got {
        assert_eq!(by_seq.get(&ev["seq"].as_u64().unwrap_or(0)), Some(ev));
    }
    let _ = sub.quit().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_delays_but_loses_nothing() {
    let mut redis = RedisServer::start();
    let s = Server::start_with("", &[("REDIS_URL", &redis.url())]).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(s.submit(json!({"code": format!("print({i})")})).await);
    }
    s.wait_sink_caught_up("redis").await;
    redis.kill();
    // The API does not wait for Redis.
    for i in 5..15 {
        ids.push(s.submit(json!({"code": format!("print({i})")})).await);
    }
    for id in &ids {
        s.wait_terminal(id).await;
    }
    let started = Instant::now();
    loop {
        let h = s.health().await;
        let sink = &h["sinks"]["redis"];
        if sink["ok"] == false && sink["backlog"].as_u64().unwrap_or(0) > 0 {
            assert_eq!(h["status"], "degraded");
            assert_eq!(h["redis"]["connected"], false);
            assert!(sink["last_error"].as_str().is_some());
            break;
        }
        assert!(started.elapsed() < DEADLINE, "outage not visible: {h}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let m = s.get("/metrics").await.text();
    assert!(
        m.contains("crucible_outbox_sink_up{sink=\"redis\"} 0"),
        "{m}"
    );
    redis.restart();
    ids.push(s.submit(json!({"code": "print('after')"})).await);
    s.wait_terminal(ids.last().expect("id")).await;
    let head = s.wait_sink_caught_up("redis").await;
    let stream = redis.stream("crucible:events").await;
    check_stream(&stream, head);
    // The appliance's own connection (request/reply, the health check) reconnects on its
    // own schedule: health is ok once it has.
    let started = Instant::now();
    loop {
        let h = s.health().await;
        if h["status"] == "ok" {
            break;
        }
        assert!(started.elapsed() < DEADLINE, "never ok again: {h}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_delivery_and_cursor_redelivers_the_same_event_ids() {
    let redis = RedisServer::start();
    let mut s = Server::start_with(
        "start_paused = true",
        &[
            ("REDIS_URL", &redis.url()),
            ("CRUCIBLE_FAILPOINTS", "relay.after_deliver=1"),
        ],
    )
    .await;
    // The first delivered batch reaches Redis, then the process aborts before the cursor
    // is saved. The 202 may or may not have been written first.
    let _ = s
        .submit_keyed(&json!({"code": "print('twice?')"}), "k1")
        .await;
    assert!(!s.wait_exit().success());
    let before = redis.stream("crucible:events").await;
    assert_eq!(before.len(), 1, "{before:?}");
    s.set_env("CRUCIBLE_FAILPOINTS", None);
    s.set_config("");
    s.restart().await;
    let r = s
        .submit_keyed(&json!({"code": "print('twice?')"}), "k1")
        .await
        .expect("retry");
    let id = r.json().expect("json")["eval_id"]
        .as_str()
        .expect("id")
        .to_string();
    s.wait_terminal(&id).await;
    let head = s.wait_sink_caught_up("redis").await;
    let after = redis.stream("crucible:events").await;
    assert_eq!(
        after[0], after[1],
        "the same event, delivered again unchanged"
    );
    assert_eq!(after.len() as u64, head + 1);
    check_stream(&after, head);
}

/// Wait until `/health` satisfies `f`; returns how long it took and the last answer.
async fn health_until(s: &Server, f: impl Fn(&Value) -> bool) -> (Duration, Value) {
    let started = Instant::now();
    loop {
        let h = s.health().await;
        if f(&h) {
            return (started.elapsed(), h);
        }
        assert!(started.elapsed() < DEADLINE, "health never changed: {h}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A consumer written the way the seed platform's storage worker is: it subscribes to
/// `evaluation:queued`, `evaluation:running`, `evaluation:completed` and
/// `evaluation:failed`, reads flat fields from each message (`eval_id`, `code`,
/// `language`, `metadata`, `executor_id`, `output`, `error`, ...), skips a message whose
/// required fields are missing, and keeps one row per evaluation.
#[derive(Debug, Default)]
struct SeedStorage {
    rows: HashMap<String, Value>,
    skipped: Vec<String>,
    by_channel: HashMap<String, usize>,
}

impl SeedStorage {
    fn handle(&mut self, channel: &str, data: &Value) {
        *self.by_channel.entry(channel.to_string()).or_default() += 1;
        let text = |k: &str| {
            data.get(k)
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string()
        };
        let eval_id = text("eval_id");
        match channel {
            "evaluation:queued" => {
                if eval_id.is_empty() || text("code").is_empty() {
                    self.skipped.push(format!("{channel}: {data}"));
                    return;
                }
                let language = data.get("language").cloned().unwrap_or(json!("python"));
                let metadata = data.get("metadata").cloned().unwrap_or(json!({}));
                self.rows.insert(
                    eval_id.clone(),
                    json!({"id": eval_id, "code": text("code"), "language": language,
                           "status": "queued", "metadata": metadata}),
                );
            }
            "evaluation:running" => {
                if eval_id.is_empty() || text("executor_id").is_empty() {
                    self.skipped.push(format!("{channel}: {data}"));
                    return;
                }
                if let Some(row) = self.rows.get_mut(&eval_id) {
                    row["status"] = json!("running");
                }
            }
            "evaluation:completed" | "evaluation:failed" => {
                if eval_id.is_empty() {
                    self.skipped.push(format!("{channel}: {data}"));
                    return;
                }
                let Some(row) = self.rows.get_mut(&eval_id) else {
                    self.skipped
                        .push(format!("{channel} before queued: {data}"));
                    return;
                };
                if channel == "evaluation:completed" {
                    row["status"] = json!("completed");
                    row["output"] = data.get("output").cloned().unwrap_or(json!(""));
                    row["error"] = data.get("error").cloned().unwrap_or(json!(""));
                    row["metadata"] = data.get("metadata").cloned().unwrap_or(json!({}));
                } else {
                    row["status"] = json!("failed");
                    row["error"] = data.get("error").cloned().unwrap_or(json!("Unknown error"));
                }
                row["exit_code"] = data.get("exit_code").cloned().unwrap_or(Value::Null);
            }
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_of_redis_or_postgres_shows_in_health_at_once() {
    let mut redis = RedisServer::start();
    let mut pg = crate::common::PgServer::start();
    let s = Server::start_with(
        "",
        &[("REDIS_URL", &redis.url()), ("DATABASE_URL", &pg.url())],
    )
    .await;
    let (_, h) = health_until(&s, |h| {
        h["redis"]["connected"] == true && h["postgres"]["reachable"] == true
    })
    .await;
    assert_eq!(h["status"], "ok", "{h}");

    // No traffic at all: only the connection checks can notice.
    redis.kill();
    let (took, h) = health_until(&s, |h| h["redis"]["connected"] == false).await;
    assert_eq!(h["status"], "degraded", "{h}");
    eprintln!(
        "redis outage seen in /health after {:.2} s",
        took.as_secs_f64()
    );
    assert!(
        took < Duration::from_secs(10),
        "redis outage seen after {took:?}"
    );
    redis.restart();
    health_until(&s, |h| h["redis"]["connected"] == true).await;

    pg.kill();
    let (took, h) = health_until(&s, |h| h["postgres"]["reachable"] == false).await;
    assert_eq!(h["status"], "degraded", "{h}");
    assert!(h["postgres"]["last_check_error"].is_string(), "{h}");
    eprintln!(
        "postgres outage seen in /health after {:.2} s",
        took.as_secs_f64()
    );
    assert!(
        took < Duration::from_secs(10),
        "postgres outage seen after {took:?}"
    );
    pg.restart();
    let (_, h) = health_until(&s, |h| h["postgres"]["reachable"] == true).await;
    let _ = h;
    health_until(&s, |h| h["status"] == "ok").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seed_style_consumer_stores_complete_records_from_seed_payloads() {
    let redis = RedisServer::start();
    let sub = {
        let cfg = fred::prelude::Config::from_url(&redis.url()).expect("url");
        let c = fred::prelude::Builder::from_config(cfg)
            .build_subscriber_client()
            .expect("subscriber");
        c.init().await.expect("connect");
        c
    };
    let mut rx = sub.message_rx();
    sub.subscribe(vec![
        "evaluation:queued",
        "evaluation:running",
        "evaluation:completed",
        "evaluation:failed",
    ])
    .await
    .expect("subscribe");
    let s = Server::start_with(
        "[redis]\npayload = \"seed\"",
        &[("REDIS_URL", &redis.url())],
    )
    .await;
    let ok = s
        .submit(json!({"code": "print('stored by the seed worker')", "metadata": {"user": "u1"}}))
        .await;
    let bad = s
        .submit(json!({"code": "import sys\nprint('partial')\nsys.exit(4)"}))
        .await;
    let ok_rec = s.wait_terminal(&ok).await;
    let bad_rec = s.wait_terminal(&bad).await;
    s.wait_sink_caught_up("redis").await;

    let mut storage = SeedStorage::default();
    let started = Instant::now();
    let done = |st: &SeedStorage| {
        [&ok, &bad].iter().all(|id| {
            st.rows
                .get(id.as_str())
                .is_some_and(|r| r["status"] == "completed" || r["status"] == "failed")
        })
    };
    while !done(&storage) {
        let left = DEADLINE.saturating_sub(started.elapsed());
        let m = tokio::time::timeout(left, rx.recv())
            .await
            .expect("the seed worker's messages")
            .expect("message");
        let data: Value =
            serde_json::from_str(&m.value.as_string().expect("text")).expect("a JSON message");
        storage.handle(&m.channel, &data);
    }
    assert!(storage.skipped.is_empty(), "{:?}", storage.skipped);
    assert_eq!(
        storage.by_channel["evaluation:running"], 2,
        "{:?}",
        storage.by_channel
    );

    let row = &storage.rows[&ok];
    assert_eq!(row["status"], "completed");
    assert_eq!(row["code"], ok_rec["code"]);
    assert_eq!(row["language"], "python");
    assert_eq!(row["output"], "stored by the seed worker\n");
    assert_eq!(row["error"], "");
    assert_eq!(row["metadata"], json!({"user": "u1"}));
    assert_eq!(row["exit_code"], 0);
    let row = &storage.rows[&bad];
    assert_eq!(row["status"], "failed");
    assert_eq!(row["error"], bad_rec["error"]);
    assert!(
        row["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{row}"
    );
    assert_eq!(row["exit_code"], 4);

    // The stream keeps the envelope for consumers that must not miss an event.
    let stream = redis.stream("crucible:events").await;
    assert!(stream
        .iter()
        .all(|(_, e)| e["data"]["eval_id"] == e["eval_id"]));
}
