//! The sandbox helper: `crucible __sandbox`, re-executed from the appliance for every
//! run. It is a fresh single-threaded process, so forking and setting up namespaces
//! here is safe (doing it inside the multi-threaded server would not be).
//!
//! Protocol: the spec arrives as JSON on fd 3; the result leaves as JSON on fd 4;
//! stdin/stdout/stderr are passed straight through to the sandboxed program. The helper
//! dies with its parent (PR_SET_PDEATHSIG), and the sandboxed program is PID 1 of its own
//! PID namespace, so killing the helper kills the whole tree.
//!
//! Isolation (hakoniwa): new user, mount, PID, network and IPC namespaces (the hostname
//! and cgroup paths are not secrets, and without privileges over the parent namespaces
//! the code cannot change them; leaving them out lets the systemd unit forbid them);
//! only `lo` (down) in the network namespace; a read-only root built from read-only binds
//! of the host's runtime directories and a few /etc files; a private size-capped /tmp;
//! device nodes null/zero/full/random/urandom only; rlimits on address space, CPU time,
//! processes, file size, open files and core dumps; no_new_privs; an empty environment
//! apart from PATH/HOME/LANG. When started as root it first drops to the configured
//! unprivileged uid/gid, so RLIMIT_NPROC applies and nothing runs as host root.
//!
//! The last steps before `execve` of the program run in the sandbox's own process
//! ([`exec_program`]): join a new, empty session keyring (keyrings are not namespaced),
//! set the sandbox's `user.max_user_namespaces` to 0, and install the syscall filter
//! ([`super::seccomp`]).

use hakoniwa::{Container, MountOptions, Namespace, Rlimit, Runctl, Stdio};
use serde::{Deserialize, Serialize};
use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

/// Uid/gid the program sees inside the sandbox.
pub const SANDBOX_ID: u32 = 1000;
/// Where the submitted files live inside the sandbox (read-only).
pub const CODE_DIR: &str = "/code";
/// Where a compile step writes, and where runs find the compiled program.
pub const BUILD_DIR: &str = "/build";

/// What the helper must set up and run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Spec {
    pub parent_pid: u32,
    pub uid: u32,
    pub gid: u32,
    /// This run's own directory (its sandbox root is made inside; the appliance removes
    /// it when the run ends, however it ends).
    pub work_dir: PathBuf,
    /// Install the syscall filter (off only to debug).
    pub seccomp: bool,
    pub ro_dirs: Vec<String>,
    pub etc_files: Vec<String>,
    /// Files under /code: (relative path, content).
    pub files: Vec<(String, String)>,
    pub program: String,
    pub args: Vec<String>,
    pub path: String,
    /// Extra environment of the program (`NAME=value`).
    pub env: Vec<String>,
    /// A directory to show read-only (and executable) at /build: the compiled program.
    pub build_ro: Option<PathBuf>,
    /// Compile mode: /build is a writable tmpfs of this many bytes; the program runs as a
    /// child, and what it left there is sent back as a frame on stdout (see
    /// [`super::build`]).
    pub compile_build_bytes: Option<u64>,
    /// Bytes of the compiler's stdout and of its stderr kept (compile mode).
    pub output_cap: u64,
    pub memory_bytes: u64,
    pub max_processes: u64,
    pub max_file_bytes: u64,
    pub max_open_files: u64,
    pub cpu_secs: u64,
    pub tmp_bytes: u64,
    pub backstop_secs: u64,
    /// A pooled sandbox: set up now, with nothing in /code, and left waiting for its run
    /// ([`Assignment`]), which arrives first on its stdin. The fields above that describe
    /// the program (files, program, args, env, build, limits) are unused then.
    #[serde(default)]
    pub pooled: bool,
}

/// The run given to a pooled sandbox, on its control socket (its stdin): `[u64 LE
/// length][this, as JSON][u64 LE length][a tar of /build, or nothing]`, with the read end
/// of the program's stdin pipe passed along (none when it serves tests). The sandbox's
/// first process reads exactly the frame, writes /code (and /build) into fresh tmpfs
/// mounts made read-only before anything else runs, applies the limits and becomes the
/// program (or serves tests).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Assignment {
    /// Files under /code: (relative path, content).
    pub files: Vec<(String, String)>,
    pub program: String,
    pub args: Vec<String>,
    /// The program's whole environment (name, value).
    pub env: Vec<(String, String)>,
    /// Size of /build's tmpfs when a build comes with the run (0: none).
    pub build_bytes: u64,
    pub memory_bytes: u64,
    pub max_processes: u64,
    pub max_file_bytes: u64,
    pub max_open_files: u64,
    pub cpu_secs: u64,
    /// Serve tests: instead of becoming the program, the first process runs it once per
    /// test request on the control socket (see `serve_tests`), each time in new PID and
    /// mount namespaces (its IPC objects removed after it) with a fresh /tmp of `tmp_bytes`.
    #[serde(default)]
    pub serve: bool,
    #[serde(default)]
    pub tmp_bytes: u64,
}

/// The largest assignment a pooled sandbox accepts (the API caps code and files far
/// below this).
const MAX_ASSIGNMENT_BYTES: u64 = 256 * 1024 * 1024;

/// The frame of an assignment, as the appliance writes it on a pooled sandbox's stdin.
pub fn assignment_frame(a: &Assignment, build_tar: &[u8]) -> Result<Vec<u8>, String> {
    let json = serde_json::to_vec(a).map_err(|e| format!("assignment: {e}"))?;
    let mut out = Vec::with_capacity(16 + json.len() + build_tar.len());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(&(build_tar.len() as u64).to_le_bytes());
    out.extend_from_slice(build_tar);
    Ok(out)
}

/// The program's environment: PATH, HOME, LANG and TMPDIR, then the language's own
/// (`NAME=value`, replacing one of those of the same name).
pub fn program_env(path: &str, extra: &[String]) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = vec![
        ("PATH".into(), path.to_string()),
        ("HOME".into(), "/tmp".into()),
        ("LANG".into(), "C.UTF-8".into()),
        ("TMPDIR".into(), "/tmp".into()),
    ];
    for e in extra {
        if let Some((k, v)) = e.split_once('=') {
            env.retain(|(name, _)| name != k);
            env.push((k.to_string(), v.to_string()));
        }
    }
    env
}

/// What happened, as the helper saw it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HelperResult {
    /// The sandbox could not be set up; the program never ran.
    pub setup_error: Option<String>,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub reason: String,
    /// Peak resident set size of the program, in KiB.
    pub max_rss_kb: u64,
    pub user_ms: u64,
    pub sys_ms: u64,
}

/// Entry point of `crucible __sandbox`. Returns the process exit code.
pub fn main() -> i32 {
    // Die with the appliance, whatever happens next.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
    }
    if let Some(parent) = std::env::var_os(PARENT_ENV) {
        // Nothing started from here needs it (this process is still single-threaded).
        std::env::remove_var(PARENT_ENV);
        if let Err(e) = take_pipes(&parent) {
            eprintln!("crucible sandbox helper: {e}");
            return 1;
        }
    }
    // SAFETY: fds 3 and 4 are set up by the parent for exactly this purpose.
    let mut spec_in = unsafe { std::fs::File::from_raw_fd(3) };
    let mut result_out = unsafe { std::fs::File::from_raw_fd(4) };
    let mut buf = Vec::new();
    if let Err(e) = spec_in.read_to_end(&mut buf) {
        return report(
            &mut result_out,
            setup_error(format!("cannot read the spec: {e}")),
        );
    }
    drop(spec_in);
    let spec: Spec = match serde_json::from_slice(&buf) {
        Ok(s) => s,
        Err(e) => return report(&mut result_out, setup_error(format!("bad spec: {e}"))),
    };
    drop(buf);
    let result = match run(&spec) {
        Ok(r) => r,
        Err(e) => setup_error(e),
    };
    report(&mut result_out, result)
}

/// Set by the appliance on a pooled sandbox's helper, which it starts without a step
/// between fork and exec: the appliance's pid, and the spec and result pipes come on the
/// control socket (stdin) instead of as fds 3 and 4.
pub const PARENT_ENV: &str = "CRUCIBLE_HELPER_PARENT";

/// What the appliance's pre-exec step does for other helpers, done here: make sure the
/// appliance that started this helper is still its parent (the death signal is set from
/// here on), then take the spec and result pipes from the control socket and put them
/// on fds 3 and 4.
fn take_pipes(parent: &std::ffi::OsStr) -> Result<(), String> {
    // SAFETY: getppid has no preconditions.
    let ppid = unsafe { libc::getppid() };
    if parent.to_str().and_then(|p| p.parse().ok()) != Some(ppid) {
        return Err("the appliance that started this helper is gone".into());
    }
    let mut tag = [0u8; 1];
    let fds = match super::wire::recv_with_fds(0, &mut tag, 2)? {
        Some(fds) if fds.len() == 2 && tag == *b"F" => fds,
        _ => return Err("no spec and result pipes on the control socket".into()),
    };
    let raw: Vec<_> = fds.into_iter().map(IntoRawFd::into_raw_fd).collect();
    place_pipes(raw[0], raw[1]).map_err(|e| format!("cannot place the pipes: {e}"))?;
    // What arrived as 3 or 4 is the placed pipe now; close the rest.
    for fd in raw.into_iter().filter(|&fd| fd != 3 && fd != 4) {
        // SAFETY: a received descriptor that nothing else holds.
        unsafe { libc::close(fd) };
    }
    Ok(())
}

/// Put the spec pipe `spec` on fd 3 and the result pipe `result` on fd 4, neither
/// close-on-exec (the sandbox's own steps read and write them), whatever numbers they
/// have now: both are first copied above 10, so that neither dup2 can clobber the other
/// (either may be 3 or 4 already). Only async-signal-safe calls: the appliance's pre-exec
/// step for other helpers uses it too.
pub(crate) fn place_pipes(spec: RawFd, result: RawFd) -> std::io::Result<()> {
    // SAFETY: fcntl, dup2 and close on descriptors of this process.
    unsafe {
        let a = libc::fcntl(spec, libc::F_DUPFD, 10);
        let b = libc::fcntl(result, libc::F_DUPFD, 10);
        if a < 0 || b < 0 || libc::dup2(a, 3) < 0 || libc::dup2(b, 4) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        libc::close(a);
        libc::close(b);
    }
    Ok(())
}

fn setup_error(msg: String) -> HelperResult {
    HelperResult {
        setup_error: Some(msg),
        ..HelperResult::default()
    }
}

fn report(out: &mut std::fs::File, r: HelperResult) -> i32 {
    let bytes = serde_json::to_vec(&r).unwrap_or_default();
    let _ = out.write_all(&bytes);
    0
}

fn drop_privileges(spec: &Spec) -> Result<(), String> {
    // SAFETY: plain syscalls in a single-threaded process.
    unsafe {
        if libc::geteuid() != 0 {
            return Ok(());
        }
        if libc::setgroups(0, std::ptr::null()) != 0 {
            return Err(format!("setgroups: {}", std::io::Error::last_os_error()));
        }
        if libc::setgid(spec.gid) != 0 {
            return Err(format!(
                "setgid({}): {}",
                spec.gid,
                std::io::Error::last_os_error()
            ));
        }
        if libc::setuid(spec.uid) != 0 {
            return Err(format!(
                "setuid({}): {}",
                spec.uid,
                std::io::Error::last_os_error()
            ));
        }
        // Changing credentials clears "dumpable" (which would make /proc/self/uid_map
        // unwritable) and the parent-death signal: restore both.
        libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0);
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
    }
    Ok(())
}

fn run(spec: &Spec) -> Result<HelperResult, String> {
    // SAFETY: getppid has no preconditions.
    if unsafe { libc::getppid() } as u32 != spec.parent_pid {
        return Err("the appliance went away before the run started".into());
    }
    drop_privileges(spec)?;
    if unsafe { libc::getppid() } as u32 != spec.parent_pid {
        return Err("the appliance went away before the run started".into());
    }
    // The sandbox root: a directory of the run's own, which the appliance removes after
    // the run (hakoniwa's own temporary root would be removed here, while the appliance
    // waits for the result).
    let root = spec.work_dir.join("root");
    std::fs::create_dir(&root)
        .map_err(|e| format!("cannot create the sandbox root {}: {e}", root.display()))?;
    // SAFETY (edition 2021 API): single-threaded process, nobody else reads the env.
    std::env::set_var("TMPDIR", &spec.work_dir);

    let mut c = Container::empty();
    c.rootdir(&root);
    for ns in [
        Namespace::Mount,
        Namespace::User,
        Namespace::Pid,
        Namespace::Network,
        Namespace::Ipc,
    ] {
        c.unshare(ns);
    }
    c.uidmap(SANDBOX_ID).gidmap(SANDBOX_ID);
    // A read-only remount of a bind mount must keep the flags the kernel locked on the
    // source mount (nodev, noexec, ... of the host's /etc, /usr): retry with them.
    c.runctl(Runctl::MountFallback);
    c.procfsmount("/proc");

    for dir in &spec.ro_dirs {
        mount_host_path(&mut c, Path::new(dir), dir)?;
    }
    c.dir("/etc", 0o755);
    for f in &spec.etc_files {
        let host = Path::new("/etc").join(f);
        mount_host_path(&mut c, &host, &format!("/etc/{f}"))?;
    }
    c.file(
        "/etc/passwd",
        "root:x:0:0:root:/root:/usr/sbin/nologin\nsandbox:x:1000:1000:sandbox:/tmp:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
    );
    c.file(
        "/etc/group",
        "root:x:0:\nsandbox:x:1000:\nnogroup:x:65534:\n",
    );
    c.file("/etc/hosts", "127.0.0.1 localhost\n::1 localhost\n");

    for dev in ["null", "zero", "full"] {
        let p = format!("/dev/{dev}");
        c.bindmount_rw(&p, &p);
    }
    for dev in ["random", "urandom"] {
        let p = format!("/dev/{dev}");
        c.bindmount_ro(&p, &p);
    }
    c.symlink("/proc/self/fd", "/dev/fd");
    c.symlink("/proc/self/fd/0", "/dev/stdin");
    c.symlink("/proc/self/fd/1", "/dev/stdout");
    c.symlink("/proc/self/fd/2", "/dev/stderr");

    c.mount(
        "tmpfs",
        "/tmp",
        "tmpfs",
        MountOptions::NOSUID | MountOptions::NODEV | MountOptions::NOEXEC,
        Some(format!("size={},nr_inodes=16384,mode=1777", spec.tmp_bytes)),
    );
    c.dir(CODE_DIR, 0o755);
    if spec.pooled {
        return run_pooled(spec, c);
    }
    let mut dirs = std::collections::BTreeSet::new();
    for (name, content) in &spec.files {
        let mut parent = Path::new(name).parent();
        let mut chain = Vec::new();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
            chain.push(p.to_path_buf());
            parent = p.parent();
        }
        for d in chain.into_iter().rev() {
            if dirs.insert(d.clone()) {
                c.dir(&format!("{CODE_DIR}/{}", d.display()), 0o755);
            }
        }
        c.file(&format!("{CODE_DIR}/{name}"), content);
    }
    match (&spec.build_ro, spec.compile_build_bytes) {
        (_, Some(bytes)) => {
            c.mount(
                "tmpfs",
                BUILD_DIR,
                "tmpfs",
                MountOptions::NOSUID | MountOptions::NODEV,
                Some(format!("size={bytes},nr_inodes=16384,mode=1777")),
            );
        }
        (Some(dir), None) => {
            c.bindmount_ro(&dir.to_string_lossy(), BUILD_DIR);
        }
        (None, None) => {}
    }

    c.setrlimit(Rlimit::As, spec.memory_bytes, spec.memory_bytes)
        .setrlimit(Rlimit::Nproc, spec.max_processes, spec.max_processes)
        .setrlimit(Rlimit::Fsize, spec.max_file_bytes, spec.max_file_bytes)
        .setrlimit(Rlimit::Nofile, spec.max_open_files, spec.max_open_files)
        .setrlimit(Rlimit::Cpu, spec.cpu_secs, spec.cpu_secs + 1)
        .setrlimit(Rlimit::Core, 0, 0);

    let env = program_env(&spec.path, &spec.env);
    let exec = Exec::new(spec, &env)?;
    let compile = spec.compile_build_bytes;
    let cap = spec.output_cap;
    // SAFETY: the closure runs in the sandbox's child after hakoniwa's fork; this helper
    // is single-threaded, so allocation there is safe, and it ends in execve (or, in
    // compile mode, in writing the frame and exiting).
    let mut cmd = unsafe {
        c.command_from_closure(move || match compile {
            Some(bytes) => compile_and_send(&exec, bytes, cap),
            None => exec_program(&exec),
        })
    };
    cmd.env("PATH", &spec.path)
        .env("HOME", "/tmp")
        .env("LANG", "C.UTF-8")
        .env("TMPDIR", "/tmp")
        .current_dir("/tmp")
        .wait_timeout(spec.backstop_secs)
        .stdin(Stdio::inherit())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit());
    finish(cmd)
}

/// Wait for the sandbox's program and report how it ended.
fn finish(mut cmd: hakoniwa::Command) -> Result<HelperResult, String> {
    let status = cmd
        .status()
        .map_err(|e| format!("sandbox setup failed: {e}"))?;

    let mut r = HelperResult {
        reason: status.reason.clone(),
        ..HelperResult::default()
    };
    if let Some(u) = &status.rusage {
        r.max_rss_kb = u.max_rss.max(0) as u64;
        r.user_ms = u.user_time.as_millis() as u64;
        r.sys_ms = u.system_time.as_millis() as u64;
    }
    match status.exit_code {
        Some(code) => r.exit_code = Some(code),
        None if status.code > 128 && status.rusage.is_some() => r.signal = Some(status.code - 128),
        None => r.setup_error = Some(explain_setup_failure(&status.reason)),
    }
    Ok(r)
}

/// A pooled sandbox: the same root with an empty /code (and a /build to mount on), no
/// limits yet and no time limit here (the appliance's timer kills the run's cgroup and
/// this helper); its first process waits for its [`Assignment`] on stdin.
fn run_pooled(spec: &Spec, mut c: Container) -> Result<HelperResult, String> {
    c.dir(BUILD_DIR, 0o755);
    c.setrlimit(Rlimit::Core, 0, 0);
    let filters = match spec.seccomp {
        true => Some(super::seccomp::programs()?),
        false => None,
    };
    // SAFETY: as in `run`: the closure runs in the sandbox's first process, forked from
    // this single-threaded helper, and ends in execve or an exit.
    let mut cmd = unsafe {
        c.command_from_closure(move || match take_assignment(filters.clone()) {
            Ok(Taken::Run(exec, stdin)) => {
                // dup2 onto fd 0 (the control socket, which closes with it).
                if libc::dup2(stdin.as_raw_fd(), 0) < 0 {
                    return sandbox_step_failed(
                        "cannot take the run's stdin",
                        std::io::Error::last_os_error().to_string(),
                    );
                }
                drop(stdin);
                exec_program(&exec)
            }
            Ok(Taken::Serve(exec, tmp_bytes)) => serve_tests(&exec, tmp_bytes),
            Err(e) => sandbox_step_failed("cannot take the run", e),
        })
    };
    cmd.env("PATH", &spec.path)
        .env("HOME", "/tmp")
        .env("LANG", "C.UTF-8")
        .env("TMPDIR", "/tmp")
        .current_dir("/tmp")
        .stdin(Stdio::inherit())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit());
    finish(cmd)
}

/// What a pooled sandbox's first process does once it has its run.
enum Taken {
    /// Become the program, with this stdin.
    Run(Exec, OwnedFd),
    /// Serve tests (fresh /tmp of this many bytes each).
    Serve(Exec, u64),
}

/// In a pooled sandbox's first process: read the assignment (exactly its frame), put its
/// files in place on fresh tmpfs mounts made read-only, apply its limits, and prepare the
/// program.
fn take_assignment(filters: Option<Vec<seccompiler::BpfProgram>>) -> Result<Taken, String> {
    // SAFETY: fd 0 is this process's control socket; ManuallyDrop leaves it open.
    let mut control = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(0) });
    let mut len = [0u8; 8];
    let mut passed = super::wire::recv_with_fds(0, &mut len, 1)?
        .ok_or("no assignment: the control socket closed")?;
    let mut read_block = |len: Option<[u8; 8]>, max: u64| -> Result<Vec<u8>, String> {
        let len = match len {
            Some(l) => u64::from_le_bytes(l),
            None => {
                let mut l = [0u8; 8];
                control
                    .read_exact(&mut l)
                    .map_err(|e| format!("a cut assignment: {e}"))?;
                u64::from_le_bytes(l)
            }
        };
        if len > max {
            return Err(format!("an assignment block of {len} bytes is over {max}"));
        }
        let mut buf = vec![0u8; len as usize];
        control
            .read_exact(&mut buf)
            .map_err(|e| format!("a cut assignment: {e}"))?;
        Ok(buf)
    };
    let json = read_block(Some(len), MAX_ASSIGNMENT_BYTES)?;
    let a: Assignment =
        serde_json::from_slice(&json).map_err(|e| format!("a bad assignment: {e}"))?;
    drop(json);
    let stdin = match (a.serve, passed.pop()) {
        (false, Some(fd)) => Some(fd),
        (true, None) => None,
        _ => return Err("an assignment with the wrong descriptors".into()),
    };
    let tar = read_block(None, a.build_bytes)?;

    let code_bytes: u64 = a.files.iter().map(|(_, c)| c.len() as u64 + 4096).sum();
    mount_tmpfs(CODE_DIR, code_bytes + 64 * 1024, 0o755)?;
    for (name, content) in &a.files {
        let target = Path::new(CODE_DIR).join(name);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("{CODE_DIR}: {e}"))?;
        }
        write_new(&target, content.as_bytes(), 0o644)?;
    }
    remount_ro(CODE_DIR)?;
    if !tar.is_empty() {
        mount_tmpfs(BUILD_DIR, a.build_bytes.max(1), 0o755)?;
        super::build::extract(&tar, Path::new(BUILD_DIR), 100_000, a.build_bytes)?;
        remount_ro(BUILD_DIR)?;
    }
    drop(tar);

    let mut limits = vec![
        (libc::RLIMIT_AS, a.memory_bytes, a.memory_bytes),
        (libc::RLIMIT_NPROC, a.max_processes, a.max_processes),
        (libc::RLIMIT_FSIZE, a.max_file_bytes, a.max_file_bytes),
        (libc::RLIMIT_NOFILE, a.max_open_files, a.max_open_files),
    ];
    // A serving process's CPU time limit is each test's own (set in the test's process).
    if !a.serve {
        limits.push((libc::RLIMIT_CPU, a.cpu_secs, a.cpu_secs + 1));
    }
    for (resource, value, hard) in limits {
        set_rlimit(resource, value, hard)?;
    }
    let exec = Exec::build(&a.program, &a.args, &a.env, filters)?;
    Ok(match stdin {
        Some(fd) => Taken::Run(exec, fd),
        None => Taken::Serve(exec, a.tmp_bytes),
    })
}

/// The type of setrlimit's resource argument (glibc and musl differ).
#[cfg(target_env = "gnu")]
type Resource = libc::__rlimit_resource_t;
#[cfg(not(target_env = "gnu"))]
type Resource = libc::c_int;

fn set_rlimit(resource: Resource, value: u64, hard: u64) -> Result<(), String> {
    let lim = libc::rlimit {
        rlim_cur: value,
        rlim_max: hard,
    };
    // SAFETY: setrlimit with a valid struct.
    if unsafe { libc::setrlimit(resource, &lim) } != 0 {
        return Err(format!("setrlimit: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Serve tests (in a pooled sandbox's first process, PID 1 of the sandbox's PID
/// namespace): for each request on the control socket (fd 0: the test's CPU seconds, with
/// its stdin, stdout and stderr passed along), start the program in a new process that is
/// PID 1 of new PID and mount namespaces ([`test_process`]), wait for it, remove every
/// IPC object it left ([`clear_ipc`]) and answer how it ended. When that process ends,
/// the kernel kills everything else of its PID namespace and reaps it before `wait4`
/// returns: nothing of a test outlives it. Ends when the appliance closes the socket.
///
/// IPC objects are removed here, before the answer, rather than left to a new IPC
/// namespace per test: the kernel frees a dead IPC namespace's objects later, in the
/// background, so their memory would still be charged to the sandbox's cgroup while the
/// next test runs (a test holding 224 MiB of shared memory made the next one run out of
/// memory).
///
/// This process is made non-dumpable first: a test's program (the same uid, no
/// capabilities) can neither trace it nor open its /proc files, were it to see it.
fn serve_tests(x: &Exec, tmp_bytes: u64) -> i32 {
    // SAFETY: prctl and umount2 with valid arguments.
    unsafe {
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
        // The sandbox's own /tmp is nobody's: each test mounts its own.
        libc::umount2(c"/tmp".as_ptr(), libc::MNT_DETACH);
    }
    // The POSIX message queues of the sandbox's IPC namespace, listed there to be removed
    // after each test (tests see their own /tmp on top).
    if let Err(e) = mount_fs("mqueue", MQUEUE_DIR, "mqueue", libc::MS_NOEXEC, "") {
        return sandbox_step_failed("cannot serve tests", e);
    }
    // SAFETY: fd 0 is the control socket.
    let mut control = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(0) });
    loop {
        let mut req = [0u8; super::wire::REQUEST_BYTES];
        let fds = match super::wire::recv_with_fds(0, &mut req, 3) {
            Ok(None) => return 0,
            Ok(Some(fds)) if fds.len() == 3 => fds,
            Ok(Some(_)) => {
                return sandbox_step_failed("a test request", "without its descriptors".into())
            }
            Err(e) => return sandbox_step_failed("a test request", e),
        };
        let cpu_secs = u64::from_le_bytes(req);
        let flags = libc::CLONE_NEWPID | libc::CLONE_NEWNS;
        // SAFETY: clone without a new stack behaves as fork (the child runs on a copy of
        // this stack) in this single-threaded process; the child only sets up its own
        // namespaces and ends in execve or _exit.
        let pid = unsafe {
            libc::syscall(
                libc::SYS_clone,
                (flags | libc::SIGCHLD) as libc::c_ulong,
                0usize,
                0usize,
                0usize,
                0usize,
            )
        };
        if pid == 0 {
            let code = test_process(x, &fds, cpu_secs, tmp_bytes);
            // SAFETY: leave the child without running this process's destructors.
            unsafe { libc::_exit(code) }
        }
        drop(fds);
        let mut reply = if pid < 0 {
            eprintln!(
                "crucible sandbox: cannot start a test: {}",
                std::io::Error::last_os_error()
            );
            super::wire::Reply::default()
        } else {
            wait_test(pid as libc::pid_t)
        };
        let cleared = clear_ipc();
        if let Err(e) = &cleared {
            eprintln!("crucible sandbox: cannot remove a test's IPC objects: {e}");
            reply.spent = true;
        }
        if control.write_all(&reply.encode()).is_err() || cleared.is_err() {
            return 0;
        }
    }
}

/// Where a serving sandbox lists its POSIX message queues (its own /tmp, unmounted).
const MQUEUE_DIR: &str = "/tmp";

/// Remove every SysV shared memory segment, message queue and semaphore set, and every
/// POSIX message queue, of the sandbox's IPC namespace (after a test: nobody is left to
/// use them, so their memory is freed now). This process has the capabilities of the
/// sandbox's user namespace, which owns the IPC namespace: whatever the objects'
/// permissions, it may remove them.
fn clear_ipc() -> Result<(), String> {
    for kind in ["shm", "msg", "sem"] {
        let path = format!("/proc/sysvipc/{kind}");
        let text = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
        // A header line, then one line per object: key, id, ...
        for id in text
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<libc::c_int>().ok())
        {
            // SAFETY: IPC_RMID takes no buffer.
            let rc = unsafe {
                match kind {
                    "shm" => libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut()),
                    "msg" => libc::msgctl(id, libc::IPC_RMID, std::ptr::null_mut()),
                    _ => libc::semctl(id, 0, libc::IPC_RMID),
                }
            };
            let e = std::io::Error::last_os_error();
            // Gone meanwhile is fine (nobody is left to remove it, but be exact).
            if rc != 0
                && e.raw_os_error() != Some(libc::EINVAL)
                && e.raw_os_error() != Some(libc::EIDRM)
            {
                return Err(format!("cannot remove {kind} {id}: {e}"));
            }
        }
    }
    let entries = std::fs::read_dir(MQUEUE_DIR).map_err(|e| format!("{MQUEUE_DIR}: {e}"))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("{MQUEUE_DIR}: {e}"))?;
        std::fs::remove_file(entry.path())
            .map_err(|e| format!("cannot remove {}: {e}", entry.path().display()))?;
    }
    Ok(())
}

/// Wait for a test's process; how it ended and what it used.
fn wait_test(pid: libc::pid_t) -> super::wire::Reply {
    let mut st = 0;
    // SAFETY: a zeroed rusage is valid; wait4 fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: waiting for our own child.
        let rc = unsafe { libc::wait4(pid, &mut st, 0, &mut ru) };
        if rc == pid {
            break;
        }
        if rc < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return super::wire::Reply::default();
        }
    }
    let ms = |t: libc::timeval| (t.tv_sec.max(0) as u64) * 1000 + (t.tv_usec.max(0) as u64) / 1000;
    super::wire::Reply {
        exit_code: libc::WIFEXITED(st).then(|| libc::WEXITSTATUS(st)),
        signal: libc::WIFSIGNALED(st).then(|| libc::WTERMSIG(st)),
        max_rss_kb: ru.ru_maxrss.max(0) as u64,
        user_ms: ms(ru.ru_utime),
        sys_ms: ms(ru.ru_stime),
        spent: false,
    }
}

/// A test's process, PID 1 of its own PID namespace: the test's descriptors on 0, 1, 2
/// and nothing else open, a fresh /tmp and a /proc of its own namespace (the serving
/// process is not in it), its CPU time limit, then the same last steps as every run.
fn test_process(x: &Exec, fds: &[OwnedFd], cpu_secs: u64, tmp_bytes: u64) -> i32 {
    for (i, fd) in fds.iter().enumerate() {
        // SAFETY: dup2 of descriptors we hold onto 0, 1, 2.
        if unsafe { libc::dup2(fd.as_raw_fd(), i as libc::c_int) } < 0 {
            return EXIT_SANDBOX_STEP;
        }
    }
    // SAFETY: close_range closes every descriptor from 3 up (the control socket and
    // anything else of the serving process); it takes no pointers.
    if unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) } != 0 {
        for fd in 3..1024 {
            // SAFETY: closing descriptors of this process.
            unsafe { libc::close(fd) };
        }
    }
    let step = || -> Result<(), String> {
        mount_fs(
            "tmpfs",
            "/tmp",
            "tmpfs",
            libc::MS_NOEXEC,
            &format!("size={tmp_bytes},nr_inodes=16384,mode=1777"),
        )?;
        mount_fs("proc", "/proc", "proc", libc::MS_NOEXEC, "")?;
        std::env::set_current_dir("/tmp").map_err(|e| format!("cannot enter /tmp: {e}"))?;
        set_rlimit(libc::RLIMIT_CPU, cpu_secs, cpu_secs + 1)
    };
    if let Err(e) = step() {
        return sandbox_step_failed("cannot prepare the test", e);
    }
    exec_program(x)
}

/// A fresh tmpfs at `target` (no devices, no set-uid).
fn mount_tmpfs(target: &str, bytes: u64, mode: u32) -> Result<(), String> {
    let opts = format!("size={bytes},nr_inodes=16384,mode={mode:o}");
    mount_fs("tmpfs", target, "tmpfs", 0, &opts)
}

/// Mount a new `fstype` at `target`, never with devices or set-uid (`flags` adds to that).
fn mount_fs(
    source: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    opts: &str,
) -> Result<(), String> {
    let c = |s: &str| CString::new(s).map_err(|_| format!("NUL byte in {s:?}"));
    let (src, dst, fs, opts) = (c(source)?, c(target)?, c(fstype)?, c(opts)?);
    // SAFETY: mount(2) with NUL-terminated strings that live across the call.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            dst.as_ptr(),
            fs.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | flags,
            opts.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(format!(
            "cannot mount a {fstype} on {target}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Make the mount at `target` read-only.
fn remount_ro(target: &str) -> Result<(), String> {
    let dst = CString::new(target).map_err(|_| format!("NUL byte in {target:?}"))?;
    // SAFETY: mount(2) remounting an existing mount point.
    let rc = unsafe {
        libc::mount(
            std::ptr::null(),
            dst.as_ptr(),
            std::ptr::null(),
            libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(format!(
            "cannot make {target} read-only: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Create `path` (it must not exist: nothing is followed) with `content`.
fn write_new(path: &Path, content: &[u8], mode: u32) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(mode)
        .open(path)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    f.write_all(content)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// The program to exec inside the sandbox, prepared before the fork.
struct Exec {
    program: CString,
    argv: Vec<CString>,
    envp: Vec<CString>,
    filters: Option<Vec<seccompiler::BpfProgram>>,
}

impl Exec {
    fn new(spec: &Spec, env: &[(String, String)]) -> Result<Exec, String> {
        let filters = match spec.seccomp {
            true => Some(super::seccomp::programs()?),
            false => None,
        };
        Exec::build(&spec.program, &spec.args, env, filters)
    }

    fn build(
        program: &str,
        args: &[String],
        env: &[(String, String)],
        filters: Option<Vec<seccompiler::BpfProgram>>,
    ) -> Result<Exec, String> {
        let c = |s: &str| CString::new(s).map_err(|_| format!("NUL byte in {s:?}"));
        let program = c(program)?;
        let mut argv = vec![program.clone()];
        for a in args {
            argv.push(c(a)?);
        }
        let envp = env
            .iter()
            .map(|(k, v)| c(&format!("{k}={v}")))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Exec {
            program,
            argv,
            envp,
            filters,
        })
    }
}

/// Exit code of a run whose last sandbox step failed (the message is on its stderr).
pub const EXIT_SANDBOX_STEP: i32 = 126;

/// The last steps in the sandbox's own process, then `execve` of the program. Runs after
/// hakoniwa's setup (namespaces, mounts, rlimits, `no_new_privs`), still with the
/// capabilities the new user namespace gives; `execve` of a non-root program drops them.
fn exec_program(x: &Exec) -> i32 {
    if let Err(code) = last_steps(x) {
        return code;
    }
    execve(x)
}

fn sandbox_step_failed(what: &str, e: String) -> i32 {
    eprintln!("crucible sandbox: {what}: {e}");
    EXIT_SANDBOX_STEP
}

/// A new empty session keyring, no nested user namespaces, the syscall filter.
fn last_steps(x: &Exec) -> Result<(), i32> {
    let fail = |what: &str, e: String| -> Result<(), i32> { Err(sandbox_step_failed(what, e)) };
    // A new, empty session keyring: nothing shared with the host or another run.
    const KEYCTL_JOIN_SESSION_KEYRING: libc::c_long = 1;
    // SAFETY: keyctl(JOIN_SESSION_KEYRING, NULL) creates and joins an anonymous keyring.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_keyctl,
            KEYCTL_JOIN_SESSION_KEYRING,
            std::ptr::null::<libc::c_char>(),
        )
    };
    if rc < 0 {
        return fail(
            "cannot join a new session keyring",
            std::io::Error::last_os_error().to_string(),
        );
    }
    // No user namespaces inside this one, even where the filter is off.
    if let Err(e) = std::fs::write("/proc/sys/user/max_user_namespaces", "0") {
        return fail("cannot set user.max_user_namespaces", e.to_string());
    }
    if let Some(f) = &x.filters {
        if let Err(e) = super::seccomp::install(f) {
            return fail("cannot install the syscall filter", e);
        }
    }
    Ok(())
}

/// Compile mode: run the compiler as a child with its output in the sandbox's /tmp, then
/// send back (on stdout) how it ended, its output and a tar of /build, read here, in the
/// sandbox's own view, without following any link.
fn compile_and_send(x: &Exec, build_bytes: u64, cap: u64) -> i32 {
    if let Err(code) = last_steps(x) {
        return code;
    }
    let paths = ["/tmp/.crucible-compile.out", "/tmp/.crucible-compile.err"];
    let mut files = Vec::new();
    for p in paths {
        match std::fs::File::create(p) {
            Ok(f) => files.push(f),
            Err(e) => {
                return sandbox_step_failed("cannot capture the compiler's output", e.to_string())
            }
        }
    }
    // SAFETY: fork in this single-threaded process; the child only redirects and execs.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return sandbox_step_failed(
            "cannot start the compiler",
            std::io::Error::last_os_error().to_string(),
        );
    }
    if pid == 0 {
        // SAFETY: dup2 onto the standard descriptors, then execve (or _exit).
        unsafe {
            let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY);
            if null < 0
                || libc::dup2(null, 0) < 0
                || libc::dup2(files[0].as_raw_fd(), 1) < 0
                || libc::dup2(files[1].as_raw_fd(), 2) < 0
            {
                libc::_exit(EXIT_SANDBOX_STEP);
            }
        }
        let code = execve(x);
        // SAFETY: leave the forked child without running the parent's destructors.
        unsafe { libc::_exit(code) }
    }
    drop(files);
    let mut st = 0;
    // SAFETY: waiting for the child we just forked.
    let status = if unsafe { libc::waitpid(pid, &mut st, 0) } < 0 {
        super::build::Status::Failed
    } else if libc::WIFEXITED(st) {
        super::build::Status::Exited(libc::WEXITSTATUS(st))
    } else if libc::WIFSIGNALED(st) {
        super::build::Status::Signaled(libc::WTERMSIG(st))
    } else {
        super::build::Status::Failed
    };
    let read_capped = |p: &str| -> Vec<u8> {
        let mut buf = Vec::new();
        if let Ok(f) = std::fs::File::open(p) {
            let _ = f.take(cap).read_to_end(&mut buf);
        }
        buf
    };
    let (out, err) = (read_capped(paths[0]), read_capped(paths[1]));
    let tar = match super::build::archive(Path::new(BUILD_DIR), build_bytes) {
        Ok(t) => t,
        Err(e) => return sandbox_step_failed("cannot read the build output", e.to_string()),
    };
    let mut stdout = std::io::stdout().lock();
    match super::build::write_frame(&mut stdout, status, &out, &err, &tar) {
        Ok(()) => 0,
        Err(e) => sandbox_step_failed("cannot send the build output", e.to_string()),
    }
}

/// `execve` the program; returns only on failure (127).
fn execve(x: &Exec) -> i32 {
    let mut argv: Vec<*const libc::c_char> = x.argv.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = x.envp.iter().map(|e| e.as_ptr()).collect();
    envp.push(std::ptr::null());
    // SAFETY: NUL-terminated arrays of pointers into CStrings that outlive the call.
    unsafe {
        libc::execve(x.program.as_ptr(), argv.as_ptr(), envp.as_ptr());
    }
    eprintln!(
        "crucible sandbox: cannot execute {}: {}",
        x.program.to_string_lossy(),
        std::io::Error::last_os_error()
    );
    127
}

/// Bind `host` read-only at `target`, keeping symlinks as symlinks; skip missing paths.
fn mount_host_path(c: &mut Container, host: &Path, target: &str) -> Result<(), String> {
    let meta = match std::fs::symlink_metadata(host) {
        Ok(m) => m,
        Err(_) => return Ok(()),
    };
    if meta.file_type().is_symlink() {
        let dest = std::fs::read_link(host)
            .map_err(|e| format!("cannot read link {}: {e}", host.display()))?;
        c.symlink(&dest.to_string_lossy(), target);
    } else {
        c.bindmount_ro(&host.to_string_lossy(), target);
    }
    Ok(())
}

/// Turn a low-level setup error into advice an operator can act on.
pub fn explain_setup_failure(reason: &str) -> String {
    let lower = reason.to_lowercase();
    if lower.contains("uid_map") || lower.contains("unshare") {
        format!(
            "{reason}. The sandbox needs unprivileged user namespaces: check \
             `sysctl kernel.unprivileged_userns_clone` (must be 1 where it exists), \
             `sysctl user.max_user_namespaces` (must be > 0) and, on Ubuntu 23.10+, \
             `sysctl kernel.apparmor_restrict_unprivileged_userns` (must be 0); under systemd, \
             RestrictNamespaces= must allow user, mnt, pid, net and ipc; in a container, run \
             it with --security-opt seccomp=unconfined"
        )
    } else if lower.contains("\"proc\"") || lower.contains("/proc") {
        format!(
            "{reason}. The sandbox mounts its own /proc, which the kernel allows only when \
             this process sees a fully visible /proc: under systemd use ProtectKernelTunables= \
             and ProtectKernelLogs= only together with ProcSubset=pid; in Docker add \
             --security-opt systempaths=unconfined"
        )
    } else if lower.contains("mount") {
        format!(
            "{reason}. The sandbox could not build its read-only root; check that the \
             directories in [sandbox] ro_dirs and etc_files exist and are readable, and that \
             mounting is not forbidden (systemd: SystemCallFilter= must include @mount; \
             Docker: --security-opt seccomp=unconfined)"
        )
    } else {
        reason.to_string()
    }
}
