//! Crash safety (OUTBOX.md): kill -9 during a burst, and an abort at each crash point
//! (`CRUCIBLE_FAILPOINTS`, see `src/ops/failpoint.rs`). After a restart: every
//! acknowledged evaluation exists and reaches a terminal state, every event reaches the
//! sink (duplicates only as repeated event_ids with identical content), seqs have no
//! gaps, and no record exists without its event.

use crate::common::{read_jsonl, Server, DEADLINE};
use crucible::client::SseReader;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn sink_config(path: &Path, extra: &str) -> String {
    format!(
        "{extra}\n[sinks.file]\npath = {:?}\n",
        path.display().to_string()
    )
}

/// The whole durable log, read back through `/api/events` from seq 0.
async fn read_log(s: &Server) -> Vec<Value> {
    let h = s.health().await;
    let head = h["store"]["head_seq"].as_u64().unwrap_or(0);
    let oldest = h["store"]["oldest_seq"].as_u64().unwrap_or(1);
    let mut out = Vec::new();
    if head == 0 || oldest > head {
        return out;
    }
    let resp = s
        .client
        .stream("/api/events", &[("Last-Event-ID", "0")])
        .await
        .expect("stream");
    let mut sse = SseReader::new(resp);
    while let Some(ev) = sse.next().await {
        let v: Value = serde_json::from_str(&ev.data).expect("event json");
        let seq = v["seq"].as_u64().unwrap_or(0);
        out.push(v);
        if seq >= head {
            break;
        }
    }
    out
}

/// The invariants after a restart. `acked` evaluations must exist and finish; the file
/// sink must hold the whole log exactly (after dedupe by event_id).
async fn verify(s: &Server, acked: &[String], sink: &Path) {
    for id in acked {
        let rec = s.wait_terminal(id).await;
        assert!(
            matches!(
                rec["status"].as_str(),
                Some("completed" | "failed" | "cancelled")
            ),
            "{rec}"
        );
    }
    // Evaluations that were durable but never acknowledged run to the end as well; wait
    // for them so the snapshot below is stable.
    for rec in s.all_records().await {
        s.wait_terminal(rec["eval_id"].as_str().unwrap_or("")).await;
    }
    let head = s.wait_sink_caught_up("file").await;
    let oldest = s.health().await["store"]["oldest_seq"]
        .as_u64()
        .unwrap_or(1);

    // The sink: duplicates only as identical copies; no seq missing from 1..=head.
    let mut by_id: HashMap<String, Value> = HashMap::new();
    for e in read_jsonl(sink) {
        let id = e["event_id"].as_str().expect("event_id").to_string();
        if let Some(prev) = by_id.get(&id) {
            assert_eq!(prev, &e, "a redelivered event changed");
        }
        by_id.insert(id, e);
    }
    let mut by_seq: BTreeMap<u64, Value> = BTreeMap::new();
    for e in by_id.values() {
        let seq = e["seq"].as_u64().expect("seq");
        assert!(
            by_seq.insert(seq, e.clone()).is_none(),
            "two event ids share seq {seq}"
        );
    }
    let seqs: Vec<u64> = by_seq.keys().copied().collect();
    let expected: Vec<u64> = (1..=head).collect();
    assert_eq!(seqs, expected, "the sink must hold every seq exactly once");

    // Per evaluation: versions 1, 2, ... in seq order, ending in its current state.
    let mut per_eval: HashMap<String, Vec<&Value>> = HashMap::new();
    for e in by_seq.values() {
        per_eval
            .entry(e["eval_id"].as_str().unwrap_or("").to_string())
            .or_default()
            .push(e);
    }
    let evals = s.all_records().await;
    assert_eq!(
        evals.len(),
        per_eval.len(),
        "every record has events and vice versa"
    );
    for rec in &evals {
        let id = rec["eval_id"].as_str().unwrap_or("");
        let evs = per_eval
            .get(id)
            .unwrap_or_else(|| panic!("no events for {id}"));
        let versions: Vec<u64> = evs
            .iter()
            .map(|e| e["version"].as_u64().unwrap_or(0))
            .collect();
        let want: Vec<u64> = (1..=versions.len() as u64).collect();
        assert_eq!(versions, want, "versions of {id}");
        assert_eq!(evs[0]["type"], "evaluation:queued");
        let last = evs[evs.len() - 1];
        assert_eq!(last["version"], rec["version"], "{id}");
        assert_eq!(last["data"]["status"], rec["status"], "{id}");
    }
    // The durable log agrees with the sink for whatever is still retained.
    let log = read_log(s).await;
    for e in &log {
        let seq = e["seq"].as_u64().unwrap_or(0);
        assert!(seq >= oldest);
        assert_eq!(Some(e), by_seq.get(&seq), "log and sink differ at {seq}");
    }
    let ids: HashSet<&str> = acked.iter().map(|s| s.as_str()).collect();
    let have: HashSet<&str> = evals.iter().filter_map(|r| r["eval_id"].as_str()).collect();
    assert!(
        ids.is_subset(&have),
        "an acknowledged evaluation is missing"
    );
}

fn sink_path(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("events.jsonl")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_during_a_burst_loses_nothing_acknowledged() {
    let out = tempfile::tempdir().expect("tempdir");
    let sink = sink_path(&out);
    let mut s = Server::start(&sink_config(&sink, "workers = 2")).await;
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let count = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for t in 0..8 {
        let c = s.client.clone();
        let acked = acked.clone();
        let count = count.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0.. {
                let body = json!({"code": format!("print({t}, {i})"), "timeout": 10});
                match c.post_json("/api/eval", &body).await {
                    Ok(r) if r.status == 202 => {
                        let id = r.json().expect("json")["eval_id"]
                            .as_str()
                            .expect("id")
                            .to_string();
                        acked.lock().expect("lock").push(id);
                        count.fetch_add(1, Ordering::SeqCst);
                    }
                    // The server is gone: stop.
                    _ => return,
                }
            }
        }));
    }
    let started = Instant::now();
    while count.load(Ordering::SeqCst) < 300 {
        assert!(started.elapsed() < DEADLINE, "burst too slow:\n{}", s.log());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    s.kill9();
    for t in tasks {
        let _ = t.await;
    }
    s.restart().await;
    let acked = acked.lock().expect("lock").clone();
    assert!(acked.len() >= 300);
    verify(&s, &acked, &sink).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_flush_before_the_202_keeps_the_evaluation() {
    let out = tempfile::tempdir().expect("tempdir");
    let sink = sink_path(&out);
    // Hit 1 is the start-up batch (interrupt_running); hit 2 is the first submission.
    let mut s = Server::start_with(
        &sink_config(&sink, "start_paused = true"),
        &[("CRUCIBLE_FAILPOINTS", "store.after_flush=2")],
    )
    .await;
    let body = json!({"code": "print('kept')"});
    let r = s.submit_keyed(&body, "crash-after-flush").await;
    assert!(r.is_err(), "the client must not hear 'accepted': {r:?}");
    let st = s.wait_exit();
    assert!(!st.success(), "expected an abort: {st}");
    s.set_env("CRUCIBLE_FAILPOINTS", None);
    s.set_config(&sink_config(&sink, ""));
    s.restart().await;
    // The write was flushed: it exists, and the retry with the same key finds it.
    let evals = s.all_records().await;
    assert_eq!(evals.len(), 1, "{evals:?}");
    let r = s
        .submit_keyed(&body, "crash-after-flush")
        .await
        .expect("retry");
    assert_eq!(r.status, 202);
    let id = r.json().expect("json")["eval_id"]
        .as_str()
        .expect("id")
        .to_string();
    assert_eq!(id, evals[0]["eval_id"].as_str().unwrap_or(""));
    let rec = s.wait_terminal(&id).await;
    assert_eq!(rec["output"], "kept\n");
    verify(&s, &[id], &sink).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_before_flush_never_acknowledges_and_leaves_no_half_write() {
    let out = tempfile::tempdir().expect("tempdir");
    let sink = sink_path(&out);
    let mut s = Server::start_with(
        &sink_config(&sink, "start_paused = true"),
        &[("CRUCIBLE_FAILPOINTS", "store.before_flush=2")],
    )
    .await;
    let r = s
        .client
        .post_json("/api/eval", &json!({"code": "print('maybe')"}))
        .await;
    assert!(r.is_err(), "the client must not hear 'accepted': {r:?}");
    assert!(!s.wait_exit().success());
    s.set_env("CRUCIBLE_FAILPOINTS", None);
    s.set_config(&sink_config(&sink, ""));
    s.restart().await;
    // Whatever survived is whole: a record only with its event, and it runs to the end.
    let evals = s.all_records().await;
    assert!(evals.len() <= 1);
    let ids: Vec<String> = evals
        .iter()
        .filter_map(|r| r["eval_id"].as_str().map(|s| s.to_string()))
        .collect();
    let fresh = s.submit(json!({"code": "print('after')"})).await;
    let mut all = ids.clone();
    all.push(fresh);
    verify(&s, &all, &sink).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_delivery_before_cursor_redelivers_same_event_ids() {
    let out = tempfile::tempdir().expect("tempdir");
    let sink = sink_path(&out);
    let mut s = Server::start_with(
        &sink_config(&sink, "start_paused = true"),
        &[("CRUCIBLE_FAILPOINTS", "relay.after_deliver=1")],
    )
    .await;
    let body = json!({"code": "print('once')"});
    // The relay delivers the queued event, then aborts before saving its cursor. The
    // 202 may or may not have been written first; the key finds the id either way.
    let _ = s.submit_keyed(&body, "redeliver").await;
    assert!(!s.wait_exit().success());
    let before = read_jsonl(&sink);
    assert_eq!(
        before.len(),
        1,
        "delivered once before the crash: {before:?}"
    );
    s.set_env("CRUCIBLE_FAILPOINTS", None);
    s.set_config(&sink_config(&sink, ""));
    s.restart().await;
    let r = s.submit_keyed(&body, "redeliver").await.expect("retry");
    let id = r.json().expect("json")["eval_id"]
        .as_str()
        .expect("id")
        .to_string();
    s.wait_terminal(&id).await;
    s.wait_sink_caught_up("file").await;
    let after = read_jsonl(&sink);
    assert_eq!(
        after[0], after[1],
        "the queued event is delivered again, unchanged"
    );
    assert_eq!(after.len(), 4, "{after:?}");
    verify(&s, &[id], &sink).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_during_pruning_keeps_log_and_sink_consistent() {
    let out = tempfile::tempdir().expect("tempdir");
    let sink = sink_path(&out);
    let cfg = sink_config(
        &sink,
        "start_paused = true\n[outbox]\nretain_secs = 0\nprune_interval_secs = 1",
    );
    let mut s = Server::start_with(&cfg, &[("CRUCIBLE_FAILPOINTS", "outbox.prune=1")]).await;
    let mut acked = Vec::new();
    for b in 0..11 {
        let items: Vec<Value> = (0..100)
            .map(|i| json!({"code": format!("print({b}, {i})")}))
            .collect();
        let r = s
            .post("/api/eval-batch", &json!({ "evaluations": items }))
            .await;
        assert_eq!(r.status, 202, "{}", r.text());
        for it in r.json().expect("json")["evaluations"]
            .as_array()
            .expect("array")
        {
            acked.push(it["eval_id"].as_str().expect("id").to_string());
        }
    }
    // Pruning removes a batch of delivered events, then aborts.
    assert!(!s.wait_exit().success(), "{}", s.log());
    s.set_env("CRUCIBLE_FAILPOINTS", None);
    // Keep what is left, so the checks below see a stable log.
    s.set_config(&sink_config(&sink, "start_paused = true"));
    s.restart().await;
    let h = s.health().await;
    assert!(
        h["store"]["oldest_seq"].as_u64().unwrap_or(0) > 1,
        "pruned: {h}"
    );
    s.post("/api/admin/queue/resume", &json!({})).await;
    verify(&s, &acked, &sink).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_during_replay_then_replay_completes() {
    let out = tempfile::tempdir().expect("tempdir");
    let sink = sink_path(&out);
    let mut s = Server::start_with(
        &sink_config(&sink, ""),
        &[("CRUCIBLE_FAILPOINTS", "outbox.replay=1")],
    )
    .await;
    let id = s.submit(json!({"code": "print('r')"})).await;
    s.wait_terminal(&id).await;
    s.wait_sink_caught_up("file").await;
    assert_eq!(read_jsonl(&sink).len(), 3);
    let r = s
        .client
        .post_json("/api/admin/sinks/file/replay", &json!({"from_seq": 1}))
        .await;
    assert!(r.is_err(), "aborted before answering: {r:?}");
    assert!(!s.wait_exit().success());
    s.set_env("CRUCIBLE_FAILPOINTS", None);
    s.restart().await;
    // The moved cursor was durable: the whole log is delivered again.
    s.wait_sink_caught_up("file").await;
    let lines = read_jsonl(&sink);
    assert_eq!(lines.len(), 6, "{lines:?}");
    assert_eq!(lines[..3], lines[3..]);
    verify(&s, &[id], &sink).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_during_evaluation_retention_keeps_the_store_consistent() {
    let out = tempfile::tempdir().expect("tempdir");
    let sink = sink_path(&out);
    let cfg = sink_config(
        &sink,
        "start_paused = true\n[store]\nretain_evaluations_secs = 1\n[outbox]\nprune_interval_secs = 1",
    );
    let mut s = Server::start_with(&cfg, &[("CRUCIBLE_FAILPOINTS", "retention.prune=1")]).await;
    let keyed = s
        .submit_keyed(&json!({"code": "print('k')"}), "kept-key")
        .await
        .expect("submit");
    assert_eq!(keyed.status, 202);
    let keyed_id = keyed.json().expect("json")["eval_id"]
        .as_str()
        .expect("id")
        .to_string();
    let mut ids = vec![keyed_id.clone()];
    for b in 0..11 {
        let items: Vec<Value> = (0..100)
            .map(|i| json!({"code": format!("print({b}, {i})")}))
            .collect();
        let r = s
            .post("/api/eval-batch", &json!({ "evaluations": items }))
            .await;
        assert_eq!(r.status, 202, "{}", r.text());
        for it in r.json().expect("json")["evaluations"]
            .as_array()
            .expect("array")
        {
            ids.push(it["eval_id"].as_str().expect("id").to_string());
        }
    }
    // Cancelled is terminal: retention removes them a second later, once the file sink
    // has them, and aborts after its first batch.
    for id in &ids {
        let r = s
            .client
            .post_json(&format!("/api/eval/{id}/cancel"), &json!({}))
            .await;
        match r {
            Ok(r) => assert_eq!(r.status, 200, "{}", r.text()),
            Err(_) => break, // retention already began and aborted
        }
    }
    assert!(!s.wait_exit().success(), "{}", s.log());
    s.set_env("CRUCIBLE_FAILPOINTS", None);
    s.restart().await;
    let after_crash = s.health().await["store"]["evaluations"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        after_crash < ids.len() as u64,
        "a batch was removed before the abort"
    );
    // The rest goes after the restart; nothing half-removed is left behind.
    let started = Instant::now();
    loop {
        let h = s.health().await;
        let left = h["store"]["evaluations"].as_u64().unwrap_or(u64::MAX);
        let cancelled = s.get("/api/evaluations?status=cancelled&limit=100").await;
        let listed = cancelled.json().expect("json")["evaluations"]
            .as_array()
            .map(|a| a.len())
            .unwrap_or(0);
        if left == 0 && listed == 0 && s.all_records().await.is_empty() {
            break;
        }
        // Whatever is still there is whole: listed both ways and readable.
        for rec in s.all_records().await {
            let id = rec["eval_id"].as_str().unwrap_or("");
            let r = s.get(&format!("/api/eval/{id}")).await;
            match r.status {
                404 => {} // removed meanwhile
                200 => {
                    let rec = r.json().expect("json");
                    if rec["status"] == "queued" {
                        // Listed after a page boundary moved: cancel it now.
                        s.post(&format!("/api/eval/{id}/cancel"), &json!({})).await;
                    } else {
                        assert_eq!(rec["status"], "cancelled", "{rec}");
                    }
                }
                other => panic!("{other}: {}", r.text()),
            }
        }
        assert!(started.elapsed() < DEADLINE, "retention stuck: {h}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for id in &ids {
        let r = s.get(&format!("/api/eval/{id}")).await;
        assert_eq!(r.status, 404, "{id} should be gone");
    }
    // Every event reached the sink, each seq exactly once (after dedupe).
    let head = s.wait_sink_caught_up("file").await;
    let mut by_id: HashMap<String, Value> = HashMap::new();
    for e in read_jsonl(&sink) {
        by_id.insert(e["event_id"].as_str().expect("id").to_string(), e);
    }
    let seqs: HashSet<u64> = by_id.values().filter_map(|e| e["seq"].as_u64()).collect();
    assert_eq!(seqs.len() as u64, head, "every seq delivered once");
    let cancelled_in_sink: HashSet<&str> = by_id
        .values()
        .filter(|e| e["type"] == "evaluation:cancelled")
        .filter_map(|e| e["eval_id"].as_str())
        .collect();
    assert_eq!(
        cancelled_in_sink.len(),
        ids.len(),
        "every removed evaluation was delivered"
    );
    // The idempotency key went with its evaluation.
    let again = s
        .submit_keyed(&json!({"code": "print('k')"}), "kept-key")
        .await
        .expect("submit");
    assert_eq!(again.status, 202);
    assert_ne!(again.json().expect("json")["eval_id"], keyed_id.as_str());
}
