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

mod session;

use super::cgroup::{CgroupLimits, Cgroups, RunCgroup};
use super::helper::{Assignment, HelperResult, Spec, BUILD_DIR, CODE_DIR};
use super::{
    build, read_capped, BoxFuture, CompileJob, CompileOutput, Executor, ExecutorHealth, Job,
    LanguageInfo, LanguageState, RunOutput, Termination, Usage,
};
use crate::config::Config;
use crate::model::RunLimits;
use crate::ops::metrics::{Exposition, LabeledCounter};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
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

/// A language as this host runs it.
#[derive(Debug, Clone)]
struct Lang {
    /// The main file's name.
    file: String,
    run: Vec<String>,
    compile: Option<Vec<String>>,
    version: Option<Vec<String>>,
    env: Vec<String>,
    limits: RunLimits,
    /// The toolchain's version, asked of it in the background after start.
    known_version: Arc<Mutex<Option<String>>>,
}

/// One run of the helper: the command (placeholders expanded), what /code and /build
/// hold, and its limits.
struct SandboxRun<'a> {
    argv: Vec<String>,
    env: Vec<String>,
    files: Vec<(String, String)>,
    build_ro: Option<PathBuf>,
    compile_build_bytes: Option<u64>,
    stdin: Option<&'a str>,
    timeout: Duration,
    limits: RunLimits,
    tmp_bytes: u64,
    /// May take a pooled sandbox (an evaluation's run; not a compile step, the self-test
    /// or a toolchain's version, which get one made for them and leave the pool to
    /// evaluations).
    pooled: bool,
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
    /// Runs by how their sandbox was had (`pool`: prepared ahead; `cold`: made for it).
    pub sandboxes: LabeledCounter,
    /// Pooled sandboxes found dead when taken, or that could not be given their run.
    pub pool_discarded: AtomicU64,
}

/// A sandbox prepared ahead (see [`Spec::pooled`]): its helper waits, inside its cgroup,
/// for a run on stdin. Used once.
struct Warm {
    child: tokio::process::Child,
    cgroup: Option<RunCgroup>,
    run_dir: RunDir,
    result_r: OwnedFd,
    /// Its stdin: the control socket its first process reads its run from (until given).
    control: Option<UnixStream>,
    name: String,
}

impl Warm {
    /// Kill it and remove its cgroup and directory, now.
    async fn discard(mut self) {
        if let Some(g) = &self.cgroup {
            g.kill();
        }
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
        let cgroup = self.cgroup.take();
        let dir = std::mem::take(&mut self.run_dir.path);
        let _ = tokio::task::spawn_blocking(move || {
            if let Some(g) = cgroup {
                g.remove_now();
            }
            let _ = std::fs::remove_dir_all(&dir);
        })
        .await;
    }
}

/// The sandboxes prepared ahead, and the task that keeps them there.
struct Pool {
    size: usize,
    ready: Mutex<Vec<Warm>>,
    /// Wakes the refill task (a sandbox was taken and its program released: preparing
    /// the next one then does not delay this one's start).
    wake: Arc<tokio::sync::Notify>,
    stop: CancellationToken,
    /// The refill's last failure (it retries every second).
    last_error: Mutex<Option<String>>,
    /// The background tasks (the refill, the toolchain versions), awaited at shutdown.
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

/// A run's helper, started (cold) or taken from the pool and given its run.
struct Launched {
    child: tokio::process::Child,
    cgroup: Option<RunCgroup>,
    /// Removed when the run ends (dropped with this).
    _run_dir: RunDir,
    result_r: OwnedFd,
    /// The spec still to write on fd 3 (cold).
    spec: Option<(OwnedFd, Vec<u8>)>,
    /// Pooled: the control socket, the assignment frame to send on it (then the pool is
    /// refilled) and the read end of the program's stdin pipe to pass along it (none when
    /// it serves tests).
    control: Option<(UnixStream, Vec<u8>, Option<OwnedFd>)>,
    /// The write end of the program's stdin pipe (pooled; else the helper's stdin).
    stdin_w: Option<OwnedFd>,
    /// The program's stdin.
    input: Vec<u8>,
    /// CPU time (µs) its cgroup had used before the run (a pooled sandbox's setup).
    cpu_base: u64,
    pooled: bool,
}

/// The sandbox executor.
pub struct SandboxExecutor {
    exe: PathBuf,
    languages: HashMap<String, Lang>,
    unavailable: HashMap<String, String>,
    work_dir: PathBuf,
    uid: u32,
    gid: u32,
    ro_dirs: Vec<String>,
    etc_files: Vec<String>,
    path: String,
    containment: Containment,
    cpus: f64,
    seccomp: bool,
    judge: crate::config::JudgeConfig,
    max_file_bytes: u64,
    max_open_files: u64,
    tmp_bytes: u64,
    last_error: Mutex<Option<String>>,
    pub stats: SandboxStats,
    pool: Pool,
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
            // Compiled languages need their compiler here; the program they run may be
            // the compiled one, in /build.
            let needed = match &lang.compile {
                Some(c) => vec![c[0].as_str()],
                None => vec![],
            }
            .into_iter()
            .chain(std::iter::once(lang.run[0].as_str()))
            .filter(|p| !p.starts_with("/build/"))
            .find(|p| resolve_program(p, &cfg.sandbox.path, &cfg.sandbox.ro_dirs).is_none());
            match needed {
                None => {
                    languages.insert(
                        name.clone(),
                        Lang {
                            file: lang.file.clone(),
                            run: lang.run.clone(),
                            compile: lang.compile.clone(),
                            version: lang.version.clone(),
                            env: lang.env.clone(),
                            limits: cfg.max_limits(name),
                            known_version: Arc::new(Mutex::new(None)),
                        },
                    );
                }
                Some(missing) => {
                    let pkg = lang
                        .package
                        .as_deref()
                        .map(|p| format!(" (Debian package `{p}`)"))
                        .unwrap_or_default();
                    unavailable.insert(
                        name.clone(),
                        format!(
                            "language `{name}` needs `{missing}`, which is not installed on this host{pkg}"
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
            seccomp: cfg.sandbox.seccomp,
            judge: cfg.judge.clone(),
            max_file_bytes: l.max_file_mb * 1024 * 1024,
            max_open_files: l.max_open_files,
            tmp_bytes: l.tmp_mb * 1024 * 1024,
            last_error: Mutex::new(None),
            stats: SandboxStats::default(),
            pool: Pool {
                size: cfg.sandbox.pool.unwrap_or(cfg.workers),
                ready: Mutex::new(Vec::new()),
                wake: Arc::new(tokio::sync::Notify::new()),
                stop: CancellationToken::new(),
                last_error: Mutex::new(None),
                tasks: Mutex::new(Vec::new()),
            },
        })
    }

    /// Start the background work (until [`Executor::shutdown`]): ask each toolchain for
    /// its version, once (`/api/languages`), and keep `[sandbox] pool` sandboxes prepared.
    pub fn start_background(self: &Arc<Self>) {
        let me = self.clone();
        let probe = tokio::spawn(async move { me.probe_versions().await });
        if let Ok(mut t) = self.pool.tasks.lock() {
            t.push(probe);
        }
        if self.pool.size == 0 {
            return;
        }
        let me = self.clone();
        let task = tokio::spawn(async move {
            // Several at once (one per core): a sandbox is mostly the kernel's work in its
            // own process, and a run of many short tests (a judged program) takes them
            // faster than one at a time can make them.
            let parallel = std::thread::available_parallelism().map_or(1, |n| n.get());
            loop {
                loop {
                    let missing = me.pool.size.saturating_sub(me.pool_len());
                    if missing == 0 || me.pool.stop.is_cancelled() {
                        break;
                    }
                    let made = futures_util::future::join_all(
                        (0..missing.min(parallel)).map(|_| me.prepare_warm()),
                    )
                    .await;
                    let mut failed = None;
                    for r in made {
                        match r {
                            Ok(w) if me.pool.stop.is_cancelled() => w.discard().await,
                            Ok(w) => {
                                if let Ok(mut ready) = me.pool.ready.lock() {
                                    ready.push(w);
                                }
                            }
                            Err(e) => failed = Some(e),
                        }
                    }
                    if let Ok(mut last) = me.pool.last_error.lock() {
                        *last = failed.clone();
                    }
                    if let Some(e) = failed {
                        tracing::warn!(error = %e, "cannot prepare a pooled sandbox; retrying in 1 s");
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                            _ = me.pool.stop.cancelled() => {}
                        }
                    }
                }
                tokio::select! {
                    _ = me.pool.wake.notified() => {}
                    _ = me.pool.stop.cancelled() => break,
                }
            }
        });
        if let Ok(mut t) = self.pool.tasks.lock() {
            t.push(task);
        }
    }

    /// The runs' cgroups, when runs get one.
    fn cgroups(&self) -> Option<Arc<Cgroups>> {
        match &self.containment {
            Containment::Cgroup(c) => Some(c.clone()),
            Containment::Rlimit(_) => None,
        }
    }

    /// A new run's name and its own directory (its sandbox root is made inside, and it
    /// goes when the run ends, however it ends: the guard removes it).
    fn new_run_dir(&self) -> Result<(String, RunDir), String> {
        let name = format!("run-{}", uuid::Uuid::new_v4().simple());
        let dir = RunDir::create(&self.work_dir, &name, self.uid, self.gid)?;
        Ok((name, dir))
    }

    fn pool_len(&self) -> usize {
        self.pool.ready.lock().map(|r| r.len()).unwrap_or(0)
    }

    /// Prepare one pooled sandbox: its directory, its helper in its own cgroup (with small
    /// limits until it gets its run), its spec sent.
    async fn prepare_warm(&self) -> Result<Warm, String> {
        let (name, run_dir) = self.new_run_dir()?;
        let idle = SandboxRun {
            argv: vec![String::new()],
            env: Vec::new(),
            files: Vec::new(),
            build_ro: None,
            compile_build_bytes: None,
            stdin: None,
            timeout: Duration::from_secs(1),
            limits: POOL_IDLE_LIMITS,
            tmp_bytes: self.tmp_bytes,
            pooled: false,
        };
        let mut spec = self.spec(&idle, &run_dir.path);
        spec.pooled = true;
        let spec = serde_json::to_vec(&spec).map_err(|e| format!("spec: {e}"))?;
        let (mut child, spec_w, result_r, control) = spawn_helper(&self.exe, true)
            .map_err(|e| format!("cannot start the sandbox helper: {e}"))?;
        let control = control.ok_or("the sandbox helper has no control socket")?;
        let pid = child.id().unwrap_or(0);
        // Moving a process into a cgroup waits for the kernel (an RCU grace period on
        // cgroup v1): done here, ahead of the run, on a blocking thread.
        let cgroups = self.cgroups();
        let cpus = self.cpus;
        let group = name.clone();
        let contained = tokio::task::spawn_blocking(move || -> Result<_, String> {
            let g = match cgroups {
                Some(c) => Some(contain_in(&c, &POOL_IDLE_LIMITS, cpus, pid, &group)?),
                None => None,
            };
            // A small spec on a fresh pipe: it fits its buffer, the write does not block.
            let mut w = std::fs::File::from(spec_w);
            if let Err(e) = w.write_all(&spec) {
                if let Some(g) = &g {
                    g.remove_now();
                }
                return Err(format!("cannot send the sandbox its spec: {e}"));
            }
            Ok(g)
        })
        .await
        .map_err(|e| format!("pool: {e}"));
        match contained.and_then(|r| r) {
            Ok(cgroup) => Ok(Warm {
                child,
                cgroup,
                run_dir,
                result_r,
                control: Some(control),
                name,
            }),
            Err(e) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                Err(e)
            }
        }
    }

    /// A ready pooled sandbox, if there is one (dead ones are discarded). The refill is
    /// woken once its program has been released (see `run_sandbox`).
    async fn take_warm(&self) -> Option<Warm> {
        if self.pool.size == 0 {
            return None;
        }
        loop {
            let mut w = self.pool.ready.lock().ok()?.pop()?;
            match w.child.try_wait() {
                Ok(None) => return Some(w),
                _ => {
                    self.stats.pool_discarded.fetch_add(1, Ordering::Relaxed);
                    w.discard().await;
                }
            }
        }
    }

    /// Give a pooled sandbox its run: the run's limits on its cgroup, then its files,
    /// build and limits as the frame to send on its control socket (with the program's
    /// stdin pipe; or, to `serve` tests, without).
    fn assign(
        &self,
        mut w: Warm,
        run: &SandboxRun<'_>,
        serve: bool,
    ) -> Result<Launched, Box<(Warm, String)>> {
        let spec = self.spec(run, &w.run_dir.path);
        let (tar, build_bytes) = match &run.build_ro {
            Some(dir) => {
                let max = self.judge.build_mb * 1024 * 1024;
                match build::archive(dir, max) {
                    Ok(t) => (t, max),
                    Err(e) => return Err(Box::new((w, format!("cannot read the build: {e}")))),
                }
            }
            None => (Vec::new(), 0),
        };
        let assignment = Assignment {
            files: spec.files,
            program: spec.program,
            args: spec.args,
            env: super::helper::program_env(&spec.path, &spec.env),
            build_bytes,
            memory_bytes: spec.memory_bytes,
            max_processes: spec.max_processes,
            max_file_bytes: spec.max_file_bytes,
            max_open_files: spec.max_open_files,
            cpu_secs: spec.cpu_secs,
            serve,
            tmp_bytes: run.tmp_bytes,
        };
        let frame = match super::helper::assignment_frame(&assignment, &tar) {
            Ok(f) => f,
            Err(e) => return Err(Box::new((w, e))),
        };
        let (stdin_r, stdin_w) = match serve {
            true => (None, None),
            false => match pipe_cloexec() {
                Ok((r, w)) => (Some(r), Some(w)),
                Err(e) => return Err(Box::new((w, format!("cannot make a stdin pipe: {e}")))),
            },
        };
        let mut cpu_base = 0;
        if let Some(g) = &w.cgroup {
            if let Err(e) = g.set_limits(&self.cgroup_limits(&run.limits)) {
                return Err(Box::new((
                    w,
                    format!("cannot set the run's limits on its cgroup: {e}"),
                )));
            }
            cpu_base = g.begin().cpu_usec.unwrap_or(0);
        }
        tracing::debug!(run = %w.name, "pooled sandbox assigned");
        let Some(control) = w.control.take() else {
            return Err(Box::new((w, "the sandbox was given a run already".into())));
        };
        let Warm {
            child,
            cgroup,
            run_dir,
            result_r,
            ..
        } = w;
        Ok(Launched {
            child,
            cgroup,
            _run_dir: run_dir,
            result_r,
            spec: None,
            control: Some((control, frame, stdin_r)),
            stdin_w,
            input: run.stdin.unwrap_or_default().as_bytes().to_vec(),
            cpu_base,
            pooled: true,
        })
    }

    /// Start a helper for this run alone, in a new cgroup.
    fn launch_cold(&self, run: &SandboxRun<'_>) -> Result<Launched, String> {
        let (name, run_dir) = self.new_run_dir()?;
        let spec =
            serde_json::to_vec(&self.spec(run, &run_dir.path)).map_err(|e| format!("spec: {e}"))?;
        let (mut child, spec_w, result_r, _) = spawn_helper(&self.exe, false)
            .map_err(|e| format!("cannot start the sandbox helper: {e}"))?;
        let pid = child.id().unwrap_or(0);
        // The helper waits for its spec: nothing of the run starts before it is contained.
        let cgroup = match self.contain(&run.limits, pid, &name) {
            Ok(g) => g,
            Err(msg) => {
                let _ = child.start_kill();
                return Err(msg);
            }
        };
        Ok(Launched {
            child,
            cgroup,
            _run_dir: run_dir,
            result_r,
            spec: Some((spec_w, spec)),
            control: None,
            stdin_w: None,
            input: run.stdin.unwrap_or_default().as_bytes().to_vec(),
            cpu_base: 0,
            pooled: false,
        })
    }

    /// At shutdown, after the last run: drain the pool (every prepared sandbox is killed
    /// and removed), then remove whatever runs left that is still being removed in the
    /// background (their cgroups and directories) and the work dir, so that a clean stop
    /// leaves nothing.
    async fn drain_pool(&self) {
        self.pool.stop.cancel();
        for t in take_all(&self.pool.tasks) {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
        for w in take_all(&self.pool.ready) {
            w.discard().await;
        }
        let cgroups = self.cgroups();
        let work_dir = self.work_dir.clone();
        let _ = tokio::task::spawn_blocking(move || {
            if let Some(c) = cgroups {
                c.reap();
            }
            clear_dir(&work_dir);
            // The directory itself too (the next start makes it again): in a shared
            // tmpfs (/dev/shm) every data dir's node would otherwise leave one behind.
            let _ = std::fs::remove_dir(&work_dir);
        })
        .await;
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
        let mut argv = vec![program];
        argv.extend(args);
        let run = SandboxRun {
            argv,
            env: Vec::new(),
            files: Vec::new(),
            build_ro: None,
            compile_build_bytes: None,
            stdin: None,
            timeout: Duration::from_secs(30),
            limits: RunLimits {
                memory_mb: 64,
                cpu_ms: 10_000,
                max_processes: 8,
                max_output_bytes: 4096,
            },
            tmp_bytes: self.tmp_bytes,
            pooled: false,
        };
        let out = self
            .run_sandbox(run, "self-test", CancellationToken::new())
            .await;
        match out.termination {
            Termination::Exited(0) => Ok(()),
            Termination::ExecutorError(e) => Err(e),
            other => Err(format!(
                "the sandbox self-test ended with {other:?}; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            )),
        }
    }

    fn spec(&self, run: &SandboxRun<'_>, run_dir: &Path) -> Spec {
        let secs = run.timeout.as_secs_f64().ceil() as u64;
        let memory = run.limits.memory_mb * 1024 * 1024;
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
            Containment::Cgroup(_) => run.limits.max_processes.saturating_mul(2) + 8,
            Containment::Rlimit(_) => run.limits.max_processes,
        };
        Spec {
            parent_pid: std::process::id(),
            uid: self.uid,
            gid: self.gid,
            work_dir: run_dir.to_path_buf(),
            seccomp: self.seccomp,
            ro_dirs: self.ro_dirs.clone(),
            etc_files: self.etc_files.clone(),
            files: run.files.clone(),
            program: run.argv[0].clone(),
            args: run.argv[1..].to_vec(),
            path: self.path.clone(),
            env: run.env.clone(),
            build_ro: run.build_ro.clone(),
            compile_build_bytes: run.compile_build_bytes,
            output_cap: run.limits.max_output_bytes,
            memory_bytes: address_space,
            max_processes: nproc,
            max_file_bytes: self.max_file_bytes,
            max_open_files: self.max_open_files,
            cpu_secs: rlimit_cpu_secs(&run.limits, run.timeout),
            tmp_bytes: run.tmp_bytes,
            backstop_secs: secs.max(1) + 2,
            pooled: false,
        }
    }

    /// The command of a run or compile step: placeholders expanded, the program
    /// resolved on this host (a program in /build stays as it is).
    fn command(
        &self,
        template: &[String],
        lang: &Lang,
        files: &[(String, String)],
        memory_mb: u64,
    ) -> Result<Vec<String>, String> {
        let ext = Path::new(&lang.file).extension();
        let mut argv = Vec::new();
        for a in template {
            if a == "{sources}" {
                argv.extend(
                    files
                        .iter()
                        .filter(|(n, _)| Path::new(n).extension() == ext)
                        .map(|(n, _)| format!("{CODE_DIR}/{n}")),
                );
                continue;
            }
            argv.push(
                a.replace("{file}", &format!("{CODE_DIR}/{}", lang.file))
                    .replace("{memory_mb}", &memory_mb.to_string()),
            );
        }
        let Some(first) = argv.first().cloned() else {
            return Err("the language has an empty command".into());
        };
        if !first.starts_with(BUILD_DIR) {
            argv[0] = resolve_program(&first, &self.path, &self.ro_dirs)
                .ok_or_else(|| format!("`{first}` is not installed on this host"))?;
        }
        Ok(argv)
    }

    fn job_files(
        lang: &Lang,
        code: &str,
        files: &[crate::model::SourceFile],
    ) -> Vec<(String, String)> {
        std::iter::once((lang.file.clone(), code.to_string()))
            .chain(files.iter().map(|f| (f.name.clone(), f.content.clone())))
            .collect()
    }

    /// The caps of a run's cgroup.
    fn cgroup_limits(&self, limits: &RunLimits) -> CgroupLimits {
        cgroup_limits(limits, self.cpus)
    }

    /// The run's cgroup, with the helper (and so everything it starts) inside.
    fn contain(
        &self,
        limits: &RunLimits,
        pid: u32,
        name: &str,
    ) -> Result<Option<RunCgroup>, String> {
        let Some(c) = self.cgroups() else {
            return Ok(None);
        };
        contain_in(&c, limits, self.cpus, pid, name).map(Some)
    }

    async fn run_sandbox(
        &self,
        run: SandboxRun<'_>,
        eval_id: &str,
        cancel: CancellationToken,
    ) -> RunOutput {
        let started = Instant::now();
        // An evaluation's run takes a pooled sandbox when one is ready; a compile step's
        // sandbox differs (a writable /build, its own /tmp size) and is made for it.
        let warm = match run.pooled {
            true => self.take_warm().await,
            false => None,
        };
        let launched = match warm.map(|w| self.assign(w, &run, false)) {
            Some(Ok(l)) => Ok(l),
            Some(Err(failed)) => {
                let (w, e) = *failed;
                tracing::warn!(error = %e, "a pooled sandbox could not take its run; making one");
                self.stats.pool_discarded.fetch_add(1, Ordering::Relaxed);
                w.discard().await;
                self.launch_cold(&run)
            }
            None => self.launch_cold(&run),
        };
        let Launched {
            mut child,
            cgroup,
            _run_dir,
            result_r,
            spec,
            control,
            stdin_w,
            input,
            cpu_base,
            pooled,
        } = match launched {
            Ok(l) => l,
            Err(msg) => {
                self.note_error(&msg);
                return RunOutput::executor_error(msg, started.elapsed());
            }
        };
        tracing::debug!(eval_id, pooled, "sandbox run");
        let pid = child.id().unwrap_or(0);
        self.stats.runs.add(&[self.limits_mode()], 1);
        self.stats
            .sandboxes
            .add(&[if pooled { "pool" } else { "cold" }], 1);

        let spec_task = tokio::spawn(async move {
            if let Some((spec_w, spec)) = spec {
                if let Ok(mut w) = tokio::net::unix::pipe::Sender::from_owned_fd(spec_w) {
                    let _ = w.write_all(&spec).await;
                }
            }
        });
        let result_task = tokio::spawn(async move {
            match tokio::net::unix::pipe::Receiver::from_owned_fd(result_r) {
                Ok(r) => read_capped(r, 64 * 1024).await.0,
                Err(_) => Vec::new(),
            }
        });
        let wake = self.pool.wake.clone();
        let stdin_task = match (control, stdin_w) {
            (Some((control, frame, stdin_r)), Some(stdin_w)) => Some(tokio::spawn(async move {
                let fds: Vec<_> = stdin_r.iter().map(|f| f.as_raw_fd()).collect();
                let sent = session::send_frame(control, &frame, &fds).await;
                drop(stdin_r);
                wake.notify_one();
                if sent.is_ok() {
                    if let Ok(mut w) = tokio::net::unix::pipe::Sender::from_owned_fd(stdin_w) {
                        let _ = w.write_all(&input).await;
                    }
                }
            })),
            _ => child.stdin.take().map(|mut w| {
                tokio::spawn(async move {
                    let _ = w.write_all(&input).await;
                    let _ = w.shutdown().await;
                })
            }),
        };
        // A compile step's stdout is its frame: the compiler's output and the build.
        let cap = match run.compile_build_bytes {
            Some(b) => (b + 2 * run.limits.max_output_bytes + 4096) as usize,
            None => run.limits.max_output_bytes as usize,
        };
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
            _ = tokio::time::sleep(run.timeout) => Some(Stop::TimedOut),
            _ = cancel.cancelled() => Some(Stop::Cancelled),
            s = watch(cgroup.as_ref(), pid, run.limits, cpu_base, &mut peak_sum) => Some(s),
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
                        cpu_ms: u.cpu_usec.map(|us| us.saturating_sub(cpu_base) / 1000),
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
            stdout_truncated: t1,
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

    /// An evaluation's run of `job`: its language's command with its files, build, stdin
    /// and limits, in a pooled sandbox when one is ready.
    fn job_run<'j>(&self, job: &'j Job) -> Result<SandboxRun<'j>, String> {
        let lang = self
            .languages
            .get(&job.language)
            .ok_or_else(|| self.why_not(&job.language))?;
        let files = Self::job_files(lang, &job.code, &job.files);
        let mut argv = self.command(&lang.run, lang, &files, job.limits.memory_mb)?;
        argv.extend(job.args.iter().cloned());
        Ok(SandboxRun {
            argv,
            env: lang.env.clone(),
            files,
            build_ro: job.artifact.clone(),
            compile_build_bytes: None,
            stdin: job.stdin.as_deref(),
            timeout: job.timeout,
            limits: job.limits,
            tmp_bytes: self.tmp_bytes,
            pooled: true,
        })
    }

    fn why_not(&self, language: &str) -> String {
        self.unavailable
            .get(language)
            .cloned()
            .unwrap_or_else(|| format!("unknown language `{language}`"))
    }

    /// Ask each language's toolchain for its version, once (`/api/languages`).
    async fn probe_versions(&self) {
        for (name, lang) in &self.languages {
            if self.pool.stop.is_cancelled() {
                return;
            }
            let Some(cmd) = &lang.version else { continue };
            let argv = match self.command(cmd, lang, &[], lang.limits.memory_mb) {
                Ok(a) => a,
                Err(_) => continue,
            };
            let run = SandboxRun {
                argv,
                env: lang.env.clone(),
                files: Vec::new(),
                build_ro: None,
                compile_build_bytes: None,
                stdin: None,
                timeout: Duration::from_secs(30),
                limits: lang.limits,
                tmp_bytes: self.tmp_bytes,
                pooled: false,
            };
            let out = self
                .run_sandbox(run, "version", self.pool.stop.clone())
                .await;
            // Some print it to stderr (java -version).
            let text = [out.stdout, out.stderr]
                .iter()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .flat_map(|t| t.lines().map(|l| l.trim().to_string()).collect::<Vec<_>>())
                .find(|l| !l.is_empty());
            tracing::debug!(language = %name, version = ?text, "toolchain version");
            if let Ok(mut v) = lang.known_version.lock() {
                *v = text;
            }
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
async fn watch(
    cgroup: Option<&RunCgroup>,
    helper: u32,
    limits: RunLimits,
    cpu_base: u64,
    peak: &mut u64,
) -> Stop {
    let memory = limits.memory_mb * 1024 * 1024;
    loop {
        tokio::time::sleep(WATCH_EVERY).await;
        match cgroup {
            Some(g) => {
                let used_us = g.usage().cpu_usec.unwrap_or(0).saturating_sub(cpu_base);
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
            match self.job_run(job) {
                Ok(run) => self.run_sandbox(run, &job.eval_id, cancel).await,
                Err(e) => RunOutput::executor_error(e, Duration::ZERO),
            }
        })
    }

    fn runs<'a>(&'a self, job: &Job) -> Option<Box<dyn super::Runs + 'a>> {
        // Serving tests needs the run's cgroup (each test's usage is a delta of it, and a
        // test is killed by killing it); without one, each test is a fresh run.
        match self.containment {
            Containment::Cgroup(_) => Some(Box::new(session::SessionRuns::new(self, job.clone()))),
            Containment::Rlimit(_) => None,
        }
    }

    fn compile<'a>(
        &'a self,
        job: &'a CompileJob,
        cancel: CancellationToken,
    ) -> BoxFuture<'a, CompileOutput> {
        Box::pin(async move {
            let fail = |e: String| CompileOutput {
                run: RunOutput::executor_error(e, Duration::ZERO),
                build: None,
            };
            let Some(lang) = self.languages.get(&job.language) else {
                return fail(self.why_not(&job.language));
            };
            let Some(template) = &lang.compile else {
                return fail(format!("`{}` is not a compiled language", job.language));
            };
            let files = Self::job_files(lang, &job.code, &job.files);
            let argv = match self.command(template, lang, &files, job.limits.memory_mb) {
                Ok(a) => a,
                Err(e) => return fail(e),
            };
            let run = SandboxRun {
                argv,
                env: lang.env.clone(),
                files,
                build_ro: None,
                compile_build_bytes: Some(self.judge.build_mb * 1024 * 1024),
                stdin: None,
                timeout: job.timeout,
                limits: job.limits,
                tmp_bytes: self.judge.compile_tmp_mb * 1024 * 1024,
                pooled: false,
            };
            let mut out = self.run_sandbox(run, &job.eval_id, cancel).await;
            // The helper's stdout is the frame: how the compiler ended, its output, the build.
            match (&out.termination, build::parse(&out.stdout)) {
                (Termination::Exited(0), Some(frame)) => {
                    out.termination = match frame.status {
                        build::Status::Exited(c) => Termination::Exited(c),
                        build::Status::Signaled(s) => Termination::Signaled(s),
                        build::Status::Failed => {
                            Termination::ExecutorError("the compiler could not be started".into())
                        }
                    };
                    out.stdout = frame.stdout;
                    out.stderr = frame.stderr;
                    CompileOutput {
                        run: out,
                        build: Some(frame.tar),
                    }
                }
                _ => {
                    // The step died before it could report (a limit, a timeout): its own
                    // stdout is not a frame, so keep only its stderr.
                    out.stdout.clear();
                    CompileOutput {
                        run: out,
                        build: None,
                    }
                }
            }
        })
    }

    fn languages(&self) -> BoxFuture<'_, Vec<LanguageInfo>> {
        Box::pin(async move {
            let mut out = Vec::new();
            for (name, lang) in &self.languages {
                out.push(LanguageInfo {
                    name: name.clone(),
                    version: lang.known_version.lock().ok().and_then(|v| v.clone()),
                    compiled: lang.compile.is_some(),
                    file: lang.file.clone(),
                    available: true,
                    reason: None,
                    limits: lang.limits,
                });
            }
            for (name, why) in &self.unavailable {
                out.push(LanguageInfo {
                    name: name.clone(),
                    version: None,
                    compiled: false,
                    file: String::new(),
                    available: false,
                    reason: Some(why.clone()),
                    limits: RunLimits {
                        memory_mb: 0,
                        cpu_ms: 0,
                        max_processes: 0,
                        max_output_bytes: 0,
                    },
                });
            }
            out.sort_by(|a, b| a.name.cmp(&b.name));
            out
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
                work_dir: Some(self.work_dir.display().to_string()),
                pool: (self.pool.size > 0).then(|| super::PoolHealth {
                    size: self.pool.size,
                    ready: self.pool_len(),
                    last_error: self.pool.last_error.lock().ok().and_then(|e| e.clone()),
                }),
            }
        })
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.drain_pool())
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
        e.labeled(
            "crucible_sandbox_sources_total",
            "Sandbox runs by how their sandbox was had (pool: prepared ahead; cold: made for the run).",
            &["source"],
            &self.stats.sandboxes,
        );
        e.gauge(
            "crucible_sandbox_pool_ready",
            "Sandboxes prepared ahead and ready now.",
            self.pool_len() as f64,
        );
        e.counter(
            "crucible_sandbox_pool_discarded_total",
            "Pooled sandboxes found dead when taken or unable to take their run.",
            self.stats.pool_discarded.load(Ordering::Relaxed),
        );
        e.counter(
            "crucible_cpu_limit_kills_total",
            "Runs killed for using up their CPU time (limits.cpu_ms).",
            self.stats.cpu_kills.load(Ordering::Relaxed),
        );
    }
}

/// A run's RLIMIT_CPU: its CPU time, or its wall-clock timeout when shorter, rounded up,
/// plus a second (the cgroup's counter is the exact limit; this is the second line).
fn rlimit_cpu_secs(limits: &RunLimits, timeout: Duration) -> u64 {
    let secs = timeout.as_secs_f64().ceil() as u64;
    limits.cpu_ms.div_ceil(1000).min(secs.max(1)) + 1
}

/// Everything in `list`, leaving it empty.
fn take_all<T>(list: &Mutex<Vec<T>>) -> Vec<T> {
    list.lock()
        .map(|mut l| std::mem::take(&mut *l))
        .unwrap_or_default()
}

/// What a pooled sandbox may use while it waits for its run (its helper and the
/// sandbox's first process; the run's own limits replace these when it is assigned).
const POOL_IDLE_LIMITS: RunLimits = RunLimits {
    memory_mb: 64,
    cpu_ms: 10_000,
    max_processes: 2,
    max_output_bytes: 0,
};

/// The caps of a run's cgroup.
fn cgroup_limits(limits: &RunLimits, cpus: f64) -> CgroupLimits {
    CgroupLimits {
        memory_bytes: limits.memory_mb * 1024 * 1024,
        // The helper and the sandbox's init process are in the group too.
        max_processes: limits.max_processes + 2,
        cpus,
    }
}

/// A new cgroup `name` with `limits`, and the process `pid` inside.
fn contain_in(
    c: &Cgroups,
    limits: &RunLimits,
    cpus: f64,
    pid: u32,
    name: &str,
) -> Result<RunCgroup, String> {
    let g = c
        .create(name, &cgroup_limits(limits, cpus))
        .map_err(|e| format!("cannot create the run's cgroup: {e}"))?;
    if let Err(e) = g.add(pid) {
        g.remove_now();
        return Err(format!("cannot move the run into its cgroup: {e}"));
    }
    Ok(g)
}

/// A run's directory under the work dir, removed when dropped (in the background): the
/// sandbox root hakoniwa builds there, whatever the run left. Nothing in it is followed:
/// `remove_dir_all` does not follow symbolic links.
struct RunDir {
    path: PathBuf,
}

impl RunDir {
    fn create(work_dir: &Path, name: &str, uid: u32, gid: u32) -> Result<RunDir, String> {
        use std::os::unix::fs::DirBuilderExt;
        let path = work_dir.join(name);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|e| format!("cannot create the run's directory {}: {e}", path.display()))?;
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            if let Err(e) = std::os::unix::fs::chown(&path, Some(uid), Some(gid)) {
                let _ = std::fs::remove_dir(&path);
                return Err(format!("cannot hand {} to uid {uid}: {e}", path.display()));
            }
        }
        Ok(RunDir { path })
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let path = std::mem::take(&mut self.path);
        let remove = move || {
            if let Err(e) = std::fs::remove_dir_all(&path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove a run's directory");
                }
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                h.spawn_blocking(remove);
            }
            Err(_) => remove(),
        }
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

type Spawned = (tokio::process::Child, OwnedFd, OwnedFd, Option<UnixStream>);

/// Start `crucible __sandbox` with the spec pipe on fd 3 and the result pipe on fd 4;
/// with `control`, its stdin is one end of a Unix socket pair and the other is returned
/// (a pooled sandbox's control socket, which first carries those two pipes), else a pipe.
fn spawn_helper(exe: &Path, control: bool) -> std::io::Result<Spawned> {
    let (spec_r, spec_w) = pipe_cloexec()?;
    let (result_r, result_w) = pipe_cloexec()?;
    let spec_fd = spec_r.as_raw_fd();
    let result_fd = result_w.as_raw_fd();
    let (ours, stdin) = match control {
        true => {
            let (ours, theirs) = UnixStream::pair()?;
            (Some(ours), Stdio::from(OwnedFd::from(theirs)))
        }
        false => (None, Stdio::piped()),
    };
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg("__sandbox")
        .env_clear()
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let parent = std::process::id() as i32;
    match &ours {
        // A pooled sandbox's helper is started without a step between fork and exec, so
        // that the C library can start it with vfork semantics (posix_spawn) instead of
        // copying the appliance's address space (about 1 ms of a runtime thread per
        // sandbox here); it checks its parent itself and takes its spec and result pipes
        // from its control socket (`helper::main`).
        Some(_) => {
            cmd.env(super::helper::PARENT_ENV, parent.to_string());
        }
        // SAFETY: only async-signal-safe calls (prctl, getppid, fcntl, dup2, close)
        // between fork and exec.
        None => unsafe {
            cmd.pre_exec(move || {
                // Die with the appliance already between fork and exec: until exec closes
                // them, this child shares the appliance's descriptors (the store's lock
                // among them), and must not keep them past a kill -9 of the appliance.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                super::helper::place_pipes(spec_fd, result_fd)
            });
        },
    }
    let child = cmd.spawn()?;
    if let Some(ours) = &ours {
        // The helper holds them once it has read them (or is gone, and the run fails on
        // its spec).
        super::wire::send_with_fds(ours.as_raw_fd(), b"F", &[spec_fd, result_fd])?;
    }
    drop(spec_r);
    drop(result_w);
    Ok((child, spec_w, result_r, ours))
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
        // In a shared directory (/dev/shm) someone else may have made it first.
        use std::os::unix::fs::MetadataExt;
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        if meta.uid() != me && !(me == 0 && meta.uid() == uid) {
            return Err(format!(
                "sandbox work dir {} belongs to uid {}, not to this process",
                dir.display(),
                meta.uid()
            ));
        }
        clear_dir(dir);
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

/// Remove everything in `dir` (links are removed, never followed).
fn clear_dir(dir: &Path) {
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
}

/// The default work directory. Sandbox roots are many small directories and files made
/// and removed for every run: on a tmpfs that costs a fraction of what a disk
/// filesystem's inode allocator costs (BENCHMARKS.md), so a tmpfs is preferred: the
/// unit's RuntimeDirectory= (`$RUNTIME_DIRECTORY`), else `$XDG_RUNTIME_DIR` (not as root),
/// else `/dev/shm`. Without one: the data dir, or as root (where the unprivileged sandbox
/// user may not be able to traverse the data dir) a per-node directory under the system
/// temp dir.
pub fn default_work_dir(cfg: &Config, node: &str) -> PathBuf {
    if let Some(d) = &cfg.sandbox.work_dir {
        return d.clone();
    }
    if let Some(dir) = std::env::var_os("RUNTIME_DIRECTORY") {
        if let Some(first) = dir.to_string_lossy().split(':').next() {
            if !first.is_empty() && is_tmpfs(Path::new(first)) {
                return Path::new(first).join("sandbox");
            }
        }
    }
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let mut candidates = Vec::new();
    if !root {
        candidates.extend(std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from));
    }
    candidates.push(PathBuf::from("/dev/shm"));
    for c in candidates {
        if is_tmpfs(&c) && writable(&c) {
            return c.join(format!("crucible-sandbox-{node}"));
        }
    }
    if root {
        std::env::temp_dir().join(format!("crucible-sandbox-{node}"))
    } else {
        cfg.sandbox_work_dir()
    }
}

/// Whether `dir` is a tmpfs.
fn is_tmpfs(dir: &Path) -> bool {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs fills the zeroed struct for a NUL-terminated path.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == TMPFS_MAGIC
    }
}

/// Whether this process may create entries in `dir`.
fn writable(dir: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: access with a NUL-terminated path.
    unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) == 0 }
}
