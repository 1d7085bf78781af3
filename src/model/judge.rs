//! Judging: the parts of a submission and of the record that describe test cases,
//! extra source files, how output is compared, and the verdicts. Pure data and pure
//! functions (the comparison of an output with its expected output).

use serde::{Deserialize, Serialize};

/// A source file placed beside the main file (`code`), at `/code/<name>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SourceFile {
    /// A plain relative path (`util.h`, `pkg/mod.py`): no `..`, not absolute, not the
    /// main file's name, no duplicates.
    pub name: String,
    /// The file's content (UTF-8).
    pub content: String,
}

/// How a test's output is checked against its `expected_output`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Compare {
    /// Byte for byte.
    Exact,
    /// Trailing whitespace of each line and trailing empty lines ignored (the default).
    #[default]
    Trimmed,
    /// Whitespace-separated tokens.
    Tokens,
    /// Tokens; numbers equal within `float_tolerance` (absolute or relative).
    Float,
}

impl Compare {
    /// Every mode, for messages and docs.
    pub const ALL: [Compare; 4] = [
        Compare::Exact,
        Compare::Trimmed,
        Compare::Tokens,
        Compare::Float,
    ];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Compare::Exact => "exact",
            Compare::Trimmed => "trimmed",
            Compare::Tokens => "tokens",
            Compare::Float => "float",
        }
    }

    /// Parse the wire name.
    pub fn parse(s: &str) -> Option<Compare> {
        Compare::ALL.into_iter().find(|c| c.as_str() == s)
    }

    /// Whether `output` matches `expected`.
    pub fn matches(self, output: &str, expected: &str, tolerance: f64) -> bool {
        match self {
            Compare::Exact => output == expected,
            Compare::Trimmed => trimmed_lines(output) == trimmed_lines(expected),
            Compare::Tokens => output.split_whitespace().eq(expected.split_whitespace()),
            Compare::Float => {
                let (mut a, mut b) = (output.split_whitespace(), expected.split_whitespace());
                loop {
                    match (a.next(), b.next()) {
                        (None, None) => return true,
                        (Some(x), Some(y)) => {
                            if !tokens_match(x, y, tolerance) {
                                return false;
                            }
                        }
                        _ => return false,
                    }
                }
            }
        }
    }
}

fn trimmed_lines(s: &str) -> Vec<&str> {
    let mut lines: Vec<&str> = s.lines().map(|l| l.trim_end()).collect();
    while lines.last().is_some_and(|l| l.is_empty()) {
        lines.pop();
    }
    lines
}

fn tokens_match(x: &str, y: &str, tolerance: f64) -> bool {
    if x == y {
        return true;
    }
    match (x.parse::<f64>(), y.parse::<f64>()) {
        (Ok(a), Ok(b)) if a.is_finite() && b.is_finite() => {
            let diff = (a - b).abs();
            diff <= tolerance || diff <= tolerance * b.abs()
        }
        _ => false,
    }
}

/// The outcome of one test (or, for the evaluation, the first test that was not
/// accepted; `compile_error` when compilation failed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Accepted,
    WrongAnswer,
    TimeLimit,
    MemoryLimit,
    RuntimeError,
    OutputLimit,
    CompileError,
    Skipped,
}

impl Verdict {
    /// Every verdict, for metrics and docs.
    pub const ALL: [Verdict; 8] = [
        Verdict::Accepted,
        Verdict::WrongAnswer,
        Verdict::TimeLimit,
        Verdict::MemoryLimit,
        Verdict::RuntimeError,
        Verdict::OutputLimit,
        Verdict::CompileError,
        Verdict::Skipped,
    ];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Accepted => "accepted",
            Verdict::WrongAnswer => "wrong_answer",
            Verdict::TimeLimit => "time_limit",
            Verdict::MemoryLimit => "memory_limit",
            Verdict::RuntimeError => "runtime_error",
            Verdict::OutputLimit => "output_limit",
            Verdict::CompileError => "compile_error",
            Verdict::Skipped => "skipped",
        }
    }
}

/// One test case: what was submitted, and once judged, what happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TestCase {
    /// As submitted (optional).
    pub name: Option<String>,
    /// The program's standard input for this test.
    pub stdin: Option<String>,
    /// What the output must match (per `compare`); `null`: any output is accepted.
    pub expected_output: Option<String>,
    /// Wall-clock timeout of this test, in seconds.
    pub timeout: f64,
    /// `null` until judged.
    pub verdict: Option<Verdict>,
    /// The program's exit code (`null` when killed by a signal, or not run).
    pub exit_code: Option<i32>,
    /// Wall-clock time of this run, in milliseconds.
    pub runtime_ms: Option<u64>,
    /// CPU time of this run's whole process tree, in milliseconds.
    pub cpu_ms: Option<u64>,
    /// Peak memory of this run's whole process tree, in KiB.
    pub memory_peak_kb: Option<u64>,
    /// The test's stdout, capped at `[judge] test_output_bytes`.
    pub stdout: Option<String>,
    /// The test's stderr, capped likewise.
    pub stderr: Option<String>,
    /// The stored output was cut (at `test_output_bytes`), or the program wrote more
    /// than `max_output_bytes`.
    pub output_truncated: Option<bool>,
}

impl TestCase {
    /// A submitted test, not judged yet.
    pub fn submitted(
        name: Option<String>,
        stdin: Option<String>,
        expected_output: Option<String>,
        timeout: f64,
    ) -> TestCase {
        TestCase {
            name,
            stdin,
            expected_output,
            timeout,
            verdict: None,
            exit_code: None,
            runtime_ms: None,
            cpu_ms: None,
            memory_peak_kb: None,
            stdout: None,
            stderr: None,
            output_truncated: None,
        }
    }

    /// What happened when it ran (or `skipped`).
    pub fn judged(&self, r: &TestOutcome) -> TestCase {
        TestCase {
            verdict: Some(r.verdict),
            exit_code: r.exit_code,
            runtime_ms: r.runtime_ms,
            cpu_ms: r.cpu_ms,
            memory_peak_kb: r.memory_peak_kb,
            stdout: Some(r.stdout.clone()),
            stderr: Some(r.stderr.clone()),
            output_truncated: Some(r.output_truncated),
            ..self.clone()
        }
    }
}

/// The result of running one test.
#[derive(Debug, Clone, PartialEq)]
pub struct TestOutcome {
    pub verdict: Verdict,
    pub exit_code: Option<i32>,
    pub runtime_ms: Option<u64>,
    pub cpu_ms: Option<u64>,
    pub memory_peak_kb: Option<u64>,
    pub stdout: String,
    pub stderr: String,
    pub output_truncated: bool,
}

impl TestOutcome {
    /// A test that did not run because an earlier one failed (`stop_on_failure`).
    pub fn skipped() -> TestOutcome {
        TestOutcome {
            verdict: Verdict::Skipped,
            exit_code: None,
            runtime_ms: None,
            cpu_ms: None,
            memory_peak_kb: None,
            stdout: String::new(),
            stderr: String::new(),
            output_truncated: false,
        }
    }
}

/// The compile step of a compiled language.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CompileInfo {
    /// The compiler's exit code (`null` when it was killed).
    pub exit_code: Option<i32>,
    /// The compiler's stdout (capped).
    pub stdout: String,
    /// The compiler's stderr (capped): the diagnostics of a `compile_error`.
    pub stderr: String,
    /// Wall-clock time of the compile step, in milliseconds.
    pub runtime_ms: Option<u64>,
    /// CPU time of the compile step's process tree, in milliseconds.
    pub cpu_ms: Option<u64>,
    /// Peak memory of the compile step's process tree, in KiB.
    pub memory_peak_kb: Option<u64>,
    /// The program came from the compile cache (this evaluation compiled nothing).
    pub cached: bool,
}

/// Tests passed out of tests submitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Score {
    /// Tests accepted.
    pub passed: u64,
    /// Tests submitted.
    pub total: u64,
}

/// The verdict of an evaluation: `accepted` when every test is, else the first that is
/// not.
pub fn overall_verdict(tests: &[TestCase]) -> Verdict {
    tests
        .iter()
        .filter_map(|t| t.verdict)
        .find(|v| *v != Verdict::Accepted)
        .unwrap_or(Verdict::Accepted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_modes() {
        assert!(Compare::Exact.matches("1 2\n", "1 2\n", 0.0));
        assert!(!Compare::Exact.matches("1 2\n", "1 2", 0.0));
        assert!(Compare::Trimmed.matches("1 2  \nx\n\n\n", "1 2\nx", 0.0));
        assert!(!Compare::Trimmed.matches("1  2\n", "1 2\n", 0.0));
        assert!(
            !Compare::Trimmed.matches("\n1", "1", 0.0),
            "leading lines count"
        );
        assert!(Compare::Tokens.matches("1\n  2\t3", "1 2 3\n", 0.0));
        assert!(!Compare::Tokens.matches("1 2", "1 2 3", 0.0));
        assert!(Compare::Float.matches("0.3333334 x", "0.33333333 x", 1e-6));
        assert!(!Compare::Float.matches("0.334", "0.333", 1e-6));
        assert!(
            Compare::Float.matches("1000001", "1000000", 1e-6),
            "relative"
        );
        assert!(!Compare::Float.matches("nan", "nan1", 1e-6));
        assert!(!Compare::Float.matches("1", "1 2", 1e-6));
        for c in Compare::ALL {
            assert_eq!(Compare::parse(c.as_str()), Some(c));
        }
    }

    #[test]
    fn the_first_failure_is_the_verdict() {
        let mut t = vec![
            TestCase::submitted(None, None, None, 1.0),
            TestCase::submitted(None, None, None, 1.0),
        ];
        t[0].verdict = Some(Verdict::Accepted);
        assert_eq!(overall_verdict(&t), Verdict::Accepted);
        t[1].verdict = Some(Verdict::WrongAnswer);
        assert_eq!(overall_verdict(&t), Verdict::WrongAnswer);
        t[0].verdict = Some(Verdict::TimeLimit);
        assert_eq!(overall_verdict(&t), Verdict::TimeLimit);
    }
}
