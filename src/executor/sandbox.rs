//! The `sandbox` backend: no daemon; Linux namespaces, one cgroup per run and rlimits,
//! through the helper process (`crucible __sandbox`, see [`super::helper`]).
//!
//! This side resolves languages to programs on the host, starts the helper, puts it into
//! the run's own cgroup (memory + swap, processes and a CPU quota for the whole tree;
//! see [`super::cgroup`]) before it reads its spec on fd 3, feeds stdin, reads stdout
//! and stderr separately with a cap, enforces the wall-clock timeout and the tree's CPU
//! time by killing the whole group, reads the kernel's counters (OOM kills, peak memory,
//! CPU time) and removes the group. It never runs user code itself.
//!
//! Without a cgroup (a non-root `cargo run` on a host without delegation) runs still
//! happen, loudly: per-process rlimits, and a watchdog that sums the memory of the run's
//! processes every few tens of milliseconds and kills the run past its allowance.

use super::cgroup::{CgroupLimits, Cgroups, RunCgroup};
use super::helper::{HelperResult, Spec, CODE_DIR};
use super::{
    read_capped, BoxFuture, Executor, ExecutorHealth, Job, LanguageState, RunOutput, Termination,
    Usage,
};
use crate::config::Config;
use crate::model::RunLimits;
use crate::ops::metrics::{Exposition, LabeledCounter};
use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

/// How often the watchdog (no cgroup) sums the run's memory, and the CPU monitor reads
/// the run's CPU time.
const WATCH_EVERY: Duration = Duration::from_millis(25);

#[derive(Debug, Clone)]
struct Resolved {
    program: String,
    args: Vec<String>,
    file: String,
}

/// How runs are contained on this host, decided once at start.
pub enum Containment {
    /// One cgroup per run.
    Cgroup(Arc<Cgroups>),
    /// No cgroup could be had: rlimits and the memory watchdog; the reason says why.
    Rlimit(String),
}

/// Counters of the sandbox, for /metrics.
#[derive(Debug, Default)]
pub struct SandboxStats {
    /// Runs by how their limits applied (`cgroup2`, `cgroup1`, `rlimit`).
    pub runs: LabeledCounter,
    /// Runs in which the kernel OOM-killed a process.
    pub oom_kills: AtomicU64,
    /// Runs the memory watchdog killed (no cgroup).
    pub watchdog_kills: AtomicU64,
    /// Runs killed for using up their CPU time.
    pub cpu_kills: AtomicU64,
}

/// The sandbox executor.
pub struct SandboxExecutor {
    exe: PathBuf,
    languages: HashMap<String, Resolved>,
    unavailable: HashMap<String, String>,
    work_dir: PathBuf,
    uid: u32,
    gid: u32,
    ro_dirs: Vec<String>,
    etc_files: Vec<String>,
    path: String,
    containment: Containment,
    cpus: f64,
    max_file_bytes: u64,
    max_open_files: u64,
    tmp_bytes: u64,
    last_error: Mutex<Option<String>>,
    pub stats: SandboxStats,
}

/// What ended a run before the program did.
enum Stop {
    TimedOut,
    Cancelled,
    CpuLimit,
    Watchdog,
}

impl SandboxExecutor {
    /// Build the executor from the config: resolve each language's program on this host
    /// and prepare the work directory (wiping leftovers of a crashed run).
    pub fn new(cfg: &Config, work_dir: PathBuf, containment: Containment) -> Result<Self, String> {
        let exe =
            std::env::current_exe().map_err(|e| format!("cannot find the crucible binary: {e}"))?;
        let mut languages = HashMap::new();
        let mut unavailable = HashMap::new();
        for (name, lang) in &cfg.languages {
            match resolve_program(&lang.command[0], &cfg.sandbox.path, &cfg.sandbox.ro_dirs) {
                Some(program) => {
                    let file_path = format!("{CODE_DIR}/{}", lang.file);
                    let args = lang.command[1..]
                        .iter()
                        .map(|a| a.replace("{file}", &file_path))
                        .collect();
                    languages.insert(
                        name.clone(),
                        Resolved {
                            program,
                            args,
                            file: lang.file.clone(),
                        },
                    );
                }
                None => {
                    let pkg = lang
                        .package
                        .as_deref()
                        .map(|p| format!(" (Debian package `{p}`)"))
                        .unwrap_or_default();
                    unavailable.insert(
                        name.clone(),
                        format!(
                            "language `{name}` needs `{}`, which is not installed on this host{pkg}",
                            lang.command[0]
                        ),
                    );
                }
            }
        }
        prepare_work_dir(&work_dir, cfg.sandbox.uid, cfg.sandbox.gid)?;
        if let Containment::Cgroup(c) = &containment {
            let n = c.reap();
            if n > 0 {
                tracing::warn!(count = n, "removed run cgroups left by an earlier crash");
            }
        }
        let l = &cfg.limits;
        Ok(SandboxExecutor {
            exe,
            languages,
            unavailable,
            work_dir,
            uid: cfg.sandbox.uid,
            gid: cfg.sandbox.gid,
            ro_dirs: cfg.sandbox.ro_dirs.clone(),
            etc_files: cfg.sandbox.etc_files.clone(),
            path: cfg.sandbox.path.clone(),
            containment,
            cpus: cfg.sandbox.cpus,
            max_file_bytes: l.max_file_mb * 1024 * 1024,
            max_open_files: l.max_open_files,
            tmp_bytes: l.tmp_mb * 1024 * 1024,
            last_error: Mutex::new(None),
            stats: SandboxStats::default(),
        })
    }

    /// Languages that cannot run here, with the reason.
    pub fn unavailable(&self) -> &HashMap<String, String> {
        &self.unavailable
    }

    /// `cgroup2`, `cgroup1` or `rlimit`.
    pub fn limits_mode(&self) -> &'static str {
        match &self.containment {
            Containment::Cgroup(c) => c.label(),
            Containment::Rlimit(_) => "rlimit",
        }
    }

    /// Run `true` (or `sh -c 'exit 0'`) through the whole sandbox path once, so a host
    /// that cannot create the sandbox is reported at start-up, not on the first request.
    pub async fn self_test(&self) -> Result<(), String> {
        let program = resolve_program("true", &self.path, &self.ro_dirs)
            .or_else(|| resolve_program("sh", &self.path, &self.ro_dirs))
            .ok_or("neither `true` nor `sh` is available to test the sandbox")?;
        let args = if program.ends_with("/sh") {
            vec!["-c".to_string(), "exit 0".to_string()]
        } else {
            Vec::new()
        };
        let r = Resolved {
            program,
            args,
            file: "probe".into(),
        };
        let job = Job {
            eval_id: "self-test".into(),
            language: "self-test".into(),
            code: String::new(),
            stdin: None,
            timeout: Duration::from_secs(30),
            limits: RunLimits {
                memory_mb: 64,
                cpu_ms: 10_000,
                max_processes: 8,
                max_output_bytes: 4096,
            },
        };
        let out = self.run_resolved(&r, &job, CancellationToken::new()).await;
        match out.termination {
            Termination::Exited(0) => Ok(()),
            Termination::ExecutorError(e) => Err(e),
            other => Err(format!(
                "the sandbox self-test ended with {other:?}; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            )),
        }
    }

    fn spec(&self, r: &Resolved, job: &Job, run_dir: &Path) -> Spec {
        let secs = job.timeout.as_secs_f64().ceil() as u64;
        let cpu_secs = (job.limits.cpu_ms.div_ceil(1000)).min(secs.max(1));
        let memory = job.limits.memory_mb * 1024 * 1024;
        // With a cgroup, the cgroup is the memory limit: runtimes that reserve large
        // virtual ranges (JVM, Go, Node) must run. Without one, the address space is a
        // second line behind the watchdog: it bounds one process before the watchdog sees it.
        let address_space = match self.containment {
            Containment::Cgroup(_) => u64::MAX,
            Containment::Rlimit(_) => memory.saturating_mul(4),
        };
        // Likewise the cgroup's pids limit is the process limit of the tree; the rlimit
        // (per user, so shared by concurrent runs) is only a second line behind it.
        let nproc = match self.containment {
            Containment::Cgroup(_) => job.limits.max_processes.saturating_mul(2) + 8,
            Containment::Rlimit(_) => job.limits.max_processes,
        };
        Spec {
            parent_pid: std::process::id(),
            uid: self.uid,
            gid: self.gid,
            work_dir: run_dir.to_path_buf(),
            ro_dirs: self.ro_dirs.clone(),
            etc_files: self.etc_files.clone(),
            code_file: r.file.clone(),
            code: job.code.clone(),
            program: r.program.clone(),
            args: r.args.clone(),
            path: self.path.clone(),
            memory_bytes: address_space,
            max_processes: nproc,
            max_file_bytes: self.max_file_bytes,
            max_open_files: self.max_open_files,
            cpu_secs: cpu_secs + 1,
            tmp_bytes: self.tmp_bytes,
            backstop_secs: secs.max(1) + 2,
        }
    }

    /// The run's cgroup, with the helper (and so everything it starts) inside.
    fn contain(&self, job: &Job, pid: u32) -> Result<Option<RunCgroup>, String> {
        let Containment::Cgroup(c) = &self.containment else {
            return Ok(None);
        };
        let limits = CgroupLimits {
            memory_bytes: job.limits.memory_mb * 1024 * 1024,
            // The helper and the sandbox's init process are in the group too.
            max_processes: job.limits.max_processes + 2,
            cpus: self.cpus,
        };
        let name = format!("run-{}", uuid::Uuid::new_v4().simple());
        let g = c
            .create(&name, &limits)
            .map_err(|e| format!("cannot create the run's cgroup: {e}"))?;
        if let Err(e) = g.add(pid) {
            g.remove_now();
            return Err(format!("cannot move the run into its cgroup: {e}"));
        }
        Ok(Some(g))
    }

    async fn run_resolved(&self, r: &Resolved, job: &Job, cancel: CancellationToken) -> RunOutput {
        let started = Instant::now();
        // Each run builds its root in a directory of its own, removed here after the run
        // whatever happened: a helper killed at a timeout or a cancel cannot clean up.
        let run_dir = match RunDir::create(&self.work_dir, self.uid, self.gid) {
            Ok(d) => d,
            Err(e) => {
                self.note_error(&e);
                return RunOutput::executor_error(e, started.elapsed());
            }
        };
        let spec = match serde_json::to_vec(&self.spec(r, job, &run_dir.0)) {
            Ok(s) => s,
            Err(e) => return RunOutput::executor_error(format!("spec: {e}"), started.elapsed()),
        };
        let (mut child, spec_w, result_r) = match spawn_helper(&self.exe) {
            Ok(x) => x,
            Err(e) => {
                let msg = format!("cannot start the sandbox helper: {e}");
                self.note_error(&msg);
                return RunOutput::executor_error(msg, started.elapsed());
            }
        };
        let pid = child.id().unwrap_or(0);
        // The helper waits for its spec: nothing of the run starts before it is contained.
        let cgroup = match self.contain(job, pid) {
            Ok(g) => g,
            Err(msg) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                self.note_error(&msg);
                return RunOutput::executor_error(msg, started.elapsed());
            }
        };
        self.stats.runs.add(&[self.limits_mode()], 1);

        let spec_task = tokio::spawn(async move {
            if let Ok(mut w) = tokio::net::unix::pipe::Sender::from_owned_fd(spec_w) {
                let _ = w.write_all(&spec).await;
            }
        });
        let result_task = tokio::spawn(async move {
            match tokio::net::unix::pipe::Receiver::from_owned_fd(result_r) {
                Ok(r) => read_capped(r, 64 * 1024).await.0,
                Err(_) => Vec::new(),
            }
        });
        let stdin_bytes = job.stdin.clone().unwrap_or_default().into_bytes();
        let stdin_task = child.stdin.take().map(|mut w| {
            tokio::spawn(async move {
                let _ = w.write_all(&stdin_bytes).await;
                let _ = w.shutdown().await;
            })
        });
        let cap = job.limits.max_output_bytes as usize;
        let out_task = child
            .stdout
            .take()
            .map(|r| tokio::spawn(read_capped(r, cap)));
        let err_task = child
            .stderr
            .take()
            .map(|r| tokio::spawn(read_capped(r, cap)));

        let mut peak_sum = 0u64;
        let stop = tokio::select! {
            _ = child.wait() => None,
            _ = tokio::time::sleep(job.timeout) => Some(Stop::TimedOut),
            _ = cancel.cancelled() => Some(Stop::Cancelled),
            s = watch(cgroup.as_ref(), pid, job.limits, &mut peak_sum) => Some(s),
        };
        if stop.is_some() {
            // Killing the helper kills its child (PDEATHSIG) and with it PID 1 of the
            // sandbox's PID namespace, which takes every other process there down too;
            // the cgroup is killed whole as well.
            if let Some(g) = &cgroup {
                g.kill();
            }
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
        // Nothing of the run may outlive it.
        if let Some(g) = &cgroup {
            g.kill();
        }
        let duration = started.elapsed();
        spec_task.abort();
        if let Some(t) = stdin_task {
            t.abort();
        }
        let grace = Duration::from_secs(5);
        let (stdout, t1) = join_capped(out_task, grace).await;
        let (stderr, t2) = join_capped(err_task, grace).await;
        let result_bytes = tokio::time::timeout(grace, result_task)
            .await
            .ok()
            .and_then(|r| r.ok())
            .unwrap_or_default();
        let truncated = t1 || t2;
        let result: Option<HelperResult> = serde_json::from_slice(&result_bytes).ok();

        // What the kernel counted; then the group goes, in the background.
        let (usage, oom_killed) = match &cgroup {
            Some(g) => {
                let u = g.usage();
                (
                    Usage {
                        cpu_ms: u.cpu_usec.map(|us| us / 1000),
                        memory_peak_kb: u.memory_peak_bytes.map(|b| b / 1024),
                    },
                    u.oom_kills > 0,
                )
            }
            None => {
                let rss_kb = result.as_ref().map(|r| r.max_rss_kb).unwrap_or(0);
                let cpu = result.as_ref().map(|r| r.user_ms + r.sys_ms);
                (
                    Usage {
                        cpu_ms: cpu,
                        memory_peak_kb: Some(rss_kb.max(peak_sum / 1024)),
                    },
                    false,
                )
            }
        };
        if let Some(g) = cgroup {
            tokio::task::spawn_blocking(move || g.remove_now());
        }
        let memory_exceeded = oom_killed || matches!(stop, Some(Stop::Watchdog));
        if oom_killed {
            self.stats.oom_kills.fetch_add(1, Ordering::Relaxed);
        }
        let base = RunOutput {
            termination: Termination::ExecutorError(String::new()),
            stdout,
            stderr,
            truncated,
            duration,
            memory_exceeded,
            usage,
        };
        let termination = match stop {
            Some(Stop::TimedOut) => Termination::TimedOut,
            Some(Stop::Cancelled) => Termination::Cancelled,
            Some(Stop::CpuLimit) => {
                self.stats.cpu_kills.fetch_add(1, Ordering::Relaxed);
                Termination::CpuLimit
            }
            Some(Stop::Watchdog) => {
                self.stats.watchdog_kills.fetch_add(1, Ordering::Relaxed);
                Termination::Signaled(libc::SIGKILL)
            }
            None => match result {
                None if oom_killed => Termination::Signaled(libc::SIGKILL),
                None => {
                    let msg = "the sandbox helper ended without reporting a result".to_string();
                    self.note_error(&msg);
                    Termination::ExecutorError(msg)
                }
                Some(r) => match r.setup_error {
                    Some(e) => {
                        self.note_error(&e);
                        Termination::ExecutorError(e)
                    }
                    None => {
                        self.clear_error();
                        match (r.exit_code, r.signal) {
                            (Some(code), _) => Termination::Exited(code),
                            (None, Some(sig)) => Termination::Signaled(sig),
                            (None, None) => Termination::ExecutorError(r.reason.clone()),
                        }
                    }
                },
            },
        };
        RunOutput {
            termination,
            ..base
        }
    }

    fn note_error(&self, msg: &str) {
        tracing::warn!(error = %msg, "sandbox run failed");
        if let Ok(mut e) = self.last_error.lock() {
            *e = Some(msg.to_string());
        }
    }

    fn clear_error(&self) {
        if let Ok(mut e) = self.last_error.lock() {
            *e = None;
        }
    }
}

/// Completes when the run must be stopped for a limit only a watcher can enforce: the
/// tree's CPU time (from its cgroup) or, without a cgroup, the sum of its processes'
/// memory (the watchdog). Pending forever when there is nothing to watch.
async fn watch(cgroup: Option<&RunCgroup>, helper: u32, limits: RunLimits, peak: &mut u64) -> Stop {
    let memory = limits.memory_mb * 1024 * 1024;
    loop {
        tokio::time::sleep(WATCH_EVERY).await;
        match cgroup {
            Some(g) => {
                let used_us = g.usage().cpu_usec.unwrap_or(0);
                if used_us > limits.cpu_ms * 1000 {
                    return Stop::CpuLimit;
                }
            }
            None => {
                let rss = tree_rss_bytes(helper);
                *peak = (*peak).max(rss);
                if rss > memory {
                    return Stop::Watchdog;
                }
            }
        }
    }
}

/// Resident memory of `root` and all its descendants (their RSS summed: shared pages
/// count more than once, so this errs on the safe side).
fn tree_rss_bytes(root: u32) -> u64 {
    let page = 4096u64;
    let mut total = 0;
    let mut stack = vec![root];
    let mut seen = 0;
    while let Some(pid) = stack.pop() {
        seen += 1;
        if seen > 100_000 {
            break;
        }
        if let Ok(statm) = std::fs::read_to_string(format!("/proc/{pid}/statm")) {
            if let Some(rss) = statm
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
            {
                total += rss * page;
            }
        }
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            if let Ok(children) = std::fs::read_to_string(t.path().join("children")) {
                stack.extend(
                    children
                        .split_whitespace()
                        .filter_map(|c| c.parse::<u32>().ok()),
                );
            }
        }
    }
    total
}

impl Executor for SandboxExecutor {
    fn name(&self) -> &'static str {
        "sandbox"
    }

    fn language_state(&self, language: &str) -> LanguageState {
        if self.languages.contains_key(language) {
            LanguageState::Available
        } else if let Some(why) = self.unavailable.get(language) {
            LanguageState::Unavailable(why.clone())
        } else {
            LanguageState::Unknown
        }
    }

    fn run<'a>(&'a self, job: &'a Job, cancel: CancellationToken) -> BoxFuture<'a, RunOutput> {
        Box::pin(async move {
            match self.languages.get(&job.language) {
                Some(r) => self.run_resolved(r, job, cancel).await,
                None => RunOutput::executor_error(
                    self.unavailable
                        .get(&job.language)
                        .cloned()
                        .unwrap_or_else(|| format!("unknown language `{}`", job.language)),
                    Duration::ZERO,
                ),
            }
        })
    }

    fn health(&self) -> BoxFuture<'_, ExecutorHealth> {
        Box::pin(async move {
            let last = self.last_error.lock().ok().and_then(|e| e.clone());
            let mut languages = BTreeMap::new();
            for name in self.languages.keys() {
                languages.insert(name.clone(), "available".to_string());
            }
            for (name, why) in &self.unavailable {
                languages.insert(name.clone(), why.clone());
            }
            ExecutorHealth {
                backend: "sandbox",
                ok: last.is_none(),
                detail: last.unwrap_or_else(|| "ready".into()),
                languages,
                limits: self.limits_mode(),
                limits_reason: match &self.containment {
                    Containment::Rlimit(why) => Some(why.clone()),
                    Containment::Cgroup(_) => None,
                },
            }
        })
    }

    fn metrics(&self, e: &mut Exposition) {
        e.labeled(
            "crucible_sandbox_runs_total",
            "Sandbox runs by how their limits applied (cgroup2, cgroup1, rlimit).",
            &["limits"],
            &self.stats.runs,
        );
        e.counter(
            "crucible_oom_kills_total",
            "Runs in which the kernel OOM-killed a process of the run's cgroup.",
            self.stats.oom_kills.load(Ordering::Relaxed),
        );
        e.counter(
            "crucible_sandbox_watchdog_kills_total",
            "Runs the memory watchdog killed (hosts without a cgroup for the runs).",
            self.stats.watchdog_kills.load(Ordering::Relaxed),
        );
        e.counter(
            "crucible_cpu_limit_kills_total",
            "Runs killed for using up their CPU time (limits.cpu_ms).",
            self.stats.cpu_kills.load(Ordering::Relaxed),
        );
    }
}

async fn join_capped(
    task: Option<tokio::task::JoinHandle<(Vec<u8>, bool)>>,
    grace: Duration,
) -> (Vec<u8>, bool) {
    match task {
        Some(t) => tokio::time::timeout(grace, t)
            .await
            .ok()
            .and_then(|r| r.ok())
            .unwrap_or_default(),
        None => (Vec::new(), false),
    }
}

type Spawned = (tokio::process::Child, OwnedFd, OwnedFd);

/// Start `crucible __sandbox` with the spec pipe on fd 3 and the result pipe on fd 4.
fn spawn_helper(exe: &Path) -> std::io::Result<Spawned> {
    let (spec_r, spec_w) = pipe_cloexec()?;
    let (result_r, result_w) = pipe_cloexec()?;
    let spec_fd = spec_r.as_raw_fd();
    let result_fd = result_w.as_raw_fd();
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg("__sandbox")
        .env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // SAFETY: only async-signal-safe calls (fcntl, dup2) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // Move both ends above 10 first so the dup2s below cannot clobber each other.
            let a = libc::fcntl(spec_fd, libc::F_DUPFD, 10);
            let b = libc::fcntl(result_fd, libc::F_DUPFD, 10);
            if a < 0 || b < 0 || libc::dup2(a, 3) < 0 || libc::dup2(b, 4) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::close(a);
            libc::close(b);
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    drop(spec_r);
    drop(result_w);
    Ok((child, spec_w, result_r))
}

fn pipe_cloexec() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid two-element array.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pipe2 just returned these two fresh descriptors.
    use std::os::fd::FromRawFd;
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Find `program` on the sandbox PATH, inside a directory the sandbox can see.
fn resolve_program(program: &str, path: &str, ro_dirs: &[String]) -> Option<String> {
    let visible = |p: &Path| {
        ro_dirs
            .iter()
            .any(|d| p.starts_with(d) || Path::new(d).is_symlink() && p.starts_with(d))
    };
    let is_exec = |p: &Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p)
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if program.starts_with('/') {
        let p = Path::new(program);
        return (visible(p) && is_exec(p)).then(|| program.to_string());
    }
    if program.contains('/') {
        return None;
    }
    path.split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(program))
        .find(|p| visible(p) && is_exec(p))
        .map(|p| p.to_string_lossy().to_string())
}

/// A run's own directory under the work dir (the helper builds the sandbox root in it),
/// removed when dropped, in the background.
struct RunDir(PathBuf);

impl RunDir {
    fn create(work_dir: &Path, uid: u32, gid: u32) -> Result<RunDir, String> {
        use std::os::unix::fs::DirBuilderExt;
        let dir = work_dir.join(format!("run-{}", uuid::Uuid::new_v4().simple()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            if let Err(e) = std::os::unix::fs::chown(&dir, Some(uid), Some(gid)) {
                let _ = std::fs::remove_dir(&dir);
                return Err(format!("cannot hand {} to uid {uid}: {e}", dir.display()));
            }
        }
        Ok(RunDir(dir))
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        // remove_dir_all does not follow symlinks placed in the tree.
        let dir = std::mem::take(&mut self.0);
        let remove = move || {
            let _ = std::fs::remove_dir_all(&dir);
        };
        match tokio::runtime::Handle::try_current() {
            Ok(h) => drop(h.spawn_blocking(remove)),
            Err(_) => remove(),
        }
    }
}

/// Create the work directory, owned by the sandbox user when we are root, and remove
/// anything a crashed run left behind.
fn prepare_work_dir(dir: &Path, uid: u32, gid: u32) -> Result<(), String> {
    if let Ok(meta) = std::fs::symlink_metadata(dir) {
        if meta.file_type().is_symlink() || !meta.is_dir() {
            return Err(format!(
                "sandbox work dir {} exists and is not a directory",
                dir.display()
            ));
        }
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                let p = e.path();
                let _ = if p.is_dir() && !p.is_symlink() {
                    std::fs::remove_dir_all(&p)
                } else {
                    std::fs::remove_file(&p)
                };
            }
        }
    } else {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create sandbox work dir {}: {e}", dir.display()))?;
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| format!("cannot set permissions on {}: {e}", dir.display()))?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        std::os::unix::fs::chown(dir, Some(uid), Some(gid))
            .map_err(|e| format!("cannot hand {} to uid {uid}: {e}", dir.display()))?;
    }
    Ok(())
}

/// The default work directory: inside the data dir, except when running as root, where
/// the unprivileged sandbox user may not be able to traverse the data dir; then a
/// per-node directory under the system temp dir.
pub fn default_work_dir(cfg: &Config, node: &str) -> PathBuf {
    if let Some(d) = &cfg.sandbox.work_dir {
        return d.clone();
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        std::env::temp_dir().join(format!("crucible-sandbox-{node}"))
    } else {
        cfg.sandbox_work_dir()
    }
}
