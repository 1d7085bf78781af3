//! Live reconfiguration: SIGHUP (systemd's `ExecReload=`) re-reads the configuration
//! file and applies what can change while serving; everything else is logged as needing
//! a restart and left as it runs. An invalid file is refused and the running
//! configuration kept.
//!
//! Applied live: `api_token` / `api_token_file`, `log_level`, `max_queued`, `[limits]`
//! and the languages' `memory_mb` / `max_processes`. The running configuration is a
//! [`LiveConfig`]: readers take a snapshot per request, the reloader swaps it whole.

use crate::config::{Config, Overrides};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

/// The running configuration, swappable at runtime.
pub struct LiveConfig {
    current: RwLock<Arc<Config>>,
}

impl LiveConfig {
    pub fn new(cfg: Arc<Config>) -> LiveConfig {
        LiveConfig {
            current: RwLock::new(cfg),
        }
    }

    /// A snapshot of the configuration now.
    pub fn get(&self) -> Arc<Config> {
        match self.current.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn set(&self, cfg: Arc<Config>) {
        match self.current.write() {
            Ok(mut c) => *c = cfg,
            Err(poisoned) => *poisoned.into_inner() = cfg,
        }
    }
}

/// What a reload did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Settings applied live (dotted keys).
    pub applied: Vec<String>,
    /// Settings that changed in the file but take effect only after a restart.
    pub need_restart: Vec<String>,
}

/// Dotted keys whose values differ between `a` and `b`.
fn changed_keys(a: &Config, b: &Config) -> Vec<String> {
    fn walk(prefix: &str, a: &toml::Value, b: Option<&toml::Value>, out: &mut Vec<String>) {
        match (a, b) {
            (toml::Value::Table(ta), Some(toml::Value::Table(tb))) => {
                for (k, va) in ta {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, va, tb.get(k), out);
                }
                for k in tb.keys().filter(|k| !ta.contains_key(*k)) {
                    out.push(if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    });
                }
            }
            (va, Some(vb)) if va == vb => {}
            _ => out.push(prefix.to_string()),
        }
    }
    let (Ok(va), Ok(vb)) = (toml::Value::try_from(a), toml::Value::try_from(b)) else {
        return vec!["(the configuration cannot be compared)".into()];
    };
    let mut out = Vec::new();
    walk("", &va, Some(&vb), &mut out);
    // A key absent on one side (an optional unset) shows up from the other side too.
    let mut back = Vec::new();
    walk("", &vb, Some(&va), &mut back);
    for k in back {
        if !out.contains(&k) {
            out.push(k);
        }
    }
    out.sort();
    out
}

fn is_live(key: &str) -> bool {
    matches!(
        key,
        "api_token" | "api_token_file" | "log_level" | "max_queued"
    ) || key.starts_with("limits.")
        || (key.starts_with("languages.")
            && (key.ends_with(".memory_mb") || key.ends_with(".max_processes")))
}

/// The running configuration with the live settings of `new` applied.
fn merge(old: &Config, new: &Config) -> Config {
    let mut c = old.clone();
    c.api_token = new.api_token.clone();
    c.api_token_file = new.api_token_file.clone();
    c.log_level = new.log_level.clone();
    c.max_queued = new.max_queued;
    c.limits = new.limits.clone();
    for (name, lang) in c.languages.iter_mut() {
        if let Some(n) = new.languages.get(name) {
            lang.memory_mb = n.memory_mb;
            lang.max_processes = n.max_processes;
        }
    }
    c
}

/// Re-read `path` (keeping the flags' listen address and data dir) and apply what can
/// change live. Errors leave the running configuration untouched.
pub fn reload(live: &LiveConfig, path: Option<&PathBuf>) -> Result<Outcome, String> {
    let old = live.get();
    let overrides = Overrides {
        listen: Some(old.listen),
        data_dir: Some(old.data_dir.clone()),
    };
    let new = Config::load(path.map(|p| p.as_path()), &overrides).map_err(|e| e.to_string())?;
    let merged = merge(&old, &new);
    // The merged configuration must itself be valid (limits against the body cap, ...).
    merged.validate().map_err(|e| e.to_string())?;
    let mut out = Outcome::default();
    for key in changed_keys(&old, &new) {
        if is_live(&key) {
            out.applied.push(key);
        } else {
            out.need_restart.push(key);
        }
    }
    if out.applied.iter().any(|k| k == "log_level") {
        crate::ops::logging::set_filter(&merged.log_level)?;
    }
    live.set(Arc::new(merged));
    Ok(out)
}

/// Reload on every SIGHUP, logging what happened, until the process ends.
pub fn on_sighup(live: Arc<LiveConfig>, path: Option<PathBuf>) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            crate::ops::systemd::notify("RELOADING=1");
            match reload(&live, path.as_ref()) {
                Ok(o) => {
                    for key in &o.applied {
                        tracing::info!(setting = %key, "reload: applied");
                    }
                    for key in &o.need_restart {
                        tracing::warn!(setting = %key, "reload: changed, takes effect after a restart");
                    }
                    tracing::info!(
                        applied = o.applied.len(),
                        need_restart = o.need_restart.len(),
                        "configuration reloaded"
                    );
                }
                Err(e) => tracing::error!(
                    error = %e,
                    "reload refused: the configuration file is invalid; the running configuration is kept"
                ),
            }
            crate::ops::systemd::notify("READY=1");
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_and_restart_settings_are_told_apart() {
        let a = Config::default();
        let mut b = a.clone();
        b.api_token = Some("t".into());
        b.limits.max_code_bytes = 1000;
        b.workers = 5;
        let keys = changed_keys(&a, &b);
        assert_eq!(keys, vec!["api_token", "limits.max_code_bytes", "workers"]);
        assert!(is_live("api_token") && is_live("limits.max_code_bytes"));
        assert!(!is_live("workers"));
        let m = merge(&a, &b);
        assert_eq!((m.api_token.as_deref(), m.workers), (Some("t"), a.workers));
    }
}
