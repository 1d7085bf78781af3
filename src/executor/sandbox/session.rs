//! One sandbox serving one evaluation's tests: the appliance's side.
//!
//! A pooled sandbox (or one made now) is given the evaluation's program in serve mode:
//! its files, build and limits are set up once (one root, one cgroup), and its first
//! process then starts the program once per test in new PID and mount namespaces
//! (removing its IPC objects after it) with a fresh /tmp and nothing of the previous test
//! alive (see the helper's `serve_tests`). Each test gets its own stdin, stdout and stderr pipes, passed over the
//! control socket; its wall time, CPU time (a delta of the cgroup's counter), peak memory
//! (the cgroup's, reset per test on cgroup v1; the test's largest process on v2) and OOM
//! kills (a delta) are its own.
//!
//! Whatever ends a test from outside (its timeout, its CPU time, a cancel, an OOM kill, a
//! sandbox that stops answering) kills the whole sandbox; the next test gets a new one.

use super::{pipe_cloexec, rlimit_cpu_secs, watch, SandboxExecutor, Stop, Warm};
use crate::executor::wire::{self, Reply};
use crate::executor::{read_capped, BoxFuture, Job, RunOutput, Runs, Termination, Usage};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// Send `frame` on a pooled sandbox's control socket, with `fds` attached to its first
/// byte; returns the socket for what follows.
pub(super) async fn send_frame(
    control: std::os::unix::net::UnixStream,
    frame: &[u8],
    fds: &[RawFd],
) -> std::io::Result<tokio::net::UnixStream> {
    control.set_nonblocking(true)?;
    let mut s = tokio::net::UnixStream::from_std(control)?;
    send_all(&mut s, frame, fds).await?;
    Ok(s)
}

/// Send all of `data` on a control socket, with `fds` attached to its first byte.
async fn send_all(
    s: &mut tokio::net::UnixStream,
    data: &[u8],
    fds: &[RawFd],
) -> std::io::Result<()> {
    let sent = loop {
        s.writable().await?;
        match s.try_io(tokio::io::Interest::WRITABLE, || {
            wire::send_with_fds(s.as_raw_fd(), data, fds)
        }) {
            Ok(n) => break n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    };
    s.write_all(&data[sent..]).await
}

/// A sandbox serving tests.
struct Session {
    /// The sandbox (its helper, cgroup and directory); taken when it goes.
    sandbox: Option<Warm>,
    control: tokio::net::UnixStream,
    /// The helper's own stdout and stderr (the serving process's complaints).
    drains: Vec<tokio::task::JoinHandle<(Vec<u8>, bool)>>,
}

impl Session {
    /// Kill it and remove its cgroup and directory, in the background.
    fn discard(&mut self) {
        if let Some(w) = self.sandbox.take() {
            if let Some(g) = &w.cgroup {
                g.kill();
            }
            for d in self.drains.drain(..) {
                d.abort();
            }
            if let Ok(h) = tokio::runtime::Handle::try_current() {
                h.spawn(w.discard());
            }
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.discard();
    }
}

/// An evaluation's tests on the sandbox backend.
pub(super) struct SessionRuns<'a> {
    executor: &'a SandboxExecutor,
    job: Job,
    session: Option<Session>,
}

impl<'a> SessionRuns<'a> {
    pub(super) fn new(executor: &'a SandboxExecutor, job: Job) -> Self {
        SessionRuns {
            executor,
            job,
            session: None,
        }
    }

    /// A sandbox serving this job's program: a pooled one when ready, else one made now.
    async fn open(&self) -> Result<Session, String> {
        let ex = self.executor;
        let run = ex.job_run(&self.job)?;
        let (warm, source) = match ex.take_warm().await {
            Some(w) => (w, "pool"),
            None => (ex.prepare_warm().await?, "cold"),
        };
        let launched = match ex.assign(warm, &run, true) {
            Ok(l) => l,
            Err(failed) => {
                let (w, e) = *failed;
                ex.stats.pool_discarded.fetch_add(1, Ordering::Relaxed);
                w.discard().await;
                return Err(e);
            }
        };
        ex.stats.sandboxes.add(&[source], 1);
        let super::Launched {
            mut child,
            cgroup,
            _run_dir: run_dir,
            result_r,
            control,
            ..
        } = launched;
        let drains: Vec<_> = [
            child
                .stdout
                .take()
                .map(|r| tokio::spawn(read_capped(r, 4096))),
            child
                .stderr
                .take()
                .map(|r| tokio::spawn(read_capped(r, 4096))),
        ]
        .into_iter()
        .flatten()
        .collect();
        let warm = Warm {
            child,
            cgroup,
            run_dir,
            result_r,
            control: None,
            name: String::new(),
        };
        let sent = match control {
            Some((c, frame, _)) if warm.cgroup.is_some() => send_frame(c, &frame, &[])
                .await
                .map_err(|e| format!("cannot give the sandbox its program: {e}")),
            Some(_) => Err("a sandbox serving tests needs a cgroup".to_string()),
            None => Err("the sandbox has no control socket".to_string()),
        };
        ex.pool.wake.notify_one();
        let control = match sent {
            Ok(c) => c,
            Err(e) => {
                for d in drains {
                    d.abort();
                }
                warm.discard().await;
                return Err(e);
            }
        };
        Ok(Session {
            sandbox: Some(warm),
            control,
            drains,
        })
    }

    /// One test in the session; `false` with it when the session cannot serve another.
    async fn test(
        &self,
        session: &mut Session,
        stdin: Option<String>,
        timeout: Duration,
        cancel: CancellationToken,
    ) -> (RunOutput, bool) {
        let limits = self.job.limits;
        let ex = self.executor;
        let started = Instant::now();
        let Some(cgroup) = session.sandbox.as_ref().and_then(|w| w.cgroup.as_ref()) else {
            return (
                RunOutput::executor_error("the session has no sandbox", Duration::ZERO),
                false,
            );
        };
        let pipes =
            (|| Ok::<_, std::io::Error>((pipe_cloexec()?, pipe_cloexec()?, pipe_cloexec()?)))();
        let ((in_r, in_w), (out_r, out_w), (err_r, err_w)) = match pipes {
            Ok(p) => p,
            Err(e) => {
                return (
                    RunOutput::executor_error(format!("cannot make pipes: {e}"), Duration::ZERO),
                    false,
                )
            }
        };
        let before = cgroup.begin();
        let cpu_base = before.cpu_usec.unwrap_or(0);
        ex.stats.runs.add(&[ex.limits_mode()], 1);
        ex.stats.sandboxes.add(&["session"], 1);

        let request = rlimit_cpu_secs(&limits, timeout).to_le_bytes();
        let fds = [in_r.as_raw_fd(), out_w.as_raw_fd(), err_w.as_raw_fd()];
        let sent = send_all(&mut session.control, &request, &fds).await;
        drop((in_r, out_w, err_w));
        if sent.is_err() {
            return (
                RunOutput::executor_error(
                    "the sandbox serving the tests does not take requests",
                    started.elapsed(),
                ),
                false,
            );
        }
        let input = stdin.unwrap_or_default().into_bytes();
        let stdin_task = tokio::spawn(async move {
            if let Ok(mut w) = tokio::net::unix::pipe::Sender::from_owned_fd(in_w) {
                let _ = w.write_all(&input).await;
            }
        });
        let cap = limits.max_output_bytes as usize;
        let reader = |fd| {
            tokio::spawn(async move {
                match tokio::net::unix::pipe::Receiver::from_owned_fd(fd) {
                    Ok(r) => read_capped(r, cap).await,
                    Err(_) => (Vec::new(), false),
                }
            })
        };
        let (out_task, err_task) = (reader(out_r), reader(err_r));

        let mut reply = [0u8; wire::REPLY_BYTES];
        let mut peak_sum = 0;
        let stop = tokio::select! {
            r = session.control.read_exact(&mut reply) => match r {
                Ok(_) => None,
                Err(_) => Some(None),
            },
            _ = tokio::time::sleep(timeout) => Some(Some(Stop::TimedOut)),
            _ = cancel.cancelled() => Some(Some(Stop::Cancelled)),
            s = watch(Some(cgroup), 0, limits, cpu_base, &mut peak_sum) => Some(Some(s)),
        };
        let duration = started.elapsed();
        let mut keep = stop.is_none();
        if !keep {
            // Killing the group kills the test and the serving process; the helper follows.
            cgroup.kill();
        }
        stdin_task.abort();
        let grace = Duration::from_secs(5);
        // The test's processes are gone: its pipes are at their end, unless something
        // outside it holds them (then the session goes).
        let joined = |t: tokio::task::JoinHandle<(Vec<u8>, bool)>| async move {
            tokio::time::timeout(grace, t)
                .await
                .ok()
                .and_then(|r| r.ok())
        };
        let (out, err) = (joined(out_task).await, joined(err_task).await);
        keep &= out.is_some() && err.is_some();
        let (stdout, t1) = out.unwrap_or_default();
        let (stderr, t2) = err.unwrap_or_default();
        let after = cgroup.usage();
        let reply = Reply::decode(&reply);
        keep &= !reply.spent;
        let oom_killed = after.oom_kills > before.oom_kills;
        if oom_killed {
            ex.stats.oom_kills.fetch_add(1, Ordering::Relaxed);
            keep = false;
        }
        let usage = Usage {
            cpu_ms: after.cpu_usec.map(|us| us.saturating_sub(cpu_base) / 1000),
            memory_peak_kb: match cgroup.peak_resets() {
                true => after.memory_peak_bytes.map(|b| b / 1024),
                false if stop.is_none() => Some(reply.max_rss_kb),
                false => None,
            },
        };
        let termination = match stop {
            Some(Some(Stop::TimedOut)) => Termination::TimedOut,
            Some(Some(Stop::Cancelled)) => Termination::Cancelled,
            Some(Some(Stop::CpuLimit)) => {
                ex.stats.cpu_kills.fetch_add(1, Ordering::Relaxed);
                Termination::CpuLimit
            }
            Some(Some(Stop::Watchdog)) => Termination::Signaled(libc::SIGKILL),
            Some(None) if oom_killed => Termination::Signaled(libc::SIGKILL),
            Some(None) => {
                let msg = "the sandbox serving the tests ended unexpectedly".to_string();
                ex.note_error(&msg);
                Termination::ExecutorError(msg)
            }
            None => match (reply.exit_code, reply.signal) {
                (Some(c), _) => Termination::Exited(c),
                (None, Some(s)) => Termination::Signaled(s),
                (None, None) => {
                    keep = false;
                    Termination::ExecutorError("the sandbox could not start the test".into())
                }
            },
        };
        let out = RunOutput {
            termination,
            stdout,
            stderr,
            truncated: t1 || t2,
            stdout_truncated: t1,
            duration,
            memory_exceeded: oom_killed,
            usage,
        };
        (out, keep)
    }
}

impl Runs for SessionRuns<'_> {
    fn run<'b>(
        &'b mut self,
        stdin: Option<String>,
        timeout: Duration,
        cancel: CancellationToken,
    ) -> BoxFuture<'b, RunOutput> {
        Box::pin(async move {
            let mut session = match self.session.take() {
                Some(s) => s,
                None => match self.open().await {
                    Ok(s) => s,
                    Err(e) => {
                        self.executor.note_error(&e);
                        return RunOutput::executor_error(e, Duration::ZERO);
                    }
                },
            };
            let (out, keep) = self.test(&mut session, stdin, timeout, cancel).await;
            if keep {
                self.session = Some(session);
            }
            out
        })
    }

    fn close(mut self: Box<Self>) -> BoxFuture<'static, ()> {
        // Dropping the session kills it and removes it in the background.
        self.session.take();
        Box::pin(async {})
    }
}
