//! Operations: systemd notifications and watchdog, structured log fields, live backups,
//! the Prometheus exposition checked by promtool.

use crate::common::{Server, DEADLINE};
use serde_json::{json, Value};
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

fn recv_until(sock: &UnixDatagram, want: &str) -> Vec<String> {
    let mut seen = Vec::new();
    let started = Instant::now();
    let mut buf = [0u8; 512];
    while started.elapsed() < DEADLINE {
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            let done = msg.contains(want);
            seen.push(msg);
            if done {
                return seen;
            }
        }
    }
    panic!("no {want} notification; got {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_ready_watchdog_and_stopping() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("notify");
    let sock = UnixDatagram::bind(&path).expect("bind");
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let mut s = Server::start_with(
        "",
        &[
            ("NOTIFY_SOCKET", path.to_str().expect("path")),
            ("WATCHDOG_USEC", "300000"),
        ],
    )
    .await;
    let ready = recv_until(&sock, "READY=1");
    assert!(
        ready
            .last()
            .is_some_and(|m| m.contains("STATUS=serving on")),
        "{ready:?}"
    );
    // Pings keep coming while the store writer answers.
    recv_until(&sock, "WATCHDOG=1");
    recv_until(&sock, "WATCHDOG=1");
    assert!(s.terminate().success());
    recv_until(&sock, "STOPPING=1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_structured_fields() {
    let mut s = Server::start("log_format = \"json\"").await;
    let id = s.submit(json!({"code": "print(1)"})).await;
    s.wait_terminal(&id).await;
    assert!(s.terminate().success());
    let lines: Vec<Value> = s
        .log()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let finished = lines
        .iter()
        .find(|l| l["message"] == "evaluation finished" && l["eval_id"] == id.as_str())
        .unwrap_or_else(|| panic!("no finished line for {id} in {lines:?}"));
    assert_eq!(finished["status"], "completed");
    assert_eq!(finished["event_type"], "evaluation:completed");
    assert_eq!(finished["level"], "INFO");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_backup_is_a_usable_data_dir() {
    let out = tempfile::tempdir().expect("tempdir");
    let s = Server::start(&format!(
        "backup_dir = {:?}",
        out.path().display().to_string()
    ))
    .await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(s.submit(json!({"code": format!("print({i})")})).await);
    }
    for id in &ids {
        s.wait_terminal(id).await;
    }
    let dest = out.path().join("b1");
    let url = format!("http://{}", s.addr);
    let o = tokio::task::spawn_blocking(move || {
        std::process::Command::new(crate::common::bin())
            .args(["backup", "b1", "--server", &url])
            .output()
            .expect("run backup")
    })
    .await
    .expect("join");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains(&dest.display().to_string()),
        "the CLI says where the backup went"
    );
    let info: Value = serde_json::from_slice(&o.stdout).expect("json");
    let head = s.health().await["store"]["head_seq"].as_u64().unwrap_or(0);
    assert_eq!(info["head_seq"].as_u64(), Some(head));
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(dest.join("backup.json")).expect("manifest"))
            .expect("json");
    assert_eq!(manifest["head_seq"].as_u64(), Some(head));
    // Refuses to overwrite.
    let again = s
        .post("/api/admin/backup", &json!({"path": dest.to_str()}))
        .await;
    assert_eq!(again.status, 409);
    assert_eq!(again.error_code().as_deref(), Some("backup_exists"));
    // Only inside backup_dir: neither `..` nor an absolute path elsewhere, and nothing
    // is written for a refused request.
    let outside = tempfile::tempdir().expect("tempdir");
    for bad in [
        json!("../escape"),
        json!("a/../../escape"),
        json!(outside.path().join("x").display().to_string()),
        json!("/etc/crucible-backup"),
        json!(7),
    ] {
        let r = s.post("/api/admin/backup", &json!({ "path": bad })).await;
        assert_eq!(r.status, 422, "{bad}: {}", r.text());
        let e = r.json().expect("json");
        assert_eq!(e["error"]["field"], "path", "{bad}");
    }
    assert!(!out.path().parent().expect("parent").join("escape").exists());
    assert_eq!(
        std::fs::read_dir(outside.path()).expect("read").count(),
        0,
        "nothing written outside"
    );
    assert!(!std::path::Path::new("/etc/crucible-backup").exists());

    // The backup directory is a data dir: a second server started on it has everything.
    let restored = restore_server(&dest).await;
    for id in &ids {
        let original = s.record(id).await;
        assert_eq!(restored.record(id).await, original);
    }
}

/// A server whose data dir is `dir` (the fixture normally picks its own).
async fn restore_server(dir: &std::path::Path) -> RestoredServer {
    let child = std::process::Command::new(crate::common::bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .env_remove("CRUCIBLE_API_TOKEN")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let started = Instant::now();
    let addr = loop {
        if let Ok(a) = std::fs::read_to_string(dir.join("listen.addr")) {
            if a.ends_with('\n') {
                break a.trim().to_string();
            }
        }
        assert!(
            started.elapsed() < DEADLINE,
            "restored server did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    RestoredServer {
        child,
        client: crucible::client::Client::new(&format!("http://{addr}"), None).expect("client"),
    }
}

struct RestoredServer {
    child: std::process::Child,
    client: crucible::client::Client,
}

impl RestoredServer {
    async fn record(&self, id: &str) -> Value {
        let r = self
            .client
            .get(&format!("/api/eval/{id}"))
            .await
            .expect("get");
        assert_eq!(r.status, 200, "{}", r.text());
        r.json().expect("json")
    }
}

impl Drop for RestoredServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_token_and_refuses_a_broken_file() {
    let mut s = Server::start("api_token = \"old-token-1\"").await;
    let base = format!("http://{}", s.addr);
    let old = crucible::client::Client::new(&base, Some("old-token-1".into())).expect("client");
    let new = crucible::client::Client::new(&base, Some("new-token-2".into())).expect("client");
    let status = |c: &crucible::client::Client| {
        let c = c.clone();
        async move { c.get("/api/evaluations").await.expect("GET").status }
    };
    assert_eq!(status(&old).await, 200);
    assert_eq!(status(&new).await, 401);

    s.set_config("api_token = \"new-token-2\"\nworkers = 3\n[limits]\nmax_code_bytes = 2048");
    let pid = s.pid() as i32;
    let hup = move || unsafe { libc::kill(pid, libc::SIGHUP) };
    hup();
    let started = Instant::now();
    while status(&new).await != 200 {
        assert!(
            started.elapsed() < DEADLINE,
            "reload not applied:\n{}",
            s.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status(&old).await, 401, "the old token no longer works");
    // A live limit applies to the next request.
    let big = new
        .post_json("/api/eval", &json!({"code": "#".repeat(4096)}))
        .await
        .expect("POST");
    assert_eq!(big.status, 422, "{}", big.text());
    let log = s.log();
    assert!(
        log.contains("reload: applied") && log.contains("api_token"),
        "{log}"
    );
    assert!(
        log.contains("takes effect after a restart") && log.contains("workers"),
        "{log}"
    );
    assert!(
        !log.contains("new-token-2"),
        "the token itself is never logged"
    );

    // A broken file is refused; the running configuration stays.
    s.set_config("api_token = \"third-token\"\nworkers = \"many\"");
    hup();
    let started = Instant::now();
    while !s.log().contains("reload refused") {
        assert!(started.elapsed() < DEADLINE, "no refusal:\n{}", s.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        status(&new).await,
        200,
        "still serving with the running config"
    );
    assert_eq!(s.get("/health").await.status, 200);
    assert!(s.terminate().success());
}

/// `promtool check metrics` (Debian's `prometheus` package) on a real `/metrics` answer
/// with every subsystem reporting: sinks (file and Redis), finished and failed
/// evaluations, HTTP errors, the request/reply responder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool() {
    let redis = crate::common::RedisServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let events = dir.path().join("events.jsonl");
    let s = Server::start_with(
        &format!("[sinks.file]\npath = {:?}", events.display().to_string()),
        &[("REDIS_URL", &redis.url())],
    )
    .await;
    s.run_py("print('ok')", 30.0).await;
    s.run_py("raise SystemExit(3)", 30.0).await;
    assert_eq!(s.get("/api/nope").await.status, 404);
    s.wait_sink_caught_up("file").await;
    s.wait_sink_caught_up("redis").await;
    let m = s.get("/metrics").await;
    assert_eq!(m.status, 200);
    let text = m.text();
    for name in [
        "crucible_outbox_cursor{sink=\"redis\"}",
        "crucible_redis_connected 1",
        "crucible_http_requests_total{route=\"other\",code=\"404\"} 1",
        "crucible_evaluations_finished_total{status=\"failed\",failure_reason=\"nonzero_exit\"} 1",
    ] {
        assert!(text.contains(name), "metrics lack {name}:\n{text}");
    }
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package `prometheus`; tests/run.sh installs it)");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(text.as_bytes()).expect("write metrics");
    }
    let out = child.wait_with_output().expect("promtool");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics: {}\n{said}\n--- /metrics:\n{text}",
        out.status
    );
}
