//! Compatibility with the seed platform's clients, each item through the real binary:
//! its paths (`/api/health`, `/api/eval/{id}/status`), offset paging with `count`,
//! `has_more`, `limit`, `offset`, the submit answer's `message` and `queue_position`, the
//! batch answer's `total`, `queued`, `failed`, and `services` in `/health`.

use crate::common::Server;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_paths_answer_like_their_crucible_twins() {
    let s = Server::start("").await;
    let rec = s.run_py("print('twins')", 30.0).await;
    let id = rec["eval_id"].as_str().expect("id");
    let twin = s.get(&format!("/api/eval/{id}/status")).await;
    assert_eq!(twin.status, 200, "{}", twin.text());
    assert_eq!(twin.json().expect("json"), rec);
    let missing = s
        .get("/api/eval/0193a0b4-7d2e-7c4a-9f00-000000000000/status")
        .await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.error_code().as_deref(), Some("not_found"));

    let health = s.get("/health").await.json().expect("json");
    let api = s.get("/api/health").await;
    assert_eq!(api.status, 200);
    let api = api.json().expect("json");
    for k in ["status", "version", "node", "services", "store", "queue"] {
        assert_eq!(api[k], health[k], "{k}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_services_come_from_every_subsystem() {
    let s = Server::start("").await;
    let h = s.get("/health").await.json().expect("json");
    let services = h["services"].as_object().expect("services").clone();
    assert!(!h["timestamp"].as_str().unwrap_or("").is_empty(), "{h}");
    // One state per subsystem entry, and nothing else.
    let entries: Vec<&str> = [
        "store", "queue", "executor", "judge", "sinks", "redis", "postgres", "workers",
    ]
    .into_iter()
    .filter(|k| h.get(*k).is_some())
    .collect();
    let keys: Vec<&str> = services.keys().map(String::as_str).collect();
    assert_eq!(keys, entries, "{h}");
    for (k, state) in &services {
        let want = if h[k].is_null() {
            "disabled"
        } else {
            "healthy"
        };
        assert_eq!(state, want, "{k}: {h}");
    }
    // Not configured here: disabled, like their `null` entries.
    assert_eq!(services["redis"], "disabled");
    assert_eq!(services["postgres"], "disabled");

    // A Redis that is configured but down: degraded, as its own entry says.
    let port = crate::common::free_port();
    let url = format!("redis://127.0.0.1:{port}");
    let down = Server::start_with("", &[("REDIS_URL", &url)]).await;
    let h = down.get("/health").await.json().expect("json");
    assert_eq!(h["redis"]["connected"], false, "{h}");
    assert_eq!(h["services"]["redis"], "degraded", "{h}");
    assert_eq!(h["status"], "degraded", "{h}");
}

/// Ids of a listing page.
fn ids(page: &Value) -> Vec<String> {
    page["evaluations"]
        .as_array()
        .expect("evaluations")
        .iter()
        .map(|r| r["eval_id"].as_str().unwrap_or("").to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offset_paging_with_count_and_has_more() {
    let s = Server::start("start_paused = true").await;
    let mut all = Vec::new();
    for i in 0..5 {
        all.push(s.submit(json!({ "code": format!("print({i})") })).await);
    }
    all.reverse(); // newest first
    let cancelled = all[1].clone();
    let r = s
        .post(&format!("/api/eval/{cancelled}/cancel"), &json!({}))
        .await;
    assert_eq!(r.status, 200);

    // The seed's loop: offset += limit until has_more is false.
    let mut seen = Vec::new();
    let mut offset = 0;
    loop {
        let page = s
            .get(&format!("/api/evaluations?limit=2&offset={offset}"))
            .await;
        assert_eq!(page.status, 200, "{}", page.text());
        let page = page.json().expect("json");
        assert_eq!(page["count"], 5, "{page}");
        assert_eq!(page["limit"], 2);
        assert_eq!(page["offset"], offset);
        seen.extend(ids(&page));
        if page["has_more"] == false {
            assert_eq!(page["next_cursor"], Value::Null);
            break;
        }
        offset += 2;
    }
    assert_eq!(seen, all, "every evaluation once, newest first");

    let queued = s
        .get("/api/evaluations?status=queued&limit=3&offset=1")
        .await
        .json()
        .expect("json");
    assert_eq!(queued["count"], 4, "{queued}");
    assert_eq!(queued["has_more"], false);
    let want: Vec<String> = all
        .iter()
        .filter(|id| **id != cancelled)
        .skip(1)
        .cloned()
        .collect();
    assert_eq!(ids(&queued), want);

    // Cursor paging, and an offset after a cursor.
    let first = s
        .get("/api/evaluations?limit=2")
        .await
        .json()
        .expect("json");
    assert_eq!(first["offset"], 0);
    assert_eq!(first["has_more"], true);
    let cursor = first["next_cursor"].as_str().expect("cursor");
    let second = s
        .get(&format!("/api/evaluations?limit=2&cursor={cursor}"))
        .await
        .json()
        .expect("json");
    assert_eq!(second["offset"], 0);
    assert_eq!(ids(&second), all[2..4].to_vec());
    let skipped = s
        .get(&format!(
            "/api/evaluations?limit=2&cursor={cursor}&offset=1"
        ))
        .await
        .json()
        .expect("json");
    assert_eq!(skipped["offset"], 1);
    assert_eq!(ids(&skipped), all[3..5].to_vec());
    let past = s
        .get("/api/evaluations?offset=50")
        .await
        .json()
        .expect("json");
    assert_eq!(past["evaluations"], json!([]));
    assert_eq!(past["has_more"], false);
    let deep = s.get("/api/evaluations?offset=1000001").await;
    assert_eq!(deep.status, 422);
    assert_eq!(deep.error_code().as_deref(), Some("invalid_field"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_and_batch_answers_carry_the_seed_fields() {
    let s = Server::start("start_paused = true").await;
    let first = s.post("/api/eval", &json!({ "code": "print(1)" })).await;
    assert_eq!(first.status, 202);
    let first = first.json().expect("json");
    assert_eq!(first["queue_position"], 1, "{first}");
    assert!(first["message"].as_str().is_some_and(|m| !m.is_empty()));

    let body = json!({ "code": "print(2)" });
    let keyed = s.submit_keyed(&body, "seed-1").await.expect("submit");
    let keyed = keyed.json().expect("json");
    assert_eq!(keyed["queue_position"], 2, "{keyed}");
    let again = s.submit_keyed(&body, "seed-1").await.expect("submit");
    assert_eq!(again.status, 202);
    let again = again.json().expect("json");
    assert_eq!(again["eval_id"], keyed["eval_id"]);
    assert_eq!(
        again["queue_position"],
        Value::Null,
        "a repeat has no new place: {again}"
    );
    assert_ne!(again["message"], keyed["message"]);

    let batch = s
        .post(
            "/api/eval-batch",
            &json!({ "evaluations": [{ "code": "print(3)" }, { "code": "echo 4", "language": "sh" }] }),
        )
        .await;
    assert_eq!(batch.status, 202, "{}", batch.text());
    let batch = batch.json().expect("json");
    assert_eq!(
        (
            batch["total"].clone(),
            batch["queued"].clone(),
            batch["failed"].clone()
        ),
        (json!(2), json!(2), json!(0)),
        "{batch}"
    );
    let positions: Vec<Value> = batch["evaluations"]
        .as_array()
        .expect("evaluations")
        .iter()
        .map(|e| e["queue_position"].clone())
        .collect();
    assert_eq!(positions, vec![json!(3), json!(4)]);
}
