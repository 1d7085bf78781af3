//! One sandbox serving all of an evaluation's tests (the sandbox backend's sessions),
//! attacked from inside: a test plants what it can (a file in /tmp, SysV shared memory, a
//! message queue and a semaphore set, a POSIX message queue, a process that outlives the
//! test's own) and the next test of the same session looks for it; a test looks for the
//! serving process (signals, /proc, its descriptors); tests killed for their time or
//! memory, stop_on_failure and a cancel end a session and nothing of it is left.
//!
//! Every probe has its positive control in the same program: the planting test looks
//! with the same code right after planting and must see everything it planted; the reach
//! probe runs once more in a second process of its test, where PID 1 is another program
//! and an extra descriptor is open, and must see all of that. So a leak the checks are
//! blind to would show as a control failing, not as a silent pass.
//!
//! Which sandbox served what is read from /metrics: `crucible_sandbox_sources_total`
//! counts tests served by a session (`source="session"`) and sandboxes taken (`pool`,
//! `cold`). Counters are compared once the start-up version probes (cold sandboxes of
//! their own) are done, so the deltas are exactly this evaluation's.
//!
//! One test is ``d because it fails today: a test's SysV IPC memory is still
//! charged to the session's cgroup when the next test starts (see
//! `a_tests_ipc_memory_is_not_charged_to_the_next_test`).

use crate::common::{dir_entries, host_processes_with, marker, Server, DEADLINE};
use crate::pool::pool_full;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The program of the session tests; its first word of stdin says what it does.
///
/// - `plant`: plant everything (`MARKER`: the sleeper's command line, see
///   [`crate::common::marker`]) and print what it made and what it then sees: [`PLANTED`].
/// - `check`: look for all of it; `clean` ([`CLEAN`]), else `LEFT OVER` and what it found.
/// - `spin` / `hog`: plant, then loop / allocate until killed.
/// - `big`: hold 100 MiB at once; `cpu`: use a second of CPU time.
/// - `hold`: become `sleep HOLD` (until cancelled); `wrong`: a wrong answer.
const PROGRAM: &str = r#"
import ctypes, errno, json, os, sys, time

KEY = 0x5E55
libc = ctypes.CDLL(None, use_errno=True)
libc.mq_open.restype = ctypes.c_int

def fail():
    return errno.errorcode.get(ctypes.get_errno(), "?")

def sysv(name, *args):
    # "ok" (an id), or the errno's name.
    return "ok" if getattr(libc, name)(KEY, *args) >= 0 else fail()

def posix_mq(flags):
    fd = libc.mq_open(b"/crucible-session", flags, 0o600, None)
    if fd < 0:
        return fail()
    os.close(fd)
    return "ok"

def seen():
    return {
        "tmp": sorted(os.listdir("/tmp")),
        "shm": sysv("shmget", 0, 0),
        "msg": sysv("msgget", 0),
        "sem": sysv("semget", 0, 0),
        "mq": posix_mq(os.O_RDONLY),
        "pids": sorted(p for p in os.listdir("/proc") if p.isdigit()),
    }

def plant():
    made = {}
    try:
        with open("/tmp/planted", "x") as f:
            f.write("x")
        made["tmp"] = "ok"
    except OSError as e:
        made["tmp"] = errno.errorcode.get(e.errno, "?")
    new = 0o1000 | 0o2000 | 0o600  # IPC_CREAT | IPC_EXCL: EEXIST if one was left
    made["shm"] = sysv("shmget", 4096, new)
    made["msg"] = sysv("msgget", new)
    made["sem"] = sysv("semget", 1, new)
    made["mq"] = posix_mq(os.O_CREAT | os.O_EXCL | os.O_RDONLY)
    # A process that would outlive this test's own (it holds the test's stdout too).
    if os.fork() == 0:
        try:
            os.execv("/usr/bin/sleep", ["sleep", "MARKER"])
        finally:
            os._exit(127)
    return made

CLEAN = {"tmp": [], "shm": "ENOENT", "msg": "ENOENT", "sem": "ENOENT", "mq": "ENOENT",
         "pids": ["1"]}

mode = (sys.stdin.read().split() or ["none"])[0]
if mode == "plant":
    made = plant()
    print("planted", json.dumps(made, sort_keys=True), json.dumps(seen(), sort_keys=True))
elif mode == "check":
    s = seen()
    print("clean" if s == CLEAN else "LEFT OVER " + json.dumps(s, sort_keys=True))
elif mode == "spin":
    plant()
    while True:
        pass
elif mode == "hog":
    plant()
    chunks = []
    while True:
        chunks.append(b"x" * (1 << 20))
elif mode == "big":
    data = b"x" * (100 << 20)
    print("big", len(data) >> 20)
elif mode == "cpu":
    while time.process_time() < 1.0:
        pass
    print("cpu")
elif mode == "hold":
    os.execv("/usr/bin/sleep", ["sleep", "HOLD"])
else:
    print("wrong")
"#;

/// What `plant` prints: everything made (none there before: IPC_EXCL, O_EXCL) and seen
/// right after by the code that `check` runs, with the sleeper as PID 2. A test sharing
/// anything with an earlier one would print EEXIST for it, or other PIDs.
const PLANTED: &str = r#"planted {"mq": "ok", "msg": "ok", "sem": "ok", "shm": "ok", "tmp": "ok"} {"mq": "ok", "msg": "ok", "pids": ["1", "2"], "sem": "ok", "shm": "ok", "tmp": ["planted"]}"#;

/// What `check` prints when nothing of an earlier test is there.
const CLEAN: &str = "clean";

fn program(marker: &str, hold: &str) -> String {
    PROGRAM.replace("MARKER", marker).replace("HOLD", hold)
}

fn case(stdin: &str, expected: &str) -> Value {
    json!({"name": stdin, "stdin": stdin, "expected_output": expected})
}

fn case_timeout(stdin: &str, expected: &str, timeout: f64) -> Value {
    json!({"name": stdin, "stdin": stdin, "expected_output": expected, "timeout": timeout})
}

async fn judged(s: &Server, body: Value) -> Value {
    let id = s.submit(body).await;
    s.wait_terminal(&id).await
}

fn verdicts(r: &Value) -> Vec<String> {
    r["tests"]
        .as_array()
        .map(|t| {
            t.iter()
                .map(|x| x["verdict"].as_str().unwrap_or("none").to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Each test's verdict, usage and output, for failure messages.
fn outcomes(r: &Value) -> String {
    let mut out = format!(
        "status {} verdict {} error {}\n",
        r["status"], r["verdict"], r["error"]
    );
    for (i, t) in r["tests"].as_array().into_iter().flatten().enumerate() {
        out.push_str(&format!(
            "  test {i} ({}): {} exit {} cpu_ms {} memory_peak_kb {}\n    stdout {}\n    stderr {}\n",
            t["name"], t["verdict"], t["exit_code"], t["cpu_ms"], t["memory_peak_kb"],
            t["stdout"], t["stderr"]
        ));
    }
    out
}

const SOURCES: &str = "crucible_sandbox_sources_total";

/// (tests served by a session, sandboxes taken from the pool or made cold) so far.
async fn counts(s: &Server) -> (f64, f64) {
    let of = |source: &'static str| async move {
        s.metric(SOURCES, &format!("source=\"{source}\""))
            .await
            .unwrap_or(0.0)
    };
    (of("session").await, of("pool").await + of("cold").await)
}

/// Wait until the start-up toolchain probes are done (each takes a cold sandbox): every
/// available language reports its version.
async fn settled(s: &Server) {
    let started = Instant::now();
    loop {
        let v = s.get("/api/languages").await.json().expect("json");
        let langs = v["languages"].as_array().cloned().unwrap_or_default();
        if langs
            .iter()
            .filter(|l| l["available"] == true)
            .all(|l| l["version"].is_string())
        {
            return;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "the toolchain versions never appeared: {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A server with a pool of `pool` sandboxes, its start-up probes done.
async fn server(pool: usize, extra: &str) -> Server {
    let s = Server::start(&format!("workers = 2\n{extra}\n[sandbox]\npool = {pool}")).await;
    settled(&s).await;
    s
}

/// Submit `body`, wait for its end; also returns how many tests sessions served and how
/// many sandboxes were taken meanwhile.
async fn judged_counted(s: &Server, body: Value) -> (Value, f64, f64) {
    let (served0, taken0) = counts(s).await;
    let r = judged(s, body).await;
    let (served1, taken1) = counts(s).await;
    (r, served1 - served0, taken1 - taken0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_of_a_test_is_left_for_the_next_one_in_its_session() {
    let s = server(2, "").await;
    let m = marker(71);
    // Plant, check, three times over in ONE sandbox: each check runs right after a plant
    // in the same session. Were tests not in their own mount namespace, `tmp` would list
    // "planted"; not in their own IPC namespace, shm/msg/sem/mq would be "ok" (and the
    // next plant would print EEXIST); not in their own PID namespace, or were the sleeper
    // not killed with its test, `pids` would hold more than the check itself (PID 1).
    let tests = ["plant", "check", "plant", "check", "plant", "check"]
        .iter()
        .map(|t| case(t, if *t == "plant" { PLANTED } else { CLEAN }))
        .collect::<Vec<_>>();
    let n = tests.len() as f64;
    let (r, served, taken) = judged_counted(
        &s,
        json!({"language": "python", "code": program(&m, "0"), "tests": tests}),
    )
    .await;
    assert_eq!(r["status"], "completed", "{}", outcomes(&r));
    assert_eq!(
        verdicts(&r),
        vec!["accepted"; tests.len()],
        "a test saw what an earlier one of its session left (or a plant was not seen by \
         its own test):\n{}",
        outcomes(&r)
    );
    // One sandbox served them all. A sleeper that outlived its test would hold the test's
    // stdout open: the session would give up on it and the next test take a new sandbox.
    assert_eq!(served, n, "tests served by a session\n{}", outcomes(&r));
    assert_eq!(
        taken,
        1.0,
        "sandboxes taken for one evaluation's tests\n{}",
        outcomes(&r)
    );
    all_gone(&m).await;
}

/// The reach probe: what a test can signal, what /proc shows it, whether PID 1 is its own
/// program, and its open descriptors (besides the listing's own) by kind.
const REACH: &str = r#"
import json, os, sys

def probe():
    me = os.getpid()
    signalable = []
    for pid in range(1, 65):
        if pid == me:
            continue
        try:
            os.kill(pid, 0)
            signalable.append(pid)
        except ProcessLookupError:
            pass
        except PermissionError:
            signalable.append(pid)
    own = open("/proc/self/cmdline", "rb").read()
    fds = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds[fd] = os.readlink("/proc/self/fd/" + fd).split(":")[0]
        except FileNotFoundError:
            pass  # the listing's own descriptor, closed by now
    return {
        "pid": me,
        "pids": sorted(p for p in os.listdir("/proc") if p.isdigit()),
        "signalable": signalable,
        "pid1_is_me": open("/proc/1/cmdline", "rb").read() == own,
        "fds": fds,
    }

CLEAN = {"pid": 1, "pids": ["1"], "signalable": [], "pid1_is_me": True,
         "fds": {"0": "pipe", "1": "pipe", "2": "pipe"}}

if sys.stdin.read().strip() == "control":
    # A second process of this test, with a descriptor of its own open, probes once PID 1
    # has become another program: what a test would see of a serving process in reach.
    mine = open("/proc/self/cmdline", "rb").read()
    if os.fork() == 0:
        extra = os.open("/code/main.py", os.O_RDONLY)
        while open("/proc/1/cmdline", "rb").read() == mine:
            pass
        print(json.dumps(probe(), sort_keys=True), flush=True)
        os._exit(0)
    os.execv(sys.executable, [sys.executable, "-c", "import os; os.wait()"])
p = probe()
print("clean" if p == CLEAN else "REACHABLE " + json.dumps(p, sort_keys=True))
"#;

/// What the control prints: another process (PID 1, another program) it can signal, and
/// a descriptor beyond the test's pipes. What `probe` would print, give or take, if the
/// serving process were in the test's PID namespace or had left a descriptor to it.
const REACH_CONTROL: &str = r#"{"fds": {"0": "pipe", "1": "pipe", "2": "pipe", "3": "/code/main.py"}, "pid": 2, "pid1_is_me": false, "pids": ["1", "2"], "signalable": [1]}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_serving_process_is_out_of_reach_of_the_tests() {
    let s = server(2, "").await;
    // Were the serving process (PID 1 of the sandbox) in a test's PID namespace, the test
    // would not be PID 1, could signal it (same uid) and /proc/1/cmdline would be the
    // helper's; had it left its control socket or another descriptor open in the test,
    // `fds` would show a socket. The probe runs first, after the control, and again.
    let tests = vec![
        case("probe", "clean"),
        case("control", REACH_CONTROL),
        case("probe", "clean"),
    ];
    let (r, served, taken) = judged_counted(
        &s,
        json!({"language": "python", "code": REACH, "tests": tests}),
    )
    .await;
    assert_eq!(r["status"], "completed", "{}", outcomes(&r));
    assert_eq!(
        verdicts(&r),
        ["accepted", "accepted", "accepted"],
        "a test reached the serving process (or the control did not see its own):\n{}",
        outcomes(&r)
    );
    // The same session served all three: the probing did not end it.
    assert_eq!((served, taken), (3.0, 1.0), "{}", outcomes(&r));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_test_out_of_time_takes_its_sandbox_and_the_next_tests_are_judged_fresh() {
    let s = server(2, "").await;
    let m = marker(72);
    // `spin` plants, then loops past its 1 s: time_limit, and its sandbox goes (with what
    // it planted). The tests after it run in a new session, see nothing, and each gets its
    // own CPU time: `cpu` uses a second of it, the check after it almost none (were the
    // cgroup's counter not taken as a delta per test, it would be charged that second).
    let tests = vec![
        case_timeout("spin", "never", 1.0),
        case("check", CLEAN),
        case_timeout("cpu", "cpu", 60.0),
        case("check", CLEAN),
    ];
    let (r, served, taken) = judged_counted(
        &s,
        json!({"language": "python", "code": program(&m, "0"), "tests": tests}),
    )
    .await;
    assert_eq!(r["status"], "completed", "{}", outcomes(&r));
    assert_eq!(
        verdicts(&r),
        ["time_limit", "accepted", "accepted", "accepted"],
        "{}",
        outcomes(&r)
    );
    assert_eq!(served, 4.0, "{}", outcomes(&r));
    assert_eq!(
        taken,
        2.0,
        "the timed-out test's sandbox was not replaced exactly once\n{}",
        outcomes(&r)
    );
    let cpu = |i: usize| r["tests"][i]["cpu_ms"].as_u64().unwrap_or(u64::MAX);
    assert!(cpu(2) >= 1000, "the CPU test's own time: {}", outcomes(&r));
    assert!(
        cpu(3) < 1000,
        "the test after it was charged its CPU time: {}",
        outcomes(&r)
    );
    all_gone(&m).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_test_out_of_memory_takes_its_sandbox_and_peaks_are_per_test() {
    let s = server(2, "").await;
    let m = marker(73);
    // `hog` plants and allocates until the cgroup kills it: memory_limit, its sandbox
    // goes. In the next session `big` holds 100 MiB and the checks after hold a few: each
    // test's peak is its own (the cgroup's peak is reset per test; were it not, every
    // test after `big` would report at least 100 MiB).
    let tests = vec![
        case("hog", "never"),
        case("check", CLEAN),
        case("big", "big 100"),
        case("check", CLEAN),
    ];
    let (r, served, taken) = judged_counted(
        &s,
        json!({"language": "python", "code": program(&m, "0"), "tests": tests,
               "limits": {"memory_mb": 192}}),
    )
    .await;
    assert_eq!(r["status"], "completed", "{}", outcomes(&r));
    assert_eq!(
        verdicts(&r),
        ["memory_limit", "accepted", "accepted", "accepted"],
        "{}",
        outcomes(&r)
    );
    assert_eq!(served, 4.0, "{}", outcomes(&r));
    assert_eq!(
        taken,
        2.0,
        "the OOM-killed test's sandbox was not replaced exactly once\n{}",
        outcomes(&r)
    );
    let peak = |i: usize| r["tests"][i]["memory_peak_kb"].as_u64().unwrap_or(u64::MAX);
    assert!(peak(2) >= 100 * 1024, "big's own peak: {}", outcomes(&r));
    for i in [1, 3] {
        assert!(
            peak(i) < 50 * 1024,
            "test {i} was charged an earlier test's peak: {}",
            outcomes(&r)
        );
    }
    all_gone(&m).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_on_failure_runs_no_more_tests_and_takes_no_more_sandboxes() {
    let s = server(2, "").await;
    let code = program(&marker(74), "0");
    // A wrong answer: the session is still good, but nothing more runs in it.
    let (r, served, taken) = judged_counted(
        &s,
        json!({"language": "python", "code": code, "stop_on_failure": true, "tests": [
            case("check", CLEAN), case("wrong", CLEAN), case("check", CLEAN),
            case("check", CLEAN)]}),
    )
    .await;
    assert_eq!(
        verdicts(&r),
        ["accepted", "wrong_answer", "skipped", "skipped"],
        "{}",
        outcomes(&r)
    );
    assert_eq!((served, taken), (2.0, 1.0), "{}", outcomes(&r));
    // A timeout kills the session: the skipped test after it gets no new sandbox.
    let (r, served, taken) = judged_counted(
        &s,
        json!({"language": "python", "code": code, "stop_on_failure": true, "tests": [
            case("check", CLEAN), case_timeout("spin", "never", 1.0), case("check", CLEAN)]}),
    )
    .await;
    assert_eq!(
        verdicts(&r),
        ["accepted", "time_limit", "skipped"],
        "{}",
        outcomes(&r)
    );
    assert_eq!((served, taken), (2.0, 1.0), "{}", outcomes(&r));
}

/// The server's descendants that still run (pid, command line): its sandbox helpers and
/// everything in its sandboxes. Zombies waiting to be reaped do not count.
fn descendants(root: u32) -> Vec<(u32, String)> {
    let mut parent = std::collections::HashMap::new();
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        // Processes may exit while we scan: a missing stat is simply not there.
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        let Some((_, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        let mut f = rest.split_whitespace();
        let (state, ppid) = (f.next().unwrap_or("Z"), f.next().unwrap_or("0"));
        if state != "Z" && state != "X" {
            parent.insert(pid, ppid.parse::<u32>().unwrap_or(0));
        }
    }
    let mut out = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for (&child, &pp) in &parent {
            if pp == p {
                frontier.push(child);
                let cmd = std::fs::read(format!("/proc/{child}/cmdline")).unwrap_or_default();
                out.push((child, String::from_utf8_lossy(&cmd).replace('\0', " ")));
            }
        }
    }
    out.sort();
    out
}

/// Poll until `f` holds (bounded by [`DEADLINE`]); `what` explains a failure.
/// No process with `marker` is left on the host. A process killed with its sandbox from
/// outside (a cgroup kill) is gone once the kernel has run its exit, which is not at
/// once: waited for (a leak fails at the deadline).
async fn all_gone(marker: &str) {
    eventually(
        || host_processes_with(marker).is_empty(),
        || {
            format!(
                "sandboxed processes outlived their evaluation: {:?}",
                host_processes_with(marker)
            )
        },
    )
    .await;
}

async fn eventually(mut f: impl FnMut() -> bool, what: impl Fn() -> String) {
    let started = Instant::now();
    while !f() {
        assert!(started.elapsed() < DEADLINE, "{}", what());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_session_leaves_no_process_or_directory_behind() {
    let pool = 2;
    let s = server(pool, "").await;
    let e = pool_full(&s, pool as u64).await;
    let work = PathBuf::from(e["work_dir"].as_str().expect("work_dir"));
    let pid = s.pid();
    // Idle: the pool's sandboxes only (their start-up runs' directories go in the
    // background).
    eventually(
        || dir_entries(&work).len() == pool,
        || format!("idle work dir: {:?}", dir_entries(&work)),
    )
    .await;
    let idle = descendants(pid);
    assert!(
        !idle.is_empty() && idle.iter().all(|(_, c)| c.contains("__sandbox")),
        "idle: {idle:?}"
    );

    // `plant` leaves a sleeper (marker `planted`) that must die with its test; `hold`
    // becomes a sleeper (marker `held`) and stays until the cancel.
    let (planted, held) = (marker(75), marker(76));
    let (served0, taken0) = counts(&s).await;
    let id = s
        .submit(
            json!({"language": "python", "code": program(&planted, &held), "tests": [
            case("plant", PLANTED), case_timeout("hold", "never", 300.0), case("check", CLEAN)]}),
        )
        .await;
    // Positive control: the held test's sleeper shows on the host, as a descendant of the
    // appliance; then the session is in its second test.
    eventually(
        || descendants(pid).iter().any(|(_, c)| c.contains(&held)),
        || format!("the held test never ran: {:?}", descendants(pid)),
    )
    .await;
    // The first test's sleeper is gone already, while its session still serves the
    // second test (the same sandbox: one taken, two tests served). Its test was reaped
    // before the second started, and a PID namespace's processes are killed and reaped
    // before its first one is: no waiting.
    let left = host_processes_with(&planted);
    assert!(
        left.is_empty(),
        "the first test's process outlived it in its session: {left:?}"
    );
    let (served, taken) = counts(&s).await;
    assert_eq!(
        (served - served0, taken - taken0),
        (2.0, 1.0),
        "(tests served, sandboxes taken) while the second test runs"
    );
    // Its directory is there while it runs: the pool's (refilled) and the session's.
    pool_full(&s, pool as u64).await;
    eventually(
        || dir_entries(&work).len() == pool + 1,
        || format!("work dir while the session runs: {:?}", dir_entries(&work)),
    )
    .await;
    let running = dir_entries(&work);

    let c = s.post(&format!("/api/eval/{id}/cancel"), &json!({})).await;
    assert_eq!(c.status, 200, "{}", c.text());
    let r = s.wait_terminal(&id).await;
    assert_eq!(r["status"], "cancelled", "{}", outcomes(&r));
    assert_eq!(r["tests"][0]["verdict"], "accepted", "{}", outcomes(&r));
    assert!(
        r["tests"][2]["verdict"].is_null(),
        "a test ran after the cancel: {}",
        outcomes(&r)
    );
    // Nothing of the session is left: no process of it (only as many sandbox processes
    // as when idle, none of them a program), no directory (the pool's two remain).
    eventually(
        || {
            let now = descendants(pid);
            now.len() == idle.len() && now.iter().all(|(_, c)| c.contains("__sandbox"))
        },
        || {
            format!(
                "processes left by the cancelled session: {:?} (idle: {idle:?})",
                descendants(pid)
            )
        },
    )
    .await;
    all_gone(&held).await;
    eventually(
        || dir_entries(&work).len() == pool,
        || format!("directories left: {:?}", dir_entries(&work)),
    )
    .await;
    let left = dir_entries(&work);
    assert!(
        left.is_subset(&running),
        "the cancelled session's directory was replaced, not removed: {left:?} vs {running:?}"
    );
    // No sandbox was taken after the cancel for the test that did not run.
    assert_eq!(counts(&s).await, (served, taken));
    // And the appliance still judges.
    let r = judged(
        &s,
        json!({"language": "python", "code": program(&marker(77), "0"),
               "tests": [case("check", CLEAN)]}),
    )
    .await;
    assert_eq!(verdicts(&r), ["accepted"], "{}", outcomes(&r));
}

/// A C program: `shm` fills a 224 MiB SysV shared memory segment, `msg` fills 3000 SysV
/// message queues with 16 000 bytes each (~48 MiB), and each exits (what they made dies
/// with the test's IPC namespace); `alloc` fills 224 MiB of its own; else `small`.
const IPC_MEMORY: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ipc.h>
#include <sys/msg.h>
#include <sys/shm.h>
static struct { long type; char text[8000]; } message = {1, {0}};
int main(void) {
    char mode[16] = {0};
    size_t n = (size_t)224 << 20;
    if (scanf("%15s", mode) != 1) return 2;
    if (!strcmp(mode, "shm")) {
        int id = shmget(0x5e55, n, IPC_CREAT | 0600);
        char *p = id < 0 ? (char *)-1 : shmat(id, 0, 0);
        if (p == (char *)-1) { perror("shm"); return 3; }
        memset(p, 1, n);
    } else if (!strcmp(mode, "msg")) {
        for (int k = 1; k <= 3000; k++) {
            int q = msgget(k, IPC_CREAT | 0600);
            if (q < 0) { perror("msgget"); return 4; }
            msgsnd(q, &message, sizeof message.text, IPC_NOWAIT);
            msgsnd(q, &message, sizeof message.text, IPC_NOWAIT);
        }
    } else if (!strcmp(mode, "alloc")) {
        char *p = malloc(n);
        if (!p) return 5;
        memset(p, 1, n);
    }
    puts(mode);
    return 0;
}
"#;

/// The memory of a test's SysV IPC objects must not be charged to the next test. Found
/// while writing these tests, with a new IPC namespace per test: the kernel frees a dead
/// IPC namespace's objects asynchronously (a work item after an RCU grace period), so a
/// 1 MiB program reported a peak of ~50 MiB after a test that filled message queues and
/// ~230 MiB after one that left a 224 MiB segment, and a correct program filling 224 MiB
/// under a 256 MiB limit was OOM-killed after them (3 runs in 3). Now the serving process
/// removes every IPC object after each test, before it answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tests_ipc_memory_is_not_charged_to_the_next_test() {
    let s = server(2, "").await;
    if s.health().await["executor"]["languages"]["c"] != "available" {
        panic!("gcc is not installed (tests/run.sh installs it)");
    }
    let (r, served, _) = judged_counted(
        &s,
        json!({"language": "c", "code": IPC_MEMORY, "limits": {"memory_mb": 256}, "tests": [
            case("msg", "msg"), case("small", "small"), case("shm", "shm"),
            case("small", "small"), case("alloc", "alloc"), case("alloc", "alloc")]}),
    )
    .await;
    assert_eq!(r["status"], "completed", "{}", outcomes(&r));
    assert_eq!(served, 6.0, "{}", outcomes(&r));
    let peak = |i: usize| r["tests"][i]["memory_peak_kb"].as_u64().unwrap_or(u64::MAX);
    let mut wrong = Vec::new();
    for i in [1, 3] {
        if peak(i) >= 16 * 1024 {
            wrong.push(format!(
                "test {i} was charged the previous test's IPC memory"
            ));
        }
    }
    if verdicts(&r) != ["accepted"; 6] {
        wrong.push("a correct program was judged by the memory an earlier test left".into());
    }
    assert!(wrong.is_empty(), "{}:\n{}", wrong.join("; "), outcomes(&r));
}
