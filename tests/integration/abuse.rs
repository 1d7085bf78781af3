//! The API and the host under abuse: half-open connections (slowloris) from the same
//! address as well-formed clients, duplicate Authorization headers, an Idempotency-Key
//! reused for a different request, and run directories left behind by timed-out runs.
//! (Backups outside backup_dir: ops.rs.)

use crate::common::{dir_entries, marker, program, Server, DEADLINE};
use serde_json::json;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// A raw request on a fresh connection; the status code of the answer.
fn raw_request(addr: &str, request: &str) -> u16 {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    s.write_all(request.as_bytes()).expect("write");
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).expect("read an answer");
    let head = String::from_utf8_lossy(&buf[..n]);
    head.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {head:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_connections_do_not_keep_the_api_down() {
    // A long header deadline, so that only making room at the cap can answer in time:
    // without it the well-formed request would wait for a half-open one to time out.
    let s = Server::start("[http]\nmax_connections = 32\nheader_timeout_secs = 60").await;
    let addr = s.addr.clone();
    // Three times the cap, from the same address as the client below (loopback, as
    // behind a reverse proxy), each stuck in the middle of its headers.
    let mut half_open = Vec::new();
    for _ in 0..96 {
        let mut c = TcpStream::connect(&addr).expect("connect");
        c.write_all(b"GET /health HTTP/1.1\r\nHost: crucible\r\nX-Slow: ")
            .expect("partial headers");
        half_open.push(c);
    }
    let a = addr.clone();
    let started = Instant::now();
    let health = tokio::task::spawn_blocking(move || {
        raw_request(
            &a,
            "GET /health HTTP/1.1\r\nHost: crucible\r\nConnection: close\r\n\r\n",
        )
    })
    .await
    .expect("join");
    let waited = started.elapsed();
    assert_eq!(health, 200);
    assert!(
        waited < Duration::from_secs(10),
        "/health took {waited:?} behind {} half-open connections",
        half_open.len()
    );
    // A normal submission too, while more half-open connections keep arriving.
    for _ in 0..64 {
        let mut c = TcpStream::connect(&addr).expect("connect");
        c.write_all(b"POST /api/eval HTTP/1.1\r\nHost: crucible\r\n")
            .expect("partial headers");
        half_open.push(c);
    }
    let started = Instant::now();
    let id = s.submit(json!({"code": "print('through')"})).await;
    assert!(started.elapsed() < Duration::from_secs(10));
    let r = s.wait_terminal(&id).await;
    assert_eq!(r["output"], "through\n");
    let evicted = s
        .metric("crucible_http_connections_evicted_total", "")
        .await
        .unwrap_or(0.0);
    assert!(evicted >= 96.0, "half-open connections closed: {evicted}");
    drop(half_open);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_sent_request_is_closed_at_the_header_deadline() {
    let s = Server::start("[http]\nheader_timeout_secs = 1").await;
    let mut c = TcpStream::connect(&s.addr).expect("connect");
    c.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .expect("partial");
    c.set_read_timeout(Some(DEADLINE)).expect("timeout");
    let started = Instant::now();
    let mut buf = [0u8; 256];
    // The server gives up on the connection: EOF (or a 408 first), never an answer to
    // the half-sent request after a long wait.
    let n = c.read(&mut buf).unwrap_or(0);
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(n == 0 || text.starts_with("HTTP/1.1 408"), "{text:?}");
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_authorization_headers_are_refused() {
    let s = Server::start_with("", &[("CRUCIBLE_API_TOKEN", "s3cret")]).await;
    let addr = s.addr.clone();
    let status = tokio::task::spawn_blocking(move || {
        let one = raw_request(
            &addr,
            "GET /api/evaluations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\nConnection: close\r\n\r\n",
        );
        let two = raw_request(
            &addr,
            "GET /api/evaluations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\nAuthorization: Bearer wrong\r\nConnection: close\r\n\r\n",
        );
        let two_same = raw_request(
            &addr,
            "GET /api/evaluations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong\r\nAuthorization: Bearer s3cret\r\nConnection: close\r\n\r\n",
        );
        (one, two, two_same)
    })
    .await
    .expect("join");
    assert_eq!(status, (200, 400, 400));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_reused_for_another_request_is_a_conflict() {
    let s = Server::start("start_paused = true").await;
    let send = |body: &'static str| {
        let c = s.client.clone();
        async move {
            c.request(
                http::Method::POST,
                "/api/eval",
                Some(("application/json", bytes::Bytes::from(body))),
                &[("Idempotency-Key", "order-99")],
            )
            .await
            .expect("request")
        }
    };
    let first = send(r#"{"code": "print(1)", "metadata": {"a": 1, "b": 2}}"#).await;
    assert_eq!(first.status, 202, "{}", first.text());
    let id = first.json().expect("json")["eval_id"].clone();
    // The same request, other whitespace and key order: the same evaluation.
    let again = send(r#"{"metadata":{"b":2,"a":1},"code":"print(1)"}"#).await;
    assert_eq!(again.status, 202, "{}", again.text());
    assert_eq!(again.json().expect("json")["eval_id"], id);
    // Another request under the same key: 409, and nothing is written.
    let head = s.health().await["store"]["head_seq"].clone();
    let other = send(r#"{"code": "print(2)", "metadata": {"a": 1, "b": 2}}"#).await;
    assert_eq!(other.status, 409, "{}", other.text());
    assert_eq!(
        other.error_code().as_deref(),
        Some("idempotency_key_conflict")
    );
    assert_eq!(s.health().await["store"]["head_seq"], head);
    assert_eq!(s.all_records().await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_leave_no_directory_behind_however_they_end() {
    // Sandboxes made for their run (pooled ones: tests/integration/pool.rs).
    let s = Server::start("workers = 2\n[sandbox]\npool = 0").await;
    let work = std::path::PathBuf::from(
        s.health().await["executor"]["work_dir"]
            .as_str()
            .expect("the sandbox's work_dir in /health"),
    );
    let m = marker(40);
    let spin = program("sleeper(\"MARKER\")\nwhile True: pass\n", &[("MARKER", &m)]);
    // While a run is going, its directory exists (the positive control).
    let long = s.submit(json!({"code": spin, "timeout": 300})).await;
    s.wait_status(&long, "running").await;
    let started = Instant::now();
    while std::fs::read_dir(&work).map(|d| d.count()).unwrap_or(0) == 0 {
        assert!(
            started.elapsed() < DEADLINE,
            "no run directory in {}",
            work.display()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Timed out, cancelled, failed, completed.
    let timed_out = s.submit(json!({"code": spin, "timeout": 1})).await;
    s.wait_terminal(&timed_out).await;
    let c = s
        .post(&format!("/api/eval/{long}/cancel"), &json!({}))
        .await;
    assert_eq!(c.status, 200);
    s.run_py("raise SystemExit(3)", 30.0).await;
    s.run_py("print(1)", 30.0).await;
    let started = Instant::now();
    loop {
        let left = dir_entries(&work);
        if left.is_empty() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "run directories left behind: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
