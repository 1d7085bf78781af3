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

/// Run every case of the shared corpus on `server`; all must hold.
pub async fn run_corpus(server: &Server) {
    let mut failures = Vec::new();
    for case in crate::corpus::cases() {
        let mut body = json!({"code": case.code, "language": "python", "timeout": 60});
        if let Some(l) = &case.limits {
            body["limits"] = l.clone();
        }
        let r = server.run(body).await;
        if let Err(e) = (case.check)(&r) {
            failures.push(format!("{}: {e}", case.name));
        }
    }
    assert!(
        failures.is_empty(),
        "the corpus did not hold:\n{}",
        failures.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hostile_corpus_holds_in_the_sandbox() {
    let server = Server::start_with_session_key("", "hunter2-keyring").await;
    run_corpus(&server).await;
    assert_server_still_fine(&server).await;
}

/// The probe's `{family: result}`.
fn families(r: &Value) -> Value {
    probe_result(r)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_filter_the_families_are_open_so_the_test_can_fail() {
    // The protection off: the same probe with `[sandbox] seccomp = false`. Calls an
    // unprivileged program can make succeed, so the corpus above would report them.
    let server = Server::start("[sandbox]\nseccomp = false").await;
    let p = families(&server.run_py(crate::corpus::SYSCALL_FAMILIES, 60.0).await);
    for open in [
        "keyctl",
        "add_key",
        "io_uring_setup",
        "ptrace",
        "process_vm_readv",
        "userfaultfd",
    ] {
        assert_eq!(p[open], "ok", "{open} without the filter: {p}");
    }
    assert_ne!(p["clone3"], "ENOSYS", "{p}");
    // The second line holds on its own: the sandbox's user.max_user_namespaces is 0.
    assert_eq!(
        p["unshare"], "ENOSPC",
        "nested user namespaces without the filter: {p}"
    );
    assert_eq!(p["clone_newuser"], "ENOSPC", "{p}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_run_has_its_own_empty_keyring() {
    // Control: a process started like the appliance (in its session keyring), but not
    // sandboxed, reads the host's secret.
    let mut control = std::process::Command::new("python3");
    control.args(["-c", crate::corpus::KEYRING_SEARCH]);
    crate::common::join_session_with_key(&mut control, "hunter2-keyring");
    let out = control.output().expect("control probe");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("hunter2-keyring"), "control: {text}");

    // Without the filter (keyctl allowed), the run's fresh keyring still holds nothing
    // of the host's, and nothing of another run's.
    let server = Server::start_with_session_key(
        "workers = 2\n[sandbox]\nseccomp = false",
        "hunter2-keyring",
    )
    .await;
    let p = probe_result(&server.run_py(crate::corpus::KEYRING_SEARCH, 30.0).await);
    assert_eq!(p["search"], "ENOKEY", "the host's key was reachable: {p}");
    let writer = server
        .submit(json!({
            "code": "import ctypes, time\nlibc = ctypes.CDLL(None, use_errno=True)\n\
                     r = libc.syscall(ctypes.c_long(248), b'user', b'crucible-test', b'from-run-a', ctypes.c_long(10), ctypes.c_long(-3))\n\
                     print('added' if r >= 0 else 'failed', flush=True)\ntime.sleep(4)\n",
            "timeout": 30
        }))
        .await;
    server.wait_status(&writer, "running").await;
    let p = probe_result(&server.run_py(crate::corpus::KEYRING_SEARCH, 30.0).await);
    assert_eq!(
        p["search"], "ENOKEY",
        "another run's key was reachable: {p}"
    );
    let w = server.wait_terminal(&writer).await;
    assert_eq!(
        w["output"], "added\n",
        "the first run could add its key: {w:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_filter_denies_the_privileged_families_even_to_root() {
    // The filter itself, applied in a root child process on the host: calls root may
    // make (with harmless arguments) fail differently without it, with EPERM with it.
    let filters = crucible::executor::seccomp::programs().expect("filters");
    fn probe() -> Vec<i32> {
        // SAFETY: raw syscalls with invalid or harmless arguments.
        unsafe {
            let calls: [libc::c_long; 5] = [
                libc::syscall(
                    libc::SYS_delete_module,
                    c"crucible_no_such_module".as_ptr(),
                    0,
                ),
                libc::syscall(libc::SYS_kexec_load, 0, 0, 0usize, 0xdead_0000u64),
                libc::syscall(libc::SYS_reboot, 0, 0, 0, 0),
                libc::syscall(libc::SYS_swapon, c"/crucible/nonexistent".as_ptr(), 0),
                libc::syscall(libc::SYS_acct, c"/crucible/nonexistent".as_ptr()),
            ];
            calls
                .iter()
                .map(|r| if *r < 0 { *libc::__errno_location() } else { 0 })
                .collect()
        }
    }
    // Each result is an errno; collect them through a pipe from a forked child.
    fn in_child(filters: Option<&[seccompiler::BpfProgram]>) -> Vec<i32> {
        let mut fds = [0; 2];
        // SAFETY: fork/pipe/write/_exit; the child only makes syscalls.
        unsafe {
            assert_eq!(libc::pipe(fds.as_mut_ptr()), 0);
            let pid = libc::fork();
            if pid == 0 {
                if let Some(f) = filters {
                    if crucible::executor::seccomp::install(f).is_err() {
                        libc::_exit(2);
                    }
                }
                let r = probe();
                libc::write(fds[1], r.as_ptr().cast(), r.len() * 4);
                libc::_exit(0);
            }
            libc::close(fds[1]);
            let mut buf = [0i32; 5];
            let n = libc::read(fds[0], buf.as_mut_ptr().cast(), 20);
            libc::close(fds[0]);
            let mut st = 0;
            libc::waitpid(pid, &mut st, 0);
            assert_eq!(n, 20, "child status {st}");
            buf.to_vec()
        }
    }
    assert_eq!(unsafe { libc::geteuid() }, 0, "this test runs as root");
    let open = in_child(None);
    assert!(
        open.iter().all(|e| *e != libc::EPERM),
        "as root without the filter none of these is EPERM: {open:?}"
    );
    let filtered = in_child(Some(&filters));
    assert_eq!(
        filtered,
        vec![libc::EPERM; 5],
        "with the filter: {filtered:?}"
    );
}
