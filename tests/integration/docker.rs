//! The Docker executor against the real engine (`executor = "docker"`, the test image
//! from tests/images.sh): the hostile cases of `hostile.rs` inside containers, the
//! container's security profile as the engine reports it, container clean-up after each
//! run, at a crash (orphans reaped at the next start, also when the engine only answers
//! after that start) and at SIGTERM, an engine that goes away and comes back, a missing
//! image, and the warm pool.
//!
//! Containers are found with the `docker` CLI by this server's node label
//! (`crucible.node=<node>`, plus `crucible.eval_id=<id>`), never by the global label:
//! other tests run in parallel against the same engine. Each test's server is a
//! [`DockerServer`], which force-removes its node's containers once stopped, so a failing
//! test leaves nothing on the engine. Nothing here waits a fixed time for something to
//! happen; every wait polls a condition up to `DEADLINE` (30 s for conditions nothing can
//! change any more because the server has exited).

use crate::common::{
    self, assert_no_host_process_with, docker_config, free_port, host_processes_with, program,
    test_image, Server, DEADLINE, FORK_BOMB,
};
use serde_json::{json, Value};
use std::future::Future;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const LABEL_NODE: &str = "crucible.node";
const LABEL_EVAL: &str = "crucible.eval_id";
const MIB: u64 = 1024 * 1024;

// ---------------------------------------------------------------------------------------
// Helpers: the docker CLI, polling, probes.
// ---------------------------------------------------------------------------------------

/// Run the docker CLI and return its stdout; panics with its stderr when it fails.
fn docker(args: &[&str]) -> String {
    let out = Command::new("docker")
        .args(args)
        .output()
        .expect("run the docker CLI");
    assert!(
        out.status.success(),
        "docker {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Full ids of the containers (any state) that carry every label of `labels`
/// (`key=value`).
fn containers_with(labels: &[String]) -> Vec<String> {
    let mut args: Vec<String> = vec!["ps".into(), "-a".into(), "-q".into(), "--no-trunc".into()];
    for l in labels {
        args.push("--filter".into());
        args.push(format!("label={l}"));
    }
    let refs: Vec<&str> = args.iter().map(|a| a.as_str()).collect();
    docker(&refs)
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

/// Every container of this node.
fn node_containers(node: &str) -> Vec<String> {
    containers_with(&[format!("{LABEL_NODE}={node}")])
}

/// The containers of this node labelled with `eval` (an eval_id, or `warm`).
fn eval_containers(node: &str, eval: &str) -> Vec<String> {
    containers_with(&[
        format!("{LABEL_NODE}={node}"),
        format!("{LABEL_EVAL}={eval}"),
    ])
}

/// `docker inspect` of one container; `None` once it no longer exists.
fn inspect(id: &str) -> Option<Value> {
    let out = Command::new("docker")
        .args(["inspect", "--type", "container", id])
        .output()
        .expect("run the docker CLI");
    if !out.status.success() {
        return None;
    }
    let v: Value = serde_json::from_slice(&out.stdout).expect("docker inspect JSON");
    v.as_array().and_then(|a| a.first().cloned())
}

/// The node id the server labels its containers with.
async fn node_id(s: &Server) -> String {
    let h = s.health().await;
    h["node"]
        .as_str()
        .unwrap_or_else(|| panic!("no node in /health: {h}"))
        .to_string()
}

/// A server whose node's containers are force-removed after it is stopped, whatever
/// the test's outcome, so a failing test (or a leak the test reports) does not leave
/// containers on the engine. Derefs to the fixture's [`Server`].
struct DockerServer {
    server: Option<Server>,
    node: String,
}

impl DockerServer {
    async fn start(toml: &str) -> DockerServer {
        Self::start_with(toml, &[]).await
    }

    async fn start_with(toml: &str, env: &[(&str, &str)]) -> DockerServer {
        let server = Server::start_with(toml, env).await;
        let node = node_id(&server).await;
        DockerServer {
            server: Some(server),
            node,
        }
    }
}

impl std::ops::Deref for DockerServer {
    type Target = Server;
    fn deref(&self) -> &Server {
        self.server.as_ref().expect("server")
    }
}

impl std::ops::DerefMut for DockerServer {
    fn deref_mut(&mut self) -> &mut Server {
        self.server.as_mut().expect("server")
    }
}

impl Drop for DockerServer {
    fn drop(&mut self) {
        drop(self.server.take());
        let ids = node_containers(&self.node);
        if !ids.is_empty() {
            let _ = Command::new("docker")
                .args(["rm", "-f", "-v"])
                .args(&ids)
                .output();
        }
    }
}

/// Poll `f` until it yields `Ok`; at `DEADLINE` fail with its last `Err` and the log.
async fn eventually<T, F, Fut>(s: &Server, what: &str, f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    eventually_within(s, what, DEADLINE, f).await
}

/// Same with another bound (for conditions nothing can change any more, e.g. once the
/// server has exited, so that a failure does not wait the full `DEADLINE`).
async fn eventually_within<T, F, Fut>(s: &Server, what: &str, within: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let started = Instant::now();
    loop {
        let last = match f().await {
            Ok(v) => return v,
            Err(e) => e,
        };
        assert!(
            started.elapsed() < within,
            "gave up waiting for {what}; last seen: {last}\nserver log:\n{}",
            s.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Wait until no container of `node` exists (removed after its run, or reaped).
async fn assert_no_containers_eventually(s: &Server, node: &str, after: &str) {
    assert_no_containers_within(s, node, after, DEADLINE).await
}

async fn assert_no_containers_within(s: &Server, node: &str, after: &str, within: Duration) {
    let what = format!("no container of this node {after}");
    eventually_within(s, &what, within, || {
        let left = node_containers(node);
        std::future::ready(if left.is_empty() {
            Ok(())
        } else {
            Err(format!("containers left: {left:?}"))
        })
    })
    .await
}

/// Wait until the container of evaluation `eval` exists and return its id.
async fn container_of(s: &Server, node: &str, eval: &str) -> String {
    eventually(s, &format!("the container of {eval}"), || {
        let ids = eval_containers(node, eval);
        std::future::ready(match ids.as_slice() {
            [one] => Ok(one.clone()),
            other => Err(format!("containers labelled with the eval: {other:?}")),
        })
    })
    .await
}

/// Wait until the container of evaluation `eval` is running (the store says `running`
/// before the container is created and started) and return its `docker inspect`.
async fn running_container(s: &Server, node: &str, eval: &str) -> (String, Value) {
    let cid = container_of(s, node, eval).await;
    let c = eventually(s, &format!("container {cid} to run"), || {
        std::future::ready(match inspect(&cid) {
            Some(c) if c["State"]["Running"] == true => Ok(c),
            Some(c) => Err(format!("state {}", c["State"])),
            None => Err("gone".to_string()),
        })
    })
    .await;
    (cid, c)
}

/// A metric of /metrics; fails the test when the server does not export it.
async fn metric(s: &Server, name: &str) -> f64 {
    s.metric(name, "")
        .await
        .unwrap_or_else(|| panic!("metric {name} missing from /metrics"))
}

/// The server answers /health, runs an ordinary evaluation to completion, and leaves no
/// container of its node behind (no warm pool in these tests).
async fn assert_server_still_fine(s: &Server, node: &str) {
    let h = s.get("/health").await;
    assert_eq!(h.status, 200, "/health after a hostile run: {}", h.text());
    let hv = h.json().expect("health json");
    assert_eq!(hv["executor"]["ok"], true, "executor health: {hv:#}");
    let r = s.run_py("print(1)", 60.0).await;
    assert_eq!(r["status"], "completed", "follow-up evaluation: {r:#}");
    assert_eq!(r["output"], "1\n", "follow-up evaluation: {r:#}");
    assert_no_containers_eventually(s, node, "after the follow-up evaluation").await;
}

/// The single JSON line a probe program printed.
fn probe_result(r: &Value) -> Value {
    assert_eq!(r["status"], "completed", "probe did not complete: {r:#}");
    let out = r["output"].as_str().expect("output is a string");
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("probe output {out:?}: {e}"))
}

fn text(r: &Value, field: &str) -> String {
    r[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} is not a string: {r:#}"))
        .to_string()
}

/// A sleep duration no other process on the host has in its command line (distinct
/// from the markers of hostile.rs, which share this test binary).
fn marker(tag: u32) -> String {
    format!("{}9", common::marker(tag))
}

/// Blocks until the container's main process gets SIGUSR1, then prints `released` and
/// exits 0. Signals sent before the handler exists are ignored (PID 1), so the test
/// sends SIGUSR1 repeatedly until the evaluation ends.
const RELEASE_ON_USR1: &str = r#"
import signal, sys, time
def release(*_):
    print("released", flush=True)
    sys.exit(0)
signal.signal(signal.SIGUSR1, release)
while True:
    time.sleep(1)
"#;

/// Send SIGUSR1 to the container until the evaluation is terminal; returns the record.
async fn release(s: &Server, container: &str, eval: &str) -> Value {
    eventually(
        s,
        &format!("{eval} to end after SIGUSR1"),
        move || async move {
            let _ = Command::new("docker")
                .args(["kill", "--signal", "USR1", container])
                .output();
            let r = s.record(eval).await;
            match r["status"].as_str() {
                Some("completed" | "failed" | "cancelled") => Ok(r),
                other => Err(format!("status {other:?}")),
            }
        },
    )
    .await
}

// ---------------------------------------------------------------------------------------
// 1. Hostile code inside containers.
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_infinite_loop_times_out() {
    let s = DockerServer::start(&docker_config("")).await;
    let node = node_id(&s).await;
    let m = marker(1);
    let code = program("sleeper(\"MARKER\")\nwhile True: pass\n", &[("MARKER", &m)]);
    let r = s.run_py(&code, 1.0).await;
    assert_eq!(r["status"], "failed", "{r:#}");
    assert_eq!(r["failure_reason"], "timeout", "{r:#}");
    assert!(r["runtime_ms"].as_u64().is_some(), "runtime_ms: {r:#}");
    assert_no_containers_eventually(&s, &node, "after the timeout").await;
    // The container and with it the whole process tree are gone.
    assert_no_host_process_with(&m);
    assert_server_still_fine(&s, &node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_memory_bomb_hits_the_memory_limit() {
    let s = DockerServer::start(&docker_config("[limits]\nmemory_mb = 128")).await;
    let node = node_id(&s).await;
    // The verdict comes from the kernel: an OOM event of the cgroup parent the appliance
    // owns for each container, not the engine's OOMKilled flag (which some engines never
    // set). 20 of 20, on this engine.
    let h = s.health().await;
    assert_eq!(h["executor"]["limits"], "cgroup1", "{h}");
    assert!(h["executor"]["limits_reason"].is_null(), "{h}");
    let code = "chunks = []\nwhile True:\n    chunks.append('x' * (1 << 20))\n";
    for i in 0..20 {
        let r = s.run_py(code, 60.0).await;
        assert_eq!(r["status"], "failed", "repetition {i}: {r:#}");
        assert_eq!(r["failure_reason"], "memory_limit", "repetition {i}: {r:#}");
        let peak = r["memory_peak_kb"].as_u64().unwrap_or(0);
        assert!(
            peak > 64 * 1024 && peak <= 128 * 1024 + 4096,
            "repetition {i}: the tree's peak {peak} KiB"
        );
    }
    assert_eq!(metric(&s, "crucible_oom_kills_total").await, 20.0);
    assert_server_still_fine(&s, &node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_fork_bomb_is_contained() {
    let s = DockerServer::start(&docker_config("[limits]\nmax_processes = 32")).await;
    let node = node_id(&s).await;
    let m = marker(3);
    // Fork sleepers until the pids limit refuses, report how many, then keep hammering
    // the limit for a while and exit.
    let code = program(FORK_BOMB, &[("MARKER", &m)]);
    let r = s.run_py(&code, 120.0).await;
    let status = text(&r, "status");
    assert!(
        ["completed", "failed"].contains(&status.as_str()),
        "the fork bomb's evaluation did not end normally: {r:#}"
    );
    let forks: u64 = text(&r, "output")
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("fork count not reported ({e}): {r:#}"));
    assert!(
        forks < 32,
        "max_processes = 32 (pids limit) did not stop the bomb: {forks} forks"
    );
    assert_no_containers_eventually(&s, &node, "after the fork bomb").await;
    assert_no_host_process_with(&m);
    assert_server_still_fine(&s, &node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_stdout_flood_is_capped() {
    let s = DockerServer::start(&docker_config("")).await;
    let node = node_id(&s).await;
    let code = "import sys\nsys.stdout.write('x' * 100_000_000)\n";
    let r = s.run_py(code, 120.0).await;
    assert_eq!(r["status"], "completed", "{r:#}");
    assert_eq!(r["output_truncated"], true, "{}", r["output_truncated"]);
    let out = text(&r, "output");
    assert_eq!(out.len(), 262_144, "stdout not cut at the default cap");
    assert!(out.bytes().all(|b| b == b'x'), "stdout content");
    assert_eq!(r["stderr"], "", "nothing was written to stderr");
    assert_server_still_fine(&s, &node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_stderr_is_separate_and_capped() {
    let s = DockerServer::start(&docker_config("[limits]\nmax_output_bytes = 4096")).await;
    let node = node_id(&s).await;
    let code = "import sys\nprint('ok', flush=True)\nsys.stderr.write('e' * 100_000_000)\n";
    let r = s.run_py(code, 120.0).await;
    assert_eq!(r["status"], "completed", "{r:#}");
    assert_eq!(r["output_truncated"], true, "{}", r["output_truncated"]);
    assert_eq!(r["output"], "ok\n", "stdout must hold only stdout, intact");
    let stderr = text(&r, "stderr");
    assert_eq!(stderr.len(), 4096, "stderr not cut at the cap");
    assert!(stderr.bytes().all(|b| b == b'e'), "stderr content");

    // Small outputs: each stream lands in its own field, in order.
    let r = s
        .run_py(
            "import sys\nfor i in range(3):\n    print('out', i, flush=True)\n    print('err', i, file=sys.stderr, flush=True)\n",
            60.0,
        )
        .await;
    assert_eq!(r["status"], "completed", "{r:#}");
    assert_eq!(r["output"], "out 0\nout 1\nout 2\n", "{r:#}");
    assert_eq!(r["stderr"], "err 0\nerr 1\nerr 2\n", "{r:#}");
    assert_eq!(r["output_truncated"], false, "{r:#}");
    assert_server_still_fine(&s, &node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_network_is_none() {
    let s = DockerServer::start(&docker_config("")).await;
    let node = node_id(&s).await;
    // A port this host listens on over loopback; the container must not reach it (nor
    // the appliance's own port). Never aim the probe at anything but loopback.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a test listener");
    listener.set_nonblocking(true).expect("nonblocking");
    let test_port = listener.local_addr().expect("addr").port();
    let (host, server_port) = s.addr.rsplit_once(':').expect("host:port");
    assert_eq!(host, "127.0.0.1", "the fixture listens on loopback");
    let code = program(
        r#"
res = {
    "dev": [l.split(":")[0].strip() for l in open("/proc/net/dev").read().splitlines()[2:]],
    "sys": sorted(os.listdir("/sys/class/net")),
    "index": [n for _, n in socket.if_nameindex()],
    "routes": open("/proc/net/route").read().splitlines()[1:],
    "connect": {},
}
for port in [TEST_PORT, SERVER_PORT]:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(10)
    try:
        s.connect(("127.0.0.1", port))
        res["connect"][str(port)] = "connected"
    except OSError as e:
        res["connect"][str(port)] = "error: %s" % e
    finally:
        s.close()
print(json.dumps(res))
"#,
        &[
            ("TEST_PORT", &test_port.to_string()),
            ("SERVER_PORT", server_port),
        ],
    );
    let p = probe_result(&s.run_py(&code, 60.0).await);
    assert_eq!(p["dev"], json!(["lo"]), "interfaces in /proc/net/dev: {p}");
    assert_eq!(p["sys"], json!(["lo"]), "interfaces in /sys/class/net: {p}");
    assert_eq!(p["index"], json!(["lo"]), "socket.if_nameindex(): {p}");
    assert_eq!(p["routes"], json!([]), "IPv4 routes inside: {p}");
    for port in [test_port.to_string(), server_port.to_string()] {
        let got = p["connect"][&port].as_str().expect("connect result");
        assert!(
            got.starts_with("error: "),
            "the container reached the host's 127.0.0.1:{port}: {got}"
        );
    }
    match listener.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("the host's test listener got a connection: {other:?}"),
    }
    assert_server_still_fine(&s, &node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_filesystem_is_read_only_and_tmp_is_noexec() {
    let s = DockerServer::start(&docker_config("[limits]\ntmp_mb = 4\nmax_file_mb = 2")).await;
    let node = node_id(&s).await;
    let code = program(
        r#"
import shutil, subprocess

def err(e):
    return errno.errorcode.get(e.errno, str(e.errno))

res = {}
for d in ["/", "/usr", "/etc", "/bin", "/var", "/var/tmp", "/run/lock"]:
    res[d] = write(os.path.join(d, "crucible-probe"), 10)
mounts = [l.split() for l in open("/proc/mounts").read().splitlines()]
res["root_opts"] = [m[3].split(",") for m in mounts if m[1] == "/"]
res["shm_opts"] = [m[3].split(",") for m in mounts if m[1] == "/dev/shm"]
res["/tmp"] = write("/tmp/crucible-probe", 10)
res["/tmp readback"] = open("/tmp/crucible-probe", "rb").read().decode()
res["exec_rootfs"] = subprocess.run(["/bin/true"]).returncode
shutil.copy("/bin/true", "/tmp/true")
os.chmod("/tmp/true", 0o755)
try:
    res["exec_tmp"] = "ran with %d" % subprocess.run(["/tmp/true"]).returncode
except OSError as e:
    res["exec_tmp"] = err(e)
os.remove("/tmp/true")
res["tmp_mount"] = [l for l in open("/proc/mounts").read().splitlines() if l.split()[1] == "/tmp"]
tmp_limits(res)
print(json.dumps(res))
"#,
        &[],
    );
    let p = probe_result(&s.run_py(&code, 60.0).await);
    for path in ["/", "/usr", "/etc", "/bin", "/var"] {
        let got = p[path].as_str().expect("result per path");
        assert!(
            ["EROFS", "EACCES", "EPERM"].contains(&got),
            "writing under {path} should fail (read-only root), got {got}: {p}"
        );
    }
    // World-writable directories of the image: only a read-only root stops these.
    for path in ["/var/tmp", "/run/lock"] {
        assert_eq!(p[path], "EROFS", "writing under {path} (mode 1777): {p}");
    }
    let root = &p["root_opts"];
    assert!(
        root.as_array().is_some_and(|r| r.len() == 1)
            && root[0].as_array().is_some_and(|o| o.contains(&json!("ro"))),
        "the root is mounted read-only: {p}"
    );
    // Docker's own /dev/shm, when present, must not allow exec either.
    for opts in p["shm_opts"].as_array().cloned().unwrap_or_default() {
        assert!(
            opts.as_array()
                .is_some_and(|o| o.contains(&json!("noexec"))),
            "/dev/shm must be noexec: {p}"
        );
    }
    assert_eq!(p["/tmp"], "ok", "/tmp must be writable: {p}");
    assert_eq!(p["/tmp readback"], "xxxxxxxxxx", "{p}");
    assert_eq!(
        p["exec_rootfs"], 0,
        "control: exec from the image works: {p}"
    );
    assert_eq!(p["exec_tmp"], "EACCES", "exec from a noexec /tmp: {p}");
    let mounts = p["tmp_mount"].as_array().expect("mounts");
    assert_eq!(mounts.len(), 1, "one /tmp mount: {p}");
    let m = mounts[0].as_str().unwrap_or("");
    assert!(
        m.starts_with("tmpfs /tmp tmpfs ") && m.contains("noexec") && m.contains("nosuid"),
        "/tmp mount: {m}"
    );
    assert_eq!(p["big"], "EFBIG", "a 3 MiB file over max_file_mb = 2: {p}");
    assert_eq!(p["fill"], "ENOSPC", "filling a 4 MiB /tmp: {p}");
    assert_server_still_fine(&s, &node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_runs_unprivileged_and_gets_stdin() {
    let s =
        DockerServer::start_with(&docker_config(""), &[("CRUCIBLE_SECRET_TEST", "hunter2")]).await;
    let node = node_id(&s).await;
    // Non-ASCII in the code: the bootstrap must count bytes, not characters.
    let code = r#"
import json, os, sys
status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
print(json.dumps({
    "uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(), "egid": os.getegid(),
    "cap_eff": status["CapEff"].strip(), "cap_prm": status["CapPrm"].strip(),
    "cap_bnd": status["CapBnd"].strip(), "no_new_privs": status["NoNewPrivs"].strip(),
    "environ": dict(os.environ), "stdin": sys.stdin.read(), "text": "héllo ✓",
}))
"#;
    let stdin = "first line\nsecond 'line' \"with\" quotes ✓\n\nno trailing newline";
    let r = s
        .run(json!({"code": code, "language": "python", "timeout": 60, "stdin": stdin}))
        .await;
    let p = probe_result(&r);
    for k in ["uid", "euid", "gid", "egid"] {
        assert_ne!(p[k], 0, "{k} is root inside: {p}");
        assert_eq!(
            p[k], 65534,
            "{k} is not the default docker.user 65534:65534: {p}"
        );
    }
    for k in ["cap_eff", "cap_prm", "cap_bnd"] {
        assert_eq!(p[k], "0000000000000000", "{k}: capabilities left: {p}");
    }
    assert_eq!(p["no_new_privs"], "1", "no-new-privileges: {p}");
    assert_eq!(p["stdin"], stdin, "stdin did not reach the program intact");
    assert_eq!(p["text"], "héllo ✓", "the code arrived altered");
    let environ = p["environ"].as_object().expect("environ");
    assert!(
        !environ.contains_key("CRUCIBLE_SECRET_TEST") && !environ.values().any(|v| v == "hunter2"),
        "the appliance's environment leaked: {environ:?}"
    );

    // sh, and no stdin at all: the program sees EOF at once.
    let r = s
        .run(json!({"code": "id -u\ncat\necho done", "language": "sh", "timeout": 60}))
        .await;
    assert_eq!(r["status"], "completed", "{r:#}");
    assert_eq!(r["output"], "65534\ndone\n", "{r:#}");
    assert_server_still_fine(&s, &node).await;
}

// ---------------------------------------------------------------------------------------
// 2. No container outlives its evaluation.
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_container_is_removed_after_each_evaluation() {
    let s = DockerServer::start(&docker_config("")).await;
    let node = node_id(&s).await;

    // Positive control: while an evaluation runs, its container exists with our labels.
    let id = s
        .submit(json!({"code": RELEASE_ON_USR1, "language": "python", "timeout": 120}))
        .await;
    s.wait_status(&id, "running").await;
    let cid = container_of(&s, &node, &id).await;
    assert_eq!(node_containers(&node), vec![cid.clone()], "one container");
    let r = release(&s, &cid, &id).await;
    assert_eq!(r["status"], "completed", "{r:#}");
    assert_eq!(r["output"], "released\n", "{r:#}");
    assert_no_containers_eventually(&s, &node, "after a completed evaluation").await;
    assert!(inspect(&cid).is_none(), "container {cid} still exists");

    let r = s.run_py("import sys\nsys.exit(3)", 60.0).await;
    assert_eq!(r["status"], "failed", "{r:#}");
    assert_eq!(r["failure_reason"], "nonzero_exit", "{r:#}");
    assert_eq!(r["exit_code"], 3, "{r:#}");
    assert_no_containers_eventually(&s, &node, "after a non-zero exit").await;

    let r = s.run_py("while True: pass", 1.0).await;
    assert_eq!(r["failure_reason"], "timeout", "{r:#}");
    assert_no_containers_eventually(&s, &node, "after a timeout").await;

    let r = s
        .run(json!({"code": "echo hi", "language": "sh", "timeout": 60}))
        .await;
    assert_eq!(r["status"], "completed", "{r:#}");
    assert_eq!(r["output"], "hi\n", "{r:#}");
    assert_no_containers_eventually(&s, &node, "after a sh evaluation").await;

    // Every evaluation had a container of its own.
    assert_eq!(
        metric(&s, "crucible_docker_containers_created_total").await,
        4.0
    );
}

// ---------------------------------------------------------------------------------------
// 3. The security profile as the engine sees it; cancel removes the container.
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_security_profile_and_cancel() {
    let s = DockerServer::start(&docker_config(
        "[limits]\nmemory_mb = 200\nmax_processes = 48\ntmp_mb = 8\n[docker]\ncpus = 0.5\nuser = \"4242:4243\"",
    ))
    .await;
    let node = node_id(&s).await;
    let m = marker(30);
    let code = program(
        "sleeper(\"MARKER\")\nimport time\nwhile True: time.sleep(1)\n",
        &[("MARKER", &m)],
    );
    let id = s
        .submit(json!({"code": code, "language": "python", "timeout": 300}))
        .await;
    s.wait_status(&id, "running").await;
    let (cid, c) = running_container(&s, &node, &id).await;
    let hc = &c["HostConfig"];
    let cfg = &c["Config"];
    let ctx = format!("container {cid}: {c:#}");

    assert_eq!(hc["NetworkMode"], "none", "NetworkMode; {ctx}");
    assert_eq!(cfg["NetworkDisabled"], true, "NetworkDisabled; {ctx}");
    assert_eq!(hc["ReadonlyRootfs"], true, "ReadonlyRootfs; {ctx}");
    assert_eq!(hc["Privileged"], false, "Privileged; {ctx}");
    let cap_drop: Vec<String> = serde_json::from_value(hc["CapDrop"].clone()).unwrap_or_default();
    assert!(
        cap_drop.iter().any(|c| c.eq_ignore_ascii_case("ALL")),
        "CapDrop ALL; {ctx}"
    );
    let cap_add: Vec<String> = serde_json::from_value(hc["CapAdd"].clone()).unwrap_or_default();
    assert!(cap_add.is_empty(), "CapAdd must be empty; {ctx}");
    let sec: Vec<String> = serde_json::from_value(hc["SecurityOpt"].clone()).unwrap_or_default();
    assert!(
        sec.iter()
            .any(|o| o == "no-new-privileges" || o == "no-new-privileges:true"),
        "SecurityOpt no-new-privileges; {ctx}"
    );
    assert!(
        !sec.iter().any(|o| o.contains("unconfined")),
        "no unconfined profile; {ctx}"
    );
    assert_eq!(hc["PidsLimit"], 48, "PidsLimit = max_processes; {ctx}");
    // The tree's memory limit is the kernel's: memory and memory + swap of the cgroup
    // parent the appliance owns for the run (the container's own limit sits just above
    // it, so the OOM is recorded where the appliance reads it).
    let parent = hc["CgroupParent"].as_str().unwrap_or("").to_string();
    assert!(parent.starts_with("/crucible-"), "CgroupParent; {ctx}");
    let limit = |file: &str| -> u64 {
        let p = format!("/sys/fs/cgroup/memory{parent}/{file}");
        std::fs::read_to_string(&p)
            .unwrap_or_else(|e| panic!("{p}: {e}"))
            .trim()
            .parse()
            .expect("a number")
    };
    assert_eq!(
        limit("memory.limit_in_bytes"),
        200 * MIB,
        "memory = memory_mb; {ctx}"
    );
    assert_eq!(
        limit("memory.memsw.limit_in_bytes"),
        200 * MIB,
        "memory + swap = memory_mb; {ctx}"
    );
    assert!(hc["Memory"].as_u64() >= Some(200 * MIB), "Memory; {ctx}");
    assert_eq!(hc["MemorySwap"], hc["Memory"], "MemorySwap = Memory; {ctx}");
    assert_eq!(hc["NanoCpus"], 500_000_000u64, "NanoCpus = cpus; {ctx}");
    assert_eq!(hc["OomScoreAdj"], 1000, "OomScoreAdj; {ctx}");
    let tmp = hc["Tmpfs"]["/tmp"].as_str().unwrap_or("");
    let size = format!("size={}", 8 * MIB);
    for opt in [
        "noexec",
        "nosuid",
        "nodev",
        size.as_str(),
        "nr_inodes=16384",
    ] {
        assert!(
            tmp.split(',').any(|o| o == opt),
            "Tmpfs /tmp lacks {opt}: {tmp:?}; {ctx}"
        );
    }
    assert_eq!(cfg["User"], "4242:4243", "User = docker.user; {ctx}");
    let binds: Vec<String> = serde_json::from_value(hc["Binds"].clone()).unwrap_or_default();
    assert!(binds.is_empty(), "no host binds; {ctx}");
    let mounts = c["Mounts"].as_array().cloned().unwrap_or_default();
    assert!(mounts.is_empty(), "no mounts from the host; {ctx}");
    let devices = hc["Devices"].as_array().cloned().unwrap_or_default();
    assert!(devices.is_empty(), "no host devices; {ctx}");
    for (k, host_mode) in [
        ("PidMode", "host"),
        ("IpcMode", "host"),
        ("UTSMode", "host"),
        ("UsernsMode", "host"),
    ] {
        assert_ne!(hc[k], host_mode, "{k}; {ctx}");
    }
    assert_eq!(cfg["Image"], test_image(), "the allow-listed image; {ctx}");
    assert_eq!(
        cfg["Labels"][LABEL_NODE],
        node.as_str(),
        "node label; {ctx}"
    );
    assert_eq!(cfg["Labels"][LABEL_EVAL], id.as_str(), "eval label; {ctx}");
    let name = c["Name"].as_str().unwrap_or("");
    assert!(
        name.starts_with(&format!("/crucible-{node}-")),
        "container name {name:?}"
    );
    assert_eq!(c["State"]["Running"], true, "running; {ctx}");

    // The forked sleeper is visible on this host (positive control for the check below).
    eventually(&s, "the sleeper inside the container", || {
        std::future::ready(if host_processes_with(&m).is_empty() {
            Err("not on the host yet".to_string())
        } else {
            Ok(())
        })
    })
    .await;

    let c = s.post(&format!("/api/eval/{id}/cancel"), &json!({})).await;
    assert_eq!(c.status, 200, "cancel: {}", c.text());
    assert_eq!(c.json().expect("cancel json")["status"], "cancelled");
    assert_no_containers_eventually(&s, &node, "after the cancel").await;
    eventually(&s, "the sleeper to be gone", || {
        let left = host_processes_with(&m);
        std::future::ready(if left.is_empty() {
            Ok(())
        } else {
            Err(format!("{left:?}"))
        })
    })
    .await;
    let r = s.record(&id).await;
    assert_eq!(r["status"], "cancelled", "{r:#}");
    assert_server_still_fine(&s, &node).await;
    assert_eq!(
        s.record(&id).await["status"],
        "cancelled",
        "terminal states never change"
    );
}

// ---------------------------------------------------------------------------------------
// 4. kill -9 mid-run: the orphan is reaped and the evaluation is interrupted.
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_orphan_is_reaped_after_kill9() {
    let mut s = DockerServer::start(&docker_config("")).await;
    let node = node_id(&s).await;
    let id = s
        .submit(
            json!({"code": "import time\ntime.sleep(300)", "language": "python", "timeout": 300}),
        )
        .await;
    s.wait_status(&id, "running").await;
    let (cid, _) = running_container(&s, &node, &id).await;

    s.kill9();
    // Nobody removes it while the appliance is dead: an orphan.
    let orphan = inspect(&cid).expect("the container survives the appliance's crash");
    assert_eq!(orphan["State"]["Running"], true, "{orphan:#}");

    s.restart().await;
    assert_eq!(node_id(&s).await, node, "the node id is kept in the store");
    assert_no_containers_eventually(&s, &node, "after the restart (orphan reaping)").await;
    assert!(inspect(&cid).is_none(), "the orphan {cid} still exists");
    let r = s.wait_terminal(&id).await;
    assert_eq!(r["status"], "failed", "{r:#}");
    assert_eq!(r["failure_reason"], "interrupted", "{r:#}");
    assert!(
        s.log()
            .contains("removed containers left by an earlier run"),
        "the reaping is logged:\n{}",
        s.log()
    );
    assert_server_still_fine(&s, &node).await;
}

// ---------------------------------------------------------------------------------------
// 5. The engine goes away and comes back: work waits in the queue.
// ---------------------------------------------------------------------------------------

/// A TCP -> /var/run/docker.sock forwarder on a fixed loopback port that can be stopped
/// (listener closed, every connection cut) and started again.
struct Forwarder {
    port: u16,
    task: Option<tokio::task::JoinHandle<()>>,
    connections: Arc<AtomicUsize>,
}

impl Forwarder {
    fn new(port: u16) -> Forwarder {
        Forwarder {
            port,
            task: None,
            connections: Arc::new(AtomicUsize::new(0)),
        }
    }

    async fn start(&mut self) {
        assert!(self.task.is_none(), "forwarder already running");
        let started = Instant::now();
        let listener = loop {
            match tokio::net::TcpListener::bind(("127.0.0.1", self.port)).await {
                Ok(l) => break l,
                Err(e) => {
                    assert!(
                        started.elapsed() < DEADLINE,
                        "cannot bind the forwarder on {}: {e}",
                        self.port
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        let count = self.connections.clone();
        self.task = Some(tokio::spawn(async move {
            // Dropping this task (abort) drops the listener and the JoinSet, which aborts
            // every connection.
            let mut conns = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((mut tcp, _)) = accepted else { continue };
                        count.fetch_add(1, Ordering::SeqCst);
                        conns.spawn(async move {
                            if let Ok(mut unix) =
                                tokio::net::UnixStream::connect("/var/run/docker.sock").await
                            {
                                let _ = tokio::io::copy_bidirectional(&mut tcp, &mut unix).await;
                            }
                        });
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        }));
    }

    async fn stop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_engine_outage_keeps_work_queued() {
    let port = free_port();
    let mut fwd = Forwarder::new(port);
    fwd.start().await;
    let host = format!("tcp://127.0.0.1:{port}");
    let s = DockerServer::start_with(
        &docker_config(&format!("[docker]\nhost = \"{host}\"")),
        &[("DOCKER_HOST", host.as_str())],
    )
    .await;
    let node = node_id(&s).await;

    // Through the forwarder, everything works (and the server really uses it).
    let h = s.health().await;
    assert_eq!(h["executor"]["backend"], "docker", "{h:#}");
    assert_eq!(h["executor"]["ok"], true, "{h:#}");
    let r = s.run_py("print('before')", 60.0).await;
    assert_eq!(r["status"], "completed", "{r:#}");
    assert!(fwd.connections() > 0, "the server did not use docker.host");

    // The engine goes away.
    fwd.stop().await;
    let sr = &s;
    let h = eventually(
        &s,
        "/health to report the engine unreachable",
        move || async move {
            let h = sr.health().await;
            if h["executor"]["ok"] == false {
                Ok(h)
            } else {
                Err(h.to_string())
            }
        },
    )
    .await;
    assert_eq!(h["status"], "degraded", "{h:#}");
    assert!(
        !text(&h["executor"], "detail").is_empty(),
        "the outage is explained: {h:#}"
    );

    // Submissions are still accepted and wait: never started, never failed.
    let a = s
        .submit(json!({"code": "print('a')", "language": "python", "timeout": 60}))
        .await;
    let b = s
        .submit(json!({"code": "echo b", "language": "sh", "timeout": 60}))
        .await;
    for _ in 0..6 {
        for id in [&a, &b] {
            let r = s.record(id).await;
            assert_eq!(r["status"], "queued", "with the engine down: {r:#}");
        }
        let h = s.health().await;
        assert_eq!(h["executor"]["ok"], false, "{h:#}");
        assert_eq!(h["queue"]["running"], 0, "{h:#}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // The engine is back: the queued work runs by itself.
    fwd.start().await;
    let ra = s.wait_terminal(&a).await;
    let rb = s.wait_terminal(&b).await;
    assert_eq!(ra["status"], "completed", "{ra:#}");
    assert_eq!(ra["output"], "a\n", "{ra:#}");
    assert_eq!(rb["status"], "completed", "{rb:#}");
    assert_eq!(rb["output"], "b\n", "{rb:#}");
    let h = s.health().await;
    assert_eq!(h["executor"]["ok"], true, "{h:#}");
    assert_no_containers_eventually(&s, &node, "after the outage").await;
    drop(s);
    fwd.stop().await;
}

// ---------------------------------------------------------------------------------------
// 6. A language whose image is missing fails its evaluations with executor_error.
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_missing_image_is_an_executor_error() {
    const MISSING: &str = "crucible-no-such-image:never";
    let probe = Command::new("docker")
        .args(["image", "inspect", MISSING])
        .output()
        .expect("docker CLI");
    assert!(
        !probe.status.success(),
        "precondition: {MISSING} must not exist"
    );
    // pull = false: nothing may be fetched from a registry.
    let cfg = format!(
        "executor = \"docker\"\n[docker]\npull = false\n[languages.python]\nimage = \"{MISSING}\"\n[languages.sh]\nimage = \"{}\"\n",
        test_image()
    );
    let s = DockerServer::start(&cfg).await;
    let node = node_id(&s).await;
    let r = s.run_py("print('never')", 60.0).await;
    assert_eq!(r["status"], "failed", "{r:#}");
    assert_eq!(r["failure_reason"], "executor_error", "{r:#}");
    let err = text(&r, "error");
    assert!(err.contains(MISSING), "the error names the image: {err:?}");
    assert_eq!(r["output"], "", "{r:#}");
    assert_no_containers_eventually(&s, &node, "after the failed create").await;

    // The other language keeps working.
    let r = s
        .run(json!({"code": "echo fine", "language": "sh", "timeout": 60}))
        .await;
    assert_eq!(r["status"], "completed", "{r:#}");
    assert_eq!(r["output"], "fine\n", "{r:#}");
    assert_no_containers_eventually(&s, &node, "after the sh evaluation").await;
}

// ---------------------------------------------------------------------------------------
// 7. The warm pool: filled, each container used once, refilled.
// ---------------------------------------------------------------------------------------

/// The language a container was created for, from its bootstrap command.
fn container_language(c: &Value) -> &str {
    c["Config"]["Labels"]["crucible.language"]
        .as_str()
        .unwrap_or("unknown")
}

/// Wait until the pool holds exactly `per_language` unused (`created`) containers for
/// python and for sh, and the gauge agrees; returns (python ids, sh ids).
async fn wait_warm_pool(s: &Server, node: &str, per_language: usize) -> (Vec<String>, Vec<String>) {
    eventually(s, "the warm pool to be full", move || async move {
        let mut py = Vec::new();
        let mut sh = Vec::new();
        let mut other = Vec::new();
        for id in eval_containers(node, "warm") {
            let Some(c) = inspect(&id) else {
                return Err(format!("{id} vanished"));
            };
            let state = c["State"]["Status"].as_str().unwrap_or("").to_string();
            match (container_language(&c), state.as_str()) {
                // Warm containers are started and wait for their code on stdin.
                ("python", "running") => py.push(id),
                ("sh", "running") => sh.push(id),
                (lang, st) => other.push(format!("{id} {lang} {st}")),
            }
        }
        let gauge = metric(s, "crucible_docker_warm_containers").await;
        if py.len() == per_language
            && sh.len() == per_language
            && other.is_empty()
            && gauge == (2 * per_language) as f64
        {
            Ok((py, sh))
        } else {
            Err(format!(
                "python {py:?}, sh {sh:?}, in use or other {other:?}, gauge {gauge}"
            ))
        }
    })
    .await
}

const HOSTNAME_PROBE: &str = r#"
import json, os, socket
used = os.path.exists("/tmp/crucible-used")
open("/tmp/crucible-used", "w").write("x")
print(json.dumps({"host": socket.gethostname(), "used_before": used}))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_warm_pool_serves_each_container_once() {
    let s = DockerServer::start(&docker_config("workers = 1\n[docker]\nwarm_pool = 2")).await;
    let node = node_id(&s).await;
    let (py0, sh0) = wait_warm_pool(&s, &node, 2).await;
    let all0: Vec<&String> = py0.iter().chain(sh0.iter()).collect();

    let mut hosts: Vec<String> = Vec::new();
    for i in 0..5 {
        let p = probe_result(&s.run_py(HOSTNAME_PROBE, 60.0).await);
        assert_eq!(p["used_before"], false, "a container was reused: {p}");
        hosts.push(text(&p, "host"));
        if i == 0 {
            // The pool was full: the first run started in one of its python containers.
            assert!(
                py0.iter().any(|c| c.starts_with(&hosts[0])),
                "first run in {} but the warm python containers were {py0:?}",
                hosts[0]
            );
        }
    }
    let r = s
        .run(json!({"code": "cat /proc/sys/kernel/hostname; test -e /tmp/crucible-used && echo reused; touch /tmp/crucible-used", "language": "sh", "timeout": 60}))
        .await;
    assert_eq!(r["status"], "completed", "{r:#}");
    let out = text(&r, "output");
    assert!(!out.contains("reused"), "an sh container was reused: {out}");
    let sh_host = out.trim().to_string();
    assert!(
        sh0.iter().any(|c| c.starts_with(&sh_host)),
        "the sh run ({sh_host}) did not use a warm sh container {sh0:?}"
    );
    hosts.push(sh_host);

    let mut distinct = hosts.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        hosts.len(),
        "every evaluation needs a container of its own: {hosts:?}"
    );

    // Refilled to the target with fresh containers; the used ones are gone.
    let (py1, sh1) = wait_warm_pool(&s, &node, 2).await;
    for c in py1.iter().chain(sh1.iter()) {
        assert!(
            !hosts.iter().any(|h| c.starts_with(h.as_str())),
            "used container {c} is back in the pool"
        );
    }
    for c in all0 {
        if hosts.iter().any(|h| c.starts_with(h.as_str())) {
            assert!(inspect(c).is_none(), "used warm container {c} not removed");
        }
    }
    assert_eq!(node_containers(&node).len(), 4, "only the pool is left");
    assert!(
        metric(&s, "crucible_docker_warm_hits_total").await >= 2.0,
        "warm hits (first python and the sh run at least)"
    );
    // Warm containers carry their language's full limit: 1 worker x the largest limit
    // + 2 warm x every language's limit.
    let langs = s.get("/api/languages").await.json().expect("languages");
    let mbs: Vec<u64> = langs["languages"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|l| l["limits"]["memory_mb"].as_u64())
        .collect();
    let largest = mbs.iter().copied().max().unwrap_or(0);
    let budget = (largest + 2 * mbs.iter().sum::<u64>()) * MIB;
    assert_eq!(
        metric(&s, "crucible_docker_memory_budget_bytes").await,
        budget as f64
    );
}

// ---------------------------------------------------------------------------------------
// 8. SIGTERM leaves no container behind.
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_sigterm_leaves_no_container() {
    let mut s = DockerServer::start(&docker_config(
        "shutdown_grace_secs = 1\n[docker]\nwarm_pool = 2",
    ))
    .await;
    let node = node_id(&s).await;

    // 1. One evaluation running (in a warm container) at the time of the signal, the
    //    rest of the pool waiting.
    wait_warm_pool(&s, &node, 2).await;
    let id = s
        .submit(
            json!({"code": "import time\ntime.sleep(300)", "language": "python", "timeout": 300}),
        )
        .await;
    s.wait_status(&id, "running").await;
    // Idle warm containers run too (a shell waiting for its code on stdin): the busy one
    // is the one whose shell became python3.
    eventually(&s, "the evaluation running in a container", || {
        let busy = node_containers(&node)
            .into_iter()
            .filter(|c| {
                inspect(c).is_some_and(|v| v["State"]["Running"] == true)
                    && Command::new("docker")
                        .args(["top", c])
                        .output()
                        .is_ok_and(|o| {
                            // CMD is the 8th column; an idle shell's own command line
                            // names python3 too, so match the program, not the text.
                            String::from_utf8_lossy(&o.stdout)
                                .lines()
                                .any(|l| l.split_whitespace().nth(7) == Some("python3"))
                        })
            })
            .count();
        std::future::ready(if busy == 1 {
            Ok(())
        } else {
            Err(format!("{busy} containers run python3"))
        })
    })
    .await;
    let st = s.terminate();
    assert!(st.success(), "exit after SIGTERM: {st:?}\n{}", s.log());
    // The server has exited: whatever is left now stays. 30 s only absorbs the engine's
    // own bookkeeping.
    let exited = Duration::from_secs(30);
    assert_no_containers_within(&s, &node, "after SIGTERM with a running evaluation", exited).await;

    // The running evaluation was killed at the end of the grace and recorded so.
    s.restart().await;
    let r = s.wait_terminal(&id).await;
    assert_eq!(r["status"], "failed", "{r:#}");
    assert_eq!(r["failure_reason"], "interrupted", "{r:#}");

    // 2. Idle: only the warm pool exists when the signal arrives.
    wait_warm_pool(&s, &node, 2).await;
    let st = s.terminate();
    assert!(st.success(), "exit after SIGTERM: {st:?}\n{}", s.log());
    assert_no_containers_within(&s, &node, "after SIGTERM with only the warm pool", exited).await;
}

// ---------------------------------------------------------------------------------------
// 9. Orphans are reaped even when the engine only answers after the start.
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_orphan_is_reaped_when_the_engine_returns_after_start() {
    let port = free_port();
    let mut fwd = Forwarder::new(port);
    fwd.start().await;
    let host = format!("tcp://127.0.0.1:{port}");
    let mut s = DockerServer::start_with(
        &docker_config(&format!("[docker]\nhost = \"{host}\"")),
        &[("DOCKER_HOST", host.as_str())],
    )
    .await;
    let node = node_id(&s).await;
    let id = s
        .submit(
            json!({"code": "import time\ntime.sleep(300)", "language": "python", "timeout": 300}),
        )
        .await;
    s.wait_status(&id, "running").await;
    let (cid, _) = running_container(&s, &node, &id).await;

    // Crash, and come back while the engine cannot be reached (e.g. the socket proxy
    // starts after the appliance at boot).
    s.kill9();
    fwd.stop().await;
    s.restart().await;
    let r = s.wait_terminal(&id).await;
    assert_eq!(r["status"], "failed", "{r:#}");
    assert_eq!(r["failure_reason"], "interrupted", "{r:#}");
    assert!(
        inspect(&cid).is_some(),
        "precondition: the orphan {cid} exists"
    );

    // The engine answers again: the orphan (still running the dead run's code, with
    // nobody enforcing its timeout any more) must be removed.
    fwd.start().await;
    let sr = &s;
    eventually(&s, "the engine to be reachable", move || async move {
        let h = sr.health().await;
        if h["executor"]["ok"] == true {
            Ok(())
        } else {
            Err(h.to_string())
        }
    })
    .await;
    assert_no_containers_eventually(&s, &node, "once the engine is reachable again").await;
    drop(s);
    fwd.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_the_hostile_corpus_holds() {
    // The same list as the sandbox runs (tests/integration/corpus.rs): the containers get
    // the sandbox's syscall filter as their seccomp profile.
    let s = DockerServer::start(&docker_config("")).await;
    let node = node_id(&s).await;
    crate::hostile::run_corpus(&s).await;
    assert_server_still_fine(&s, &node).await;
}

/// The test image with a C compiler (tests/images.sh).
fn gcc_image() -> String {
    std::env::var("CRUCIBLE_TEST_GCC_IMAGE").unwrap_or_else(|_| "crucible-test-gcc:bookworm".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_judges_a_compiled_language() {
    // C compiled in one container, its /build carried as a frame to each test's own
    // container; a second submission of the same program is a compile-cache hit. A
    // compile step that plants links shows that nothing of /build is followed on the host.
    let img = gcc_image();
    let s = DockerServer::start(&docker_config(&format!(
        "[languages.c]\nimage = \"{img}\"\n\
         [languages.planted]\nfile = \"build.sh\"\ncompile = [\"sh\", \"{{file}}\"]\n\
         run = [\"sh\", \"-c\", \"cat /build/real; cat /build/leak\"]\nimage = \"{img}\"\n"
    )))
    .await;
    let node = node_id(&s).await;
    let sum = "#include <stdio.h>\n#include \"lib/add.h\"\nint main(int c,char**v){long a,b;scanf(\"%ld %ld\",&a,&b);printf(\"%ld %s\\n\",add(a,b),v[1]);}\n";
    let body = json!({
        "language": "c",
        "code": sum,
        "files": [{"name": "lib/add.h", "content": "static long add(long a,long b){return a+b;}\n"}],
        "args": ["x"],
        "tests": [
            {"stdin": "1 2", "expected_output": "3 x"},
            {"stdin": "40 2", "expected_output": "42 x"},
            {"stdin": "1 1", "expected_output": "3 x"},
        ],
    });
    let id = s.submit(body.clone()).await;
    let r = s.wait_terminal(&id).await;
    assert_eq!(r["compile"]["exit_code"], 0, "{r:#}");
    assert_eq!(r["compile"]["cached"], false, "{r:#}");
    let verdicts: Vec<&str> = r["tests"]
        .as_array()
        .map(|t| t.iter().filter_map(|t| t["verdict"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(verdicts, ["accepted", "accepted", "wrong_answer"], "{r:#}");
    assert_eq!(r["verdict"], "wrong_answer", "{r:#}");
    assert_eq!(r["score"], json!({"passed": 2, "total": 3}));
    let again = s.wait_terminal(&s.submit(body).await).await;
    assert_eq!(again["compile"]["cached"], true, "{again:#}");
    assert_eq!(again["score"], json!({"passed": 2, "total": 3}));

    let broken =
        json!({"language": "c", "code": "int main( {", "tests": [{"expected_output": ""}]});
    let r = s.wait_terminal(&s.submit(broken).await).await;
    assert_eq!(r["verdict"], "compile_error", "{r:#}");
    assert!(
        r["compile"]["stderr"]
            .as_str()
            .unwrap_or("")
            .contains("error"),
        "the compiler's message is kept: {r:#}"
    );
    let hog = json!({
        "language": "c",
        "code": "#include <stdlib.h>\n#include <string.h>\nint main(){for(;;){char*p=malloc(1<<20);if(!p)return 3;memset(p,1,1<<20);}}\n",
        "limits": {"memory_mb": 64},
        "tests": [{"expected_output": ""}],
    });
    let r = s.wait_terminal(&s.submit(hog).await).await;
    assert_eq!(r["verdict"], "memory_limit", "{r:#}");

    // Links planted in /build by the compile step: nothing of the host comes back.
    let secret = format!("TOPSECRET-{}", std::process::id());
    let secret_path =
        std::env::temp_dir().join(format!("crucible-docker-secret-{}", std::process::id()));
    std::fs::write(&secret_path, &secret).expect("secret");
    let script = format!(
        "set -e\nln -s {p} /build/leak\nln -s / /build/root\nmkfifo /build/fifo\necho real > /build/real\n",
        p = secret_path.display()
    );
    let r = s
        .wait_terminal(
            &s.submit(json!({"language": "planted", "code": script, "tests": [{"expected_output": "real"}]}))
                .await,
        )
        .await;
    let _ = std::fs::remove_file(&secret_path);
    assert_eq!(r["compile"]["exit_code"], 0, "{r:#}");
    assert!(!r.to_string().contains(&secret), "the secret leaked: {r:#}");
    assert_eq!(
        r["tests"][0]["stdout"].as_str().map(str::trim_end),
        Some("real"),
        "{r:#}"
    );
    assert_no_containers_eventually(&s, &node, "after judging").await;
    assert_server_still_fine(&s, &node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_a_forged_build_archive_writes_nothing_outside_the_build() {
    let victim = tempfile::tempdir().expect("victim dir");
    let img = test_image();
    let s = DockerServer::start(&docker_config(&format!(
        "[languages.forge]\nfile = \"forge.py\"\ncompile = [\"python3\", \"{{file}}\"]\n\
         run = [\"sh\", \"-c\", \"cat /build/real\"]\nimage = \"{img}\"\n"
    )))
    .await;
    crate::judge::assert_a_forged_build_writes_nothing_outside(&s, victim.path()).await;
}
