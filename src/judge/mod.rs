//! The judge: what happens to a `running` evaluation between its start and its end, on
//! any executor. It compiles the program once (or takes it from the compile cache), then
//! runs it once (no tests), or once per test with that test's stdin, each in a clean
//! environment (the executor's [`crate::executor::Runs`]: on the sandbox backend one
//! sandbox serves all of an evaluation's tests, each in new namespaces), compares each
//! output with the expected one, and records each judged test as an
//! `evaluation:progress` event (written while the next test runs, in order). It returns
//! the terminal transition; the queue worker records it.
//!
//! It never writes the store except through the store's operations.

pub mod cache;

use crate::config::Config;
use crate::executor::{
    runs_of, signal_name, CompileJob, Executor, Job, RunOutput, Runs, Termination,
};
use crate::model::{
    overall_verdict, CompileInfo, Evaluation, FailureReason, Finish, RunLimits, Score, Status,
    TestCase, TestOutcome, Verdict,
};
use crate::ops::metrics::{Exposition, LabeledCounter};
use crate::ops::report::{Health, Level, Report};
use crate::store::{Store, StoreError};
use crate::BoxFuture;
use cache::{CompileCache, Held};
use sha2::Digest;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Counters for /metrics.
#[derive(Debug, Default)]
pub struct JudgeStats {
    /// Judged tests by verdict (and evaluations whose compilation failed).
    pub verdicts: LabeledCounter,
    /// Compile steps by outcome (`ok`, `error`).
    pub compilations: LabeledCounter,
}

/// The judge.
pub struct Judge {
    executor: Arc<dyn Executor>,
    cache: Arc<CompileCache>,
    cfg: Arc<Config>,
    pub stats: JudgeStats,
}

/// Why judging stopped before the end.
enum Stop {
    /// Killed (cancel or shutdown): the queue turns it into `interrupted` (or finds the
    /// record already `cancelled`).
    Cancelled,
    /// The executor could not run it.
    Executor(String),
    /// The store refused a progress event: the evaluation is no longer running here.
    Gone,
}

impl Judge {
    pub fn new(executor: Arc<dyn Executor>, cache: Arc<CompileCache>, cfg: Arc<Config>) -> Judge {
        Judge {
            executor,
            cache,
            cfg,
            stats: JudgeStats::default(),
        }
    }

    /// Judge a running evaluation; returns how it ends.
    pub async fn evaluate(
        &self,
        rec: &Evaluation,
        store: &Store,
        cancel: CancellationToken,
    ) -> Finish {
        let limits = rec
            .limits
            .unwrap_or_else(|| self.cfg.max_limits(&rec.language));
        let compiled = self
            .cfg
            .languages
            .get(&rec.language)
            .is_some_and(|l| l.compiled());
        let (artifact, compile) = if compiled {
            match self.compile(rec, &limits, cancel.clone()).await {
                Ok((held, info)) => (Some(held), Some(info)),
                Err(fin) => return *fin,
            }
        } else {
            (None, None)
        };
        let run = |stdin: Option<String>, timeout: f64| Job {
            eval_id: rec.eval_id.clone(),
            language: rec.language.clone(),
            code: rec.code.clone(),
            files: rec.files.clone(),
            args: rec.args.clone(),
            stdin,
            timeout: Duration::from_secs_f64(timeout),
            limits,
            artifact: artifact.as_ref().map(|a| a.dir.clone()),
        };
        if rec.tests.is_empty() {
            let out = self
                .executor
                .run(&run(rec.stdin.clone(), rec.timeout), cancel)
                .await;
            let mut fin = classify(out, &limits, rec.timeout);
            fin.compile = compile;
            return fin;
        }
        let mut runs = runs_of(&*self.executor, run(None, rec.timeout));
        let judged = self
            .run_tests(rec, store, &compile, runs.as_mut(), cancel)
            .await;
        runs.close().await;
        match judged {
            Ok(tests) => self.summary(tests, compile),
            Err(Stop::Cancelled) | Err(Stop::Gone) => {
                let mut f = Finish::failed(
                    FailureReason::Interrupted,
                    "the appliance shut down while this evaluation was running; it was killed"
                        .into(),
                );
                f.compile = compile;
                f
            }
            Err(Stop::Executor(e)) => {
                let mut f = Finish::failed(FailureReason::ExecutorError, e);
                f.compile = compile;
                f
            }
        }
    }

    /// The cache key of a program: its language, its compile command and every file.
    fn cache_key(&self, rec: &Evaluation) -> String {
        let mut h = sha2::Sha256::new();
        let lang = self.cfg.languages.get(&rec.language);
        h.update(rec.language.as_bytes());
        h.update([0]);
        for part in lang.and_then(|l| l.compile.clone()).unwrap_or_default() {
            h.update(part.as_bytes());
            h.update([0]);
        }
        for env in lang.map(|l| l.env.clone()).unwrap_or_default() {
            h.update(env.as_bytes());
            h.update([0]);
        }
        let main = lang.map(|l| l.file.clone()).unwrap_or_default();
        for (name, content) in std::iter::once((main.as_str(), rec.code.as_str())).chain(
            rec.files
                .iter()
                .map(|f| (f.name.as_str(), f.content.as_str())),
        ) {
            h.update((name.len() as u64).to_le_bytes());
            h.update(name.as_bytes());
            h.update((content.len() as u64).to_le_bytes());
            h.update(content.as_bytes());
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Compile, or take the program from the cache. `Err` is the evaluation's end.
    async fn compile(
        &self,
        rec: &Evaluation,
        limits: &RunLimits,
        cancel: CancellationToken,
    ) -> Result<(Held, CompileInfo), Box<Finish>> {
        let key = self.cache_key(rec);
        if let Some(held) = self.cache.get(&key) {
            let info = CompileInfo {
                exit_code: Some(0),
                stdout: String::new(),
                stderr: String::new(),
                runtime_ms: Some(0),
                cpu_ms: Some(0),
                memory_peak_kb: None,
                cached: true,
            };
            return Ok((held, info));
        }
        let lang = self.cfg.languages.get(&rec.language);
        let timeout = lang.and_then(|l| l.compile_timeout_secs).unwrap_or(30.0);
        let memory_mb = lang
            .and_then(|l| l.compile_memory_mb)
            .unwrap_or(512)
            .max(limits.memory_mb);
        let job = CompileJob {
            eval_id: rec.eval_id.clone(),
            language: rec.language.clone(),
            code: rec.code.clone(),
            files: rec.files.clone(),
            timeout: Duration::from_secs_f64(timeout),
            limits: RunLimits {
                memory_mb,
                // Compilers use several threads; the wall-clock timeout bounds the rest.
                cpu_ms: (timeout * 1000.0 * 4.0) as u64,
                max_processes: limits.max_processes.max(256),
                max_output_bytes: limits.max_output_bytes,
            },
        };
        let out = self.executor.compile(&job, cancel).await;
        let run = &out.run;
        let mut info = CompileInfo {
            exit_code: match run.termination {
                Termination::Exited(c) => Some(c),
                Termination::Signaled(s) => Some(128 + s),
                _ => None,
            },
            stdout: String::from_utf8_lossy(&run.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&run.stderr).into_owned(),
            runtime_ms: Some(run.duration.as_millis() as u64),
            cpu_ms: run.usage.cpu_ms,
            memory_peak_kb: run.usage.memory_peak_kb,
            cached: false,
        };
        let failed = |reason: FailureReason, error: String, info: CompileInfo| {
            let mut f = Finish::failed(reason, error);
            f.exit_code = info.exit_code;
            f.stderr = info.stderr.clone();
            f.output = info.stdout.clone();
            if !rec.tests.is_empty() && reason == FailureReason::CompileError {
                f.verdict = Some(Verdict::CompileError);
                f.score = Some(Score {
                    passed: 0,
                    total: rec.tests.len() as u64,
                });
                f.tests = rec
                    .tests
                    .iter()
                    .map(|t| t.judged(&TestOutcome::skipped()))
                    .collect();
            }
            f.compile = Some(info);
            Box::new(f)
        };
        let why =
            match &run.termination {
                Termination::Exited(0) => None,
                Termination::Cancelled => return Err(failed(
                    FailureReason::Interrupted,
                    "the appliance shut down while this evaluation was compiling; it was killed"
                        .into(),
                    info,
                )),
                Termination::ExecutorError(e) => {
                    self.stats.compilations.add(&["error"], 1);
                    return Err(failed(FailureReason::ExecutorError, e.clone(), info));
                }
                _ if run.memory_exceeded => {
                    Some(format!("compilation ran out of memory ({memory_mb} MiB)"))
                }
                Termination::TimedOut | Termination::CpuLimit => {
                    Some(format!("compilation took longer than {timeout} s"))
                }
                Termination::Exited(c) => Some(format!("compilation failed (exit code {c})")),
                Termination::Signaled(s) => Some(format!(
                    "the compiler was killed by signal {s} ({})",
                    signal_name(*s)
                )),
            };
        if let Some(why) = why {
            self.stats.compilations.add(&["error"], 1);
            self.stats
                .verdicts
                .add(&[Verdict::CompileError.as_str()], 1);
            return Err(failed(FailureReason::CompileError, why, info));
        }
        let Some(tar) = out.build.as_deref() else {
            self.stats.compilations.add(&["error"], 1);
            return Err(failed(
                FailureReason::ExecutorError,
                "the compile step did not send its output".into(),
                info,
            ));
        };
        match self.cache.insert(&key, tar) {
            Ok(held) => {
                self.stats.compilations.add(&["ok"], 1);
                info.exit_code = Some(0);
                Ok((held, info))
            }
            Err(e) => {
                self.stats.compilations.add(&["error"], 1);
                Err(failed(
                    FailureReason::CompileError,
                    format!("the compiled program cannot be used: {e}"),
                    info,
                ))
            }
        }
    }

    /// Run every test in order; each judged test is recorded as it is judged.
    async fn run_tests(
        &self,
        rec: &Evaluation,
        store: &Store,
        compile: &Option<CompileInfo>,
        runs: &mut dyn Runs,
        cancel: CancellationToken,
    ) -> Result<Vec<TestCase>, Stop> {
        use futures_util::FutureExt;
        let mut tests = rec.tests.clone();
        let mut failed = false;
        // Each judged test's progress event is handed to the store's writer at once (it
        // applies them in that order and flushes whatever has come in one go), and the
        // next test runs while it is written: a test's durable write does not delay the
        // next test. At most `MAX_PROGRESS_IN_FLIGHT` wait to be on disk.
        let mut in_flight: std::collections::VecDeque<(usize, ProgressWrite)> =
            std::collections::VecDeque::new();
        for (i, test) in rec.tests.iter().enumerate() {
            let outcome = if failed && rec.stop_on_failure {
                TestOutcome::skipped()
            } else {
                let out = runs
                    .run(
                        test.stdin.clone(),
                        Duration::from_secs_f64(test.timeout),
                        cancel.clone(),
                    )
                    .await;
                match &out.termination {
                    Termination::Cancelled => return Err(Stop::Cancelled),
                    Termination::ExecutorError(e) => return Err(Stop::Executor(e.clone())),
                    _ => {}
                }
                judge_test(&out, test, rec, self.cfg.judge.test_output_bytes)
            };
            self.stats.verdicts.add(&[outcome.verdict.as_str()], 1);
            failed |= outcome.verdict != Verdict::Accepted;
            tests[i] = test.judged(&outcome);
            let first = (i == 0).then_some(compile.as_ref()).flatten();
            let durable = store
                .begin_progress(&rec.eval_id, i, outcome, first.cloned())
                .await;
            in_flight.push_back((i, Box::pin(durable)));
            // Those already on disk (in order), and the oldest when too many wait.
            loop {
                let full = in_flight.len() > MAX_PROGRESS_IN_FLIGHT;
                let Some((j, write)) = in_flight.front_mut() else {
                    break;
                };
                let j = *j;
                let r = match full {
                    true => Some(write.await),
                    false => write.now_or_never(),
                };
                let Some(r) = r else { break };
                in_flight.pop_front();
                progress_written(&rec.eval_id, j, r)?;
            }
        }
        for (j, write) in in_flight {
            progress_written(&rec.eval_id, j, write.await)?;
        }
        Ok(tests)
    }

    /// The end of an evaluation with tests: every test judged, whatever the verdicts.
    fn summary(&self, tests: Vec<TestCase>, compile: Option<CompileInfo>) -> Finish {
        let verdict = overall_verdict(&tests);
        let passed = tests
            .iter()
            .filter(|t| t.verdict == Some(Verdict::Accepted))
            .count() as u64;
        // The first test that was not accepted speaks for the evaluation (else the last).
        let shown = tests
            .iter()
            .find(|t| {
                t.verdict
                    .is_some_and(|v| v != Verdict::Accepted && v != Verdict::Skipped)
            })
            .or(tests.last());
        let sum = |f: fn(&TestCase) -> Option<u64>| -> Option<u64> {
            let v: Vec<u64> = tests.iter().filter_map(f).collect();
            (!v.is_empty()).then(|| v.iter().sum())
        };
        Finish {
            status: Status::Completed,
            exit_code: Some(
                tests
                    .iter()
                    .filter_map(|t| t.exit_code)
                    .find(|c| *c != 0)
                    .unwrap_or(0),
            ),
            output: shown.and_then(|t| t.stdout.clone()).unwrap_or_default(),
            stderr: shown.and_then(|t| t.stderr.clone()).unwrap_or_default(),
            output_truncated: shown.and_then(|t| t.output_truncated).unwrap_or(false),
            failure_reason: None,
            error: (verdict != Verdict::Accepted).then(|| {
                format!(
                    "{} of {} tests accepted; first failure: {}",
                    passed,
                    tests.len(),
                    verdict.as_str()
                )
            }),
            runtime_ms: sum(|t| t.runtime_ms),
            cpu_ms: sum(|t| t.cpu_ms),
            memory_peak_kb: tests.iter().filter_map(|t| t.memory_peak_kb).max(),
            compile,
            score: Some(Score {
                passed,
                total: tests.len() as u64,
            }),
            verdict: Some(verdict),
            tests,
        }
    }
}

fn cut(bytes: &[u8], keep: usize) -> (String, bool) {
    let text = String::from_utf8_lossy(bytes);
    if text.len() <= keep {
        return (text.into_owned(), false);
    }
    let mut end = keep;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    (text[..end].to_string(), true)
}

/// A test's progress event on its way to the store.
/// A test's progress write, handed to the store's writer, until it is on disk.
type ProgressWrite =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Evaluation, StoreError>> + Send>>;

/// How many judged tests may wait for their progress write to be on disk.
const MAX_PROGRESS_IN_FLIGHT: usize = 64;

/// What a test's progress write means for the rest of the run: the evaluation is gone
/// (cancelled, finished elsewhere) or not; another failure is logged (the final record
/// carries every result anyway).
fn progress_written(
    eval_id: &str,
    i: usize,
    r: Result<Evaluation, StoreError>,
) -> Result<(), Stop> {
    match r {
        Ok(_) => Ok(()),
        Err(StoreError::AlreadyTerminal(_))
        | Err(StoreError::WrongState(..))
        | Err(StoreError::NotFound)
        | Err(StoreError::Closed) => Err(Stop::Gone),
        Err(e) => {
            tracing::warn!(eval_id = %eval_id, test = i, error = %e, "cannot record a test's progress");
            Ok(())
        }
    }
}

/// The verdict of one test run: memory, time and output limits first (what the kernel and
/// the reader recorded), then how the program ended, then its output against the
/// expected output (the whole output, up to `max_output_bytes`).
fn judge_test(out: &RunOutput, test: &TestCase, rec: &Evaluation, keep: usize) -> TestOutcome {
    let verdict = if out.memory_exceeded {
        Verdict::MemoryLimit
    } else if matches!(
        out.termination,
        Termination::TimedOut | Termination::CpuLimit
    ) || out.termination == Termination::Signaled(libc::SIGXCPU)
    {
        Verdict::TimeLimit
    } else if out.stdout_truncated {
        Verdict::OutputLimit
    } else if out.termination != Termination::Exited(0) {
        Verdict::RuntimeError
    } else {
        match &test.expected_output {
            None => Verdict::Accepted,
            Some(expected) => {
                let got = String::from_utf8_lossy(&out.stdout);
                if rec.compare.matches(&got, expected, rec.float_tolerance) {
                    Verdict::Accepted
                } else {
                    Verdict::WrongAnswer
                }
            }
        }
    };
    let (stdout, cut_out) = cut(&out.stdout, keep);
    let (stderr, cut_err) = cut(&out.stderr, keep);
    TestOutcome {
        verdict,
        exit_code: match out.termination {
            Termination::Exited(c) => Some(c),
            Termination::Signaled(s) => Some(128 + s),
            _ => None,
        },
        runtime_ms: Some(out.duration.as_millis() as u64),
        cpu_ms: out.usage.cpu_ms,
        memory_peak_kb: out.usage.memory_peak_kb,
        stdout,
        stderr,
        output_truncated: cut_out || cut_err || out.truncated,
    }
}

/// Turn one run (an evaluation without tests) into the terminal transition.
pub fn classify(out: RunOutput, limits: &RunLimits, timeout_secs: f64) -> Finish {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let runtime_ms = Some(out.duration.as_millis() as u64);
    let failed = |reason: FailureReason, exit_code: Option<i32>, error: String| Finish {
        exit_code,
        output: stdout.clone(),
        stderr: stderr.clone(),
        output_truncated: out.truncated,
        runtime_ms,
        cpu_ms: out.usage.cpu_ms,
        memory_peak_kb: out.usage.memory_peak_kb,
        ..Finish::failed(reason, error)
    };
    match &out.termination {
        Termination::Cancelled => failed(
            FailureReason::Interrupted,
            None,
            "the appliance shut down while this evaluation was running; it was killed".into(),
        ),
        Termination::TimedOut => failed(
            FailureReason::Timeout,
            None,
            format!("wall-clock timeout of {timeout_secs} s reached; the process tree was killed"),
        ),
        Termination::CpuLimit => failed(
            FailureReason::Timeout,
            None,
            format!(
                "CPU-time limit of {} ms reached; the process tree was killed",
                limits.cpu_ms
            ),
        ),
        Termination::ExecutorError(msg) => failed(FailureReason::ExecutorError, None, msg.clone()),
        t if out.memory_exceeded => {
            let code = match t {
                Termination::Exited(c) => Some(*c),
                Termination::Signaled(s) => Some(128 + s),
                _ => None,
            };
            failed(
                FailureReason::MemoryLimit,
                code,
                format!(
                    "memory limit of {} MiB reached (the kernel killed a process of the run)",
                    limits.memory_mb
                ),
            )
        }
        Termination::Signaled(sig) if *sig == libc::SIGXCPU => failed(
            FailureReason::Timeout,
            Some(128 + sig),
            "CPU-time limit reached".into(),
        ),
        Termination::Signaled(sig) => failed(
            FailureReason::NonzeroExit,
            Some(128 + sig),
            format!("killed by signal {sig} ({})", signal_name(*sig)),
        ),
        Termination::Exited(0) => Finish {
            status: Status::Completed,
            failure_reason: None,
            error: None,
            ..failed(FailureReason::NonzeroExit, Some(0), String::new())
        },
        Termination::Exited(code) => failed(
            FailureReason::NonzeroExit,
            Some(*code),
            format!("exited with code {code}"),
        ),
    }
}

impl Report for Judge {
    fn key(&self) -> &'static str {
        "judge"
    }

    fn health(&self) -> BoxFuture<'_, Health> {
        Box::pin(async move {
            Health::new(
                Level::Ok,
                serde_json::json!({
                    "compile_cache_bytes": self.cache.size(),
                    "compile_cache_max_bytes": self.cfg.judge.compile_cache_mb * 1024 * 1024,
                }),
            )
        })
    }

    fn metrics(&self, e: &mut Exposition) {
        e.labeled(
            "crucible_verdicts_total",
            "Judged tests by verdict (compile_error: evaluations whose program did not compile).",
            &["verdict"],
            &self.stats.verdicts,
        );
        e.labeled(
            "crucible_compilations_total",
            "Compile steps run, by outcome.",
            &["outcome"],
            &self.stats.compilations,
        );
        e.counter(
            "crucible_compile_cache_hits_total",
            "Programs taken from the compile cache.",
            self.cache.hits.load(Ordering::Relaxed),
        );
        e.counter(
            "crucible_compile_cache_misses_total",
            "Programs not in the compile cache (compiled).",
            self.cache.misses.load(Ordering::Relaxed),
        );
        e.counter(
            "crucible_compile_cache_evictions_total",
            "Compile cache entries evicted to stay within judge.compile_cache_mb.",
            self.cache.evictions.load(Ordering::Relaxed),
        );
    }
}
