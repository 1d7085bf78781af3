//! tracing setup: journald when running under systemd (`JOURNAL_STREAM` set), human
//! text or JSON on stderr otherwise.
//!
//! journald: event fields become journald fields exactly as documented (upper-cased, no
//! prefix), so `journalctl -u crucible EVAL_ID=...` filters one evaluation; integers are
//! written as integers and absent values are absent (fields are never Debug-formatted
//! `Option`s). Priorities: error 3 (failures of the appliance itself), warning 4 (retries,
//! degraded sinks), info 6 (lifecycle), debug 7.

use crate::config::LogFormat;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

type FilterHandle = tracing_subscriber::reload::Handle<EnvFilter, tracing_subscriber::Registry>;

/// The installed filter, replaceable at runtime (`log_level` on reload).
static FILTER: std::sync::OnceLock<FilterHandle> = std::sync::OnceLock::new();

/// Replace the log filter (unless `RUST_LOG` set it: the environment wins).
pub fn set_filter(filter: &str) -> Result<(), String> {
    if std::env::var_os("RUST_LOG").is_some() {
        return Ok(());
    }
    let f = EnvFilter::try_new(filter).map_err(|e| format!("invalid log_level `{filter}`: {e}"))?;
    match FILTER.get() {
        Some(h) => h.reload(f).map_err(|e| e.to_string()),
        None => Ok(()),
    }
}

/// Install the global subscriber. `RUST_LOG` overrides `default_filter`.
pub fn init(format: LogFormat, default_filter: &str) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(default_filter))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let format = match format {
        LogFormat::Auto if std::env::var_os("JOURNAL_STREAM").is_some() => LogFormat::Journald,
        LogFormat::Auto => LogFormat::Human,
        other => other,
    };
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let _ = FILTER.set(handle);
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Journald => match tracing_journald::layer() {
            Ok(layer) => {
                let priorities = tracing_journald::PriorityMappings {
                    info: tracing_journald::Priority::Informational,
                    debug: tracing_journald::Priority::Debug,
                    ..tracing_journald::PriorityMappings::new()
                };
                let layer = layer
                    .with_syslog_identifier("crucible".into())
                    .with_field_prefix(None)
                    .with_priority_mappings(priorities);
                let _ = registry.with(layer).try_init();
            }
            Err(e) => {
                let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
                let _ = registry
                    .with(
                        tracing_subscriber::fmt::layer()
                            .with_ansi(ansi)
                            .with_writer(std::io::stderr),
                    )
                    .try_init();
                tracing::warn!(error = %e, "journald is not reachable; logging to stderr");
            }
        },
        LogFormat::Json => {
            let _ = registry
                .with(
                    tracing_subscriber::fmt::layer()
                        .json()
                        .flatten_event(true)
                        .with_writer(std::io::stderr),
                )
                .try_init();
        }
        LogFormat::Human | LogFormat::Auto => {
            // Colour only on a terminal: never ANSI codes in files or pipes.
            let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
            let _ = registry
                .with(
                    tracing_subscriber::fmt::layer()
                        .with_ansi(ansi)
                        .with_writer(std::io::stderr),
                )
                .try_init();
        }
    }
}
