//! Executors run one evaluation's code under limits and report what happened. They are
//! behind one trait so the backends (the embedded [`sandbox`] and [`docker`]) are
//! interchangeable. An executor never writes state: the queue worker turns its
//! [`RunOutput`] into a store transition.

pub mod build;
pub mod cgroup;
pub mod docker;
pub mod helper;
pub mod sandbox;
pub mod seccomp;
pub mod wire;

use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio_util::sync::CancellationToken;

use crate::model::{RunLimits, SourceFile};
use crate::ops::report::{Health, Level, Report};
pub use crate::BoxFuture;
use std::path::PathBuf;

/// What to run.
#[derive(Debug, Clone)]
pub struct Job {
    pub eval_id: String,
    pub language: String,
    /// The main file's content (placed at `/code/<the language's file>`).
    pub code: String,
    /// Source files beside it.
    pub files: Vec<SourceFile>,
    pub args: Vec<String>,
    pub stdin: Option<String>,
    pub timeout: Duration,
    /// The limits of the run (memory and processes of the whole tree, CPU time, output).
    pub limits: RunLimits,
    /// The compiled program (a compile-cache entry: a directory the run sees read-only
    /// at `/build`), for compiled languages.
    pub artifact: Option<PathBuf>,
}

/// What to compile: the sources go to `/code`, the compiler writes `/build`.
#[derive(Debug, Clone)]
pub struct CompileJob {
    pub eval_id: String,
    pub language: String,
    pub code: String,
    pub files: Vec<SourceFile>,
    pub timeout: Duration,
    /// Memory, processes and CPU time of the compile step; its output cap.
    pub limits: RunLimits,
}

/// A compile step: how it ran, and what it left in `/build` (a tar stream of regular
/// files and directories, made where the build happened; the host extracts it with
/// [`build::extract`] and never follows anything in it).
#[derive(Debug, Clone)]
pub struct CompileOutput {
    pub run: RunOutput,
    pub build: Option<Vec<u8>>,
}

/// A language as the executor sees it, for `GET /api/languages`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct LanguageInfo {
    /// The name a submission's `language` uses.
    pub name: String,
    /// The toolchain's version, asked of it at start (`null` until known or when it has
    /// none).
    pub version: Option<String>,
    /// Whether it has a compile step.
    pub compiled: bool,
    /// The main file's name.
    pub file: String,
    /// Whether it can run on this host now.
    pub available: bool,
    /// Why not, when not available.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The default (and most) limits of a run.
    pub limits: RunLimits,
}

/// What a run used, as the kernel counted it for the whole process tree (from the run's
/// cgroup; from the helper's rusage and the memory watchdog without one).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub cpu_ms: Option<u64>,
    pub memory_peak_kb: Option<u64>,
}

/// How the run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Termination {
    /// The program exited with this code.
    Exited(i32),
    /// The program was killed by this signal (SIGXCPU means the CPU-time limit).
    Signaled(i32),
    /// The wall-clock timeout expired; the whole process tree was killed.
    TimedOut,
    /// The whole tree used its CPU-time allowance (`limits.cpu_ms`) and was killed.
    CpuLimit,
    /// The cancellation token fired; the whole process tree was killed.
    Cancelled,
    /// The executor could not run the program.
    ExecutorError(String),
}

/// Everything a run produced.
#[derive(Debug, Clone)]
pub struct RunOutput {
    pub termination: Termination,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// stdout or stderr exceeded the cap; the rest was read and dropped.
    pub truncated: bool,
    /// stdout alone exceeded the cap (a test's `output_limit`).
    pub stdout_truncated: bool,
    pub duration: Duration,
    /// A process of the run was killed for memory, as the kernel recorded it (an OOM kill
    /// counted in the run's cgroup), or, without a cgroup, the memory watchdog killed it.
    pub memory_exceeded: bool,
    /// What the run used.
    pub usage: Usage,
}

impl RunOutput {
    /// A run that never started.
    pub fn executor_error(msg: impl Into<String>, duration: Duration) -> Self {
        RunOutput {
            termination: Termination::ExecutorError(msg.into()),
            stdout: Vec::new(),
            stderr: Vec::new(),
            truncated: false,
            stdout_truncated: false,
            duration,
            memory_exceeded: false,
            usage: Usage::default(),
        }
    }
}

/// Executor health for /health.
#[derive(Debug, Clone, Serialize)]
pub struct ExecutorHealth {
    pub backend: &'static str,
    pub ok: bool,
    pub detail: String,
    /// Language -> "available" or why not.
    pub languages: BTreeMap<String, String>,
    /// How the limits of a run apply: `cgroup2` or `cgroup1` (one cgroup per run, for the
    /// whole process tree) or `rlimit` (per process, with a memory watchdog).
    pub limits: &'static str,
    /// Why there is no cgroup, when `limits` is `rlimit`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limits_reason: Option<String>,
    /// Where the sandbox makes each run's root (sandbox backend).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub work_dir: Option<String>,
    /// Sandboxes prepared ahead (sandbox backend, `[sandbox] pool` > 0).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool: Option<PoolHealth>,
}

/// The sandbox pool in /health.
#[derive(Debug, Clone, Serialize)]
pub struct PoolHealth {
    /// How many are kept ready (`[sandbox] pool`).
    pub size: usize,
    /// How many are ready now.
    pub ready: usize,
    /// Why the last one could not be prepared (it retries every second).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// Whether a language can run here, as the executor sees it.
pub use crate::model::LanguageState;

/// An execution backend.
pub trait Executor: Send + Sync + 'static {
    /// `sandbox` or `docker`.
    fn name(&self) -> &'static str;
    /// Whether `language` can run on this backend right now.
    fn language_state(&self, language: &str) -> LanguageState;
    /// Every configured language, with its toolchain's version.
    fn languages(&self) -> BoxFuture<'_, Vec<LanguageInfo>>;
    /// Compile a program of a compiled language; `cancel` as for [`Executor::run`].
    fn compile<'a>(
        &'a self,
        job: &'a CompileJob,
        cancel: CancellationToken,
    ) -> BoxFuture<'a, CompileOutput>;
    /// Run one job; must return once the whole process tree is gone. Firing `cancel`
    /// kills the run and yields [`Termination::Cancelled`].
    fn run<'a>(&'a self, job: &'a Job, cancel: CancellationToken) -> BoxFuture<'a, RunOutput>;
    /// Current health.
    fn health(&self) -> BoxFuture<'_, ExecutorHealth>;
    /// Whether a run could start now. The dispatcher starts nothing while this fails, so
    /// work stays queued (not failed) while e.g. the Docker engine is down.
    fn ready(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }
    /// Runs of one program, one after another (an evaluation's tests), when this backend
    /// has a cheaper way than a fresh [`Executor::run`] each (the sandbox: one sandbox
    /// serving them all). `None`: each run is a fresh [`Executor::run`] ([`runs_of`]).
    fn runs<'a>(&'a self, _job: &Job) -> Option<Box<dyn Runs + 'a>> {
        None
    }
    /// Backend-specific metrics for /metrics.
    fn metrics(&self, _e: &mut crate::ops::metrics::Exposition) {}
    /// Called once at shutdown, after the last run ended: release what the backend holds
    /// outside this process (e.g. containers).
    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

/// Runs of one program, one after another, each in a clean environment: nothing of a run
/// (files, processes, IPC objects) is left for the next.
pub trait Runs: Send {
    /// Run the program once more, with this stdin and timeout; as [`Executor::run`].
    fn run<'a>(
        &'a mut self,
        stdin: Option<String>,
        timeout: Duration,
        cancel: CancellationToken,
    ) -> BoxFuture<'a, RunOutput>;
    /// Release what it holds, once the last run is over.
    fn close(self: Box<Self>) -> BoxFuture<'static, ()>;
}

/// The runs of `job` on `executor`: its own way when it has one, else a fresh run each.
pub fn runs_of<'a>(executor: &'a dyn Executor, job: Job) -> Box<dyn Runs + 'a> {
    match executor.runs(&job) {
        Some(r) => r,
        None => Box::new(EachFresh { executor, job }),
    }
}

/// Runs as fresh [`Executor::run`]s.
struct EachFresh<'a> {
    executor: &'a dyn Executor,
    job: Job,
}

impl Runs for EachFresh<'_> {
    fn run<'b>(
        &'b mut self,
        stdin: Option<String>,
        timeout: Duration,
        cancel: CancellationToken,
    ) -> BoxFuture<'b, RunOutput> {
        self.job.stdin = stdin;
        self.job.timeout = timeout;
        self.executor.run(&self.job, cancel)
    }

    fn close(self: Box<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async {})
    }
}

/// The executor as a reporter (`executor` in /health; degraded when it cannot run).
pub struct ExecutorReport(pub std::sync::Arc<dyn Executor>);

impl Report for ExecutorReport {
    fn key(&self) -> &'static str {
        "executor"
    }

    fn health(&self) -> BoxFuture<'_, Health> {
        Box::pin(async move {
            let h = self.0.health().await;
            let level = if h.ok { Level::Ok } else { Level::Degraded };
            Health::new(level, serde_json::to_value(&h).unwrap_or_default())
        })
    }

    fn metrics(&self, e: &mut crate::ops::metrics::Exposition) {
        self.0.metrics(e);
    }
}

/// Read a multiplexed container output stream to its end, keeping at most `cap` bytes of
/// stdout and of stderr; returns ((stdout, stderr), (stdout truncated, stderr truncated)).
pub async fn read_capped_stream<S, E>(mut s: S, cap: usize) -> ((Vec<u8>, Vec<u8>), (bool, bool))
where
    S: futures_util::Stream<Item = Result<bollard::container::LogOutput, E>> + Unpin,
{
    use bollard::container::LogOutput;
    use futures_util::StreamExt;
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let (mut t_out, mut t_err) = (false, false);
    while let Some(item) = s.next().await {
        let (buf, msg, truncated) = match item {
            Ok(LogOutput::StdOut { message }) | Ok(LogOutput::Console { message }) => {
                (&mut out, message, &mut t_out)
            }
            Ok(LogOutput::StdErr { message }) => (&mut err, message, &mut t_err),
            Ok(LogOutput::StdIn { .. }) => continue,
            Err(_) => break,
        };
        let room = cap.saturating_sub(buf.len());
        if msg.len() <= room {
            buf.extend_from_slice(&msg);
        } else {
            buf.extend_from_slice(&msg[..room]);
            *truncated = true;
        }
    }
    ((out, err), (t_out, t_err))
}

/// Read a stream to its end, keeping at most `cap` bytes; returns (kept, truncated).
/// Reading continues past the cap so the writer is never blocked by a full pipe.
pub async fn read_capped<R: AsyncRead + Unpin>(mut r: R, cap: usize) -> (Vec<u8>, bool) {
    let mut kept = Vec::new();
    let mut truncated = false;
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        match r.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = cap.saturating_sub(kept.len());
                if n <= room {
                    kept.extend_from_slice(&chunk[..n]);
                } else {
                    kept.extend_from_slice(&chunk[..room]);
                    truncated = true;
                }
            }
        }
    }
    (kept, truncated)
}

/// Name of a signal number, for error messages.
pub fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGXCPU => "SIGXCPU",
        libc::SIGXFSZ => "SIGXFSZ",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGILL => "SIGILL",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGINT => "SIGINT",
        libc::SIGHUP => "SIGHUP",
        _ => "signal",
    }
}
