//! Redis (seed 004): the request/reply responder on `crucible.request` and the consumer
//! behind `crucible events tail`, against the real binary and a throwaway redis-server.
//!
//! Requests are PUBLISHed on `crucible.request` and replies read on a per-test channel
//! through a subscriber client. The responder subscribes asynchronously at start-up (and
//! again after a reconnect), so every test first waits until `PUBSUB NUMSUB` reports it;
//! likewise a requester waits until Redis counts its own reply subscription before it
//! publishes (fred's `subscribe` returns before Redis has processed the SUBSCRIBE).
//! Deadlines only turn a hang into a failure; no assertion depends on timing.

use crate::common::{bin, RedisServer, Server, DEADLINE};
use fred::clients::SubscriberClient;
use fred::prelude::{
    Builder, Client, ClientLike, Config, EventInterface, PubsubInterface, Value as RedisValue,
};
use fred::types::Message;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use tokio::sync::broadcast;

const REQUESTS: &str = "crucible.request";
const STREAM: &str = "crucible:events";
const POLL: Duration = Duration::from_millis(25);

// ---- fixture ---------------------------------------------------------------------------

/// A redis-server, an appliance delivering to it, and a plain client for checks. The
/// server is declared (so dropped) first: it stops while Redis is still there.
struct Rig {
    server: Server,
    redis: RedisServer,
    admin: Client,
}

impl Rig {
    /// Start both and wait until the responder listens.
    async fn start() -> Rig {
        let redis = RedisServer::start();
        let server = Server::start_with("", &[("REDIS_URL", &redis.url())]).await;
        let admin = redis.client().await;
        let rig = Rig {
            server,
            redis,
            admin,
        };
        wait_responder(&rig.admin, &rig.server).await;
        rig
    }

    /// A requester with its own reply channel.
    async fn requester(&self, reply_to: &str) -> Requester {
        Requester::new(&self.redis, &self.server, reply_to).await
    }
}

/// Everything the server wrote to stderr, found through its directory (for hang messages
/// raised where only the directory is at hand).
fn server_log(dir: &Path) -> String {
    let mut logs: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    logs.retain(|p| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("server-") && n.ends_with(".log"))
    });
    logs.sort();
    logs.iter()
        .map(|p| std::fs::read_to_string(p).unwrap_or_default())
        .collect()
}

/// Subscribers of `channel` as Redis counts them (`None` while unreachable).
async fn numsub(client: &Client, channel: &str) -> Option<i64> {
    let v: RedisValue = client.pubsub_numsub(channel).await.ok()?;
    v.into_array().get(1).and_then(|n| n.as_i64())
}

/// Wait until Redis counts one subscriber of `channel`. fred's `subscribe` returns once
/// the command is sent, not when Redis has processed it, so this is how a test knows a
/// subscription is in place.
async fn wait_subscribed(client: &Client, channel: &str, log: impl Fn() -> String) {
    let started = Instant::now();
    loop {
        let n = numsub(client, channel).await;
        if n == Some(1) {
            return;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "nobody subscribed to {channel} (NUMSUB {n:?}):\n{}",
            log()
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Wait until the appliance's responder is subscribed to `crucible.request`.
async fn wait_responder(admin: &Client, server: &Server) {
    wait_subscribed(admin, REQUESTS, || server.log()).await;
}

/// A Prometheus value: the sum over every series of `name` (labeled or not); 0 if none.
async fn metric(server: &Server, name: &str) -> u64 {
    server.metric(name, "").await.unwrap_or(0.0) as u64
}

/// The eval_id of every evaluation, all pages of `GET /api/evaluations`, newest first.
async fn all_eval_ids(server: &Server) -> Vec<String> {
    let mut out = Vec::new();
    let mut path = "/api/evaluations?limit=100".to_string();
    loop {
        let v = server.get(&path).await.json().expect("json");
        out.extend(
            v["evaluations"]
                .as_array()
                .expect("evaluations")
                .iter()
                .filter_map(|r| r["eval_id"].as_str().map(str::to_string)),
        );
        match v["next_cursor"].as_str() {
            Some(c) => path = format!("/api/evaluations?limit=100&cursor={c}"),
            None => return out,
        }
    }
}

/// Wait until the redis sink has delivered every event up to `seq` and return its
/// cursor and the durable head. (A record may be readable as terminal a moment before
/// the flush that makes its event part of the durable head, so waiting for `cursor ==
/// head` alone after `wait_terminal` could stop one event short.)
async fn wait_redis_delivered(server: &Server, seq: u64) -> (u64, u64) {
    let started = Instant::now();
    loop {
        let v = server
            .get("/api/admin/sinks")
            .await
            .json()
            .expect("sinks json");
        let redis = v["sinks"]
            .as_array()
            .and_then(|a| a.iter().find(|s| s["name"] == "redis"))
            .cloned()
            .unwrap_or_else(|| panic!("no redis sink: {v}"));
        let cursor = redis["cursor"].as_u64().expect("cursor");
        if cursor >= seq {
            return (cursor, redis["head"].as_u64().expect("head"));
        }
        assert!(
            started.elapsed() < DEADLINE,
            "redis sink stuck: {redis}\n{}",
            server.log()
        );
        tokio::time::sleep(POLL).await;
    }
}

// ---- request/reply client ----------------------------------------------------------------

/// A requester: a plain client to PUBLISH requests and a subscriber on its own reply
/// channel.
struct Requester {
    publisher: Client,
    subscriber: SubscriberClient,
    replies: broadcast::Receiver<Message>,
    reply_to: String,
    next_id: u64,
    /// The last request published (for the message when its reply never comes).
    last_sent: String,
    log_dir: PathBuf,
    http: crucible::client::Client,
}

impl Requester {
    async fn new(redis: &RedisServer, server: &Server, reply_to: &str) -> Requester {
        let publisher = redis.client().await;
        let config = Config::from_url(&redis.url()).expect("redis url");
        let subscriber = Builder::from_config(config)
            .build_subscriber_client()
            .expect("subscriber client");
        subscriber.init().await.expect("connect the subscriber");
        let replies = subscriber.message_rx();
        subscriber
            .subscribe(reply_to)
            .await
            .expect("subscribe to the reply channel");
        wait_subscribed(&publisher, reply_to, || server.log()).await;
        Requester {
            publisher,
            subscriber,
            replies,
            reply_to: reply_to.to_string(),
            next_id: 0,
            last_sent: String::new(),
            log_dir: server.dir.path().to_path_buf(),
            http: server.client.clone(),
        }
    }

    /// PUBLISH anything on the request channel (the responder must be its one listener).
    async fn publish_raw(&mut self, message: &str) {
        self.last_sent = message.to_string();
        let receivers: i64 = self
            .publisher
            .publish(REQUESTS, message)
            .await
            .expect("PUBLISH a request");
        assert_eq!(receivers, 1, "the responder is not listening");
    }

    /// PUBLISH a well-formed request answered on our reply channel.
    async fn send(&mut self, correlation_id: &str, request_type: &str, payload: Value) {
        let request = json!({
            "correlation_id": correlation_id,
            "reply_to": self.reply_to,
            "request_type": request_type,
            "payload": payload,
        });
        self.publish_raw(&request.to_string()).await;
    }

    /// The next message on our reply channel, parsed.
    async fn next_reply(&mut self) -> Value {
        let msg = match tokio::time::timeout(DEADLINE, self.replies.recv()).await {
            Ok(m) => m.expect("reply channel open and not lagging"),
            Err(_) => panic!(
                "no reply on {} in time (last request {})\n{}",
                self.reply_to,
                self.last_sent,
                self.diagnostics().await
            ),
        };
        assert_eq!(&*msg.channel, self.reply_to.as_str());
        let text = msg.value.as_string().expect("reply is text");
        let reply: Value = serde_json::from_str(&text).expect("reply is JSON");
        assert!(
            reply["source"]
                .as_str()
                .is_some_and(|s| s.starts_with("crucible:")),
            "{reply}"
        );
        assert!(reply["timestamp"].is_string(), "{reply}");
        reply
    }

    /// What the appliance says, for the message of a missing reply.
    async fn diagnostics(&self) -> String {
        let metrics = match self.http.get("/metrics").await {
            Ok(r) => r
                .text()
                .lines()
                .filter(|l| l.starts_with("crucible_redis"))
                .collect::<Vec<_>>()
                .join("\n"),
            Err(e) => format!("GET /metrics: {e}"),
        };
        format!(
            "metrics:\n{metrics}\nserver log:\n{}",
            server_log(&self.log_dir)
        )
    }

    /// Send one request and return its reply (which must be the next message and carry
    /// our correlation id).
    async fn call(&mut self, request_type: &str, payload: Value) -> Value {
        self.next_id += 1;
        let id = format!("{}-{}", self.reply_to, self.next_id);
        self.send(&id, request_type, payload).await;
        let reply = self.next_reply().await;
        assert_eq!(reply["correlation_id"], id.as_str(), "{reply}");
        reply
    }

    /// A request that must succeed; returns its payload.
    async fn ok(&mut self, request_type: &str, payload: Value) -> Value {
        let reply = self.call(request_type, payload).await;
        assert!(
            reply.get("error").is_none() && reply.get("error_code").is_none(),
            "{request_type} failed: {reply}"
        );
        reply["payload"].clone()
    }

    /// A request that must fail with `code` (and `field`, when given).
    async fn err(&mut self, request_type: &str, payload: Value, code: &str, field: Option<&str>) {
        let reply = self.call(request_type, payload).await;
        assert_error(&reply, code, field);
    }

    async fn close(self) {
        let _ = self.subscriber.quit().await;
        let _ = self.publisher.quit().await;
    }
}

fn assert_error(reply: &Value, code: &str, field: Option<&str>) {
    assert_eq!(reply["error_code"], code, "{reply}");
    assert!(
        reply["error"].as_str().is_some_and(|m| !m.is_empty()),
        "{reply}"
    );
    assert!(reply.get("payload").is_none(), "{reply}");
    match field {
        Some(f) => assert_eq!(reply["field"], f, "{reply}"),
        None => assert!(reply.get("field").is_none(), "{reply}"),
    }
}

// ---- request/reply tests ---------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_get_list_round_trip_over_redis() {
    let rig = Rig::start().await;
    let mut rq = rig.requester("test.reply.round-trip").await;

    let accepted = rq
        .ok("submit_evaluation", json!({"code": "print(2+2)"}))
        .await;
    assert_eq!(accepted["status"], "queued", "{accepted}");
    let id = accepted["eval_id"].as_str().expect("eval_id").to_string();

    let started = Instant::now();
    let rec = loop {
        let rec = rq.ok("get_evaluation", json!({ "eval_id": id })).await;
        if matches!(
            rec["status"].as_str(),
            Some("completed" | "failed" | "cancelled")
        ) {
            break rec;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "evaluation stuck: {rec}\n{}",
            rig.server.log()
        );
        tokio::time::sleep(POLL).await;
    };
    assert_eq!(rec["eval_id"], id.as_str());
    assert_eq!(rec["status"], "completed", "{rec}");
    assert_eq!(rec["output"], "4\n");
    assert_eq!(rec["language"], "python");
    // The same record over HTTP.
    assert_eq!(rig.server.record(&id).await, rec);

    let page = rq.ok("list_evaluations", json!({"limit": 1})).await;
    let evaluations = page["evaluations"].as_array().expect("evaluations");
    assert_eq!(evaluations.len(), 1, "{page}");
    assert_eq!(evaluations[0]["eval_id"], id.as_str());
    assert_eq!(page["next_cursor"], Value::Null, "{page}");

    let body = json!({"code": "print('once')", "idempotency_key": "redis-key-1"});
    let first = rq.ok("submit_evaluation", body.clone()).await;
    let again = rq.ok("submit_evaluation", body).await;
    assert_eq!(first["status"], "queued", "{first}");
    let keyed = first["eval_id"].as_str().expect("eval_id");
    assert_ne!(keyed, id);
    assert_eq!(
        again["eval_id"], keyed,
        "same idempotency_key, same evaluation"
    );

    // Two evaluations in all; the keyed one is the newest, and the limit now pages. (Once
    // it is terminal: a listing is not a snapshot of evaluations changing status.)
    rig.server.wait_terminal(keyed).await;
    let page = rq
        .ok("list_evaluations", json!({"limit": "1", "status": ""}))
        .await;
    assert_eq!(page["evaluations"][0]["eval_id"], keyed, "{page}");
    let cursor = page["next_cursor"]
        .as_str()
        .expect("a next page")
        .to_string();
    let rest = rq
        .ok("list_evaluations", json!({"limit": 10, "cursor": cursor}))
        .await;
    assert_eq!(rest["evaluations"].as_array().map(|a| a.len()), Some(1));
    assert_eq!(rest["evaluations"][0]["eval_id"], id.as_str());
    assert_eq!(rest["next_cursor"], Value::Null);
    let http = rig.server.record(keyed).await;
    assert_eq!(http["eval_id"], keyed);
    rq.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_error_replies_and_garbage_is_counted() {
    let rig = Rig::start().await;
    let mut rq = rig.requester("test.reply.errors").await;

    rq.err(
        "frobnicate",
        json!({}),
        "invalid_field",
        Some("request_type"),
    )
    .await;

    // No correlation_id: still answered (the requester may recognise its channel).
    let no_id = json!({
        "reply_to": rq.reply_to,
        "request_type": "list_evaluations",
        "payload": {},
    });
    rq.publish_raw(&no_id.to_string()).await;
    let reply = rq.next_reply().await;
    assert_eq!(reply["correlation_id"], Value::Null, "{reply}");
    assert_error(&reply, "invalid_field", Some("correlation_id"));

    // No request_type.
    let missing_type = json!({"correlation_id": "no-type", "reply_to": rq.reply_to, "payload": {}});
    rq.publish_raw(&missing_type.to_string()).await;
    let reply = rq.next_reply().await;
    assert_eq!(reply["correlation_id"], "no-type");
    assert_error(&reply, "invalid_field", Some("request_type"));

    for payload in [json!([1, 2]), json!("eval"), json!(7)] {
        rq.err("get_evaluation", payload, "invalid_field", Some("payload"))
            .await;
    }
    rq.err(
        "submit_evaluation",
        json!({"code": ""}),
        "invalid_field",
        Some("code"),
    )
    .await;
    rq.err(
        "submit_evaluation",
        json!({"code": "print(1)", "language": "cobol"}),
        "unsupported_language",
        Some("language"),
    )
    .await;
    rq.err(
        "get_evaluation",
        json!({"eval_id": "00000000-0000-7000-8000-000000000000"}),
        "not_found",
        None,
    )
    .await;
    rq.err(
        "list_evaluations",
        json!({"status": "done"}),
        "invalid_field",
        Some("status"),
    )
    .await;
    // Nothing was accepted along the way.
    let none = rig
        .server
        .get("/api/evaluations")
        .await
        .json()
        .expect("json");
    assert_eq!(none["evaluations"], json!([]), "{none}");
    assert_eq!(
        metric(&rig.server, "crucible_redis_requests_malformed_total").await,
        0
    );

    // Not a request at all: nobody to answer, only counted.
    rq.publish_raw("this is not JSON {").await;
    let no_reply_to =
        json!({"correlation_id": "lost", "request_type": "list_evaluations", "payload": {}});
    rq.publish_raw(&no_reply_to.to_string()).await;
    let started = Instant::now();
    while metric(&rig.server, "crucible_redis_requests_malformed_total").await < 2 {
        assert!(
            started.elapsed() < DEADLINE,
            "malformed requests not counted:\n{}",
            rig.server.log()
        );
        tokio::time::sleep(POLL).await;
    }

    // The responder is still there, and the garbage produced no reply of its own.
    let page = rq.ok("list_evaluations", json!({})).await;
    assert_eq!(page["evaluations"], json!([]), "{page}");
    assert_eq!(
        metric(&rig.server, "crucible_redis_requests_malformed_total").await,
        2
    );
    assert_eq!(
        metric(&rig.server, "crucible_redis_requests_dropped_total").await,
        0
    );
    assert_eq!(
        metric(&rig.server, "crucible_redis_reply_errors_total").await,
        0
    );
    rq.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_requesters_each_get_exactly_their_replies() {
    const TASKS: usize = 50;
    const PER_TASK: usize = 5;
    let rig = Rig::start().await;
    let seed = rig.server.submit(json!({"code": "print('seed')"})).await;

    let mut requesters = Vec::with_capacity(TASKS);
    for t in 0..TASKS {
        requesters.push(rig.requester(&format!("test.reply.many.{t}")).await);
    }
    let mut tasks = Vec::with_capacity(TASKS);
    for (t, mut rq) in requesters.into_iter().enumerate() {
        let seed = seed.clone();
        tasks.push(tokio::spawn(async move {
            // Every task sends one submit and a rotating mix of gets and lists, all at
            // once, then collects the replies in whatever order they come.
            let kinds = ["get_evaluation", "list_evaluations", "submit_evaluation"];
            let mut sent = BTreeMap::new();
            for r in 0..PER_TASK {
                let kind = match (t + r) % PER_TASK {
                    0 => kinds[2],
                    1 | 3 => kinds[0],
                    _ => kinds[1],
                };
                let payload = match kind {
                    "get_evaluation" => json!({ "eval_id": seed }),
                    "list_evaluations" => json!({"limit": 5}),
                    _ => json!({"code": format!("print({t})"), "language": "python"}),
                };
                let cid = format!("task{t}-req{r}");
                rq.send(&cid, kind, payload).await;
                sent.insert(cid, kind);
            }
            let mut submitted = None;
            let mut got = BTreeSet::new();
            for _ in 0..PER_TASK {
                let reply = rq.next_reply().await;
                let cid = reply["correlation_id"].as_str().unwrap_or("").to_string();
                let kind = *sent
                    .get(&cid)
                    .unwrap_or_else(|| panic!("task {t} got a reply it never asked for: {reply}"));
                assert!(got.insert(cid), "task {t} got a reply twice: {reply}");
                assert!(reply.get("error").is_none(), "{kind}: {reply}");
                let payload = &reply["payload"];
                match kind {
                    "get_evaluation" => assert_eq!(payload["eval_id"], seed.as_str()),
                    "list_evaluations" => assert!(payload["evaluations"].is_array(), "{reply}"),
                    _ => {
                        assert_eq!(payload["status"], "queued", "{reply}");
                        submitted = payload["eval_id"].as_str().map(str::to_string);
                    }
                }
            }
            // A last request after all replies came: it is the next message, so nothing
            // else was published on this channel in between.
            let last = rq.ok("get_evaluation", json!({ "eval_id": seed })).await;
            assert_eq!(last["eval_id"], seed.as_str());
            rq.close().await;
            submitted.expect("the submit was answered")
        }));
    }
    let mut submitted = HashMap::new();
    for (t, task) in tasks.into_iter().enumerate() {
        let id = task.await.expect("requester task");
        assert!(
            submitted.insert(id, t).is_none(),
            "two submits answered with one eval_id"
        );
    }
    assert_eq!(submitted.len(), TASKS);

    // Every submit was accepted once and ran the code it was given.
    for (id, t) in &submitted {
        let rec = rig.server.wait_terminal(id).await;
        assert_eq!(rec["output"], format!("{t}\n"), "{rec}");
    }
    rig.server.wait_terminal(&seed).await;
    // Listed once each. Only once all are terminal: a listing without a status filter is
    // not a snapshot, and an evaluation that changes status while it runs can be missed.
    let listed = all_eval_ids(&rig.server).await;
    let distinct: HashSet<&String> = listed.iter().collect();
    assert_eq!(listed.len(), TASKS + 1, "{listed:?}");
    assert_eq!(distinct.len(), TASKS + 1, "{listed:?}");
    assert!(distinct.contains(&seed) && submitted.keys().all(|id| distinct.contains(id)));

    let s = &rig.server;
    assert_eq!(metric(s, "crucible_redis_requests_dropped_total").await, 0);
    assert_eq!(metric(s, "crucible_redis_reply_errors_total").await, 0);
    assert_eq!(
        metric(s, "crucible_redis_requests_malformed_total").await,
        0
    );
    assert_eq!(
        metric(s, "crucible_redis_requests_total").await,
        (TASKS * (PER_TASK + 1)) as u64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responder_resubscribes_after_a_redis_restart() {
    let mut rig = Rig::start().await;
    let mut rq = rig.requester("test.reply.restart").await;
    let before = rq.ok("list_evaluations", json!({})).await;
    assert_eq!(before["evaluations"], json!([]));
    rq.close().await;
    let _ = rig.admin.quit().await;

    rig.redis.kill();
    // The API never waits for Redis.
    let during = rig.server.submit(json!({"code": "print('outage')"})).await;
    rig.redis.restart();

    rig.admin = rig.redis.client().await;
    wait_responder(&rig.admin, &rig.server).await;
    let mut rq = rig.requester("test.reply.restart").await;
    let rec = rq.ok("get_evaluation", json!({ "eval_id": during })).await;
    assert_eq!(rec["eval_id"], during.as_str());
    let done = rig.server.wait_terminal(&during).await;
    assert_eq!(done["output"], "outage\n", "{done}");
    let page = rq.ok("list_evaluations", json!({})).await;
    assert_eq!(page["evaluations"][0]["eval_id"], during.as_str(), "{page}");

    // The events of the evaluation accepted during the outage reach the stream.
    // Its three events are the only ones.
    assert_eq!(wait_redis_delivered(&rig.server, 3).await, (3, 3));
    let types: Vec<String> = rig
        .redis
        .stream(STREAM)
        .await
        .into_iter()
        .filter(|(_, e)| e["eval_id"] == during.as_str())
        .map(|(_, e)| e["type"].as_str().unwrap_or("").to_string())
        .collect();
    for t in [
        "evaluation:queued",
        "evaluation:started",
        "evaluation:completed",
    ] {
        assert!(types.iter().any(|x| x == t), "{t} missing: {types:?}");
    }
    assert_eq!(
        metric(&rig.server, "crucible_redis_requests_dropped_total").await,
        0
    );
    rq.close().await;
}

// ---- events tail -----------------------------------------------------------------------

/// `crucible events tail` as a child process: stdout read line by line on a thread (so a
/// hang turns into a failure at the deadline), stderr kept for messages. Killed on drop.
struct TailChild {
    child: Child,
    args: Vec<String>,
    lines: mpsc::Receiver<String>,
    /// Joins to the bytes after the last newline (a line torn by a kill).
    stdout: Option<std::thread::JoinHandle<String>>,
    stderr: Option<std::thread::JoinHandle<String>>,
    started: Instant,
}

impl TailChild {
    fn spawn(url: &str, args: &[&str]) -> TailChild {
        let mut all = vec![
            "events".to_string(),
            "tail".into(),
            "--redis".into(),
            url.into(),
        ];
        all.extend(args.iter().map(|a| a.to_string()));
        let mut child = Command::new(bin())
            .args(&all)
            .env_remove("REDIS_URL")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn crucible events tail");
        let mut out = child.stdout.take().expect("stdout");
        let mut err = child.stderr.take().expect("stderr");
        let (tx, lines) = mpsc::channel();
        let stdout = std::thread::spawn(move || {
            let mut pending = Vec::new();
            let mut buf = [0u8; 8192];
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 {
                    break;
                }
                pending.extend_from_slice(&buf[..n]);
                while let Some(i) = pending.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=i).collect();
                    let line = String::from_utf8_lossy(&line[..i]).into_owned();
                    let _ = tx.send(line);
                }
            }
            String::from_utf8_lossy(&pending).into_owned()
        });
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        TailChild {
            child,
            args: all,
            lines,
            stdout: Some(stdout),
            stderr: Some(stderr),
            started: Instant::now(),
        }
    }

    fn remaining(&self) -> Duration {
        DEADLINE.saturating_sub(self.started.elapsed())
    }

    /// The next complete line; `None` once stdout is closed.
    fn next_line(&mut self) -> Option<String> {
        match self.lines.recv_timeout(self.remaining()) {
            Ok(l) => Some(l),
            Err(mpsc::RecvTimeoutError::Disconnected) => None,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                self.kill9();
                panic!(
                    "`crucible {}` hung; stderr:\n{}",
                    self.args.join(" "),
                    self.stderr_text()
                );
            }
        }
    }

    /// Every remaining complete line, until stdout closes.
    fn rest(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(l) = self.next_line() {
            out.push(l);
        }
        out
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Wait for the exit (after stdout closed).
    fn wait(&mut self) -> ExitStatus {
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                return st;
            }
            if self.remaining().is_zero() {
                self.kill9();
                panic!("`crucible {}` did not exit", self.args.join(" "));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// What stdout held after its last newline (call after the process is gone).
    fn torn_tail(&mut self) -> String {
        self.stdout
            .take()
            .map(|h| h.join().expect("stdout reader"))
            .unwrap_or_default()
    }

    fn stderr_text(&mut self) -> String {
        self.stderr
            .take()
            .map(|h| h.join().expect("stderr reader"))
            .unwrap_or_default()
    }
}

impl Drop for TailChild {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill9();
        }
    }
}

/// Run `crucible events tail ARGS` to its end; asserts exit 0 and returns the lines.
async fn tail_run(url: &str, args: &[&str]) -> Vec<String> {
    let url = url.to_string();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut t = TailChild::spawn(&url, &args);
        let lines = t.rest();
        let status = t.wait();
        let torn = t.torn_tail();
        let stderr = t.stderr_text();
        assert!(status.success(), "tail {args:?} exited {status}:\n{stderr}");
        assert_eq!(torn, "", "tail {args:?} ended with a partial line");
        lines
    })
    .await
    .expect("tail task")
}

/// The event_id of a printed line, after checking the line is that event, verbatim as in
/// the stream.
fn event_id_of(line: &str, stream: &HashMap<String, Value>) -> String {
    let v: Value =
        serde_json::from_str(line).unwrap_or_else(|e| panic!("tail printed {line:?}: {e}"));
    let id = v["event_id"].as_str().expect("event_id").to_string();
    assert_eq!(
        stream.get(&id),
        Some(&v),
        "printed event differs from the stream"
    );
    id
}

fn ids_of(lines: &[String], stream: &HashMap<String, Value>) -> Vec<String> {
    lines.iter().map(|l| event_id_of(l, stream)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_tail_consumer_groups_pending_claims_and_crash() {
    let rig = Rig::start().await;
    let url = rig.redis.url();
    let mut ids = Vec::new();
    for i in 0..6 {
        ids.push(
            rig.server
                .submit(json!({ "code": format!("print({i})") }))
                .await,
        );
    }
    for id in &ids {
        let rec = rig.server.wait_terminal(id).await;
        assert_eq!(rec["status"], "completed", "{rec}");
    }
    // 6 evaluations: queued, started, completed each.
    assert_eq!(wait_redis_delivered(&rig.server, 18).await, (18, 18));
    let entries = rig.redis.stream(STREAM).await;
    let order: Vec<String> = entries.iter().map(|(id, _)| id.clone()).collect();
    let by_id: HashMap<String, Value> = entries.into_iter().collect();
    assert_eq!(order.len(), 18, "{order:?}");
    assert_eq!(by_id.len(), 18, "event_ids in the stream are distinct");

    // c1 reads the whole stream, prints 5, acknowledges those 5; the rest stays pending.
    let first = tail_run(&url, &["--group", "g", "--consumer", "c1", "--count", "5"]).await;
    assert_eq!(
        ids_of(&first, &by_id),
        order[0..5],
        "first 5 in stream order"
    );
    // c1 again: its own pending entries first.
    let second = tail_run(&url, &["--group", "g", "--consumer", "c1", "--count", "5"]).await;
    assert_eq!(
        ids_of(&second, &by_id),
        order[5..10],
        "the next 5, no overlap"
    );
    // c2 takes over what c1 left pending.
    let third = tail_run(
        &url,
        &[
            "--group",
            "g",
            "--consumer",
            "c2",
            "--claim-idle-ms",
            "0",
            "--count",
            "8",
        ],
    )
    .await;
    assert_eq!(ids_of(&third, &by_id), order[10..18], "the remaining 8");
    let mut printed: Vec<String> = Vec::new();
    for run in [&first, &second, &third] {
        printed.extend(ids_of(run, &by_id));
    }
    let distinct: BTreeSet<&String> = printed.iter().collect();
    assert_eq!(printed.len(), 18, "each event printed once");
    assert_eq!(distinct, order.iter().collect::<BTreeSet<_>>());

    // A crash: c3 of a new group is killed -9 after printing something. A second run of
    // c3 prints what was not acknowledged again (identical lines) and everything else;
    // nothing is lost. It follows the stream without --count: how many entries the
    // first run acknowledged before the kill is not knowable, so it runs until the union
    // covers the stream and is then killed too.
    let url2 = url.clone();
    let crashed = tokio::task::spawn_blocking(move || {
        let mut t = TailChild::spawn(&url2, &["--group", "g2", "--consumer", "c3"]);
        let first = t.next_line().expect("the tail printed an event");
        t.kill9();
        let mut lines = vec![first];
        lines.extend(t.rest());
        // A line torn by the kill does not count: acknowledgements follow the flush, so
        // its entry is still pending and the next run prints it.
        lines
    })
    .await
    .expect("crashing tail");
    let crashed_ids = ids_of(&crashed, &by_id);
    assert_eq!(crashed_ids, order[..crashed.len()], "stream order");
    let crashed_lines: HashMap<String, String> = crashed_ids
        .iter()
        .cloned()
        .zip(crashed.iter().cloned())
        .collect();

    let url3 = url.clone();
    let all: BTreeSet<String> = order.iter().cloned().collect();
    let mut covered: BTreeSet<String> = crashed_ids.iter().cloned().collect();
    let by_id2 = by_id.clone();
    let recovered = tokio::task::spawn_blocking(move || {
        let mut t = TailChild::spawn(&url3, &["--group", "g2", "--consumer", "c3"]);
        let mut lines = Vec::new();
        while covered != all {
            let line = t
                .next_line()
                .expect("tail exited before covering the stream");
            covered.insert(event_id_of(&line, &by_id2));
            lines.push(line);
        }
        t.kill9();
        lines.extend(t.rest());
        lines
    })
    .await
    .expect("recovering tail");
    let mut seen = HashSet::new();
    for (id, line) in ids_of(&recovered, &by_id).into_iter().zip(&recovered) {
        assert!(seen.insert(id.clone()), "one run printed {id} twice");
        if let Some(before) = crashed_lines.get(&id) {
            assert_eq!(
                before, line,
                "a re-printed event must be the identical line"
            );
        }
    }
    let union: BTreeSet<String> = crashed_ids.into_iter().chain(seen).collect();
    assert_eq!(union, order.iter().cloned().collect::<BTreeSet<_>>());
}
