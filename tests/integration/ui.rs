//! The embedded web UI, driven in a real headless Chromium over WebDriver (Debian's
//! chromium + chromium-driver, installed by tests/run.sh).
//!
//! Chromium is started so it can reach nothing but loopback: every host name resolves to
//! nothing except 127.0.0.1 and any other request goes to a proxy on a closed loopback
//! port; background services (updates, safe browsing, sync, metrics) are off.
//!
//! A screenshot of each step lands in `target/test-artifacts/ui/` (or
//! `$CRUCIBLE_ARTIFACTS_DIR/ui/`).

use crate::common::{free_port, Server, DEADLINE};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const TOKEN: &str = "ui-test-token-5d1f";

/// chromedriver on a loopback port, killed on drop.
struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    async fn start() -> Driver {
        let port = free_port();
        // Its own process group: dropping the driver kills Chromium too, even when a
        // failing test never closes its session.
        let child = Command::new("chromedriver")
            .process_group(0)
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (Debian's chromium-driver; tests/run.sh installs it)");
        let url = format!("http://127.0.0.1:{port}");
        let started = Instant::now();
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                break;
            }
            assert!(started.elapsed() < DEADLINE, "chromedriver did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Driver { child, url }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the process group this driver leads; no memory involved.
        unsafe {
            libc::kill(-(self.child.id() as i32), libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

async fn browser(driver: &Driver) -> Client {
    let args = [
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,1000",
        "--no-first-run",
        "--disable-crash-reporter",
        "--disable-breakpad",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-default-apps",
        "--disable-extensions",
        "--disable-sync",
        "--disable-domain-reliability",
        "--disable-client-side-phishing-detection",
        "--metrics-recording-only",
        "--no-pings",
        "--disable-features=Translate,OptimizationHints,MediaRouter,AutofillServerCommunication",
        // Nothing leaves this machine: names resolve only to loopback, and anything that
        // is not loopback goes to a proxy on a closed loopback port.
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
        "--proxy-server=http://127.0.0.1:9",
    ];
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({"binary": "/usr/bin/chromium", "args": args}),
    );
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&driver.url)
        .await
        .expect("a Chromium session")
}

fn artifacts() -> PathBuf {
    let dir = std::env::var("CRUCIBLE_ARTIFACTS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts"))
        .join("ui");
    std::fs::create_dir_all(&dir).expect("artifact dir");
    dir
}

async fn shot(c: &Client, name: &str) {
    let png = c.screenshot().await.expect("screenshot");
    std::fs::write(artifacts().join(format!("{name}.png")), png).expect("write screenshot");
}

/// Wait (up to the deadline) until `f` returns Some; fail with a screenshot otherwise.
async fn until<T, F, Fut>(c: &Client, what: &str, f: F) -> T
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if started.elapsed() > DEADLINE {
            shot(c, &format!("timeout-{}", what.replace(' ', "-"))).await;
            panic!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The DOM text of the first element matching `css` (not the rendered text, which CSS
/// may upper-case).
async fn text(c: &Client, css: &str) -> Option<String> {
    let v = c
        .execute(
            "const e = document.querySelector(arguments[0]); return e ? e.textContent : null",
            vec![json!(css)],
        )
        .await
        .ok()?;
    v.as_str().map(str::to_string)
}

async fn js(c: &Client, script: &str) -> Value {
    c.execute(script, vec![]).await.expect("script")
}

/// Requests the server counted for `route` (from /metrics).
async fn route_count(s: &Server, route: &str) -> u64 {
    s.metric(
        "crucible_http_requests_total",
        &format!("route=\"{route}\""),
    )
    .await
    .unwrap_or(0.0) as u64
}

async fn click(c: &Client, css: &str) {
    c.find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .click()
        .await
        .unwrap_or_else(|e| panic!("click {css}: {e}"));
}

/// Wait until the text of `css` is `want`.
async fn wait_text(c: &Client, css: &str, want: &str) {
    until(c, &format!("{css} to read {want}"), || async {
        (text(c, css).await.as_deref() == Some(want)).then_some(())
    })
    .await;
}

/// The eval ids of the history rows, top to bottom.
async fn history_rows(c: &Client) -> Vec<String> {
    let v = js(
        c,
        "return [...document.querySelectorAll('#history-rows tr')].map(r => r.dataset.evalId)",
    )
    .await;
    serde_json::from_value::<Vec<String>>(v).unwrap_or_default()
}

/// Wait until the history shows at least `n` rows; returns their eval ids.
async fn wait_rows(c: &Client, n: usize) -> Vec<String> {
    until(c, &format!("{n} history rows"), || async {
        let rows = history_rows(c).await;
        (rows.len() >= n).then_some(rows)
    })
    .await
}

async fn set_code(c: &Client, code: &str) {
    let area = c.find(Locator::Css("#code")).await.expect("editor");
    area.clear().await.expect("clear");
    area.send_keys(code).await.expect("type");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ui_submit_watch_cancel_browse_in_chromium() {
    let s = Server::start_with("", &[("CRUCIBLE_API_TOKEN", TOKEN)]).await;
    let _ = std::fs::remove_dir_all(artifacts());
    let driver = Driver::start().await;
    let c = browser(&driver).await;
    let base = format!("http://{}", s.addr);

    // 1. The page asks for the token once (the event stream answers 401 without it).
    c.goto(&format!("{base}/")).await.expect("open UI");
    until(&c, "token dialog", || async {
        let open = js(&c, "return document.querySelector('#token-dialog').open").await;
        (open == json!(true)).then_some(())
    })
    .await;
    shot(&c, "01-token-dialog").await;
    let input = c
        .find(Locator::Css("#token-input"))
        .await
        .expect("token input");
    input.send_keys(TOKEN).await.expect("type token");
    click(&c, "#token-form button[value=save]").await;
    until(&c, "live event stream", || async {
        (text(&c, "#stream-state").await.as_deref() == Some("live")).then_some(())
    })
    .await;
    let kept = js(&c, "return sessionStorage.getItem('crucible.token')").await;
    assert_eq!(kept, json!(TOKEN), "the token is kept for the session");

    // 2. Submit print("hi") with Ctrl+Enter; status and output arrive over SSE.
    let reads_before = route_count(&s, "/api/eval/{id}").await;
    set_code(&c, "print(\"hi\")").await;
    let area = c.find(Locator::Css("#code")).await.expect("editor");
    // WebDriver keys: Control (held) + Enter.
    area.send_keys("\u{E009}\u{E007}")
        .await
        .expect("ctrl+enter");
    let done = until(&c, "print(hi) to complete", || async {
        let st = text(&c, "#run-result [data-field=status]").await?;
        (st == "completed" || st == "failed").then_some(st)
    })
    .await;
    shot(&c, "02-hi-completed").await;
    assert_eq!(done, "completed");
    assert_eq!(
        text(&c, "#run-result [data-field=stdout]").await.as_deref(),
        Some("hi\n")
    );
    assert_eq!(
        text(&c, "#run-result [data-field=exit_code]")
            .await
            .as_deref(),
        Some("0")
    );
    // Usage of the run's whole tree and the limits it ran under, as the record has them.
    for (field, ends) in [
        ("cpu", " ms"),
        ("memory_peak", "MiB"),
        ("limits", "processes"),
    ] {
        let shown = text(&c, &format!("#run-result [data-field={field}]"))
            .await
            .unwrap_or_default();
        assert!(shown.ends_with(ends), "{field} shows {shown:?}");
    }
    let hi_id = text(&c, "#run-result [data-field=permalink]")
        .await
        .expect("eval id");
    // No polling: the page read the record once after submitting; the rest came as events.
    let reads = route_count(&s, "/api/eval/{id}").await - reads_before;
    assert!(reads <= 1, "the UI read the record {reads} times");
    assert_eq!(s.record(&hi_id).await["output"], "hi\n");

    // 3. A long run: see it running, cancel it from the UI, see it cancelled.
    set_code(
        &c,
        "import time\nprint('start', flush=True)\ntime.sleep(250)",
    )
    .await;
    let t = c.find(Locator::Css("#timeout")).await.expect("timeout");
    t.clear().await.expect("clear");
    t.send_keys("280").await.expect("type timeout");
    click(&c, "#run-button").await;
    wait_text(&c, "#run-result [data-field=status]", "running").await;
    let progress = text(&c, "#run-result [data-field=progress]")
        .await
        .unwrap_or_default();
    assert!(progress.starts_with("running for"), "{progress}");
    shot(&c, "03-long-running").await;
    let long_id = text(&c, "#run-result [data-field=permalink]")
        .await
        .expect("eval id");
    assert_ne!(long_id, hi_id);
    click(&c, "#run-result [data-action=cancel]").await;
    wait_text(&c, "#run-result [data-field=status]", "cancelled").await;
    shot(&c, "04-cancelled").await;
    assert_eq!(s.record(&long_id).await["status"], "cancelled");
    let cancel_hidden = js(
        &c,
        "return document.querySelector('#run-result [data-action=cancel]').hidden",
    )
    .await;
    assert_eq!(
        cancel_hidden,
        json!(true),
        "no cancel button on a terminal run"
    );

    // 4. History lists both, newest first; the filter narrows it.
    c.goto(&format!("{base}/#/history")).await.expect("history");
    let rows = until(&c, "history rows", || async {
        let v = js(
            &c,
            "return [...document.querySelectorAll('#history-rows tr')].map(r => [r.dataset.evalId, r.querySelector('.badge').textContent])",
        )
        .await;
        let rows: Vec<(String, String)> = serde_json::from_value(v).ok()?;
        (rows.len() >= 2).then_some(rows)
    })
    .await;
    shot(&c, "05-history").await;
    assert_eq!(
        rows,
        vec![
            (long_id.clone(), "cancelled".to_string()),
            (hi_id.clone(), "completed".to_string())
        ]
    );
    c.find(Locator::Css("#history-status"))
        .await
        .expect("filter")
        .select_by_value("completed")
        .await
        .expect("select");
    until(&c, "the filtered history", || async {
        (history_rows(&c).await == [hi_id.clone()]).then_some(())
    })
    .await;
    shot(&c, "06-history-completed-only").await;

    // Paging, and new evaluations arriving live while the first page is open.
    c.find(Locator::Css("#history-status"))
        .await
        .expect("filter")
        .select_by_value("")
        .await
        .expect("select all");
    wait_rows(&c, 2).await;
    let batch: Vec<Value> = (0..21)
        .map(|i| json!({"code": format!("echo {i}"), "language": "sh", "timeout": 10}))
        .collect();
    let r = s
        .post("/api/eval-batch", &json!({ "evaluations": batch }))
        .await;
    assert_eq!(r.status, 202, "{}", r.text());
    let mut all: Vec<String> = r.json().expect("json")["evaluations"]
        .as_array()
        .expect("array")
        .iter()
        .map(|e| e["eval_id"].as_str().unwrap_or_default().to_string())
        .collect();
    all.extend([hi_id.clone(), long_id.clone()]);
    // The page fills up from the event stream (no reload by the test).
    let newest = all[20].clone();
    until(&c, "the live first page", || async {
        let rows = history_rows(&c).await;
        (rows.len() == 20 && rows[0] == newest).then_some(())
    })
    .await;
    shot(&c, "06b-history-page-1").await;
    let page1 = wait_rows(&c, 20).await;
    click(&c, "#history-next").await;
    until(&c, "the second page", || async {
        (history_rows(&c).await.len() == 3).then_some(())
    })
    .await;
    let page2 = wait_rows(&c, 3).await;
    shot(&c, "06c-history-page-2").await;
    let mut seen: Vec<String> = page1.iter().chain(page2.iter()).cloned().collect();
    seen.sort();
    all.sort();
    assert_eq!(seen, all, "the two pages hold every evaluation once");
    click(&c, "#history-prev").await;
    until(&c, "the first page again", || async {
        (history_rows(&c).await == page1).then_some(())
    })
    .await;

    // 5. The detail view (a permalink, opened from its row on page 2): code, stdout and
    //    stderr apart, exit code.
    click(&c, "#history-next").await;
    until(&c, "page 2 with print(hi)", || async {
        history_rows(&c).await.contains(&hi_id).then_some(())
    })
    .await;
    click(&c, &format!("#history-rows tr[data-eval-id='{hi_id}'] a")).await;
    until(&c, "the detail view", || async {
        (text(&c, "#eval-result [data-field=stdout]")
            .await
            .as_deref()
            == Some("hi\n"))
        .then_some(())
    })
    .await;
    let url = c.current_url().await.expect("url");
    assert!(url.as_str().ends_with(&format!("#/eval/{hi_id}")), "{url}");
    assert_eq!(
        text(&c, "#eval-code").await.as_deref(),
        Some("print(\"hi\")")
    );
    shot(&c, "07-detail").await;

    // 6. Health: every subsystem and the queue.
    c.goto(&format!("{base}/#/health")).await.expect("health");
    let cards = until(&c, "health cards", || async {
        let v = js(
            &c,
            "return [...document.querySelectorAll('#health-body .card')].map(c => c.getAttribute('aria-label'))",
        )
        .await;
        let v: Vec<String> = serde_json::from_value(v).ok()?;
        (!v.is_empty()).then_some(v)
    })
    .await;
    shot(&c, "08-health").await;
    for want in ["Store (sled)", "Queue", "Redis", "PostgreSQL", "Outbox"] {
        assert!(
            cards.iter().any(|c| c == want),
            "{want} missing in {cards:?}"
        );
    }
    assert!(cards.iter().any(|c| c.starts_with("Executor")), "{cards:?}");
    // Keyboard: the skip link moves focus to the content and keeps the view.
    c.find(Locator::Css(".skip"))
        .await
        .expect("skip link")
        .send_keys("\u{E007}")
        .await
        .expect("enter on the skip link");
    let after = js(
        &c,
        "return [location.hash, document.activeElement.id, document.querySelector('#view-health').hidden]",
    )
    .await;
    assert_eq!(after, json!(["#/health", "main", false]), "skip link");

    // 7. Phone width: nothing wider than the screen.
    c.set_window_size(390, 844).await.expect("resize");
    for page in ["#/run", "#/history", &format!("#/eval/{hi_id}"), "#/health"] {
        c.goto(&format!("{base}/{page}")).await.expect("page");
        until(&c, "the page to settle", || async {
            let v = js(&c, "return document.readyState").await;
            (v == json!("complete")).then_some(())
        })
        .await;
        let fits = js(
            &c,
            "return document.documentElement.scrollWidth <= window.innerWidth",
        )
        .await;
        shot(
            &c,
            &format!("09-phone-{}", page.split('/').nth(1).unwrap_or("run")),
        )
        .await;
        assert_eq!(fits, json!(true), "{page} scrolls sideways at phone width");
    }

    c.close().await.expect("close browser");
}
