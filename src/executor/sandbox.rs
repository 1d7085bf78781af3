//! The `sandbox` backend: no daemon, Linux namespaces + rlimits via the helper process
//! (`crucible __sandbox`, see [`super::helper`]).
//!
//! This side resolves languages to programs on the host, starts the helper with the spec
//! on fd 3 and a result pipe on fd 4, feeds stdin, reads stdout and stderr separately
//! with a cap, enforces the wall-clock timeout by killing the helper (which takes the
//! whole sandbox with it), and classifies the outcome. It never runs user code itself.

use super::helper::{HelperResult, Spec, CODE_DIR};
use super::{
    read_capped, BoxFuture, Executor, ExecutorHealth, Job, LanguageState, RunOutput, Termination,
};
use crate::config::Config;
use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone)]
struct Resolved {
    program: String,
    args: Vec<String>,
    file: String,
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
    memory_bytes: u64,
    max_processes: u64,
    max_file_bytes: u64,
    max_open_files: u64,
    tmp_bytes: u64,
    max_output: usize,
    last_error: Mutex<Option<String>>,
}

impl SandboxExecutor {
    /// Build the executor from the config: resolve each language's program on this host
    /// and prepare the work directory (wiping leftovers of a crashed run).
    pub fn new(cfg: &Config, work_dir: PathBuf) -> Result<Self, String> {
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
            memory_bytes: l.memory_mb * 1024 * 1024,
            max_processes: l.max_processes,
            max_file_bytes: l.max_file_mb * 1024 * 1024,
            max_open_files: l.max_open_files,
            tmp_bytes: l.tmp_mb * 1024 * 1024,
            max_output: l.max_output_bytes,
            last_error: Mutex::new(None),
        })
    }

    /// Languages that cannot run here, with the reason.
    pub fn unavailable(&self) -> &HashMap<String, String> {
        &self.unavailable
    }

    /// Run `/bin/sh -c 'exit 0'`-equivalent through the whole sandbox path once, so a host
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

    fn spec(&self, r: &Resolved, job: &Job) -> Spec {
        let secs = job.timeout.as_secs_f64().ceil() as u64;
        Spec {
            parent_pid: std::process::id(),
            uid: self.uid,
            gid: self.gid,
            work_dir: self.work_dir.clone(),
            ro_dirs: self.ro_dirs.clone(),
            etc_files: self.etc_files.clone(),
            code_file: r.file.clone(),
            code: job.code.clone(),
            program: r.program.clone(),
            args: r.args.clone(),
            path: self.path.clone(),
            memory_bytes: self.memory_bytes,
            max_processes: self.max_processes,
            max_file_bytes: self.max_file_bytes,
            max_open_files: self.max_open_files,
            cpu_secs: secs.max(1) + 1,
            tmp_bytes: self.tmp_bytes,
            backstop_secs: secs.max(1) + 2,
        }
    }

    async fn run_resolved(&self, r: &Resolved, job: &Job, cancel: CancellationToken) -> RunOutput {
        let started = Instant::now();
        let spec = match serde_json::to_vec(&self.spec(r, job)) {
            Ok(s) => s,
            Err(e) => return RunOutput::executor_error(format!("spec: {e}"), started.elapsed()),
        };
        let spawned = spawn_helper(&self.exe);
        let (mut child, spec_w, result_r) = match spawned {
            Ok(x) => x,
            Err(e) => {
                let msg = format!("cannot start the sandbox helper: {e}");
                self.note_error(&msg);
                return RunOutput::executor_error(msg, started.elapsed());
            }
        };

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
        let cap = self.max_output;
        let out_task = child
            .stdout
            .take()
            .map(|r| tokio::spawn(read_capped(r, cap)));
        let err_task = child
            .stderr
            .take()
            .map(|r| tokio::spawn(read_capped(r, cap)));

        let mut termination = None;
        tokio::select! {
            _ = child.wait() => {}
            _ = tokio::time::sleep(job.timeout) => {
                termination = Some(Termination::TimedOut);
            }
            _ = cancel.cancelled() => {
                termination = Some(Termination::Cancelled);
            }
        }
        if termination.is_some() {
            // Killing the helper kills its child (PDEATHSIG) and with it PID 1 of the
            // sandbox's PID namespace, which takes every other process there down too.
            let _ = child.start_kill();
            let _ = child.wait().await;
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

        if let Some(t) = termination {
            return RunOutput {
                termination: t,
                stdout,
                stderr,
                truncated,
                duration,
                memory_exceeded: false,
            };
        }
        let result: HelperResult = match serde_json::from_slice(&result_bytes) {
            Ok(r) => r,
            Err(_) => {
                let msg = "the sandbox helper ended without reporting a result".to_string();
                self.note_error(&msg);
                return RunOutput {
                    stdout,
                    stderr,
                    truncated,
                    ..RunOutput::executor_error(msg, duration)
                };
            }
        };
        if let Some(e) = result.setup_error {
            self.note_error(&e);
            return RunOutput {
                stdout,
                stderr,
                truncated,
                ..RunOutput::executor_error(e, duration)
            };
        }
        self.clear_error();
        let termination = match (result.exit_code, result.signal) {
            (Some(code), _) => Termination::Exited(code),
            (None, Some(sig)) => Termination::Signaled(sig),
            (None, None) => Termination::ExecutorError(result.reason.clone()),
        };
        let failed = !matches!(termination, Termination::Exited(0));
        let memory_exceeded = failed
            && (result.max_rss_kb * 1024 >= self.memory_bytes / 10 * 9
                || mentions_out_of_memory(&stderr));
        RunOutput {
            termination,
            stdout,
            stderr,
            truncated,
            duration,
            memory_exceeded,
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
            }
        })
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

fn mentions_out_of_memory(stderr: &[u8]) -> bool {
    let tail = &stderr[stderr.len().saturating_sub(4096)..];
    let text = String::from_utf8_lossy(tail);
    text.contains("MemoryError")
        || text.contains("Cannot allocate memory")
        || text.contains("std::bad_alloc")
        || text.contains("out of memory")
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
