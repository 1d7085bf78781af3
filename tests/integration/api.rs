//! Every endpoint and every status transition, over HTTP against the real binary.

use crate::common::{read_jsonl, Server, DEADLINE};
use crucible::client::SseReader;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::time::Instant;

const LONG_SLEEP: &str = "import time\nprint('started', flush=True)\ntime.sleep(600)\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_events_round_trip_on_both_status_paths() {
    let s = Server::start("").await;
    let id = s.submit(json!({"code": "print(\"Hello, Events!\")"})).await;
    let rec = s.wait_terminal(&id).await;
    assert_eq!(rec["status"], "completed", "{rec}");
    assert_eq!(rec["output"], "Hello, Events!\n");
    assert_eq!(rec["stderr"], "");
    assert_eq!(rec["exit_code"], 0);
    assert_eq!(rec["success"], true);
    assert_eq!(rec["language"], "python");
    assert_eq!(rec["version"], 3);
    assert_eq!(rec["failure_reason"], Value::Null);
    assert_eq!(rec["output_truncated"], false);
    for f in ["created_at", "started_at", "completed_at", "runtime_ms"] {
        assert!(!rec[f].is_null(), "{f} missing: {rec}");
    }
    let seed = s.get(&format!("/api/eval-status/{id}")).await;
    assert_eq!(seed.status, 200);
    assert_eq!(seed.json().expect("json"), rec);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdout_stderr_stdin_metadata_and_exit_codes() {
    let s = Server::start("").await;
    let rec = s
        .run(json!({
            "code": "import sys\nname = sys.stdin.read().strip()\nprint('hi', name)\nprint('warn', file=sys.stderr)\nsys.exit(3)\n",
            "stdin": "ada\n",
            "timeout": 30,
            "metadata": {"user": "u1", "tags": ["a", "b"]},
        }))
        .await;
    assert_eq!(rec["status"], "failed", "{rec}");
    assert_eq!(rec["failure_reason"], "nonzero_exit");
    assert_eq!(rec["exit_code"], 3);
    assert_eq!(rec["success"], false);
    assert_eq!(rec["output"], "hi ada\n");
    assert_eq!(rec["stderr"], "warn\n");
    assert_eq!(rec["metadata"], json!({"user": "u1", "tags": ["a", "b"]}));
    assert_eq!(rec["timeout"], 30.0);
    assert!(
        rec["error"].as_str().unwrap_or("").contains("code 3"),
        "{rec}"
    );

    let sh = s
        .run(json!({"code": "echo from-sh; echo oops >&2", "language": "sh"}))
        .await;
    assert_eq!(sh["status"], "completed", "{sh}");
    assert_eq!(sh["output"], "from-sh\n");
    assert_eq!(sh["stderr"], "oops\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_filters_and_pages_newest_first() {
    let s = Server::start("").await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let code = if i % 2 == 0 {
            "print(1)"
        } else {
            "raise SystemExit(1)"
        };
        ids.push(s.submit(json!({ "code": code })).await);
    }
    for id in &ids {
        s.wait_terminal(id).await;
    }
    // Page through everything, two at a time.
    let mut seen = Vec::new();
    let mut path = "/api/evaluations?limit=2".to_string();
    loop {
        let v = s.get(&path).await.json().expect("json");
        let page = v["evaluations"].as_array().expect("array").clone();
        assert!(page.len() <= 2);
        seen.extend(
            page.iter()
                .map(|r| r["eval_id"].as_str().unwrap_or("").to_string()),
        );
        match v["next_cursor"].as_str() {
            Some(c) => path = format!("/api/evaluations?limit=2&cursor={c}"),
            None => break,
        }
    }
    let mut newest_first = ids.clone();
    newest_first.reverse();
    assert_eq!(seen, newest_first);

    let failed = s
        .get("/api/evaluations?status=failed")
        .await
        .json()
        .expect("json");
    let failed_ids: Vec<&str> = failed["evaluations"]
        .as_array()
        .expect("array")
        .iter()
        .map(|r| r["eval_id"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(failed_ids, vec![ids[3].as_str(), ids[1].as_str()]);
    let completed = s.get("/api/evaluations?status=completed&limit=100").await;
    assert_eq!(
        completed.json().expect("json")["evaluations"]
            .as_array()
            .map(|a| a.len()),
        Some(3)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_queued_then_resume_never_runs_it() {
    let s = Server::start("start_paused = true\nworkers = 1").await;
    let id = s.submit(json!({"code": "print('should not run')"})).await;
    let r = s.post(&format!("/api/eval/{id}/cancel"), &json!({})).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let rec = r.json().expect("json");
    assert_eq!(rec["status"], "cancelled");
    assert_eq!(rec["success"], false);
    assert_eq!(rec["version"], 2);
    let again = s.post(&format!("/api/eval/{id}/cancel"), &json!({})).await;
    assert_eq!(again.status, 409);
    assert_eq!(again.error_code().as_deref(), Some("already_terminal"));

    let r = s.post("/api/admin/queue/resume", &json!({})).await;
    assert_eq!(r.json().expect("json")["paused"], false);
    // Something submitted after the cancel runs, so the dispatcher has passed the
    // cancelled one; it must still be cancelled and never have started.
    let after = s.run_py("print(2)", 10.0).await;
    assert_eq!(after["output"], "2\n");
    let rec = s.record(&id).await;
    assert_eq!(rec["status"], "cancelled");
    assert_eq!(rec["started_at"], Value::Null);
    assert_eq!(rec["output"], "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_running_kills_it_and_frees_the_slot() {
    let s = Server::start("workers = 1").await;
    let id = s.submit(json!({"code": LONG_SLEEP, "timeout": 300})).await;
    s.wait_status(&id, "running").await;
    let r = s.post(&format!("/api/eval/{id}/cancel"), &json!({})).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json().expect("json")["status"], "cancelled");
    // With one worker, this only runs once the cancelled process is gone.
    let next = s.run_py("print('next')", 30.0).await;
    assert_eq!(next["status"], "completed", "{next}");
    let rec = s.record(&id).await;
    assert_eq!(
        rec["status"], "cancelled",
        "terminal states never change: {rec}"
    );
    let done = s.post(&format!("/api/eval/{id}/cancel"), &json!({})).await;
    assert_eq!(done.status, 409);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_and_idempotency_key() {
    let s = Server::start("").await;
    let r = s
        .post(
            "/api/eval-batch",
            &json!({"evaluations": [
                {"code": "print('a')"},
                {"code": "echo b", "language": "sh"},
                {"code": "print('c')", "timeout": 5},
            ]}),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.text());
    let v = r.json().expect("json");
    let items = v["evaluations"].as_array().expect("array");
    assert_eq!(items.len(), 3);
    let mut outs = Vec::new();
    for it in items {
        assert_eq!(it["status"], "queued");
        let rec = s.wait_terminal(it["eval_id"].as_str().expect("id")).await;
        outs.push(rec["output"].as_str().unwrap_or("").to_string());
    }
    assert_eq!(outs, vec!["a\n", "b\n", "c\n"]);

    let body = bytes::Bytes::from(json!({"code": "print(42)"}).to_string());
    let send = |key: &'static str| {
        let c = s.client.clone();
        let body = body.clone();
        async move {
            c.request(
                http::Method::POST,
                "/api/eval",
                Some(("application/json", body)),
                &[("Idempotency-Key", key)],
            )
            .await
            .expect("request")
        }
    };
    let a = send("order-17").await;
    let b = send("order-17").await;
    let c = send("order-18").await;
    assert_eq!((a.status, b.status, c.status), (202, 202, 202));
    let ida = a.json().expect("json")["eval_id"].clone();
    assert_eq!(ida, b.json().expect("json")["eval_id"]);
    assert_ne!(ida, c.json().expect("json")["eval_id"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_full_answers_503_with_retry_after() {
    let s = Server::start("start_paused = true\nmax_queued = 2").await;
    s.submit(json!({"code": "print(1)"})).await;
    s.submit(json!({"code": "print(2)"})).await;
    let r = s.post("/api/eval", &json!({"code": "print(3)"})).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.error_code().as_deref(), Some("queue_full"));
    assert!(r.headers.get("retry-after").is_some());
    let list = s.get("/api/evaluations").await.json().expect("json");
    assert_eq!(list["evaluations"].as_array().map(|a| a.len()), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_stream_live_and_resume_with_last_event_id() {
    let s = Server::start("").await;
    let warm = s.run_py("print(0)", 10.0).await;
    assert_eq!(warm["status"], "completed");
    // Subscribe (live, all evaluations), then submit.
    let resp = s.client.stream("/api/events", &[]).await.expect("stream");
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("text/event-stream")
    );
    let mut sse = SseReader::new(resp);
    let id = s.submit(json!({"code": "print('streamed')"})).await;
    let mut got = Vec::new();
    let started = Instant::now();
    while let Some(ev) = sse.next().await {
        let v: Value = serde_json::from_str(&ev.data).expect("event json");
        if v["eval_id"] != id.as_str() {
            continue;
        }
        assert_eq!(ev.id.as_deref(), Some(v["seq"].to_string().as_str()));
        assert_eq!(ev.event.as_deref(), v["type"].as_str());
        got.push(v);
        if got.len() == 3 || started.elapsed() > DEADLINE {
            break;
        }
    }
    let types: Vec<&str> = got
        .iter()
        .map(|e| e["type"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        types,
        vec![
            "evaluation:queued",
            "evaluation:started",
            "evaluation:completed"
        ]
    );
    let versions: Vec<u64> = got
        .iter()
        .map(|e| e["version"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(versions, vec![1, 2, 3]);
    for e in &got {
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
            assert!(e.get(k).is_some(), "event lacks {k}: {e}");
        }
    }
    assert_eq!(got[2]["data"]["output"], "streamed\n");
    let seqs: Vec<u64> = got.iter().map(|e| e["seq"].as_u64().unwrap_or(0)).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");

    // Resume after the queued event, filtered to this evaluation: the durable log replays
    // the rest with the same event ids.
    let last = seqs[0].to_string();
    let resp = s
        .client
        .stream(
            &format!("/api/events?eval_id={id}"),
            &[("Last-Event-ID", &last)],
        )
        .await
        .expect("stream");
    let mut sse = SseReader::new(resp);
    let mut replayed = Vec::new();
    while let Some(ev) = sse.next().await {
        let v: Value = serde_json::from_str(&ev.data).expect("json");
        assert_eq!(v["eval_id"], id.as_str());
        replayed.push(v["event_id"].clone());
        if replayed.len() == 2 {
            break;
        }
    }
    assert_eq!(
        replayed,
        vec![got[1]["event_id"].clone(), got[2]["event_id"].clone()]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_metrics_and_openapi() {
    let s = Server::start("").await;
    s.run_py("print(1)", 10.0).await;
    let h = s.get("/health").await;
    assert_eq!(h.status, 200);
    let h = h.json().expect("json");
    assert_eq!(h["status"], "ok", "{h}");
    assert_eq!(h["store"]["ok"], true);
    assert_eq!(h["executor"]["backend"], "sandbox");
    assert_eq!(h["executor"]["languages"]["python"], "available");
    assert_eq!(h["queue"]["workers"], 2);
    assert!(h["store"]["head_seq"].as_u64().unwrap_or(0) >= 3);

    let m = s.get("/metrics").await;
    assert_eq!(m.status, 200);
    let text = m.text();
    for name in [
        "crucible_queue_depth",
        "crucible_running",
        "crucible_evaluations_accepted_total 1",
        "crucible_evaluations_finished_total{status=\"completed\",failure_reason=\"\"} 1",
        "crucible_store_flush_seconds_bucket",
        "crucible_outbox_head_seq",
        "crucible_http_requests_total",
        "crucible_process_resident_memory_bytes",
    ] {
        assert!(text.contains(name), "metrics lack {name}:\n{text}");
    }

    // Every documented operation exists and answers only documented statuses, and every
    // route is documented. (The unit tests compare the route table with the document;
    // tests/schemathesis.sh fuzzes every operation against it.)
    let doc = s.get("/api/openapi.json").await;
    assert_eq!(doc.status, 200);
    let doc = doc.json().expect("openapi json");
    assert!(doc["openapi"].as_str().unwrap_or("").starts_with("3."));
    assert_eq!(
        doc["servers"],
        json!([{ "url": format!("http://{}", s.addr) }]),
        "servers names the address that served the document"
    );
    let paths = doc["paths"].as_object().expect("paths");
    let mut documented = HashSet::new();
    for (path, ops) in paths {
        for (method, op) in ops.as_object().expect("ops") {
            documented.insert(format!("{} {path}", method.to_uppercase()));
            let concrete = path
                .replace("{id}", "00000000-0000-0000-0000-000000000000")
                .replace("{name}", "nosuchsink");
            if path == "/api/events" {
                // An endless stream: only check that it opens.
                let r = s.client.stream(&concrete, &[]).await.expect("stream");
                assert_eq!(r.status(), 200);
                continue;
            }
            let m = http::Method::from_bytes(method.to_uppercase().as_bytes()).expect("method");
            let body = (m == http::Method::POST)
                .then(|| ("application/json", bytes::Bytes::from_static(b"{}")));
            let r = s
                .client
                .request(m, &concrete, body, &[])
                .await
                .expect("request");
            let msg = r.json().ok().map(|v| v["error"]["message"].clone());
            assert_ne!(
                msg,
                Some(json!("route not found")),
                "documented {method} {path} is not routed"
            );
            assert!(
                op["responses"].get(r.status.to_string()).is_some(),
                "{method} {path} answered {} which its document does not list: {}",
                r.status,
                r.text()
            );
        }
    }
    for route in [
        "POST /api/eval",
        "POST /api/eval-batch",
        "GET /api/eval/{id}",
        "GET /api/eval-status/{id}",
        "POST /api/eval/{id}/cancel",
        "GET /api/evaluations",
        "GET /api/events",
        "GET /health",
        "GET /metrics",
        "GET /api/openapi.json",
        "GET /api/admin/sinks",
        "POST /api/admin/sinks/{name}/replay",
        "GET /api/admin/dead-letters",
        "POST /api/admin/queue/pause",
        "POST /api/admin/backup",
        "POST /api/admin/queue/resume",
    ] {
        assert!(
            documented.contains(route),
            "{route} is not in the OpenAPI document"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_protects_the_api_but_not_health() {
    let s = Server::start_with("", &[("CRUCIBLE_API_TOKEN", "s3cret")]).await;
    let anon = crucible::client::Client::new(&format!("http://{}", s.addr), None).expect("client");
    let wrong = crucible::client::Client::new(&format!("http://{}", s.addr), Some("nope".into()))
        .expect("client");
    for c in [&anon, &wrong] {
        let r = c.get("/api/evaluations").await.expect("get");
        assert_eq!(r.status, 401);
        assert_eq!(r.error_code().as_deref(), Some("unauthorized"));
        let r = c.get("/metrics").await.expect("get");
        assert_eq!(r.status, 401);
    }
    assert_eq!(anon.get("/health").await.expect("get").status, 200);
    let rec = s.run_py("print('authorized')", 10.0).await;
    assert_eq!(rec["output"], "authorized\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_sink_gets_every_event_and_replay_redelivers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("events.jsonl");
    let s = Server::start(&format!(
        "[sinks.file]\npath = {:?}",
        path.display().to_string()
    ))
    .await;
    let id = s.submit(json!({"code": "print('x')"})).await;
    s.wait_terminal(&id).await;
    let sinks = wait_delivered(&s, 3).await;
    assert_eq!(sinks[0]["name"], "file");
    let events = read_jsonl(&path);
    let types: Vec<&str> = events
        .iter()
        .map(|e| e["type"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        types,
        vec![
            "evaluation:queued",
            "evaluation:started",
            "evaluation:completed"
        ]
    );
    assert!(events.iter().all(|e| e["eval_id"] == id.as_str()));

    let r = s
        .post("/api/admin/sinks/file/replay", &json!({"from_seq": 2}))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json().expect("json")["cursor"], 1);
    wait_delivered(&s, 3).await;
    let started = Instant::now();
    let again = loop {
        let e = read_jsonl(&path);
        if e.len() >= 5 || started.elapsed() > DEADLINE {
            break e;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(again.len(), 5, "{again:?}");
    assert_eq!(again[3]["event_id"], events[1]["event_id"]);
    assert_eq!(again[4]["event_id"], events[2]["event_id"]);

    let out = s
        .post("/api/admin/sinks/file/replay", &json!({"from_seq": 99}))
        .await;
    assert_eq!(out.status, 422);
    assert_eq!(out.error_code().as_deref(), Some("replay_out_of_window"));
    let unknown = s
        .post("/api/admin/sinks/nosuch/replay", &json!({"from_seq": 1}))
        .await;
    assert_eq!(unknown.status, 404);
    let dl = s.get("/api/admin/dead-letters").await.json().expect("json");
    assert_eq!(dl["dead_letters"], json!([]));
}

/// Wait until the file sink's cursor reaches `seq`; returns the sink reports.
async fn wait_delivered(s: &Server, seq: u64) -> Vec<Value> {
    let started = Instant::now();
    loop {
        let v = s.get("/api/admin/sinks").await.json().expect("json");
        let sinks = v["sinks"].as_array().cloned().unwrap_or_default();
        if sinks
            .iter()
            .all(|x| x["cursor"].as_u64().unwrap_or(0) >= seq)
        {
            return sinks;
        }
        assert!(started.elapsed() < DEADLINE, "sink stuck: {v}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_interrupts_running_work_after_grace_and_keeps_queued() {
    let mut s = Server::start("workers = 1\nshutdown_grace_secs = 1").await;
    let running = s.submit(json!({"code": LONG_SLEEP, "timeout": 300})).await;
    s.wait_status(&running, "running").await;
    let queued = s.submit(json!({"code": "print('after restart')"})).await;
    let status = s.terminate();
    assert!(status.success(), "exit status {status}:\n{}", s.log());
    assert!(s.log().contains("crucible stopped cleanly"), "{}", s.log());
    s.restart().await;
    let rec = s.wait_terminal(&running).await;
    assert_eq!(rec["status"], "failed", "{rec}");
    assert_eq!(rec["failure_reason"], "interrupted");
    let q = s.wait_terminal(&queued).await;
    assert_eq!(
        q["status"], "completed",
        "queued work survives a restart: {q}"
    );
    assert_eq!(q["output"], "after restart\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_while_running_ends_interrupted_after_restart() {
    let mut s = Server::start("workers = 1").await;
    let id = s.submit(json!({"code": LONG_SLEEP, "timeout": 300})).await;
    s.wait_status(&id, "running").await;
    s.kill9();
    s.restart().await;
    let rec = s.wait_terminal(&id).await;
    assert_eq!(rec["status"], "failed");
    assert_eq!(rec["failure_reason"], "interrupted");
    assert_eq!(rec["version"], 3);
    let h = s.get("/health").await.json().expect("json");
    assert_eq!(h["queue"]["running"], 0);
}

/// `?wait=SECS` on both read paths: one request learns the end of an evaluation (no
/// polling), a wait that runs out answers with the record as it stands, a cancel wakes a
/// waiting reader, and a bad `wait` or an unknown parameter is a 422 naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_with_wait_answers_when_the_evaluation_ends() {
    let s = Server::start("").await;
    // One request from submit to the result.
    let id = s.submit(json!({"code": "print('waited')"})).await;
    let r = s.get(&format!("/api/eval/{id}?wait=60")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let rec = r.json().expect("json");
    assert_eq!(rec["status"], "completed", "{rec}");
    assert_eq!(rec["output"], "waited\n");
    let r = s.get(&format!("/api/eval-status/{id}?wait=5")).await;
    assert_eq!(
        r.json().expect("json"),
        rec,
        "a terminal record answers at once"
    );

    // A wait that runs out: the record as it stands.
    let long = s.submit(json!({"code": LONG_SLEEP, "timeout": 300})).await;
    s.wait_status(&long, "running").await;
    let r = s.get(&format!("/api/eval-status/{long}?wait=0.2")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json().expect("json")["status"], "running");

    // A waiting reader is woken by the cancel (long before its 60 s run out).
    let started = Instant::now();
    let waiter = {
        let c = s.client.clone();
        let path = format!("/api/eval/{long}?wait=60");
        tokio::spawn(async move { c.get(&path).await.expect("GET") })
    };
    let c = s
        .post(&format!("/api/eval/{long}/cancel"), &json!({}))
        .await;
    assert_eq!(c.status, 200, "{}", c.text());
    let r = waiter.await.expect("join");
    assert_eq!(r.json().expect("json")["status"], "cancelled");
    assert!(
        started.elapsed().as_secs() < 50,
        "the cancel did not wake the reader"
    );

    // Bad input.
    for q in ["wait=-1", "wait=abc", "wait=", "wait=NaN", "wait=inf"] {
        let r = s.get(&format!("/api/eval/{id}?{q}")).await;
        assert_eq!(r.status, 422, "{q}: {}", r.text());
        let v = r.json().expect("json");
        assert_eq!(v["error"]["code"], "invalid_field", "{q}: {v}");
        assert_eq!(v["error"]["field"], "wait", "{q}: {v}");
    }
    let r = s.get(&format!("/api/eval/{id}?wiat=5")).await;
    assert_eq!(r.status, 422, "{}", r.text());
    let r = s
        .get("/api/eval/01890000-0000-7000-8000-000000000000?wait=1")
        .await;
    assert_eq!(r.status, 404, "{}", r.text());
}
