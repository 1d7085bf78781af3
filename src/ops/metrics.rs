//! Metric primitives (lock-free counters and histograms) and a writer for the
//! Prometheus text exposition format 0.0.4. Each module keeps its own counters; the
//! `/metrics` handler gathers them through [`Exposition`] (each subsystem writes its own
//! rows through the [`crate::ops::report`] seam). `promtool check metrics` runs on a real
//! answer in the integration tests.
//!
//! Written here rather than with a client library (issue 17): `prometheus-client` writes
//! only OpenMetrics, which `promtool check metrics` and classic-format scrapers read as
//! untyped `_total` families without help; the `prometheus` crate refuses to encode a
//! family that has no samples yet (its HELP/TYPE would vanish until the first one) and
//! needs each metric's name when it is created, where our subsystems name them when they
//! report.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// A cumulative histogram with fixed upper bounds.
#[derive(Debug)]
pub struct Histogram {
    bounds: Vec<f64>,
    counts: Vec<AtomicU64>,
    count: AtomicU64,
    /// Sum in micro-units (value * 1e6), kept as an integer for atomic adds.
    sum_micros: AtomicU64,
}

impl Histogram {
    /// A histogram with the given increasing upper bounds (+Inf is implied).
    pub fn new(bounds: &[f64]) -> Self {
        Histogram {
            bounds: bounds.to_vec(),
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }

    /// Record one observation.
    pub fn observe(&self, v: f64) {
        for (i, b) in self.bounds.iter().enumerate() {
            if v <= *b {
                self.counts[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        let micros = if v.is_finite() && v > 0.0 {
            (v * 1e6) as u64
        } else {
            0
        };
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Sum of observations.
    pub fn sum(&self) -> f64 {
        self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
    }
}

/// Counters keyed by a small set of label values.
#[derive(Debug, Default)]
pub struct LabeledCounter {
    values: Mutex<BTreeMap<Vec<String>, u64>>,
}

impl LabeledCounter {
    /// Add `n` to the counter with these label values.
    pub fn add(&self, labels: &[&str], n: u64) {
        if let Ok(mut m) = self.values.lock() {
            *m.entry(labels.iter().map(|s| s.to_string()).collect())
                .or_insert(0) += n;
        }
    }

    /// Current values.
    pub fn snapshot(&self) -> Vec<(Vec<String>, u64)> {
        self.values
            .lock()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), *v)).collect())
            .unwrap_or_default()
    }
}

/// Builds a Prometheus text exposition.
#[derive(Default)]
pub struct Exposition {
    out: String,
}

/// A label value: backslash, double quote and newline escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A HELP text: backslash and newline escaped (quotes stay).
fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

/// A sample value as the format spells it: `+Inf`, `-Inf`, `NaN` for the non-finite
/// ones (Rust would write `inf`, which no parser reads).
fn value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        v.to_string()
    }
}

fn labels(names: &[&str], values: &[String]) -> String {
    if names.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = names
        .iter()
        .zip(values)
        .map(|(n, v)| format!("{n}=\"{}\"", escape(v)))
        .collect();
    format!("{{{}}}", parts.join(","))
}

impl Exposition {
    fn header(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    /// A counter without labels.
    pub fn counter(&mut self, name: &str, help: &str, v: u64) {
        self.header(name, "counter", help);
        let _ = writeln!(self.out, "{name} {v}");
    }

    /// A gauge without labels.
    pub fn gauge(&mut self, name: &str, help: &str, v: f64) {
        self.header(name, "gauge", help);
        let _ = writeln!(self.out, "{name} {}", value(v));
    }

    /// A 0/1 gauge.
    pub fn flag(&mut self, name: &str, help: &str, on: bool) {
        self.gauge(name, help, if on { 1.0 } else { 0.0 });
    }

    /// A labeled family (`kind` is `counter` or `gauge`).
    pub fn family(
        &mut self,
        name: &str,
        kind: &str,
        help: &str,
        label_names: &[&str],
        rows: &[(Vec<String>, f64)],
    ) {
        self.header(name, kind, help);
        for (vals, v) in rows {
            let _ = writeln!(
                self.out,
                "{name}{} {}",
                labels(label_names, vals),
                value(*v)
            );
        }
    }

    /// A labeled counter.
    pub fn labeled(&mut self, name: &str, help: &str, label_names: &[&str], c: &LabeledCounter) {
        let rows: Vec<(Vec<String>, f64)> = c
            .snapshot()
            .into_iter()
            .map(|(k, v)| (k, v as f64))
            .collect();
        self.family(name, "counter", help, label_names, &rows);
    }

    /// A histogram.
    pub fn histogram(&mut self, name: &str, help: &str, h: &Histogram) {
        self.header(name, "histogram", help);
        for (i, b) in h.bounds.iter().enumerate() {
            let _ = writeln!(
                self.out,
                "{name}_bucket{{le=\"{b}\"}} {}",
                h.counts[i].load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(self.out, "{name}_bucket{{le=\"+Inf\"}} {}", h.count());
        let _ = writeln!(self.out, "{name}_sum {}", h.sum());
        let _ = writeln!(self.out, "{name}_count {}", h.count());
    }

    /// The finished text.
    pub fn finish(self) -> String {
        self.out
    }
}

/// Resident set size of this process in bytes (from /proc/self/statm).
pub fn rss_bytes() -> u64 {
    let page = 4096u64;
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map(|pages| pages * page)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let h = Histogram::new(&[1.0, 2.0]);
        h.observe(0.5);
        h.observe(1.5);
        h.observe(5.0);
        let mut e = Exposition::default();
        e.histogram("x", "help", &h);
        let t = e.finish();
        assert!(t.contains("x_bucket{le=\"1\"} 1"), "{t}");
        assert!(t.contains("x_bucket{le=\"2\"} 2"), "{t}");
        assert!(t.contains("x_bucket{le=\"+Inf\"} 3"), "{t}");
        assert!(t.contains("x_count 3"), "{t}");
    }

    #[test]
    fn help_and_non_finite_values_are_spelled_as_the_format_says() {
        let mut e = Exposition::default();
        e.gauge("g", "a \\ b\nc \"q\"", f64::INFINITY);
        e.gauge("n", "h", f64::NAN);
        e.family(
            "f",
            "gauge",
            "h",
            &["k"],
            &[(vec!["v".into()], f64::NEG_INFINITY)],
        );
        let t = e.finish();
        assert!(t.contains("# HELP g a \\\\ b\\nc \"q\"\n"), "{t}");
        assert!(t.contains("\ng +Inf\n"), "{t}");
        assert!(t.contains("\nn NaN\n"), "{t}");
        assert!(t.contains("f{k=\"v\"} -Inf"), "{t}");
    }

    #[test]
    fn labels_are_escaped() {
        let c = LabeledCounter::default();
        c.add(&["a\"b"], 2);
        let mut e = Exposition::default();
        e.labeled("y_total", "help", &["k"], &c);
        assert!(e.finish().contains("y_total{k=\"a\\\"b\"} 2"));
    }
}
