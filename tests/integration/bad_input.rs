//! Bad input: every malformed, invalid, oversized, unauthorized or misrouted request gets
//! its HTTP status and stable error code in the `{"error": {"code", "message", "field"?}}`
//! shape, and changes nothing: no evaluation appears, the event log head (`/health`
//! `store.head_seq`) does not move, and the server keeps answering `/health` with 200.

use crate::common::{Server, DEADLINE};
use bytes::Bytes;
use crucible::client::{Client, Reply};
use http::Method;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An expected error answer: HTTP status, stable code, and the field it names (if any).
type Want<'a> = (u16, &'a str, Option<&'a str>);

const INVALID: &str = "invalid_field";
const MEDIA: &str = "unsupported_media_type";
const TOO_LARGE: &str = "payload_too_large";
const OK: &str = "print(1)";
/// An id that no evaluation has.
const ID: &str = "0193a0b4-7d2e-7c4a-9f00-000000000000";

/// Send one request and check its error answer; no answer before the deadline is a hang.
async fn expect(
    c: &Client,
    m: Method,
    path: &str,
    body: Option<(&str, Bytes)>,
    headers: &[(&str, &str)],
    want: Want<'_>,
) -> Reply {
    let mut what = format!("{m} {path}");
    if let Some((ct, b)) = &body {
        what += &format!(" [{ct}] {:.80}", String::from_utf8_lossy(b));
    }
    for (k, v) in headers {
        what += &format!(" [{k}: {v:.40}]");
    }
    let r = tokio::time::timeout(DEADLINE, c.request(m, path, body, headers))
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer before the deadline (hang)"))
        .unwrap_or_else(|e| panic!("{what}: request failed: {e}"));
    assert_error(&what, &r, want);
    r
}

/// GET `path` and check the error answer.
async fn expect_get(c: &Client, path: &str, want: Want<'_>) {
    expect(c, Method::GET, path, None, &[], want).await;
}

/// POST `body` as `application/json` and check the error answer.
async fn expect_post(c: &Client, path: &str, body: &Value, h: &[(&str, &str)], want: Want<'_>) {
    let bytes = Bytes::from(serde_json::to_vec(body).expect("serialize the request body"));
    let b = Some(("application/json", bytes));
    expect(c, Method::POST, path, b, h, want).await;
}

/// The answer is an error with this status, code and field, in exactly the documented
/// shape `{"error": {"code", "message", "field"?}}` with a non-empty message.
fn assert_error(what: &str, r: &Reply, (status, code, field): Want<'_>) {
    assert_eq!(r.status, status, "{what}: wrong status; body {}", r.text());
    let ct = r.headers.get("content-type").and_then(|v| v.to_str().ok());
    assert_eq!(ct, Some("application/json"), "{what}: content-type");
    let v = r
        .json()
        .unwrap_or_else(|e| panic!("{what}: body not JSON ({e}): {}", r.text()));
    let message = v["error"]["message"].as_str().unwrap_or("");
    assert!(!message.trim().is_empty(), "{what}: no message in {v}");
    let mut shape = json!({ "error": { "code": code, "message": message } });
    if let Some(f) = field {
        shape["error"]["field"] = json!(f);
    }
    assert_eq!(v, shape, "{what}: error body");
}

/// `store.head_seq` from `/health`, which must answer 200.
async fn head_seq(s: &Server) -> u64 {
    let r = s.get("/health").await;
    assert_eq!(r.status, 200, "/health: {}", r.text());
    let v = r.json().expect("/health answers JSON");
    v["store"]["head_seq"]
        .as_u64()
        .unwrap_or_else(|| panic!("/health has no store.head_seq: {v}"))
}

/// Nothing changed since `head` was read: still healthy, same log head, no evaluation.
async fn assert_unchanged(s: &Server, head: u64) {
    assert_eq!(head_seq(s).await, head, "the event log moved:\n{}", s.log());
    let r = s.get("/api/evaluations").await;
    assert_eq!(r.status, 200, "GET /api/evaluations: {}", r.text());
    let v = r.json().expect("the listing is JSON");
    assert_eq!(v["evaluations"], json!([]), "evaluations were created: {v}");
    let log = s.log();
    assert!(!log.contains("panicked"), "the server panicked:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_submissions_get_field_errors_and_change_nothing() {
    let s = Server::start("").await;
    let c = &s.client;
    let head = head_seq(&s).await;

    // Not JSON: 400, whatever the parameters of the JSON media type.
    let malformed: [(&str, &[u8]); 8] = [
        ("application/json", b"{\"code\": "),
        ("application/json", b"not json"),
        ("application/json", b""),
        ("application/json", b"{\"code\": \"print(1)\",}"),
        ("application/json", b"{\"code\": \"print(1)\"} trailing"),
        ("application/json", b"{\"code\": \"\xff\xfe\"}"),
        ("application/json; charset=utf-8", b"{"),
        ("Application/JSON", b"["),
    ];
    for (ct, body) in malformed {
        let b = Some((ct, Bytes::copy_from_slice(body)));
        let want = (400, "malformed_json", None);
        expect(c, Method::POST, "/api/eval", b, &[], want).await;
    }

    // JSON, but not a valid submission: 422 naming the field. The sizes are one past the
    // embedded defaults of `limits.max_code_bytes`, `max_stdin_bytes`, `max_metadata_bytes`.
    let mut bodies: Vec<(Value, &str)> = vec![
        (json!([{ "code": OK }]), "body"),
        (json!(OK), "body"),
        (json!(null), "body"),
        (json!({ "language": "python" }), "code"),
        (json!({ "code": null }), "code"),
        (json!({ "code": "" }), "code"),
        (json!({ "code": " \n\t  " }), "code"),
        (json!({ "code": 5 }), "code"),
        (json!({ "code": [OK] }), "code"),
        (json!({ "code": "print(1)\u{0}" }), "code"),
        (json!({ "code": "#".repeat(512 * 1024 + 1) }), "code"),
    ];
    let fields = [
        ("language", json!(3)),
        ("language", json!({ "name": "python" })),
        ("timeout", json!(0)),
        ("timeout", json!(0.0)),
        ("timeout", json!(-1)),
        ("timeout", json!(300.5)), // above limits.max_timeout_secs (300)
        ("timeout", json!(1e9)),
        ("timeout", json!("5")),
        ("timeout", json!(true)),
        ("stdin", json!(1)),
        ("stdin", json!(["a"])),
        ("stdin", json!("x".repeat(256 * 1024 + 1))),
        ("metadata", json!([1])),
        ("metadata", json!("tag")),
        ("metadata", json!({ "pad": "x".repeat(16 * 1024) })),
    ];
    for (field, value) in fields {
        let mut body = json!({ "code": OK });
        body[field] = value;
        bodies.push((body, field));
    }
    for (body, field) in &bodies {
        expect_post(c, "/api/eval", body, &[], (422, INVALID, Some(field))).await;
    }
    for lang in ["cobol", ""] {
        let body = json!({ "code": OK, "language": lang });
        let want = (422, "unsupported_language", Some("language"));
        expect_post(c, "/api/eval", &body, &[], want).await;
    }

    // A bad Idempotency-Key on an otherwise valid submission.
    let long = "k".repeat(300);
    for key in [long.as_str(), "", "has space", "ключ"] {
        let want = (422, INVALID, Some("Idempotency-Key"));
        let h = [("idempotency-key", key)];
        expect_post(c, "/api/eval", &json!({ "code": OK }), &h, want).await;
    }

    assert_unchanged(&s, head).await;
    // Control: a valid submission does move the log and the listing, so the checks above
    // would have seen a change.
    s.submit(json!({ "code": OK })).await;
    assert!(head_seq(&s).await > head, "a submission appends an event");
    let v = s.get("/api/evaluations").await.json().expect("JSON");
    assert_eq!(v["evaluations"].as_array().map(Vec::len), Some(1), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn media_type_and_size_limits_are_enforced() {
    let s = Server::start("[http]\nmax_body_bytes = 4096\n\n[limits]\nmax_code_bytes = 1024").await;
    let c = &s.client;
    let head = head_seq(&s).await;
    // Valid submissions, the big ones refused only for their size (6 kB, 4 KiB cap).
    let (small, big) = (
        json!({ "code": OK }),
        json!({ "code": OK, "metadata": { "pad": "x".repeat(6000) } }),
    );
    for (path, small, big) in [
        ("/api/eval", small.clone(), big.clone()),
        (
            "/api/eval-batch",
            json!({ "evaluations": [small] }),
            json!({ "evaluations": [big] }),
        ),
    ] {
        let (small, big) = (Bytes::from(small.to_string()), Bytes::from(big.to_string()));
        for ct in ["text/plain", "text/json", "multipart/form-data"] {
            let b = Some((ct, small.clone()));
            expect(c, Method::POST, path, b, &[], (415, MEDIA, None)).await;
        }
        expect(c, Method::POST, path, None, &[], (415, MEDIA, None)).await;

        // Over `http.max_body_bytes`: announced by Content-Length, and streamed (chunked,
        // no Content-Length) past the cap.
        let b = || Some(("application/json", big.clone()));
        expect(c, Method::POST, path, b(), &[], (413, TOO_LARGE, None)).await;
        let chunked = [("transfer-encoding", "chunked")];
        expect(c, Method::POST, path, b(), &chunked, (413, TOO_LARGE, None)).await;
    }

    // Under the body cap but over the configured `limits.max_code_bytes`.
    let body = json!({ "code": "#".repeat(1025) });
    expect_post(c, "/api/eval", &body, &[], (422, INVALID, Some("code"))).await;

    assert_unchanged(&s, head).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_batches_are_rejected_whole() {
    let s = Server::start("").await;
    let c = &s.client;
    let head = head_seq(&s).await;
    let item = json!({ "code": OK, "language": "python", "timeout": 5 });
    // Five valid items, then item 3 replaced by a bad one.
    let item3 = |bad: Value| {
        let mut items = vec![item.clone(); 5];
        items[3] = bad;
        json!({ "evaluations": items })
    };
    let too_many = json!({ "evaluations": vec![item.clone(); 101] });
    let not_array = json!({ "evaluations": item.clone() });
    let lang = item3(json!({ "code": OK, "language": "cobol" }));
    let timeout = item3(json!({ "code": OK, "timeout": -1 }));
    let cases = [
        (too_many, "batch_too_large", "evaluations"),
        (json!({ "evaluations": [] }), INVALID, "evaluations"),
        (json!({}), INVALID, "evaluations"),
        (not_array, INVALID, "evaluations"),
        (item3(json!({ "code": "" })), INVALID, "evaluations[3].code"),
        (item3(json!(42)), INVALID, "evaluations[3].body"),
        (timeout, INVALID, "evaluations[3].timeout"),
        (lang, "unsupported_language", "evaluations[3].language"),
    ];
    for (body, code, field) in &cases {
        expect_post(c, "/api/eval-batch", body, &[], (422, code, Some(field))).await;
    }
    // The admin bodies are objects too.
    for (path, body) in [
        ("/api/admin/backup", json!(["/tmp/x"])),
        ("/api/admin/sinks/file/replay", json!(5)),
    ] {
        expect_post(c, path, &body, &[], (422, INVALID, Some("body"))).await;
    }
    let zero = json!({ "from_seq": 0 });
    let want = (422, INVALID, Some("from_seq"));
    expect_post(c, "/api/admin/sinks/file/replay", &zero, &[], want).await;
    let b = Some((
        "application/json",
        Bytes::from_static(b"{\"evaluations\":["),
    ));
    let want = (400, "malformed_json", None);
    expect(c, Method::POST, "/api/eval-batch", b, &[], want).await;

    // Items 0 to 2 were valid: none of them may have been accepted.
    assert_unchanged(&s, head).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_ids_routes_and_wrong_methods() {
    let s = Server::start("").await;
    let c = &s.client;
    let head = head_seq(&s).await;
    let not_found = (404, "not_found", None);

    let long = "x".repeat(300);
    for id in [ID, "does-not-exist", "..%2F..", &long] {
        expect_get(c, &format!("/api/eval/{id}"), not_found).await;
        expect_get(c, &format!("/api/eval-status/{id}"), not_found).await;
        let cancel = format!("/api/eval/{id}/cancel");
        expect(c, Method::POST, &cancel, None, &[], not_found).await;
    }

    let wrong = [
        (Method::GET, "/api/eval".to_string(), "POST"),
        (Method::PUT, "/api/eval".into(), "POST"),
        (Method::DELETE, "/api/eval".into(), "POST"),
        (Method::GET, "/api/eval-batch".into(), "POST"),
        (Method::POST, format!("/api/eval/{ID}"), "GET, HEAD"),
        (Method::DELETE, format!("/api/eval/{ID}"), "GET, HEAD"),
        (Method::GET, format!("/api/eval/{ID}/cancel"), "POST"),
        (Method::POST, format!("/api/eval-status/{ID}"), "GET, HEAD"),
        (Method::POST, "/api/evaluations".into(), "GET, HEAD"),
        (Method::POST, "/api/events".into(), "GET, HEAD"),
        (Method::POST, "/health".into(), "GET, HEAD"),
        (Method::POST, "/".into(), "GET, HEAD"),
        (Method::DELETE, "/ui/app.js".into(), "GET, HEAD"),
    ];
    for (m, path, allow) in wrong {
        let what = format!("{m} {path}");
        let r = expect(c, m, &path, None, &[], (405, "method_not_allowed", None)).await;
        let got = r.headers.get("allow").and_then(|v| v.to_str().ok());
        assert_eq!(got, Some(allow), "{what}: Allow header");
    }

    for path in ["/api/nope", "/api", "/api/eval/a/b", "/api/events/x", "/x"] {
        expect_get(c, path, not_found).await;
        expect(c, Method::POST, path, None, &[], not_found).await;
    }

    assert_unchanged(&s, head).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_query_parameters_and_last_event_id() {
    let s = Server::start("").await;
    let c = &s.client;
    let head = head_seq(&s).await;

    for (query, field) in [
        ("limit=0", "limit"),
        ("limit=101", "limit"),
        ("limit=-1", "limit"),
        ("limit=abc", "limit"),
        ("limit=1.5", "limit"),
        ("status=bogus", "status"),
        ("status=QUEUED", "status"),
        ("cursor=abc", "cursor"),
        ("cursor=-1", "cursor"),
        ("status=queued&limit=10&cursor=x", "cursor"),
        // A parameter that is given must have a value: empty is not "all".
        ("status=", "status"),
        ("limit=", "limit"),
        ("cursor=", "cursor"),
        ("cursor=0193A0B4-7D2E-7C4A-9F00-000000000000", "cursor"),
    ] {
        let path = format!("/api/evaluations?{query}");
        expect_get(c, &path, (422, INVALID, Some(field))).await;
    }
    // A well-formed cursor that names no evaluation.
    let path = format!("/api/evaluations?cursor={ID}");
    expect_get(c, &path, (404, "not_found", Some("cursor"))).await;
    expect_get(
        c,
        "/api/admin/dead-letters?sink=",
        (422, INVALID, Some("sink")),
    )
    .await;

    // A valid Last-Event-ID would open an endless stream: an invalid one must be answered
    // (and a stream would turn into a deadline failure in `expect`).
    let want = (422, INVALID, Some("Last-Event-ID"));
    for id in ["abc", "-1", "-5", "1.5", "0x10", "+5", ""] {
        let h = [("last-event-id", id)];
        expect(c, Method::GET, "/api/events", None, &h, want).await;
    }
    expect_get(c, "/api/events?last_event_id=abc", want).await;
    expect_get(c, "/api/events?last_event_id=", want).await;
    // Both are checked when both are given (the header wins when both are valid).
    let h = [("last-event-id", "0")];
    expect(
        c,
        Method::GET,
        "/api/events?last_event_id=-1",
        None,
        &h,
        want,
    )
    .await;
    expect_get(c, "/api/events?eval_id=", (422, INVALID, Some("eval_id"))).await;

    assert_unchanged(&s, head).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_or_repeated_query_parameters_are_named() {
    let s = Server::start("").await;
    let c = &s.client;
    let head = head_seq(&s).await;
    // Every route: a parameter it does not declare is refused, never ignored (a misspelt
    // `ofset` would otherwise silently repeat page 1).
    let gets = [
        "/api/evaluations?ofset=20",
        "/api/evaluations?limit=5&Limit=5",
        "/api/events?evalid=x",
        "/api/admin/dead-letters?snk=redis",
        "/api/admin/sinks?verbose=1",
        "/health?full=1",
        "/metrics?name=x",
        "/api/openapi.json?format=yaml",
    ];
    for path in gets {
        let field = path
            .rsplit_once('&')
            .map(|(_, p)| p)
            .or_else(|| path.split_once('?').map(|(_, q)| q))
            .and_then(|p| p.split_once('='))
            .map(|(k, _)| k)
            .unwrap_or("");
        expect_get(c, path, (422, INVALID, Some(field))).await;
    }
    expect_get(c, &format!("/api/eval/{ID}?x=1"), (422, INVALID, Some("x"))).await;
    let twice = (422, INVALID, Some("limit"));
    expect_get(c, "/api/evaluations?limit=5&limit=6", twice).await;
    let valid = json!({ "code": OK });
    let want = (422, INVALID, Some("priority"));
    expect_post(c, "/api/eval?priority=1", &valid, &[], want).await;
    // Static UI assets ignore query strings (browsers and caches add their own).
    let r = c.get("/ui/app.js?v=3").await.expect("asset");
    assert_eq!(r.status, 200);
    assert_unchanged(&s, head).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_wrong_token_is_unauthorized() {
    let s = Server::start_with("", &[("CRUCIBLE_API_TOKEN", "s3cret")]).await;
    let head = head_seq(&s).await;
    let base = format!("http://{}", s.addr);
    let anonymous = Client::new(&base, None).expect("client without a token");
    let wrong = Client::new(&base, Some("s3cret-not".into())).expect("client, wrong token");

    let body = |v: Value| Some(Bytes::from(v.to_string()));
    let (one, empty) = (body(json!({ "code": OK })), body(json!({ "code": "" })));
    let batch = body(json!({ "evaluations": [{ "code": OK }] }));
    let requests = [
        (Method::POST, "/api/eval".to_string(), one),
        (Method::POST, "/api/eval".into(), empty),
        (Method::POST, "/api/eval-batch".into(), batch),
        (Method::GET, "/api/evaluations".into(), None),
        (Method::GET, format!("/api/eval/{ID}"), None),
        (Method::GET, format!("/api/eval-status/{ID}"), None),
        (Method::POST, format!("/api/eval/{ID}/cancel"), None),
        (Method::GET, "/api/events".into(), None),
        (Method::GET, "/metrics".into(), None),
    ];
    let unauthorized = (401, "unauthorized", None);
    let headers = ["Basic czNjcmV0", "Bearer", "Bearer S3CRET", "s3cret"];
    for (m, path, body) in &requests {
        let b = || body.clone().map(|b| ("application/json", b));
        expect(&anonymous, m.clone(), path, b(), &[], unauthorized).await;
        expect(&wrong, m.clone(), path, b(), &[], unauthorized).await;
        for auth in headers {
            let h = [("authorization", auth)];
            expect(&anonymous, m.clone(), path, b(), &h, unauthorized).await;
        }
    }

    // /health needs no token.
    let r = anonymous
        .get("/health")
        .await
        .expect("GET /health, no token");
    assert_eq!(r.status, 200, "/health without a token: {}", r.text());
    assert_unchanged(&s, head).await;
}

/// Write raw bytes on a fresh connection, then either drop it at once or half-close it
/// and read until the server closes. Write and read errors are expected (the server may
/// reset a connection it rejects) and ignored; only a hang fails.
async fn raw(addr: &str, bytes: &[u8], read_answer: bool) {
    let job = async {
        let mut c = TcpStream::connect(addr).await.expect("connect");
        let _ = c.write_all(bytes).await;
        if read_answer {
            let _ = c.shutdown().await;
            let _ = c.read_to_end(&mut Vec::new()).await;
        }
    };
    let shown = String::from_utf8_lossy(&bytes[..bytes.len().min(60)]).into_owned();
    if tokio::time::timeout(DEADLINE, job).await.is_err() {
        panic!("raw connection hung: {shown:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_wire_never_crashes_the_server() {
    let s = Server::start("").await;
    let head = head_seq(&s).await;
    let big = "a".repeat(600_000); // past hyper's largest header buffer
    let post = "POST /api/eval HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n";
    let cases: Vec<Vec<u8>> = vec![
        b"\x00\x01\x02\xff\xfe\xfd garbage\r\n\r\n".to_vec(),
        (0..=255u8).cycle().take(10_000).collect(),
        b"\r\n\r\n\r\n".to_vec(),
        b"GET\r\n\r\n".to_vec(),
        b"GET /health HTTP/9.9\r\n\r\n".to_vec(),
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
        b"GET /health HTTP/1.1\r\nHost: x".to_vec(),
        format!("GET /health HTTP/1.1\r\nX-Big: {big}\r\n\r\n").into(),
        format!("{post}Content-Length: 100\r\n\r\n{{\"code\":").into(),
        format!("{post}Content-Length: abc\r\n\r\n{{}}").into(),
        format!("{post}Transfer-Encoding: chunked\r\n\r\nzz\r\n{{}}\r\n").into(),
        format!("{post}Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{{\"co").into(),
    ];
    for bytes in &cases {
        raw(&s.addr, bytes, true).await;
        raw(&s.addr, bytes, false).await;
    }
    raw(&s.addr, b"", false).await;

    // Still serving, and nothing was accepted.
    assert_unchanged(&s, head).await;
}
