//! Hostile code: every evaluation here tries to escape or exhaust the sandbox. Each test
//! checks that the attempt is contained and recorded correctly, and that the server
//! still answers /health and runs a normal evaluation afterwards.
//!
//! Leftover-process checks scan the host's /proc for a unique marker that the sandboxed
//! children carry in their command line (`sleep 3600.<test pid><tag>`). They run only
//! once the evaluation is over: the executor returns only after the sandbox's PID
//! namespace is gone (stdout/stderr reach EOF only when every holder has exited), so no
//! waiting is needed and a marker still present is a containment bug.

use crate::common::{
    assert_no_host_process_with, host_processes_with, marker, program, Server, DEADLINE, FORK_BOMB,
};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// The server answers /health and still runs an ordinary evaluation to completion.
async fn assert_server_still_fine(server: &Server) {
    let h = server.get("/health").await;
    assert_eq!(h.status, 200, "/health after a hostile run: {}", h.text());
    let r = server.run_py("print(1)", 30.0).await;
    assert_eq!(r["status"], "completed", "follow-up evaluation: {r:#}");
    assert_eq!(r["output"], "1\n", "follow-up evaluation: {r:#}");
}

/// The single JSON line a probe program printed.
fn probe_result(r: &Value) -> Value {
    assert_eq!(r["status"], "completed", "probe did not complete: {r:#}");
    let out = r["output"].as_str().expect("output is a string");
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("probe output {out:?}: {e}"))
}

fn text(r: &Value, field: &str) -> String {
    r[field].as_str().expect("string field").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn infinite_loop_times_out() {
    let server = Server::start("").await;
    let r = server.run_py("while True: pass", 1.0).await;
    assert_eq!(r["status"], "failed", "{r:#}");
    assert_eq!(r["failure_reason"], "timeout", "{r:#}");
    assert!(r["runtime_ms"].as_u64().is_some(), "runtime_ms: {r:#}");
    assert_server_still_fine(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_bomb_hits_the_memory_limit() {
    let server = Server::start("[limits]\nmemory_mb = 128").await;
    let code = "chunks = []\nwhile True:\n    chunks.append('x' * (1 << 20))\n";
    let r = server.run_py(code, 60.0).await;
    assert_eq!(r["status"], "failed", "{r:#}");
    assert_eq!(r["failure_reason"], "memory_limit", "{r:#}");
    assert_server_still_fine(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fork_bomb_is_contained() {
    let server = Server::start("[limits]\nmax_processes = 32").await;
    let m = marker(3);
    // Fork sleepers until the process limit refuses, report how many, then keep
    // hammering the limit for a while and exit (so the run ends without a race).
    let code = program(FORK_BOMB, &[("MARKER", &m)]);
    let r = server.run_py(&code, 120.0).await;
    let status = text(&r, "status");
    assert!(
        ["completed", "failed", "cancelled"].contains(&status.as_str()),
        "{r:#}"
    );
    let forks: u64 = text(&r, "output")
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("fork count not reported ({e}): {r:#}"));
    assert!(
        forks < 32,
        "max_processes = 32 did not stop the bomb: {forks} forks"
    );
    assert_no_host_process_with(&m);
    assert_server_still_fine(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdout_flood_is_capped() {
    let server = Server::start("").await;
    let code = "import sys\nsys.stdout.write('x' * 100_000_000)\n";
    let r = server.run_py(code, 60.0).await;
    assert_eq!(r["status"], "completed", "{r:#}");
    assert_eq!(r["output_truncated"], true, "{}", r["output_truncated"]);
    assert_eq!(
        text(&r, "output").len(),
        262_144,
        "stdout not cut at the cap"
    );
    assert_server_still_fine(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stderr_flood_is_capped_separately() {
    let server = Server::start("[limits]\nmax_output_bytes = 4096").await;
    let code = "import sys\nprint('ok', flush=True)\nsys.stderr.write('e' * 100_000_000)\n";
    let r = server.run_py(code, 60.0).await;
    assert_eq!(r["status"], "completed", "{r:#}");
    assert_eq!(r["output_truncated"], true, "{}", r["output_truncated"]);
    assert_eq!(r["output"], "ok\n", "stdout must be intact");
    let stderr = text(&r, "stderr");
    assert_eq!(stderr.len(), 4096, "stderr not cut at the cap");
    assert!(stderr.bytes().all(|b| b == b'e'), "stderr content");
    assert_server_still_fine(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_is_loopback_only_and_unreachable() {
    let server = Server::start("").await;
    let (host, port) = server.addr.rsplit_once(':').expect("host:port");
    // Never aim the probe at anything but loopback.
    assert_eq!(host, "127.0.0.1", "the fixture listens on loopback");
    let code = program(
        r#"
names = [l.split(":")[0].strip() for l in open("/proc/net/dev").read().splitlines()[2:]]
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.settimeout(10)
try:
    s.connect(("127.0.0.1", PORT))
    result = "connected"
except OSError as e:
    result = "error: %s" % e
print(json.dumps({"dev": names, "index": [n for _, n in socket.if_nameindex()], "connect": result}))
"#,
        &[("PORT", port)],
    );
    let p = probe_result(&server.run_py(&code, 30.0).await);
    assert_eq!(p["dev"], json!(["lo"]), "interfaces in /proc/net/dev: {p}");
    assert_eq!(p["index"], json!(["lo"]), "socket.if_nameindex(): {p}");
    let connect = p["connect"].as_str().expect("connect result");
    assert!(
        connect.starts_with("error: "),
        "the sandbox reached the appliance at {}: {connect}",
        server.addr
    );
    assert_server_still_fine(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filesystem_is_read_only_except_a_capped_tmp() {
    let server = Server::start("[limits]\ntmp_mb = 4\nmax_file_mb = 2").await;
    let code = program(
        r#"
res = {}
for d in ["/usr", "/etc", "/", "/code", "/tmp"]:
    res[d] = write(os.path.join(d, "crucible-probe"), 10)
res["/code/main.py"] = write("/code/main.py", 10)
tmp_limits(res)
print(json.dumps(res))
"#,
        &[],
    );
    let p = probe_result(&server.run_py(&code, 30.0).await);
    for path in ["/usr", "/etc", "/", "/code", "/code/main.py"] {
        let got = p[path].as_str().expect("result per path");
        assert!(
            ["EROFS", "EACCES", "EPERM"].contains(&got),
            "writing under {path} should fail read-only/permission, got {got}: {p}"
        );
    }
    assert_eq!(p["/tmp"], "ok", "/tmp must be writable: {p}");
    assert_eq!(p["big"], "EFBIG", "a 3 MiB file over max_file_mb = 2: {p}");
    assert_eq!(p["fill"], "ENOSPC", "filling a 4 MiB /tmp: {p}");
    assert_server_still_fine(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphaned_child_dies_with_the_run() {
    let server = Server::start("").await;
    let m = marker(8);
    let code = program(
        "sleeper(\"MARKER\")\nprint('parent done')\n",
        &[("MARKER", &m)],
    );
    // A run that waited for the orphan would end as a timeout, not `completed`.
    let r = server.run_py(&code, 60.0).await;
    assert_eq!(r["status"], "completed", "{r:#}");
    assert_eq!(r["output"], "parent done\n", "{r:#}");
    assert_no_host_process_with(&m);
    assert_server_still_fine(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_is_isolated_from_the_host() {
    let server = Server::start_with("", &[("CRUCIBLE_SECRET_TEST", "hunter2")]).await;
    let data_dir = server.data_dir().to_string_lossy().into_owned();
    assert!(
        server.data_dir().exists(),
        "the data dir exists on the host"
    );
    let code = program(
        r#"
pids = [p for p in os.listdir("/proc") if p.isdigit()]
cmdlines = []
for p in pids:
    try:
        cmdlines.append(open("/proc/%s/cmdline" % p, "rb").read().replace(b"\0", b" ").decode())
    except OSError:
        pass
print(json.dumps({
    "uid": os.getuid(), "euid": os.geteuid(),
    "environ": dict(os.environ), "pids": pids, "cmdlines": cmdlines,
    "data_dir": os.path.exists(DATA_DIR), "shadow": os.path.exists("/etc/shadow"),
}))
"#,
        &[("DATA_DIR", &format!("{data_dir:?}"))],
    );
    let p = probe_result(&server.run_py(&code, 30.0).await);
    assert_ne!(p["uid"], 0, "runs as root inside: {p}");
    assert_ne!(p["euid"], 0, "runs as root inside: {p}");
    let environ = p["environ"].as_object().expect("environ");
    assert!(
        !environ.contains_key("CRUCIBLE_SECRET_TEST") && !environ.values().any(|v| v == "hunter2"),
        "the appliance's environment leaked: {environ:?}"
    );
    let pids = p["pids"].as_array().expect("pids");
    assert!(pids.len() <= 3, "host processes visible: {pids:?}");
    let cmdlines = p["cmdlines"].as_array().expect("cmdlines");
    assert!(
        cmdlines
            .iter()
            .all(|c| !c.as_str().unwrap_or("").contains("crucible")),
        "the appliance is visible from inside: {cmdlines:?}"
    );
    assert_eq!(p["data_dir"], false, "{data_dir} is visible inside");
    assert_eq!(p["shadow"], false, "/etc/shadow is visible inside");
    assert_server_still_fine(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_kills_the_whole_tree() {
    let server = Server::start("").await;
    let m = marker(10);
    let code = program("sleeper(\"MARKER\")\nwhile True: pass\n", &[("MARKER", &m)]);
    let r = server.run_py(&code, 1.0).await;
    assert_eq!(r["status"], "failed", "{r:#}");
    assert_eq!(r["failure_reason"], "timeout", "{r:#}");
    assert_no_host_process_with(&m);
    assert_server_still_fine(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_kills_a_running_evaluation_and_frees_its_slot() {
    let server = Server::start("workers = 1").await;
    let m = marker(11);
    let code = program("sleeper(\"MARKER\")\nwhile True: pass\n", &[("MARKER", &m)]);
    let id = server
        .submit(json!({"code": code, "language": "python", "timeout": 300}))
        .await;
    server.wait_status(&id, "running").await;
    // Positive control for the leftover check: the sleeper is visible on the host.
    let started = Instant::now();
    while host_processes_with(&m).is_empty() {
        assert!(started.elapsed() < DEADLINE, "the sleeper never appeared");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }

    let c = server
        .post(&format!("/api/eval/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(c.status, 200, "cancel: {}", c.text());
    assert_eq!(c.json().expect("cancel json")["status"], "cancelled");

    // With one worker, this runs only after the cancelled run's executor returned,
    // i.e. after its whole process tree was gone.
    let r = server.run_py("print(1)", 30.0).await;
    assert_eq!(r["status"], "completed", "the slot was not freed: {r:#}");
    assert_eq!(r["output"], "1\n");
    assert_no_host_process_with(&m);
    assert_eq!(server.record(&id).await["status"], "cancelled");
    assert_server_still_fine(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_that_time_out_or_are_cancelled_leave_no_sandbox_root() {
    let s = crate::common::Server::start("workers = 2").await;
    let node = s.health().await["node"].as_str().expect("node").to_string();
    // As root the roots live in a per-node directory under the system temp dir; else in
    // the data dir.
    let work = if unsafe { libc::geteuid() } == 0 {
        std::env::temp_dir().join(format!("crucible-sandbox-{node}"))
    } else {
        s.data_dir().join("sandbox")
    };
    let timed_out = s
        .run(serde_json::json!({"code": "import time; time.sleep(30)", "timeout": 1}))
        .await;
    assert_eq!(timed_out["failure_reason"], "timeout", "{timed_out}");
    let id = s
        .submit(serde_json::json!({"code": "import time; time.sleep(30)", "timeout": 60}))
        .await;
    s.wait_status(&id, "running").await;
    let r = s
        .post(&format!("/api/eval/{id}/cancel"), &serde_json::json!({}))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let ok = s.run_py("print(1)", 5.0).await;
    assert_eq!(ok["status"], "completed");
    assert!(work.is_dir(), "{} is the sandbox work dir", work.display());
    let started = std::time::Instant::now();
    loop {
        let left: Vec<_> = std::fs::read_dir(&work)
            .map(|rd| rd.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        if left.is_empty() {
            break;
        }
        assert!(
            started.elapsed() < crate::common::DEADLINE,
            "sandbox roots left in {}: {left:?}",
            work.display()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
