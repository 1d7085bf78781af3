//! Validation of a submission: every field checked, the first problem named with its
//! field and a stable code; nothing here has side effects.

use super::*;
use crate::error::{ApiError, Code};
use serde_json::{json, Value};
use utoipa::ToSchema;

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
    /// Source files placed beside the main file (`code` keeps its language's name):
    /// at most `[judge] max_files`; their contents and `code` together at most
    /// `limits.max_code_bytes` bytes.
    pub files: Option<Vec<FileRequest>>,
    /// Command-line arguments of the program, at most `[judge] max_args`.
    pub args: Option<Vec<String>>,
    /// Test cases, at most `[judge] max_tests`: the program is compiled once and run once
    /// per test, each time in a fresh sandbox; their timeouts may add up to at most
    /// `[judge] max_eval_secs` (above it: 422 `limit_too_high`, field `tests`).
    pub tests: Option<Vec<TestRequest>>,
    /// How each test's output is compared with its `expected_output`; absent or `null`:
    /// `trimmed`.
    pub compare: Option<Compare>,
    /// With `compare: float`: how far numbers may differ, absolute or relative; absent
    /// or `null`: 1e-6.
    #[schema(minimum = 0.0, maximum = 1.0)]
    pub float_tolerance: Option<f64>,
    /// After the first test that is not accepted, skip the rest; absent or `null`: false.
    pub stop_on_failure: Option<bool>,
}

/// A source file of a submission.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FileRequest {
    /// A plain relative path: components of letters, digits, `.`, `_`, `-` and `+`, none
    /// starting with `.`; not the main file's name; no two files alike.
    #[schema(
        pattern = "^[A-Za-z0-9_+-][A-Za-z0-9._+-]{0,63}(/[A-Za-z0-9_+-][A-Za-z0-9._+-]{0,63}){0,3}$"
    )]
    pub name: String,
    /// The file's content (UTF-8, no NUL character).
    #[schema(pattern = "^[^\\u0000]*$")]
    pub content: String,
}

/// A test case of a submission.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TestRequest {
    /// A name for it, at most 256 bytes.
    #[schema(max_length = 256)]
    pub name: Option<String>,
    /// The program's standard input, at most `limits.max_stdin_bytes` bytes.
    pub stdin: Option<String>,
    /// The output expected (per `compare`), at most `limits.max_stdin_bytes` bytes;
    /// absent or `null`: any output of a clean exit is accepted.
    pub expected_output: Option<String>,
    /// Wall-clock timeout of this test in seconds (as `timeout`); absent or `null`: the
    /// evaluation's `timeout`.
    pub timeout: Option<f64>,
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
pub(crate) const WHITESPACE: [(u32, u32); 10] = [
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
    req["files"]["maxItems"] = json!(rules.judge.max_files);
    // Names must differ too (a rule on one property of the items: in the description).
    req["files"]["uniqueItems"] = json!(true);
    req["args"]["maxItems"] = json!(rules.judge.max_args);
    req["args"]["items"]["maxLength"] = json!(4096);
    req["args"]["items"]["pattern"] = json!("^[^\\u0000]*$");
    req["tests"]["maxItems"] = json!(rules.judge.max_tests);
    schemas["FileRequest"]["properties"]["content"]["maxLength"] = json!(rules.max_code_bytes);
    let test = &mut schemas["TestRequest"]["properties"];
    test["stdin"]["maxLength"] = json!(rules.max_stdin_bytes);
    test["expected_output"]["maxLength"] = json!(rules.max_stdin_bytes);
    test["timeout"]["exclusiveMinimum"] = json!(0);
    test["timeout"]["maximum"] = json!(rules.max_timeout);
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
    // Languages' maxima differ (the JVM's are higher): one variant per language, chosen
    // by `language` (absent or null: python), narrows `limits` to that language's own.
    let Some(mut largest) = max else { return };
    let mut variants = Vec::new();
    let mut narrows = false;
    for l in available {
        let mut own = (rules.max_limits)(l);
        let mut props = serde_json::Map::new();
        for name in RunLimits::NAMES {
            if let (Some(v), Some(top)) = (own.get_mut(name), largest.get_mut(name)) {
                if *v < *top {
                    props.insert(name.to_string(), json!({"maximum": *v}));
                }
            }
        }
        narrows |= !props.is_empty();
        let limits = json!({"anyOf": [{"type": "null"}, {"type": "object", "properties": props}]});
        variants.push(if l == "python" {
            json!({"properties": {"language": {"enum": [null, "python"]}, "limits": limits}})
        } else {
            json!({"required": ["language"], "properties": {"language": {"const": l}, "limits": limits}})
        });
    }
    if narrows {
        schemas["SubmitRequest"]["anyOf"] = Value::Array(variants);
    }
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
    /// The name of a language's main file (extra files may not take it).
    pub main_file: &'a dyn Fn(&str) -> Option<String>,
    pub judge: JudgeRules,
}

/// The caps on judging fields (`[judge]` and `[limits]`).
#[derive(Debug, Clone, Copy)]
pub struct JudgeRules {
    pub max_tests: usize,
    /// The most the tests' timeouts may add up to, in seconds.
    pub max_eval_secs: f64,
    pub max_files: usize,
    pub max_args: usize,
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

    /// Put the field inside `parent` (`tests[2].stdin`).
    fn nested(mut self, parent: &str) -> Self {
        self.field = format!("{parent}.{}", self.field);
        self
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
    check_text("code", &code, rules.max_code_bytes)?;
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
    let timeout =
        timeout_field(obj.get("timeout"), "timeout", rules)?.unwrap_or(rules.default_timeout);
    let stdin = opt_text(obj, "stdin", rules.max_stdin_bytes)?;
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
    let main_file = (rules.main_file)(&language);
    let files = validate_files(obj.get("files"), code.len(), main_file.as_deref(), rules)?;
    let args = validate_args(obj.get("args"), rules)?;
    let tests = validate_tests(obj.get("tests"), timeout, rules)?;
    let compare = match obj.get("compare") {
        None | Some(Value::Null) => Compare::default(),
        Some(Value::String(c)) => Compare::parse(c).ok_or_else(|| {
            FieldError::new(
                "compare",
                "`compare` must be one of exact, trimmed, tokens, float",
            )
        })?,
        Some(_) => return Err(FieldError::new("compare", "`compare` must be a string")),
    };
    let float_tolerance = match obj.get("float_tolerance") {
        None | Some(Value::Null) => 1e-6,
        Some(Value::Number(n)) => match n.as_f64() {
            Some(t) if t.is_finite() && (0.0..=1.0).contains(&t) => t,
            _ => {
                return Err(FieldError::new(
                    "float_tolerance",
                    "`float_tolerance` must be a number from 0 to 1",
                ))
            }
        },
        Some(_) => {
            return Err(FieldError::new(
                "float_tolerance",
                "`float_tolerance` must be a number",
            ))
        }
    };
    let stop_on_failure = match obj.get("stop_on_failure") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(FieldError::new(
                "stop_on_failure",
                "`stop_on_failure` must be true or false",
            ))
        }
    };
    Ok(NewEvaluation {
        language,
        code,
        stdin,
        timeout,
        metadata,
        limits,
        files,
        args,
        tests,
        compare,
        float_tolerance,
        stop_on_failure,
    })
}

/// Text under `max` bytes, without NUL (programs receive it as a C string or a file).
fn check_text(field: &str, s: &str, max: usize) -> Result<(), FieldError> {
    if s.len() > max {
        return Err(FieldError::new(
            field,
            format!("`{field}` is {} bytes; the limit is {max}", s.len()),
        ));
    }
    if field == "code" && s.contains('\0') {
        return Err(FieldError::new(
            field,
            format!("`{field}` must not contain NUL characters"),
        ));
    }
    Ok(())
}

/// An optional string field under `max` bytes.
fn opt_text(
    obj: &serde_json::Map<String, Value>,
    field: &str,
    max: usize,
) -> Result<Option<String>, FieldError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => {
            check_text(field, s, max)?;
            Ok(Some(s.clone()))
        }
        Some(_) => Err(FieldError::new(
            field,
            format!("`{field}` must be a string"),
        )),
    }
}

/// A timeout in seconds: above 0, at most the server's maximum.
fn timeout_field(
    v: Option<&Value>,
    field: &str,
    rules: &SubmitRules<'_>,
) -> Result<Option<f64>, FieldError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_f64() {
            Some(t) if t.is_finite() && t > 0.0 && t <= rules.max_timeout => Ok(Some(t)),
            _ => Err(FieldError::new(
                field,
                format!(
                    "`{field}` must be a number of seconds above 0 and at most {}",
                    rules.max_timeout
                ),
            )),
        },
        Some(_) => Err(FieldError::new(
            field,
            format!("`{field}` must be a number of seconds"),
        )),
    }
}

/// A plain relative path: components of `[A-Za-z0-9._+-]`, none empty, `.` or `..`,
/// none starting with a dot; at most 4 levels and 128 bytes.
fn plain_relative_path(name: &str) -> bool {
    let parts: Vec<&str> = name.split('/').collect();
    !name.is_empty()
        && name.len() <= 128
        && parts.len() <= 4
        && parts.iter().all(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'+'))
        })
}

fn validate_files(
    v: Option<&Value>,
    code_bytes: usize,
    main_file: Option<&str>,
    rules: &SubmitRules<'_>,
) -> Result<Vec<SourceFile>, FieldError> {
    let list = match v {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(a)) => a,
        Some(_) => return Err(FieldError::new("files", "`files` must be an array")),
    };
    if list.len() > rules.judge.max_files {
        return Err(FieldError::new(
            "files",
            format!(
                "at most {} files beside `code`; got {}",
                rules.judge.max_files,
                list.len()
            ),
        ));
    }
    let mut out: Vec<SourceFile> = Vec::with_capacity(list.len());
    let mut total = code_bytes;
    for (i, f) in list.iter().enumerate() {
        let field = format!("files[{i}]");
        let name = match f.get("name") {
            Some(Value::String(n)) => n.clone(),
            _ => {
                return Err(FieldError::new(
                    &format!("{field}.name"),
                    "each file needs a `name` (a string)",
                ))
            }
        };
        let content = match f.get("content") {
            Some(Value::String(c)) => c.clone(),
            _ => {
                return Err(FieldError::new(
                    &format!("{field}.content"),
                    "each file needs a `content` (a string)",
                ))
            }
        };
        if let Some(extra) = f.as_object().and_then(|o| {
            o.keys()
                .find(|k| k.as_str() != "name" && k.as_str() != "content")
        }) {
            return Err(FieldError::new(
                &format!("{field}.{}", truncate_for_message(extra)),
                "a file has only `name` and `content`",
            ));
        }
        if !plain_relative_path(&name) {
            return Err(FieldError::new(
                &format!("{field}.name"),
                "a file name is a plain relative path (letters, digits, `._+-`, `/` between \
                 parts; no `..`, no leading `/` or `.`, at most 4 levels)",
            ));
        }
        let clash = Some(name.as_str()) == main_file
            || out.iter().any(|o| {
                o.name == name
                    || o.name.starts_with(&format!("{name}/"))
                    || name.starts_with(&format!("{}/", o.name))
            });
        if clash {
            return Err(FieldError::new(
                &format!("{field}.name"),
                format!(
                    "`{}` is given twice (or is the main file)",
                    truncate_for_message(&name)
                ),
            ));
        }
        if content.contains('\0') {
            return Err(FieldError::new(
                &format!("{field}.content"),
                "file contents must not contain NUL characters",
            ));
        }
        total += content.len();
        if total > rules.max_code_bytes {
            return Err(FieldError::new(
                "files",
                format!(
                    "`code` and `files` together are over {} bytes",
                    rules.max_code_bytes
                ),
            ));
        }
        out.push(SourceFile { name, content });
    }
    Ok(out)
}

fn validate_args(v: Option<&Value>, rules: &SubmitRules<'_>) -> Result<Vec<String>, FieldError> {
    let list = match v {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(a)) => a,
        Some(_) => {
            return Err(FieldError::new(
                "args",
                "`args` must be an array of strings",
            ))
        }
    };
    if list.len() > rules.judge.max_args {
        return Err(FieldError::new(
            "args",
            format!("at most {} arguments", rules.judge.max_args),
        ));
    }
    list.iter()
        .enumerate()
        .map(|(i, a)| match a {
            Value::String(s) if s.len() <= 4096 && !s.contains('\0') => Ok(s.clone()),
            _ => Err(FieldError::new(
                &format!("args[{i}]"),
                "each argument is a string of at most 4096 bytes without NUL",
            )),
        })
        .collect()
}

fn validate_tests(
    v: Option<&Value>,
    default_timeout: f64,
    rules: &SubmitRules<'_>,
) -> Result<Vec<TestCase>, FieldError> {
    let list = match v {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(a)) => a,
        Some(_) => return Err(FieldError::new("tests", "`tests` must be an array")),
    };
    if list.len() > rules.judge.max_tests {
        return Err(FieldError::new(
            "tests",
            format!(
                "at most {} tests per evaluation; got {}",
                rules.judge.max_tests,
                list.len()
            ),
        ));
    }
    let mut out = Vec::with_capacity(list.len());
    let mut total_secs = 0.0;
    for (i, t) in list.iter().enumerate() {
        let field = format!("tests[{i}]");
        let Some(obj) = t.as_object() else {
            return Err(FieldError::new(&field, "each test is an object"));
        };
        if let Some(extra) = obj
            .keys()
            .find(|k| !matches!(k.as_str(), "name" | "stdin" | "expected_output" | "timeout"))
        {
            return Err(FieldError::new(
                &format!("{field}.{}", truncate_for_message(extra)),
                "a test has `name`, `stdin`, `expected_output` and `timeout`",
            ));
        }
        let name = opt_text(obj, "name", 256).map_err(|e| e.nested(&field))?;
        let stdin = opt_text(obj, "stdin", rules.max_stdin_bytes).map_err(|e| e.nested(&field))?;
        let expected = opt_text(obj, "expected_output", rules.max_stdin_bytes)
            .map_err(|e| e.nested(&field))?;
        let timeout = timeout_field(obj.get("timeout"), "timeout", rules)
            .map_err(|e| e.nested(&field))?
            .unwrap_or(default_timeout);
        total_secs += timeout;
        out.push(TestCase::submitted(name, stdin, expected, timeout));
    }
    if total_secs > rules.judge.max_eval_secs {
        return Err(FieldError {
            field: "tests".into(),
            code: Code::LimitTooHigh,
            message: format!(
                "the tests' timeouts add up to {total_secs} s; this server allows at most {} s \
                 per evaluation",
                rules.judge.max_eval_secs
            ),
        });
    }
    Ok(out)
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
