//! The evaluation record, its statuses and failure reasons, and the validation of a
//! submission. Pure data: nothing here touches the store, the network or the clock
//! except [`now`].

use crate::error::{ApiError, Code};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
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
    #[serde(rename = "storage:evaluation:created")]
    StorageCreated,
    #[serde(rename = "storage:evaluation:updated")]
    StorageUpdated,
}

impl EventType {
    /// Every type, for docs and metrics.
    pub const ALL: [EventType; 7] = [
        EventType::Queued,
        EventType::Started,
        EventType::Completed,
        EventType::Failed,
        EventType::Cancelled,
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
}

/// A state change the record's current status does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransitionError {
    #[error("the evaluation is already {0}")]
    AlreadyTerminal(&'static str),
    #[error("the evaluation is {0}, not {1}")]
    WrongState(&'static str, &'static str),
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
        n.success = Some(fin.status == Status::Completed);
        Ok((n, EventType::for_status(fin.status)))
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

// The OpenAPI document describes this type (its `///` lines are the document's text);
// `validate_submission` checks it field by field (a 422 names the field), and
// `document_submission` writes the bounds that depend on the configuration into the
// document from the same `SubmitRules`. A new request field is a field here with its doc
// line, plus its check in `validate_submission`.
/// A submission: the body of `POST /api/eval`, each item of `POST /api/eval-batch`, the
/// payload of the Redis `submit_evaluation` request. Other fields are ignored.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SubmitRequest {
    /// Source code: at least one character that is not whitespace, no NUL character, at
    /// most `limits.max_code_bytes` bytes (UTF-8).
    pub code: String,
    /// One of the languages this server runs (`GET /health`, `executor.languages`);
    /// absent or `null`: `python`.
    pub language: Option<String>,
    /// Wall-clock timeout in seconds, above 0 and at most `limits.max_timeout_secs`;
    /// absent or `null`: `limits.default_timeout_secs`.
    pub timeout: Option<f64>,
    /// Standard input of the program, at most `limits.max_stdin_bytes` bytes.
    pub stdin: Option<String>,
    /// Any JSON object (at most `limits.max_metadata_bytes` bytes serialized), stored and
    /// returned as given.
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Value>,
    /// Lower limits for this run; absent or `null`: the server's maximum for the language.
    pub limits: Option<LimitsRequest>,
}

/// The `limits` of a submission: each optional, a whole number from its minimum up to
/// the server's maximum for the language (above it: 422 `limit_too_high`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LimitsRequest {
    /// Memory (and memory + swap) of the whole process tree, in MiB.
    pub memory_mb: Option<u64>,
    /// CPU time (user + system) of the whole process tree, in milliseconds.
    pub cpu_ms: Option<u64>,
    /// Processes and threads of the whole tree at once.
    pub max_processes: Option<u64>,
    /// Bytes of stdout and of stderr kept.
    pub max_output_bytes: Option<u64>,
}

/// The characters `code` may not consist of only: Rust's `char::is_whitespace` (the
/// Unicode White_Space property), as ranges, so that the document can spell them out:
/// `\s` means different sets in different regex dialects (Python's `re` adds U+001C to
/// U+001F, ECMA-262 adds U+FEFF).
const WHITESPACE: [(u32, u32); 10] = [
    (0x09, 0x0d),
    (0x20, 0x20),
    (0x85, 0x85),
    (0xa0, 0xa0),
    (0x1680, 0x1680),
    (0x2000, 0x200a),
    (0x2028, 0x2029),
    (0x202f, 0x202f),
    (0x205f, 0x205f),
    (0x3000, 0x3000),
];

/// The pattern of `code`: no NUL, and at least one character that is not whitespace.
pub fn code_pattern() -> String {
    let mut class = String::from("\\u0000");
    for (lo, hi) in WHITESPACE {
        class.push_str(&format!("\\u{lo:04x}"));
        if hi != lo {
            class.push_str(&format!("-\\u{hi:04x}"));
        }
    }
    format!("^[^\\u0000]*[^{class}][^\\u0000]*$")
}

/// Write the bounds [`validate_submission`] enforces with `rules` into the document's
/// `SubmitRequest` and `LimitsRequest` schemas (`schemas` is `components.schemas`):
/// lengths, the timeout range, the languages that can run now (`available`), the limits'
/// minimums and maximums.
pub fn document_submission(schemas: &mut Value, rules: &SubmitRules<'_>, available: &[String]) {
    let req = &mut schemas["SubmitRequest"]["properties"];
    req["code"]["minLength"] = json!(1);
    req["code"]["maxLength"] = json!(rules.max_code_bytes);
    req["code"]["pattern"] = json!(code_pattern());
    req["stdin"]["maxLength"] = json!(rules.max_stdin_bytes);
    let mut langs: Vec<Value> = available.iter().map(|l| json!(l)).collect();
    langs.push(Value::Null);
    req["language"]["enum"] = Value::Array(langs);
    req["timeout"]["exclusiveMinimum"] = json!(0);
    req["timeout"]["maximum"] = json!(rules.max_timeout);
    // The most any available language allows; a language with a lower maximum answers
    // 422 limit_too_high above its own (its maximum is in GET /health).
    let mut max: Option<RunLimits> = None;
    for l in available {
        let m = (rules.max_limits)(l);
        max = Some(match max {
            None => m,
            Some(a) => RunLimits {
                memory_mb: a.memory_mb.max(m.memory_mb),
                cpu_ms: a.cpu_ms.max(m.cpu_ms),
                max_processes: a.max_processes.max(m.max_processes),
                max_output_bytes: a.max_output_bytes.max(m.max_output_bytes),
            },
        });
    }
    let limits = &mut schemas["LimitsRequest"]["properties"];
    for name in RunLimits::NAMES {
        limits[name]["minimum"] = json!(RunLimits::minimum(name));
        if let Some(mut m) = max {
            if let Some(v) = m.get_mut(name) {
                limits[name]["maximum"] = json!(*v);
            }
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
}

/// What validation needs to know.
#[derive(Clone)]
pub struct SubmitRules<'a> {
    pub languages: &'a dyn Fn(&str) -> LanguageState,
    pub max_code_bytes: usize,
    pub max_stdin_bytes: usize,
    pub max_metadata_bytes: usize,
    pub default_timeout: f64,
    pub max_timeout: f64,
    /// The most a request may ask for, per language (also the default).
    pub max_limits: &'a dyn Fn(&str) -> RunLimits,
}

/// Whether a language can be used right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LanguageState {
    Available,
    /// Configured, but the interpreter is missing on this host; the text says what to install.
    Unavailable(String),
    Unknown,
}

/// A validation failure: the field and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub code: Code,
    pub message: String,
}

impl From<FieldError> for ApiError {
    fn from(e: FieldError) -> Self {
        ApiError::new(e.code, e.message).with_field(&e.field)
    }
}

impl FieldError {
    fn new(field: &str, message: impl Into<String>) -> Self {
        FieldError {
            field: field.to_string(),
            code: Code::InvalidField,
            message: message.into(),
        }
    }

    /// Prefix the field with its position in a batch (`evaluations[3].code`).
    pub fn in_batch(mut self, index: usize) -> Self {
        self.field = format!("evaluations[{index}].{}", self.field);
        self
    }
}

/// Validate one submission object (already parsed as JSON).
pub fn validate_submission(
    v: &Value,
    rules: &SubmitRules<'_>,
) -> Result<NewEvaluation, FieldError> {
    let obj = v
        .as_object()
        .ok_or_else(|| FieldError::new("body", "the body must be a JSON object"))?;
    let code = match obj.get("code") {
        None | Some(Value::Null) => return Err(FieldError::new("code", "`code` is required")),
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(FieldError::new("code", "`code` must be a string")),
    };
    if code.trim().is_empty() {
        return Err(FieldError::new("code", "`code` must not be empty"));
    }
    if code.len() > rules.max_code_bytes {
        return Err(FieldError::new(
            "code",
            format!(
                "`code` is {} bytes; the limit is {}",
                code.len(),
                rules.max_code_bytes
            ),
        ));
    }
    if code.contains('\0') {
        return Err(FieldError::new(
            "code",
            "`code` must not contain NUL characters",
        ));
    }
    let language = match obj.get("language") {
        None | Some(Value::Null) => "python".to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(FieldError::new("language", "`language` must be a string")),
    };
    match (rules.languages)(&language) {
        LanguageState::Available => {}
        LanguageState::Unavailable(why) => {
            return Err(FieldError {
                field: "language".into(),
                code: Code::UnsupportedLanguage,
                message: why,
            })
        }
        LanguageState::Unknown => {
            return Err(FieldError {
                field: "language".into(),
                code: Code::UnsupportedLanguage,
                message: format!("unknown language `{}`", truncate_for_message(&language)),
            })
        }
    }
    let timeout = match obj.get("timeout") {
        None | Some(Value::Null) => rules.default_timeout,
        Some(Value::Number(n)) => match n.as_f64() {
            Some(t) if t.is_finite() && t > 0.0 && t <= rules.max_timeout => t,
            _ => {
                return Err(FieldError::new(
                    "timeout",
                    format!(
                        "`timeout` must be a number of seconds above 0 and at most {}",
                        rules.max_timeout
                    ),
                ))
            }
        },
        Some(_) => {
            return Err(FieldError::new(
                "timeout",
                "`timeout` must be a number of seconds",
            ))
        }
    };
    let stdin = match obj.get("stdin") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => {
            if s.len() > rules.max_stdin_bytes {
                return Err(FieldError::new(
                    "stdin",
                    format!(
                        "`stdin` is {} bytes; the limit is {}",
                        s.len(),
                        rules.max_stdin_bytes
                    ),
                ));
            }
            Some(s.clone())
        }
        Some(_) => return Err(FieldError::new("stdin", "`stdin` must be a string")),
    };
    let metadata = match obj.get("metadata") {
        None | Some(Value::Null) => None,
        Some(m @ Value::Object(_)) => {
            let size = serde_json::to_vec(m).map(|b| b.len()).unwrap_or(usize::MAX);
            if size > rules.max_metadata_bytes {
                return Err(FieldError::new(
                    "metadata",
                    format!(
                        "`metadata` is {size} bytes; the limit is {}",
                        rules.max_metadata_bytes
                    ),
                ));
            }
            Some(m.clone())
        }
        Some(_) => return Err(FieldError::new("metadata", "`metadata` must be an object")),
    };
    let limits = validate_limits(obj.get("limits"), (rules.max_limits)(&language))?;
    Ok(NewEvaluation {
        language,
        code,
        stdin,
        timeout,
        metadata,
        limits,
    })
}

/// A JSON number that is a whole number from 0 to `u64::MAX`: `64` or `64.0` (JSON
/// Schema's `integer` counts both), not `64.5` or `-1`.
pub fn whole_number(v: &Value) -> Option<u64> {
    v.as_u64().or_else(|| {
        v.as_f64()
            .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f < 18_446_744_073_709_551_616.0)
            .map(|f| f as u64)
    })
}

/// `limits`: each key optional (`null` counts as absent), a whole number from its minimum
/// up to `max`'s value.
fn validate_limits(v: Option<&Value>, max: RunLimits) -> Result<RunLimits, FieldError> {
    let obj = match v {
        None | Some(Value::Null) => return Ok(max),
        Some(Value::Object(o)) => o,
        Some(_) => return Err(FieldError::new("limits", "`limits` must be an object")),
    };
    let mut out = max;
    for (key, value) in obj {
        let field = format!("limits.{}", truncate_for_message(key));
        let mut capped = max;
        let Some(cap) = capped.get_mut(key).map(|c| *c) else {
            return Err(FieldError::new(
                &field,
                format!(
                    "unknown limit; expected one of {}",
                    RunLimits::NAMES.join(", ")
                ),
            ));
        };
        if value.is_null() {
            continue;
        }
        let min = RunLimits::minimum(key);
        let n = match whole_number(value) {
            Some(n) if n >= min => n,
            _ => {
                return Err(FieldError::new(
                    &field,
                    format!("`{field}` must be a whole number of at least {min}"),
                ))
            }
        };
        if n > cap {
            return Err(FieldError {
                field: field.clone(),
                code: Code::LimitTooHigh,
                message: format!("`{field}` is {n}; this server allows at most {cap}"),
            });
        }
        if let Some(slot) = out.get_mut(key) {
            *slot = n;
        }
    }
    Ok(out)
}

fn truncate_for_message(s: &str) -> String {
    let mut out: String = s.chars().take(40).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}

/// Current time as RFC 3339 UTC with milliseconds.
pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;
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
            let listed = WHITESPACE
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
