//! Sandboxes prepared ahead (`[sandbox] pool`, on by default): each is used once, a run
//! gets a fresh /tmp and exactly its own files read-only, its stdin intact after the
//! assignment frame, and nothing of a pooled run (process, cgroup, directory) outlives it;
//! the pool refills; at shutdown it is drained, and a kill -9 of the appliance takes the
//! waiting sandboxes with it. What is counted is what the kernel and the filesystem show
//! (cgroup directories and their processes, the work directory, /proc).

use crate::common::{assert_no_host_process_with, dir_entries, marker, program, Server, DEADLINE};
use crate::containment::{run_cgroup_bases, run_cgroups};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Wait until the pool holds `size` ready sandboxes; returns /health's executor.
pub async fn pool_full(s: &Server, size: u64) -> Value {
    let started = Instant::now();
    loop {
        let e = s.health().await["executor"].clone();
        if e["pool"]["ready"] == size {
            assert_eq!(e["pool"]["size"], size, "{e}");
            return e;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "the pool never refilled: {e}\n{}",
            s.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Processes in a cgroup directory.
fn procs(cgroup: &std::path::Path) -> Vec<u32> {
    std::fs::read_to_string(cgroup.join("cgroup.procs"))
        .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// Those of `pids` that still run (not gone, not a zombie waiting to be reaped).
fn living(pids: &[u32]) -> Vec<u32> {
    pids.iter()
        .copied()
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .map(|st| !st.contains(") Z "))
                .unwrap_or(false)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_pooled_sandbox_runs_one_program_with_a_fresh_tmp_and_its_own_files() {
    let s = Server::start("workers = 2\n[sandbox]\npool = 2").await;
    pool_full(&s, 2).await;
    // Each run: /tmp empty, /code holds exactly its files (read-only), and it leaves a
    // mark in /tmp and in its sandbox's /proc (the PID namespace's first process).
    let code = "import os, sys\n\
        tmp = sorted(os.listdir('/tmp'))\n\
        code = sorted(os.path.relpath(os.path.join(d, f), '/code') for d, _, fs in os.walk('/code') for f in fs)\n\
        open('/tmp/left-by-' + sys.argv[1], 'w').write('x')\n\
        try:\n    open('/code/main.py', 'a').write('#')\n    ro = False\nexcept OSError:\n    ro = True\n\
        data = sys.stdin.read()\n\
        print(tmp, code, ro, len(data), data[:8], data[-8:], os.environ.get('HOME'))\n";
    let stdin = format!("BEGIN{}END-----", "x".repeat(200_000));
    for i in 0..6 {
        let rec = s
            .run(json!({
                "code": code,
                "files": [{"name": format!("lib/helper{i}.py"), "content": "X = 1\n"}],
                "args": [format!("run{i}")],
                "stdin": stdin,
            }))
            .await;
        assert_eq!(rec["status"], "completed", "{rec:#}");
        let out = rec["output"].as_str().unwrap_or("");
        let expected_files = format!("['lib/helper{i}.py', 'main.py']");
        assert!(
            out.starts_with(&format!("[] {expected_files} True ")),
            "run {i} saw another run's /tmp or files, or a writable /code: {out}"
        );
        assert!(
            out.trim_end()
                .ends_with(&format!("{} BEGINxxx END----- /tmp", stdin.len())),
            "run {i}: stdin not intact after the assignment: {out}"
        );
    }
    let pooled = s
        .metric("crucible_sandbox_sources_total", "source=\"pool\"")
        .await
        .unwrap_or(0.0);
    assert!(pooled >= 6.0, "the runs did not use the pool: {pooled}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compiled_program_runs_from_a_read_only_build_in_a_pooled_sandbox() {
    let s = Server::start("[sandbox]\npool = 1").await;
    if s.health().await["executor"]["languages"]["c"] != "available" {
        panic!("gcc is not installed (tests/run.sh installs it)");
    }
    let code = "#include <stdio.h>\n#include <errno.h>\n#include <string.h>\n\
        int main(int argc, char **argv){FILE *f = fopen(\"/build/main\", \"a\");\n\
        printf(\"%s %s\\n\", f ? \"writable\" : strerror(errno), argc > 1 ? argv[1] : \"-\");\n\
        return 0;}\n";
    let mut cached = Vec::new();
    for arg in ["one", "two"] {
        pool_full(&s, 1).await;
        let rec = s
            .run(json!({"language": "c", "code": code, "args": [arg]}))
            .await;
        assert_eq!(rec["status"], "completed", "{rec:#}");
        assert_eq!(
            rec["output"],
            format!("Read-only file system {arg}\n"),
            "{}",
            s.log()
        );
        cached.push(rec["compile"]["cached"].clone());
    }
    assert_eq!(cached, [json!(false), json!(true)]);
    let pooled = s
        .metric("crucible_sandbox_sources_total", "source=\"pool\"")
        .await
        .unwrap_or(0.0);
    assert!(pooled >= 2.0, "the runs did not use the pool: {pooled}");
}

/// However a pooled run ends (timed out, cancelled, failed, completed), its process tree,
/// its cgroup and its directory go with it: once the pool has refilled, exactly `size`
/// sandboxes are left, each with only its waiting processes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_runs_leave_no_process_cgroup_or_directory_behind() {
    let s = Server::start("workers = 2\n[sandbox]\npool = 2").await;
    let e = pool_full(&s, 2).await;
    let work = PathBuf::from(e["work_dir"].as_str().expect("work_dir"));
    let bases = run_cgroup_bases(&s).await;
    assert!(bases.len() >= 2, "run cgroup bases: {bases:?}");
    // The start-up runs' directories go in the background.
    let started = Instant::now();
    let before_dirs = loop {
        let d = dir_entries(&work);
        if d.len() == 2 {
            break d;
        }
        assert!(started.elapsed() < DEADLINE, "{d:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };

    let m = marker(61);
    let spin = program("sleeper(\"MARKER\")\nwhile True: pass\n", &[("MARKER", &m)]);
    let long = s.submit(json!({"code": spin, "timeout": 300})).await;
    s.wait_status(&long, "running").await;
    // Positive control: while it runs, its processes are in one of the cgroups.
    let started = Instant::now();
    while !run_cgroups(&bases).iter().any(|g| procs(g).len() > 3) {
        assert!(
            started.elapsed() < DEADLINE,
            "the run's cgroup never held it"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let timed_out = s.submit(json!({"code": spin, "timeout": 1})).await;
    assert_eq!(
        s.wait_terminal(&timed_out).await["failure_reason"],
        "timeout"
    );
    let c = s
        .post(&format!("/api/eval/{long}/cancel"), &json!({}))
        .await;
    assert_eq!(c.status, 200);
    assert_eq!(s.wait_terminal(&long).await["status"], "cancelled");
    s.run_py("raise SystemExit(3)", 30.0).await;
    s.run_py("print(1)", 30.0).await;
    assert_no_host_process_with(&m);

    pool_full(&s, 2).await;
    let started = Instant::now();
    loop {
        let dirs = dir_entries(&work);
        let groups = run_cgroups(&bases);
        // One directory per hierarchy and sandbox: only the 2 waiting ones.
        let busy: Vec<_> = groups.iter().filter(|g| procs(g).len() > 3).collect();
        if dirs.len() == 2 && groups.len() == 2 * bases.len() && busy.is_empty() {
            // The sandboxes used were replaced: at least the last one taken is new.
            assert_ne!(dirs, before_dirs, "no sandbox was taken from the pool");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "left behind: directories {dirs:?}, cgroups {groups:?}, busy {busy:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A clean stop drains the pool (the work dir gone, no cgroup, no helper); a
/// kill -9 takes the waiting sandboxes down with the appliance (their helpers die with
/// their parent) and the next start removes what was left on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_is_drained_at_stop_and_dies_with_a_killed_appliance() {
    let mut s = Server::start("workers = 2\n[sandbox]\npool = 3").await;
    let e = pool_full(&s, 3).await;
    let work = PathBuf::from(e["work_dir"].as_str().expect("work_dir"));
    let bases = run_cgroup_bases(&s).await;
    let waiting: Vec<u32> = run_cgroups(&bases).iter().flat_map(|g| procs(g)).collect();
    assert!(
        waiting.len() >= 3,
        "no waiting sandbox processes: {waiting:?}"
    );
    assert!(s.terminate().success(), "{}", s.log());
    assert!(!work.exists(), "{:?}", dir_entries(&work));
    assert!(run_cgroups(&bases).is_empty(), "{:?}", run_cgroups(&bases));
    let alive = living(&waiting);
    assert!(
        alive.is_empty(),
        "pooled sandboxes outlived the stop: {alive:?}"
    );

    s.restart().await;
    pool_full(&s, 3).await;
    let waiting: Vec<u32> = run_cgroups(&bases).iter().flat_map(|g| procs(g)).collect();
    assert!(waiting.len() >= 3, "{waiting:?}");
    s.kill9();
    let started = Instant::now();
    loop {
        let alive = living(&waiting);
        if alive.is_empty() {
            break;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "pooled sandboxes outlived a kill -9 of the appliance: {alive:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The next start removes what the killed one left; the start-up runs' own
    // directories and cgroups go in the background.
    s.restart().await;
    pool_full(&s, 3).await;
    let started = Instant::now();
    while dir_entries(&work).len() != 3 || run_cgroups(&bases).len() != 3 * bases.len() {
        assert!(
            started.elapsed() < DEADLINE,
            "{:?} {:?}",
            dir_entries(&work),
            run_cgroups(&bases)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(s.run_py("print(7)", 30.0).await["output"], "7\n");
}

/// A pooled sandbox's helper is started without a pre-exec step (vfork semantics) and
/// checks its parent itself: started by anyone but the appliance named in its
/// environment, it stops before taking anything; started by it, it takes its spec and
/// result pipes from its control socket (here a spec that is not JSON, answered on the
/// result pipe, shows both pipes arrived).
#[test]
fn a_pooled_helper_runs_only_for_its_appliance_and_takes_its_pipes_from_its_socket() {
    use crucible::executor::helper::PARENT_ENV;
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    let start = |parent: u32| {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let child = std::process::Command::new(crate::common::bin())
            .arg("__sandbox")
            .env_clear()
            .env(PARENT_ENV, parent.to_string())
            .stdin(std::process::Stdio::from(std::os::fd::OwnedFd::from(
                theirs,
            )))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let (spec_r, mut spec_w) = std::io::pipe().unwrap();
        let (mut result_r, result_w) = std::io::pipe().unwrap();
        // Sent either way: the helper must not use them when its parent is not the one
        // named (the socket buffers them until it reads).
        crucible::executor::wire::send_with_fds(
            ours.as_raw_fd(),
            b"F",
            &[spec_r.as_raw_fd(), result_w.as_raw_fd()],
        )
        .unwrap();
        drop((spec_r, result_w));
        let _ = spec_w.write_all(b"not json");
        drop(spec_w);
        let out = child.wait_with_output().unwrap();
        let mut result = String::new();
        result_r.read_to_string(&mut result).unwrap();
        drop(ours);
        (out, result)
    };

    // Its parent is this test, not pid 1: it refuses, and answers nothing.
    let (out, result) = start(1);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("is gone"), "{stderr}");
    assert_eq!(result, "", "{stderr}");

    // Its parent as named: the spec came through the passed pipe (and was refused as
    // bad), the answer went back through the other.
    let (out, result) = start(std::process::id());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(result.contains("bad spec"), "{result} {stderr}");
}
