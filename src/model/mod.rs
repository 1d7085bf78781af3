//! The evaluation record, its statuses and failure reasons, and the validation of a
//! submission. Pure data: nothing here touches the store, the network or the clock
//! except [`now`].

mod judge;
mod validate;

pub use judge::*;
pub use validate::{
    code_pattern, document_submission, validate_submission, whole_number, FieldError, FileRequest,
    JudgeRules, LanguageState, LimitsRequest, SubmitRequest, SubmitRules, TestRequest,
};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

/// Lifecycle of an evaluation: `queued -> running -> completed | failed | cancelled`.
/// Terminal states never change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Queued,
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl Status {
    /// Every status, in lifecycle order.
    pub const ALL: [Status; 5] = [
        Status::Queued,
        Status::Running,
        Status::Completed,
        Status::Failed,
        Status::Cancelled,
    ];

    /// Terminal statuses never change again.
    pub fn is_terminal(self) -> bool {
        matches!(self, Status::Completed | Status::Failed | Status::Cancelled)
    }

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Running => "running",
            Status::Completed => "completed",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
        }
    }

    /// Its position in [`Status::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// One byte used in store index keys.
    pub fn code(self) -> u8 {
        match self {
            Status::Queued => b'q',
            Status::Running => b'r',
            Status::Completed => b'c',
            Status::Failed => b'f',
            Status::Cancelled => b'x',
        }
    }

    /// Parse the wire name.
    pub fn parse(s: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

/// Event types; the wire name is also the Redis channel (seed names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
pub enum EventType {
    #[serde(rename = "evaluation:queued")]
    Queued,
    #[serde(rename = "evaluation:started")]
    Started,
    #[serde(rename = "evaluation:completed")]
    Completed,
    #[serde(rename = "evaluation:failed")]
    Failed,
    #[serde(rename = "evaluation:cancelled")]
    Cancelled,
    /// One more test of a running evaluation was judged.
    #[serde(rename = "evaluation:progress")]
    Progress,
    #[serde(rename = "storage:evaluation:created")]
    StorageCreated,
    #[serde(rename = "storage:evaluation:updated")]
    StorageUpdated,
}

impl EventType {
    /// Every type, for docs and metrics.
    pub const ALL: [EventType; 8] = [
        EventType::Queued,
        EventType::Started,
        EventType::Completed,
        EventType::Failed,
        EventType::Cancelled,
        EventType::Progress,
        EventType::StorageCreated,
        EventType::StorageUpdated,
    ];

    /// The wire name (and channel).
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Queued => "evaluation:queued",
            EventType::Started => "evaluation:started",
            EventType::Completed => "evaluation:completed",
            EventType::Failed => "evaluation:failed",
            EventType::Cancelled => "evaluation:cancelled",
            EventType::Progress => "evaluation:progress",
            EventType::StorageCreated => "storage:evaluation:created",
            EventType::StorageUpdated => "storage:evaluation:updated",
        }
    }

    /// The event announcing that an evaluation entered `status`.
    pub fn for_status(status: Status) -> EventType {
        match status {
            Status::Queued => EventType::Queued,
            Status::Running => EventType::Started,
            Status::Completed => EventType::Completed,
            Status::Failed => EventType::Failed,
            Status::Cancelled => EventType::Cancelled,
        }
    }
}

/// Why a `failed` evaluation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FailureReason {
    /// The program ran and exited with a non-zero code (or was killed by a signal).
    NonzeroExit,
    /// The wall-clock timeout (or the CPU-time limit) was reached; the process tree was killed.
    Timeout,
    /// The program ran out of its memory allowance.
    MemoryLimit,
    /// The executor could not run the program (setup failure, missing interpreter, ...).
    ExecutorError,
    /// The appliance stopped or crashed while the evaluation was running.
    Interrupted,
    /// The program of a compiled language did not compile (see `compile`).
    CompileError,
}

impl FailureReason {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::NonzeroExit => "nonzero_exit",
            FailureReason::Timeout => "timeout",
            FailureReason::MemoryLimit => "memory_limit",
            FailureReason::ExecutorError => "executor_error",
            FailureReason::Interrupted => "interrupted",
            FailureReason::CompileError => "compile_error",
        }
    }
}

// The OpenAPI document is generated from this type: a new field needs only its doc line.
/// The evaluation record, as returned by the API and carried in every event's `data`.
/// Every field is always present (`null` when empty).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Evaluation {
    /// Its id (a UUIDv7: ids sort by creation time).
    pub eval_id: String,
    pub status: Status,
    pub language: String,
    /// The source code, as submitted.
    pub code: String,
    /// Standard input given to the program, if any.
    pub stdin: Option<String>,
    /// Wall-clock timeout in seconds.
    pub timeout: f64,
    /// When it was accepted (RFC 3339, UTC).
    #[schema(format = DateTime)]
    pub created_at: String,
    /// When it started running.
    #[schema(format = DateTime)]
    pub started_at: Option<String>,
    /// When it reached its terminal status.
    #[schema(format = DateTime)]
    pub completed_at: Option<String>,
    /// Wall-clock run time in milliseconds.
    pub runtime_ms: Option<u64>,
    /// CPU time (user + system) of the run's whole process tree, in milliseconds.
    #[serde(default)]
    pub cpu_ms: Option<u64>,
    /// Peak memory of the run's whole process tree, in KiB.
    #[serde(default)]
    pub memory_peak_kb: Option<u64>,
    /// The program's exit code (`null` until it ran, or when it was killed by a signal).
    pub exit_code: Option<i32>,
    /// `true` only for `completed`; `false` for the other terminal states; `null` before.
    pub success: Option<bool>,
    /// Captured stdout (capped; see `output_truncated`).
    pub output: String,
    /// Captured stderr (capped; see `output_truncated`).
    pub stderr: String,
    /// Why it failed, in words.
    pub error: Option<String>,
    /// stdout or stderr was longer than the cap and was cut.
    pub output_truncated: bool,
    /// Why it failed (`null` unless `failed`).
    pub failure_reason: Option<FailureReason>,
    /// The submission's `metadata`, as given.
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Value>,
    /// The limits the run gets (the request's, within the server's maximum for the
    /// language). `null` only on records written before limits were recorded.
    #[serde(default)]
    pub limits: Option<RunLimits>,
    /// Source files beside the main file (`code`).
    #[serde(default)]
    pub files: Vec<SourceFile>,
    /// Command-line arguments of the program.
    #[serde(default)]
    pub args: Vec<String>,
    /// Test cases: what was submitted and, once judged, what happened.
    #[serde(default)]
    pub tests: Vec<TestCase>,
    /// How outputs are compared with `expected_output`.
    #[serde(default)]
    pub compare: Compare,
    /// With `compare: float`: how far numbers may differ (absolute or relative).
    #[serde(default = "default_tolerance")]
    pub float_tolerance: f64,
    /// After the first test that is not accepted, the rest are `skipped`.
    #[serde(default)]
    pub stop_on_failure: bool,
    /// The compile step (`null` for interpreted languages, and until it ran).
    #[serde(default)]
    pub compile: Option<CompileInfo>,
    /// With tests: `accepted` when every test is, else the first verdict that is not;
    /// `compile_error` when compilation failed.
    #[serde(default)]
    pub verdict: Option<Verdict>,
    /// With tests: how many passed.
    #[serde(default)]
    pub score: Option<Score>,
    /// Rises by one with every event of this evaluation.
    pub version: u64,
    /// The node that accepted the evaluation.
    pub node: String,
    /// Seq of the `evaluation:queued` event; orders listings and pagination cursors.
    pub created_seq: u64,
}

impl Evaluation {
    /// A new record in `queued` (version 0), before the store assigns its seq.
    fn queued(eval_id: String, node: String, created_at: String, new: NewEvaluation) -> Self {
        Evaluation {
            eval_id,
            status: Status::Queued,
            language: new.language,
            code: new.code,
            stdin: new.stdin,
            timeout: new.timeout,
            created_at,
            started_at: None,
            completed_at: None,
            runtime_ms: None,
            cpu_ms: None,
            memory_peak_kb: None,
            exit_code: None,
            success: None,
            output: String::new(),
            stderr: String::new(),
            error: None,
            output_truncated: false,
            failure_reason: None,
            metadata: new.metadata,
            limits: Some(new.limits),
            files: new.files,
            args: new.args,
            tests: new.tests,
            compare: new.compare,
            float_tolerance: new.float_tolerance,
            stop_on_failure: new.stop_on_failure,
            compile: None,
            verdict: None,
            score: None,
            version: 0,
            node,
            created_seq: 0,
        }
    }
}

/// How a running evaluation ended, as the worker records it.
#[derive(Debug, Clone)]
pub struct Finish {
    pub status: Status,
    pub exit_code: Option<i32>,
    pub output: String,
    pub stderr: String,
    pub output_truncated: bool,
    pub failure_reason: Option<FailureReason>,
    pub error: Option<String>,
    pub runtime_ms: Option<u64>,
    pub cpu_ms: Option<u64>,
    pub memory_peak_kb: Option<u64>,
    /// The compile step, for compiled languages.
    pub compile: Option<CompileInfo>,
    /// Every test as judged (empty without tests).
    pub tests: Vec<TestCase>,
    pub verdict: Option<Verdict>,
    pub score: Option<Score>,
}

impl Finish {
    /// An outcome with no run: `failed` for `reason`, saying `error`.
    pub fn failed(reason: FailureReason, error: String) -> Finish {
        Finish {
            status: Status::Failed,
            exit_code: None,
            output: String::new(),
            stderr: String::new(),
            output_truncated: false,
            failure_reason: Some(reason),
            error: Some(error),
            runtime_ms: None,
            cpu_ms: None,
            memory_peak_kb: None,
            compile: None,
            tests: Vec::new(),
            verdict: None,
            score: None,
        }
    }
}

impl NewEvaluation {
    /// A plain Python submission with the default limits (tests of the store and sinks).
    #[cfg(test)]
    pub fn for_tests(code: &str) -> NewEvaluation {
        NewEvaluation {
            language: "python".into(),
            code: code.into(),
            stdin: None,
            timeout: 1.0,
            metadata: None,
            limits: crate::config::Config::default().max_limits("python"),
            files: Vec::new(),
            args: Vec::new(),
            tests: Vec::new(),
            compare: Compare::default(),
            float_tolerance: 1e-6,
            stop_on_failure: false,
        }
    }
}

fn default_tolerance() -> f64 {
    1e-6
}

/// A state change the record's current status does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransitionError {
    #[error("the evaluation is already {0}")]
    AlreadyTerminal(&'static str),
    #[error("the evaluation is {0}, not {1}")]
    WrongState(&'static str, &'static str),
    #[error("the evaluation has no test {0}")]
    NoSuchTest(usize),
}

/// The state machine: each transition returns the record as it is after the change
/// (version + 1) and the event that announces it; the record it is called on is left as
/// it was. The store persists both in one batch; nothing else changes a record.
impl Evaluation {
    /// A new submission: `queued`, version 1, announced by `evaluation:queued`.
    pub fn submitted(
        eval_id: String,
        node: String,
        created_at: String,
        new: NewEvaluation,
    ) -> (Evaluation, EventType) {
        let mut rec = Evaluation::queued(eval_id, node, created_at, new);
        rec.version = 1;
        (rec, EventType::Queued)
    }

    fn next(&self, status: Status) -> Evaluation {
        let mut n = self.clone();
        n.status = status;
        n.version += 1;
        n
    }

    /// `queued -> running`.
    pub fn start(&self, now: &str) -> Result<(Evaluation, EventType), TransitionError> {
        if self.status != Status::Queued {
            return Err(TransitionError::WrongState(self.status.as_str(), "queued"));
        }
        let mut n = self.next(Status::Running);
        n.started_at = Some(now.to_string());
        Ok((n, EventType::Started))
    }

    /// `running -> completed | failed | cancelled` with the run's outcome.
    pub fn finish(
        &self,
        fin: Finish,
        now: &str,
    ) -> Result<(Evaluation, EventType), TransitionError> {
        if self.status.is_terminal() {
            return Err(TransitionError::AlreadyTerminal(self.status.as_str()));
        }
        if self.status != Status::Running || !fin.status.is_terminal() {
            return Err(TransitionError::WrongState(self.status.as_str(), "running"));
        }
        let mut n = self.next(fin.status);
        n.completed_at = Some(now.to_string());
        n.exit_code = fin.exit_code;
        n.output = fin.output;
        n.stderr = fin.stderr;
        n.output_truncated = fin.output_truncated;
        n.failure_reason = fin.failure_reason;
        n.error = fin.error;
        n.runtime_ms = fin.runtime_ms;
        n.cpu_ms = fin.cpu_ms;
        n.memory_peak_kb = fin.memory_peak_kb;
        if fin.compile.is_some() {
            n.compile = fin.compile;
        }
        if !fin.tests.is_empty() {
            n.tests = fin.tests;
        }
        n.verdict = fin.verdict;
        n.score = fin.score;
        n.success = Some(match n.verdict {
            Some(v) => fin.status == Status::Completed && v == Verdict::Accepted,
            None => fin.status == Status::Completed,
        });
        Ok((n, EventType::for_status(fin.status)))
    }

    /// `running -> running`: test `index` was judged (and, with the first test, the
    /// compile step is known). Announced by `evaluation:progress`.
    pub fn progress(
        &self,
        index: usize,
        outcome: &TestOutcome,
        compile: Option<&CompileInfo>,
    ) -> Result<(Evaluation, EventType), TransitionError> {
        if self.status != Status::Running {
            return Err(TransitionError::WrongState(self.status.as_str(), "running"));
        }
        let Some(test) = self.tests.get(index) else {
            return Err(TransitionError::NoSuchTest(index));
        };
        let mut n = self.next(Status::Running);
        n.tests[index] = test.judged(outcome);
        if let Some(c) = compile {
            n.compile = Some(c.clone());
        }
        Ok((n, EventType::Progress))
    }

    /// `queued | running -> cancelled`, by request.
    pub fn cancel(&self, now: &str) -> Result<(Evaluation, EventType), TransitionError> {
        let why = match self.status {
            Status::Queued => "cancelled by request before it started",
            Status::Running => "cancelled by request while running",
            s => return Err(TransitionError::AlreadyTerminal(s.as_str())),
        };
        let mut n = self.next(Status::Cancelled);
        n.completed_at = Some(now.to_string());
        n.success = Some(false);
        n.error = Some(why.to_string());
        Ok((n, EventType::Cancelled))
    }

    /// `running -> failed` (`interrupted`): the appliance stopped while it ran.
    pub fn interrupt(&self, now: &str) -> Result<(Evaluation, EventType), TransitionError> {
        if self.status != Status::Running {
            return Err(TransitionError::WrongState(self.status.as_str(), "running"));
        }
        let mut n = self.next(Status::Failed);
        n.completed_at = Some(now.to_string());
        n.success = Some(false);
        n.failure_reason = Some(FailureReason::Interrupted);
        n.error = Some(
            "the appliance stopped while this evaluation was running; it was not finished"
                .to_string(),
        );
        Ok((n, EventType::Failed))
    }
}

/// The limits one evaluation runs under. A request may lower each of them, never raise
/// it above the server's maximum for its language.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RunLimits {
    /// Memory (and memory + swap) of the whole process tree, in MiB.
    pub memory_mb: u64,
    /// CPU time (user + system) of the whole process tree, in milliseconds.
    pub cpu_ms: u64,
    /// Processes and threads of the whole tree at once.
    pub max_processes: u64,
    /// Bytes of stdout and of stderr kept.
    pub max_output_bytes: u64,
}

impl RunLimits {
    /// The names, as in requests, records and `[limits]`.
    pub const NAMES: [&'static str; 4] =
        ["memory_mb", "cpu_ms", "max_processes", "max_output_bytes"];

    fn get_mut(&mut self, name: &str) -> Option<&mut u64> {
        match name {
            "memory_mb" => Some(&mut self.memory_mb),
            "cpu_ms" => Some(&mut self.cpu_ms),
            "max_processes" => Some(&mut self.max_processes),
            "max_output_bytes" => Some(&mut self.max_output_bytes),
            _ => None,
        }
    }

    /// The smallest accepted value of each limit.
    fn minimum(name: &str) -> u64 {
        match name {
            "memory_mb" => 16,
            "cpu_ms" => 10,
            "max_output_bytes" => 64,
            _ => 1,
        }
    }
}

/// A validated submission, ready for the store.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvaluation {
    pub language: String,
    pub code: String,
    pub stdin: Option<String>,
    pub timeout: f64,
    pub metadata: Option<Value>,
    /// The limits it will run under.
    pub limits: RunLimits,
    pub files: Vec<SourceFile>,
    pub args: Vec<String>,
    pub tests: Vec<TestCase>,
    pub compare: Compare,
    pub float_tolerance: f64,
    pub stop_on_failure: bool,
}

/// Current time as RFC 3339 UTC with milliseconds.
pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Code;
    use serde_json::json;

    fn langs(name: &str) -> LanguageState {
        match name {
            "python" | "sh" => LanguageState::Available,
            "ruby" => LanguageState::Unavailable("ruby is not installed".into()),
            _ => LanguageState::Unknown,
        }
    }

    fn rules() -> SubmitRules<'static> {
        SubmitRules {
            languages: &langs,
            max_code_bytes: 100,
            max_stdin_bytes: 10,
            max_metadata_bytes: 50,
            default_timeout: 10.0,
            max_timeout: 60.0,
            max_limits: &max_limits,
            main_file: &|_| Some("main.py".to_string()),
            judge: JudgeRules {
                max_tests: 3,
                max_eval_secs: 25.0,
                max_files: 2,
                max_args: 2,
            },
        }
    }

    fn max_limits(lang: &str) -> RunLimits {
        RunLimits {
            memory_mb: if lang == "sh" { 512 } else { 256 },
            cpu_ms: 60_000,
            max_processes: 64,
            max_output_bytes: 262_144,
        }
    }

    #[test]
    fn limits_may_be_lowered_never_raised() {
        let n = validate_submission(&json!({"code": "a"}), &rules()).expect("valid");
        assert_eq!(n.limits, max_limits("python"));
        let n = validate_submission(
            &json!({"code": "a", "limits": {"memory_mb": 64, "cpu_ms": 500.0, "max_processes": null}}),
            &rules(),
        )
        .expect("lowered");
        assert_eq!((n.limits.memory_mb, n.limits.cpu_ms), (64, 500));
        assert_eq!(n.limits.max_processes, 64, "others keep the maximum");
        let sh = validate_submission(
            &json!({"code": "a", "language": "sh", "limits": {"memory_mb": 400}}),
            &rules(),
        )
        .expect("the language's own maximum");
        assert_eq!(sh.limits.memory_mb, 400);
        for (limits, field, code) in [
            (
                json!({"memory_mb": 257}),
                "limits.memory_mb",
                Code::LimitTooHigh,
            ),
            (
                json!({"cpu_ms": 60_001}),
                "limits.cpu_ms",
                Code::LimitTooHigh,
            ),
            (
                json!({"max_processes": 0}),
                "limits.max_processes",
                Code::InvalidField,
            ),
            (
                json!({"memory_mb": "64"}),
                "limits.memory_mb",
                Code::InvalidField,
            ),
            (
                json!({"memory_mb": 1.5}),
                "limits.memory_mb",
                Code::InvalidField,
            ),
            (json!({"disk_mb": 1}), "limits.disk_mb", Code::InvalidField),
            (json!([1]), "limits", Code::InvalidField),
        ] {
            let e = validate_submission(&json!({"code": "a", "limits": limits}), &rules())
                .expect_err(field);
            assert_eq!((e.field.as_str(), e.code), (field, code), "{limits}");
        }
        let e = validate_submission(
            &json!({"code": "a", "limits": {"memory_mb": 300}}),
            &rules(),
        )
        .expect_err("too high");
        assert!(e.message.contains("at most 256"), "{}", e.message);
    }

    #[test]
    fn accepts_a_minimal_submission_with_defaults() {
        let n = validate_submission(&json!({"code": "print(1)"}), &rules()).expect("valid");
        assert_eq!(n.language, "python");
        assert_eq!(n.timeout, 10.0);
        assert_eq!(n.stdin, None);
    }

    #[test]
    fn names_the_bad_field() {
        let cases = [
            (json!([1]), "body"),
            (json!({}), "code"),
            (json!({"code": 5}), "code"),
            (json!({"code": "  "}), "code"),
            (json!({"code": "x".repeat(101)}), "code"),
            (json!({"code": "a", "language": 3}), "language"),
            (json!({"code": "a", "language": "cobol"}), "language"),
            (json!({"code": "a", "language": "ruby"}), "language"),
            (json!({"code": "a", "timeout": 0}), "timeout"),
            (json!({"code": "a", "timeout": -1}), "timeout"),
            (json!({"code": "a", "timeout": 61}), "timeout"),
            (json!({"code": "a", "timeout": "5"}), "timeout"),
            (json!({"code": "a", "stdin": 1}), "stdin"),
            (json!({"code": "a", "stdin": "x".repeat(11)}), "stdin"),
            (json!({"code": "a", "metadata": [1]}), "metadata"),
            (
                json!({"code": "a", "metadata": {"k": "x".repeat(60)}}),
                "metadata",
            ),
        ];
        for (body, field) in cases {
            let e = validate_submission(&body, &rules()).expect_err(&body.to_string());
            assert_eq!(e.field, field, "{body}");
        }
    }

    #[test]
    fn the_documented_whitespace_is_rusts() {
        for c in (0..=0x10ffff).filter_map(char::from_u32) {
            let listed = validate::WHITESPACE
                .iter()
                .any(|&(lo, hi)| (lo..=hi).contains(&(c as u32)));
            assert_eq!(listed, c.is_whitespace(), "U+{:04X}", c as u32);
        }
        let p = code_pattern();
        assert!(
            p.starts_with("^[^\\u0000]*[^\\u0000\\u0009-\\u000d\\u0020"),
            "{p}"
        );
    }

    #[test]
    fn unknown_language_has_its_own_code() {
        let e = validate_submission(&json!({"code": "a", "language": "cobol"}), &rules())
            .expect_err("unknown");
        assert_eq!(e.code, Code::UnsupportedLanguage);
        let e = validate_submission(&json!({"code": "a", "language": "ruby"}), &rules())
            .expect_err("missing");
        assert!(e.message.contains("not installed"));
    }

    fn sample() -> Evaluation {
        let new = validate_submission(&json!({"code": "print(1)"}), &rules()).expect("valid");
        Evaluation::submitted("e1".into(), "n".into(), "t0".into(), new).0
    }

    fn finish(status: Status) -> Finish {
        Finish {
            status,
            exit_code: Some(0),
            output: "o".into(),
            stderr: String::new(),
            output_truncated: false,
            failure_reason: None,
            error: None,
            runtime_ms: Some(1),
            cpu_ms: Some(1),
            memory_peak_kb: Some(100),
            compile: None,
            tests: Vec::new(),
            verdict: None,
            score: None,
        }
    }

    #[test]
    fn transitions_raise_the_version_and_name_their_event() {
        let q = sample();
        assert_eq!((q.status, q.version), (Status::Queued, 1));
        let (r, ev) = q.start("t1").expect("start");
        assert_eq!(
            (r.status, r.version, ev),
            (Status::Running, 2, EventType::Started)
        );
        assert_eq!(q.status, Status::Queued, "the original is unchanged");
        let (c, ev) = r.finish(finish(Status::Completed), "t2").expect("finish");
        assert_eq!(
            (c.status, c.version, ev),
            (Status::Completed, 3, EventType::Completed)
        );
        assert_eq!(
            (c.success, c.completed_at.as_deref()),
            (Some(true), Some("t2"))
        );
        let (i, ev) = r.interrupt("t3").expect("interrupt");
        assert_eq!(
            (i.status, i.failure_reason, ev),
            (
                Status::Failed,
                Some(FailureReason::Interrupted),
                EventType::Failed
            )
        );
        let (x, ev) = q.cancel("t4").expect("cancel queued");
        assert_eq!((x.status, ev), (Status::Cancelled, EventType::Cancelled));
    }

    #[test]
    fn illegal_transitions_are_refused() {
        let q = sample();
        assert!(matches!(
            q.finish(finish(Status::Completed), "t"),
            Err(TransitionError::WrongState("queued", "running"))
        ));
        assert!(q.interrupt("t").is_err());
        let (r, _) = q.start("t").expect("start");
        assert!(r.start("t").is_err());
        assert!(
            r.finish(finish(Status::Running), "t").is_err(),
            "not terminal"
        );
        let (c, _) = r.finish(finish(Status::Failed), "t").expect("finish");
        for res in [c.cancel("t"), c.finish(finish(Status::Completed), "t")] {
            assert!(matches!(
                res,
                Err(TransitionError::AlreadyTerminal("failed"))
            ));
        }
    }

    #[test]
    fn status_names_round_trip() {
        for s in Status::ALL {
            assert_eq!(Status::parse(s.as_str()), Some(s));
            assert_eq!(serde_json::to_value(s).expect("ser"), json!(s.as_str()));
        }
        assert!(Status::Completed.is_terminal());
        assert!(!Status::Running.is_terminal());
    }
}
