//! Containment per evaluation, against the real kernel: every run is one cgroup holding
//! its whole process tree (cgroup v1 on these machines, as root; cgroup v2 runs the same
//! cases in the VM test, tests/vm). Each test reads what the kernel recorded (the run's
//! cgroup counters as the record reports them, the cgroup directories themselves) and,
//! where a hostile program is involved, shows with a control run that the program really
//! exceeds what per-process limits alone would stop.

use crate::common::{
    assert_no_host_process_with, marker, program, Server, DEADLINE, MEMORY_HOG, PRELUDE,
};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The directories under which the server makes its runs' cgroups (v1: one per
/// hierarchy, under the server's own cgroup there, which is the test's).
pub(crate) async fn run_cgroup_bases(s: &Server) -> Vec<PathBuf> {
    let node = s.health().await["node"].as_str().expect("node").to_string();
    let own = std::fs::read_to_string("/proc/self/cgroup").expect("own cgroup");
    let mut out = Vec::new();
    for ctrl in ["memory", "pids", "cpu", "cpuacct", "freezer"] {
        let path = own.lines().find_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, list, p) = (parts.next()?, parts.next()?, parts.next()?);
            list.split(',').any(|c| c == ctrl).then(|| p.to_string())
        });
        if let Some(p) = path {
            let base = PathBuf::from(format!("/sys/fs/cgroup/{ctrl}"))
                .join(p.trim_start_matches('/'))
                .join(format!("crucible-{node}"));
            if base.exists() {
                out.push(base);
            }
        }
    }
    out
}

/// Run cgroups (`run-*`) present under `bases`.
pub(crate) fn run_cgroups(bases: &[PathBuf]) -> Vec<PathBuf> {
    bases
        .iter()
        .flat_map(|b| std::fs::read_dir(b).into_iter().flatten().flatten())
        .filter(|e| e.file_name().to_string_lossy().starts_with("run-"))
        .map(|e| e.path())
        .collect()
}

async fn cgroup_mode(s: &Server) -> String {
    s.health().await["executor"]["limits"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

fn u64_of(r: &Value, k: &str) -> u64 {
    r[k].as_u64()
        .unwrap_or_else(|| panic!("`{k}` is not a number: {r:#}"))
}

/// The hostile program as the old protection saw it: the same code on the host under
/// per-process limits only (address space and process count, as the sandbox's rlimits
/// were). It completes, and its children together hold far more than the allowance.
fn control_run_with_rlimits_only(code: &str, memory_mb: u64) -> u64 {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("hog.py");
    std::fs::write(&file, code).expect("write");
    let out = std::process::Command::new("prlimit")
        .arg(format!("--as={}", memory_mb * 1024 * 1024))
        .arg("--nproc=4096")
        .args(["python3", "-I", "-B"])
        .arg(&file)
        .output()
        .expect("prlimit (util-linux)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "control run failed: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .find_map(|l| l.strip_prefix("total_rss_kb "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no total in {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_processes_share_one_memory_limit() {
    let s = Server::start("[limits]\nmemory_mb = 128").await;
    assert_eq!(cgroup_mode(&s).await, "cgroup1", "{}", s.health().await);
    // 12 children of 40 MiB each: every one is under any per-process limit of 128 MiB.
    let code = program(MEMORY_HOG, &[("CHILDREN", "12"), ("MIB", "40")]);
    let held = control_run_with_rlimits_only(&code, 128);
    assert!(
        held > 3 * 128 * 1024,
        "the control run should hold well over 128 MiB: {held} KiB"
    );
    let r = s.run_py(&code, 60.0).await;
    assert_eq!(r["status"], "failed", "{r:#}");
    assert_eq!(r["failure_reason"], "memory_limit", "{r:#}");
    let peak = u64_of(&r, "memory_peak_kb");
    assert!(
        peak <= 128 * 1024 + 8 * 1024,
        "the tree's peak {peak} KiB is over 128 MiB"
    );
    assert_eq!(r["limits"]["memory_mb"], 128, "{r:#}");
    assert!(s.metric("crucible_oom_kills_total", "").await >= Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oom_killed_child_fails_the_run_even_when_the_parent_exits_0() {
    let s = Server::start("[limits]\nmemory_mb = 64").await;
    let code = format!(
        "{PRELUDE}\npid = os.fork()\nif pid == 0:\n    b = bytearray(200 << 20)\n    \
         for i in range(0, len(b), 4096): b[i] = 1\n    os._exit(0)\n\
         _, st = os.waitpid(pid, 0)\nprint('child status', st)\n"
    );
    let r = s.run_py(&code, 60.0).await;
    assert_eq!(r["exit_code"], 0, "the parent exits 0: {r:#}");
    assert!(
        r["output"]
            .as_str()
            .unwrap_or("")
            .contains("child status 9"),
        "the child was SIGKILLed: {r:#}"
    );
    assert_eq!(r["status"], "failed", "{r:#}");
    assert_eq!(r["failure_reason"], "memory_limit", "{r:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_process_limit_holds_for_the_whole_tree() {
    let s = Server::start("").await;
    let bases = run_cgroup_bases(&s).await;
    let pids_base = bases
        .iter()
        .find(|b| b.starts_with("/sys/fs/cgroup/pids"))
        .cloned()
        .expect("a pids hierarchy");
    let m = marker(21);
    // Fork sleepers until refused, report, then keep trying while the test reads the
    // kernel's own count of refused forks in the run's cgroup.
    let code = program(
        "forks = 0\nwhile True:\n    try:\n        sleeper(\"MARKER\")\n        forks += 1\n    \
         except OSError:\n        break\nprint(forks, flush=True)\nimport time\nend = time.time() + 3\n\
         while time.time() < end:\n    try:\n        sleeper(\"MARKER\")\n    except OSError:\n        pass\n",
        &[("MARKER", &m)],
    );
    let id = s
        .submit(json!({"code": code, "timeout": 60, "limits": {"max_processes": 10}}))
        .await;
    let started = Instant::now();
    let refused = loop {
        let events: u64 = run_cgroups(std::slice::from_ref(&pids_base))
            .iter()
            .filter_map(|d| std::fs::read_to_string(d.join("pids.events")).ok())
            .filter_map(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("max ").map(|v| v.trim().parse::<u64>().ok()))
                    .flatten()
            })
            .sum();
        if events > 0 {
            break events;
        }
        assert!(started.elapsed() < DEADLINE, "no refused fork was recorded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let r = s.wait_terminal(&id).await;
    let forks: u64 = r["output"]
        .as_str()
        .unwrap_or("")
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("fork count ({e}): {r:#}"));
    assert!(forks < 10, "max_processes = 10 let {forks} forks through");
    assert!(refused > 0);
    assert_no_host_process_with(&m);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_cpu_burners_get_one_cpu() {
    let s = Server::start("[sandbox]\ncpus = 1.0").await;
    let code = format!(
        "{PRELUDE}\nimport time\nfor _ in range(7):\n    if os.fork() == 0:\n        \
         t = time.time()\n        while time.time() - t < 1.5: pass\n        os._exit(0)\n\
         t = time.time()\nwhile time.time() - t < 1.5: pass\nfor _ in range(7): os.wait()\nprint('done')\n"
    );
    let r = s.run_py(&code, 60.0).await;
    assert_eq!(r["status"], "completed", "{r:#}");
    let (cpu, wall) = (u64_of(&r, "cpu_ms"), u64_of(&r, "runtime_ms"));
    // This machine has more than one core: unthrottled, 8 burners would use about
    // cores x wall. A 1-CPU quota keeps the tree near 1 x wall (loose bound).
    assert!(
        cpu as f64 <= wall as f64 * 1.5,
        "cpu_ms {cpu} over 1.5 x runtime_ms {wall}: the quota does not hold"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_run_leaves_no_process_and_no_cgroup() {
    // Sandboxes made for their run (pooled ones: tests/integration/pool.rs).
    let s = Server::start("[sandbox]\npool = 0").await;
    let bases = run_cgroup_bases(&s).await;
    assert!(bases.len() >= 2, "run cgroup bases: {bases:?}");
    let m = marker(22);
    let code = program("sleeper(\"MARKER\")\nwhile True: pass\n", &[("MARKER", &m)]);
    let id = s.submit(json!({"code": code, "timeout": 1})).await;
    // Positive control: while it runs, its cgroup exists.
    let started = Instant::now();
    while run_cgroups(&bases).is_empty() {
        let rec = s.record(&id).await;
        assert!(
            rec["status"] == "queued" || rec["status"] == "running",
            "the run ended before its cgroup was seen: {rec:#}"
        );
        assert!(started.elapsed() < DEADLINE, "no run cgroup appeared");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let r = s.wait_terminal(&id).await;
    assert_eq!(r["failure_reason"], "timeout", "{r:#}");
    assert_no_host_process_with(&m);
    // The cgroup is removed in the background, right after the result.
    let started = Instant::now();
    while !run_cgroups(&bases).is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "run cgroups left behind: {:?}",
            run_cgroups(&bases)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_is_measured_for_every_run() {
    let s = Server::start("").await;
    let r = s
        .run_py(
            "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.2: pass\n",
            30.0,
        )
        .await;
    assert_eq!(r["status"], "completed", "{r:#}");
    let cpu = u64_of(&r, "cpu_ms");
    assert!(
        (150..=1500).contains(&cpu),
        "cpu_ms {cpu} for a 200 ms loop"
    );
    let peak = u64_of(&r, "memory_peak_kb");
    assert!(peak > 1024 && peak < 256 * 1024, "memory_peak_kb {peak}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtimes_that_reserve_large_address_ranges_run() {
    let s = Server::start("").await;
    // What the JVM, Go and Node do at start: reserve far more address space than the
    // memory limit, touching little of it.
    let code = "import ctypes, ctypes.util\nlibc = ctypes.CDLL(None, use_errno=True)\n\
        libc.mmap.restype = ctypes.c_void_p\n\
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]\n\
        p = libc.mmap(None, 8 << 30, 0, 0x22 | 0x4000, -1, 0)\n\
        assert p not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()\nprint('reserved 8 GiB')\n";
    let r = s.run_py(code, 30.0).await;
    assert_eq!(r["status"], "completed", "{r:#}");
    assert_eq!(r["output"], "reserved 8 GiB\n");
    if std::path::Path::new("/usr/bin/java").exists() {
        let r = s
            .run(json!({"code": "java -version 2>&1", "language": "sh", "timeout": 60}))
            .await;
        assert_eq!(
            r["status"], "completed",
            "the JVM at the default limit: {r:#}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_lower_limits_and_cannot_raise_them() {
    let s = Server::start("[languages.sh]\nmemory_mb = 512\n").await;
    // 100 MiB fits the default 256 MiB, not a requested 64 MiB.
    let code = "b = bytearray(100 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1\nprint('ok')\n";
    let ok = s.run(json!({"code": code, "timeout": 30})).await;
    assert_eq!(ok["status"], "completed", "{ok:#}");
    assert_eq!(ok["limits"]["memory_mb"], 256);
    let low = s
        .run(json!({"code": code, "timeout": 30, "limits": {"memory_mb": 64}}))
        .await;
    assert_eq!(low["failure_reason"], "memory_limit", "{low:#}");
    assert_eq!(low["limits"]["memory_mb"], 64);

    let r = s
        .post(
            "/api/eval",
            &json!({"code": "print(1)", "limits": {"memory_mb": 300}}),
        )
        .await;
    assert_eq!(r.status, 422, "{}", r.text());
    let e = r.json().expect("json");
    assert_eq!(e["error"]["code"], "limit_too_high");
    assert_eq!(e["error"]["field"], "limits.memory_mb");
    assert!(e["error"]["message"].as_str().unwrap_or("").contains("256"));
    // The language's own maximum.
    let sh = s
        .post(
            "/api/eval",
            &json!({"code": "echo", "language": "sh", "limits": {"memory_mb": 400}}),
        )
        .await;
    assert_eq!(sh.status, 202, "{}", sh.text());

    // CPU time of the whole tree.
    let r = s
        .run(json!({
            "code": "import time\nt = time.time()\nwhile time.time() - t < 5: pass\n",
            "timeout": 30,
            "limits": {"cpu_ms": 300}
        }))
        .await;
    assert_eq!(r["failure_reason"], "timeout", "{r:#}");
    assert!(
        r["error"]
            .as_str()
            .unwrap_or("")
            .contains("CPU-time limit of 300 ms"),
        "{r:#}"
    );
    assert!(u64_of(&r, "runtime_ms") < 4000, "{r:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_cgroup_it_says_so_and_the_watchdog_holds_memory() {
    let s = Server::start_unprivileged("[limits]\nmemory_mb = 128").await;
    let h = s.health().await;
    assert_eq!(h["executor"]["limits"], "rlimit", "{h}");
    assert!(
        h["executor"]["limits_reason"].as_str().is_some(),
        "the reason is shown: {h}"
    );
    assert!(
        s.log().contains("NO CGROUP FOR THE RUNS") && s.log().contains("Delegate=yes"),
        "the warning names the fix:\n{}",
        s.log()
    );
    let code = program(MEMORY_HOG, &[("CHILDREN", "12"), ("MIB", "40")]);
    let r = s.run_py(&code, 60.0).await;
    assert_eq!(r["status"], "failed", "{r:#}");
    assert_eq!(r["failure_reason"], "memory_limit", "{r:#}");
    assert!(
        s.metric("crucible_sandbox_watchdog_kills_total", "").await >= Some(1.0),
        "the watchdog made the kill"
    );
    let fine = s.run_py("print(1)", 30.0).await;
    assert_eq!(fine["status"], "completed", "{fine:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_cgroup_refuses_to_start_without_one() {
    let (code, log) = Server::start_refused("[sandbox]\nrequire_cgroup = true", true).await;
    // EX_CONFIG: the unit's RestartPreventExitStatus=78 stops, rather than loops.
    assert_eq!(code, 78, "{log}");
    assert!(
        log.contains("require_cgroup") && log.contains("Delegate=yes"),
        "the refusal says why and what to change:\n{log}"
    );
}
