//! The soak benchmark in small (benches/soak.rs measures it at length): with all three
//! sinks on and retention on, round after round of a mixed load (short programs, runtime
//! errors, time limits, cancellations, a judged C program) does not grow the data dir:
//! once pruned, sled reuses the space; and when the load has drained, no sandbox
//! directory is left but the pool's waiting ones. Each round waits for conditions (all
//! terminal, all delivered, all pruned), never for a time.

use crate::common::{
    dir_allocated, dir_entries, read_jsonl, PgServer, RedisServer, Server, DEADLINE,
};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const ROUNDS: usize = 8;
const PER_ROUND: u64 = 120;

fn mixed(round: usize, i: u64) -> (Value, bool) {
    let meta = json!({"round": round, "i": i, "note": "x".repeat(1000)});
    match i % 40 {
        0 => (
            json!({"code": "import time\ntime.sleep(30)", "timeout": 1, "metadata": meta}),
            false,
        ),
        1 => (
            json!({"code": "import time\ntime.sleep(30)", "timeout": 30, "metadata": meta}),
            true,
        ),
        2 if round % 2 == 0 => (
            json!({"language": "c", "metadata": meta,
                   "code": "#include <stdio.h>\nint main(void){int a,b;scanf(\"%d %d\",&a,&b);printf(\"%d\\n\",a+b);}\n",
                   "tests": [{"stdin": "1 2", "expected_output": "3"}, {"stdin": "2 2", "expected_output": "5"}]}),
            false,
        ),
        3 => (
            json!({"code": "raise ValueError('no')", "metadata": meta}),
            false,
        ),
        4 => (
            json!({"language": "sh", "code": "echo hi; exit 3", "metadata": meta}),
            false,
        ),
        _ => (
            json!({"code": format!("print('{}' * 40)", i % 10), "metadata": meta}),
            false,
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_retention_the_data_dir_plateaus_and_no_sandbox_is_left_behind() {
    let redis = RedisServer::start();
    let pg = PgServer::start();
    let out = tempfile::tempdir().expect("tempdir");
    let events = out.path().join("events.jsonl");
    let s = Server::start_with(
        &format!(
            "workers = 2\n[sandbox]\npool = 2\n[store]\nretain_evaluations_secs = 1\n\
             [outbox]\nretain_secs = 1\nprune_interval_secs = 1\n\
             [redis]\nstream_maxlen = 1000\n[sinks.file]\npath = \"{}\"",
            events.display()
        ),
        &[("REDIS_URL", &redis.url()), ("DATABASE_URL", &pg.url())],
    )
    .await;
    let store = s.data_dir().join("store");
    let mut sizes = Vec::new();
    let mut pruned_before = 0;
    for round in 0..ROUNDS {
        for i in 0..PER_ROUND {
            let (body, cancel) = mixed(round, i);
            let id = s.submit(body).await;
            if cancel {
                let r = s.post(&format!("/api/eval/{id}/cancel"), &json!({})).await;
                assert_eq!(r.status, 200, "{}", r.text());
            }
        }
        // All of it ran (retention removes records a second after they end, so the
        // outcomes are read from the file sink at the end).
        let started = Instant::now();
        loop {
            let q = s.health().await["queue"].clone();
            if q["depth"] == 0 && q["running"] == 0 {
                break;
            }
            assert!(started.elapsed() < DEADLINE, "the queue did not drain: {q}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Every event delivered everywhere, then every evaluation and event pruned.
        for sink in ["file", "redis", "postgres"] {
            s.wait_sink_caught_up(sink).await;
        }
        let started = Instant::now();
        loop {
            let st = s.health().await["store"].clone();
            let pruned = st["evaluations_pruned"].as_u64().unwrap_or(0);
            let events_left = match (st["oldest_seq"].as_u64(), st["head_seq"].as_u64()) {
                (Some(oldest), Some(head)) => head + 1 - oldest.min(head + 1),
                _ => 0,
            };
            if st["evaluations"] == 0 && pruned >= pruned_before + PER_ROUND && events_left == 0 {
                pruned_before = pruned;
                break;
            }
            assert!(started.elapsed() < DEADLINE, "not pruned: {st}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        sizes.push(dir_allocated(&store));
    }
    // Every evaluation ended as its program meant to (nothing lost to the executor),
    // and its terminal event reached the sink.
    let mut ended = std::collections::HashSet::new();
    for e in read_jsonl(&events) {
        let d = &e["data"];
        if !["completed", "failed", "cancelled"].contains(&d["status"].as_str().unwrap_or("")) {
            continue;
        }
        assert!(
            d["status"] != "failed"
                || ["timeout", "nonzero_exit"]
                    .contains(&d["failure_reason"].as_str().unwrap_or("")),
            "{d}"
        );
        ended.insert(d["eval_id"].as_str().unwrap_or("").to_string());
    }
    assert_eq!(ended.len() as u64, ROUNDS as u64 * PER_ROUND);
    // The plateau: sled's file goes up and down by whole segments as it reuses what
    // pruning frees, so the bound is in rounds of data, not a ratio: the last rounds hold
    // at most about two rounds' worth more than the first ones did (one round writes
    // what the file sink received per round), where without pruning the store keeps
    // every round (~1.7 MB each here) and this fails.
    let round_bytes = std::fs::metadata(&events).map(|m| m.len()).unwrap_or(0) / ROUNDS as u64;
    let early = *sizes[..ROUNDS / 2].iter().max().unwrap_or(&0);
    let late = *sizes[ROUNDS / 2..].iter().max().unwrap_or(&0);
    assert!(
        late <= early + 2 * round_bytes,
        "the data dir kept growing under retention: {sizes:?} (a round writes {round_bytes} bytes)"
    );

    // After the drain: only the pool's waiting sandboxes have a directory.
    let e = s.health().await["executor"].clone();
    let work = std::path::PathBuf::from(e["work_dir"].as_str().expect("work_dir"));
    let started = Instant::now();
    loop {
        let left = dir_entries(&work);
        if left.len() <= 2 {
            break;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "sandbox directories left behind: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(s.health().await["queue"]["running"], 0);
}
