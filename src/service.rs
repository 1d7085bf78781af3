//! The operations the appliance offers, independent of transport. The HTTP gateway and
//! the Redis request/reply responder both call these, so validation, limits, durability
//! and error codes are the same whichever way a request arrives.
//!
//! This module validates and delegates; it never writes state except through the store.

use crate::config::Config;
use crate::error::{ApiError, Code};
use crate::events::Event;
use crate::executor::Executor;
use crate::model::{
    document_submission, validate_submission, Evaluation, FieldError, JudgeRules, LanguageState,
    NewEvaluation, Status, SubmitRules,
};
use crate::outbox::{Outbox, ReplayError, SinkReport};
use crate::queue::Queue;
use crate::store::{BackupInfo, DeadLetter, IdemKey, Store, Submitted};
use serde::Serialize;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use utoipa::ToSchema;

/// Most evaluations in one batch.
pub const MAX_BATCH: usize = 100;

/// Largest page of a listing.
pub const MAX_PAGE: usize = 100;

/// Default page size of a listing.
pub const DEFAULT_PAGE: usize = 20;

/// Largest `offset` of a listing: each request steps over that many entries, so deeper
/// pages are reached with `cursor`, which costs nothing.
pub const MAX_OFFSET: usize = 1_000_000;

/// The appliance's operations.
pub struct Service {
    pub cfg: Arc<Config>,
    /// The configuration as reloaded (token, limits, max_queued, log level); `cfg` is as
    /// started.
    pub live: Arc<crate::ops::reload::LiveConfig>,
    pub store: Arc<Store>,
    pub executor: Arc<dyn Executor>,
    pub queue: Arc<Queue>,
    pub outbox: Arc<Outbox>,
    pub shutdown: CancellationToken,
    /// Evaluations durably accepted (new ones, not idempotent repeats), all transports.
    pub accepted: AtomicU64,
}

/// A page of evaluations, newest first. Page with `cursor` (pass `next_cursor` back) or
/// with `offset` (pass `offset` + the number of evaluations in this page).
#[derive(Debug, Serialize, ToSchema)]
pub struct Page {
    /// Newest first.
    pub evaluations: Vec<Evaluation>,
    /// Pass as `cursor` to get the next page; `null` on the last one.
    pub next_cursor: Option<String>,
    /// How many evaluations match the filter in all (every page together).
    pub count: u64,
    /// Whether a next page exists.
    pub has_more: bool,
    /// The page size asked for (a page of very large records may hold fewer).
    pub limit: usize,
    /// How many evaluations were skipped before this page (after `cursor`, if given).
    pub offset: usize,
}

/// The answer to a submission.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Accepted {
    /// The evaluation's id (the first submission's, for a repeated `Idempotency-Key`).
    pub eval_id: String,
    /// `queued`; for a repeated `Idempotency-Key`, the evaluation's status now.
    pub status: Status,
    /// What happened, in words.
    pub message: String,
    /// Its place in the queue when it was accepted (1: the next to start); `null` for a
    /// repeated `Idempotency-Key`.
    pub queue_position: Option<u64>,
}

impl From<Submitted> for Accepted {
    fn from(s: Submitted) -> Accepted {
        let message = if s.existing {
            "already submitted with this Idempotency-Key; this is that evaluation"
        } else {
            "evaluation queued for processing"
        };
        Accepted {
            eval_id: s.eval_id,
            status: s.status,
            message: message.to_string(),
            queue_position: s.queue_position,
        }
    }
}

/// The answer to a batch: one entry per submission, in the order given. A batch is
/// accepted whole or not at all, so `queued` = `total` and `failed` = 0 in an answer.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct BatchAccepted {
    pub evaluations: Vec<Accepted>,
    /// Submissions in the batch.
    pub total: usize,
    /// Submissions accepted and queued.
    pub queued: usize,
    /// Submissions refused (always 0: a refused item refuses the batch, with a 422).
    pub failed: usize,
}

/// A non-negative whole number written with digits only (no sign, no spaces).
pub fn digits(s: &str) -> Option<usize> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// The form of an eval_id (a lowercase hyphenated UUID), which is also the form of a
/// listing cursor.
pub fn is_eval_id(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_digit() || (b'a'..=b'f').contains(c),
        })
}

/// What to list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListQuery {
    pub status: Option<Status>,
    pub limit: usize,
    /// The `next_cursor` of the previous page (an eval_id).
    pub after: Option<String>,
    /// Entries to skip first (after `after`, if given).
    pub offset: usize,
}

impl ListQuery {
    /// Parse the textual form (HTTP query parameters; Redis payload fields as text).
    /// A value that is given must be valid: an empty one is an error too.
    pub fn parse(
        status: Option<&str>,
        limit: Option<&str>,
        cursor: Option<&str>,
        offset: Option<&str>,
    ) -> Result<ListQuery, ApiError> {
        let status = match status {
            None => None,
            Some(s) => Some(Status::parse(s).ok_or_else(|| {
                ApiError::invalid_field(
                    "status",
                    "`status` must be one of queued, running, completed, failed, cancelled",
                )
            })?),
        };
        let limit = match limit {
            None => DEFAULT_PAGE,
            Some(s) => match digits(s) {
                Some(n) if (1..=MAX_PAGE).contains(&n) => n,
                _ => {
                    return Err(ApiError::invalid_field(
                        "limit",
                        format!("`limit` must be an integer from 1 to {MAX_PAGE}"),
                    ))
                }
            },
        };
        let after = match cursor {
            None => None,
            Some(c) => {
                if !is_eval_id(c) {
                    return Err(ApiError::invalid_field(
                        "cursor",
                        "`cursor` must be a value returned as `next_cursor`",
                    ));
                }
                Some(c.to_string())
            }
        };
        let offset = match offset {
            None => 0,
            Some(s) => match digits(s) {
                Some(n) if n <= MAX_OFFSET => n,
                _ => {
                    return Err(ApiError::invalid_field(
                        "offset",
                        format!(
                            "`offset` must be an integer from 0 to {MAX_OFFSET} (page further with `cursor`)"
                        ),
                    ))
                }
            },
        };
        Ok(ListQuery {
            status,
            limit,
            after,
            offset,
        })
    }
}

/// A fingerprint of a request: SHA-256 of its canonical JSON (object keys sorted at every
/// level), without the Redis payload's own `idempotency_key` field.
pub fn fingerprint(v: &Value) -> String {
    fn canonical(v: &Value, out: &mut String) {
        match v {
            Value::Object(m) => {
                let mut keys: Vec<&String> = m.keys().collect();
                keys.sort();
                out.push('{');
                for (i, k) in keys.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&Value::String(k.clone()).to_string());
                    out.push(':');
                    canonical(&m[k], out);
                }
                out.push('}');
            }
            Value::Array(a) => {
                out.push('[');
                for (i, x) in a.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    canonical(x, out);
                }
                out.push(']');
            }
            other => out.push_str(&other.to_string()),
        }
    }
    let mut body = v.clone();
    if let Value::Object(m) = &mut body {
        m.remove("idempotency_key");
    }
    let mut text = String::new();
    canonical(&body, &mut text);
    use sha2::Digest;
    let digest = sha2::Sha256::digest(text.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Check an idempotency key: 1 to 255 visible ASCII characters. `field` names it in the
/// error (`Idempotency-Key` over HTTP, `idempotency_key` over Redis).
pub fn check_idempotency_key(key: &str, field: &str) -> Result<String, ApiError> {
    if key.is_empty() || key.len() > 255 || !key.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return Err(ApiError::invalid_field(
            field,
            format!("{field} must be 1 to 255 visible ASCII characters"),
        ));
    }
    Ok(key.to_string())
}

impl Service {
    /// The rules a submission is validated (and documented) with.
    fn with_rules<R>(&self, f: impl FnOnce(&SubmitRules<'_>) -> R) -> R {
        let ex = self.executor.clone();
        let langs = move |name: &str| ex.language_state(name);
        let cfg = self.live.get();
        let l = &cfg.limits;
        let rules = SubmitRules {
            languages: &langs,
            max_code_bytes: l.max_code_bytes,
            max_stdin_bytes: l.max_stdin_bytes,
            max_metadata_bytes: l.max_metadata_bytes,
            default_timeout: l.default_timeout_secs,
            max_timeout: l.max_timeout_secs,
            max_limits: &|lang: &str| cfg.max_limits(lang),
            main_file: &|lang: &str| cfg.languages.get(lang).map(|l| l.file.clone()),
            judge: JudgeRules {
                max_tests: cfg.judge.max_tests,
                max_eval_secs: cfg.judge.max_eval_secs,
                max_files: cfg.judge.max_files,
                max_args: cfg.judge.max_args,
            },
        };
        f(&rules)
    }

    /// Validate one submission object.
    pub fn validate(&self, v: &Value) -> Result<NewEvaluation, FieldError> {
        self.with_rules(|rules| validate_submission(v, rules))
    }

    /// The configured languages this host can run now.
    pub fn available_languages(&self) -> Vec<String> {
        self.cfg
            .languages
            .keys()
            .filter(|l| self.executor.language_state(l) == LanguageState::Available)
            .cloned()
            .collect()
    }

    /// Write this server's submission bounds into the OpenAPI `components.schemas`.
    pub fn document_submission(&self, schemas: &mut Value) {
        let available = self.available_languages();
        self.with_rules(|rules| document_submission(schemas, rules, &available));
        document_backup_path(schemas, &self.cfg.backup_dir());
    }

    fn check_accepting(&self) -> Result<(), ApiError> {
        if self.shutdown.is_cancelled() {
            return Err(ApiError::shutting_down());
        }
        // The last measurement (at most a second old); the writer checks again.
        if let Some(e) = self.store.space_error() {
            return Err(e.into());
        }
        Ok(())
    }

    /// Durably accept one evaluation (returns after the flush).
    /// With an idempotency key, a retry of the same request (compared as parsed JSON:
    /// whitespace and key order do not matter) returns the first evaluation; a different
    /// request with the same key is `409 idempotency_key_conflict`.
    pub async fn submit(&self, v: &Value, idem_key: Option<String>) -> Result<Accepted, ApiError> {
        let new = self.validate(v)?;
        self.check_accepting()?;
        let idem_key = idem_key.map(|key| IdemKey {
            key,
            fingerprint: fingerprint(v),
        });
        let mut res = self
            .store
            .submit(vec![new], idem_key, self.live.get().max_queued as u64)
            .await?;
        let s = res
            .pop()
            .ok_or_else(|| ApiError::internal("the store accepted nothing"))?;
        if !s.existing {
            self.accepted.fetch_add(1, Ordering::Relaxed);
            // debug: at thousands of submissions per second an info line each would cost
            // more than the submission; "started" and "finished" are info.
            tracing::debug!(
                eval_id = %s.eval_id,
                status = "queued",
                event_type = "evaluation:queued",
                "evaluation accepted"
            );
        }
        Ok(s.into())
    }

    /// Durably accept up to [`MAX_BATCH`] evaluations, all or nothing.
    pub async fn submit_batch(&self, v: &Value) -> Result<BatchAccepted, ApiError> {
        let list = match v.get("evaluations") {
            Some(Value::Array(a)) => a,
            Some(_) => {
                return Err(ApiError::invalid_field(
                    "evaluations",
                    "`evaluations` must be an array",
                ))
            }
            None => {
                return Err(ApiError::invalid_field(
                    "evaluations",
                    "`evaluations` is required",
                ))
            }
        };
        if list.is_empty() {
            return Err(ApiError::invalid_field(
                "evaluations",
                "`evaluations` must not be empty",
            ));
        }
        if list.len() > MAX_BATCH {
            return Err(ApiError::new(
                Code::BatchTooLarge,
                format!(
                    "at most {MAX_BATCH} evaluations per batch; got {}",
                    list.len()
                ),
            )
            .with_field("evaluations"));
        }
        let mut news = Vec::with_capacity(list.len());
        for (i, item) in list.iter().enumerate() {
            news.push(
                self.validate(item)
                    .map_err(|e| ApiError::from(e.in_batch(i)))?,
            );
        }
        self.check_accepting()?;
        let n = news.len() as u64;
        let res = self
            .store
            .submit(news, None, self.live.get().max_queued as u64)
            .await?;
        self.accepted.fetch_add(n, Ordering::Relaxed);
        let evaluations: Vec<Accepted> = res.into_iter().map(Accepted::from).collect();
        Ok(BatchAccepted {
            total: evaluations.len(),
            queued: evaluations.len(),
            failed: 0,
            evaluations,
        })
    }

    /// One evaluation.
    pub async fn get(&self, id: &str) -> Result<Evaluation, ApiError> {
        self.store
            .get(id)
            .await?
            .ok_or_else(|| ApiError::not_found("evaluation"))
    }

    /// The record once it is terminal, or as it stands after `wait` (at most
    /// `[limits] max_wait_secs`; sooner when the appliance stops). Woken by every durable batch
    /// of the store, so the answer leaves as soon as the terminal state is on disk.
    pub async fn get_waiting(&self, id: &str, wait: Duration) -> Result<Evaluation, ApiError> {
        let most = Duration::from_secs(self.live.get().limits.max_wait_secs);
        let deadline = tokio::time::Instant::now() + wait.min(most);
        let mut head = self.store.subscribe_head();
        loop {
            head.borrow_and_update();
            let rec = self.get(id).await?;
            if rec.status.is_terminal() || self.shutdown.is_cancelled() {
                return Ok(rec);
            }
            tokio::select! {
                changed = head.changed() => {
                    if changed.is_err() {
                        return Ok(rec);
                    }
                }
                _ = tokio::time::sleep_until(deadline) => return Ok(rec),
                _ = self.shutdown.cancelled() => return Ok(rec),
            }
        }
    }

    /// A page of evaluations, newest first.
    pub async fn list(&self, q: &ListQuery) -> Result<Page, ApiError> {
        let (evaluations, next_cursor) = self
            .store
            .list(q.status, q.limit, q.after.as_deref(), q.offset)
            .await
            .map_err(|e| match e {
                crate::store::StoreError::NotFound => {
                    ApiError::new(Code::NotFound, "no evaluation has the id given as `cursor`")
                        .with_field("cursor")
                }
                other => other.into(),
            })?;
        Ok(Page {
            has_more: next_cursor.is_some(),
            count: self.store.count(q.status),
            limit: q.limit,
            offset: q.offset,
            evaluations,
            next_cursor,
        })
    }

    /// Cancel a queued evaluation or kill a running one; the record is `cancelled` on
    /// disk before this returns.
    pub async fn cancel(&self, id: &str) -> Result<Evaluation, ApiError> {
        let (rec, prev) = self.store.cancel(id).await?;
        if prev == Status::Running {
            self.queue.kill(id);
        }
        tracing::info!(eval_id = %id, status = "cancelled", previous = prev.as_str(), "evaluation cancelled");
        Ok(rec)
    }
}

/// The longest `path` of a backup, in characters (a name of at most 252 bytes: within
/// any filesystem's limit for one name).
const MAX_BACKUP_NAME_CHARS: usize = 63;

/// Write what [`backup_destination`] accepts into the document's `BackupRequest.path`: a
/// relative path of one or more names (none `.` or `..`, though `.` may stand between
/// names), or the same under the absolute `base`; repeated and trailing slashes allowed.
fn document_backup_path(schemas: &mut Value, base: &Path) {
    const NAME: &str = r"(?:[^/\u0000.][^/\u0000]*|\.[^/\u0000.][^/\u0000]*|\.\.[^/\u0000]+)";
    let mut escaped = String::new();
    for ch in base.to_string_lossy().chars() {
        if "\\^$.|?*+()[]{}".contains(ch) {
            escaped.push('\\');
        }
        escaped.push(ch);
    }
    let pattern = format!("^(?:{escaped}/+)?{NAME}(?:/+(?:{NAME}|\\.))*/*$");
    let path = &mut schemas["BackupRequest"]["properties"]["path"];
    path["minLength"] = json!(1);
    path["maxLength"] = json!(MAX_BACKUP_NAME_CHARS);
    path["pattern"] = json!(pattern);
}

/// Where a backup named `name` goes: inside `base` only. Plain relative names (no `..`,
/// no `.`), or an absolute path inside `base`; nothing on the way may be a symbolic link.
pub fn backup_destination(base: &Path, name: Option<&str>) -> Result<PathBuf, ApiError> {
    let bad = |why: &str| {
        ApiError::invalid_field(
            "path",
            format!(
                "`path` must name a directory inside the backup directory {} ({why})",
                base.display()
            ),
        )
    };
    let stamp;
    let name = match name {
        Some(n) => n,
        None => {
            stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ").to_string();
            &stamp
        }
    };
    if name.is_empty() || name.chars().count() > MAX_BACKUP_NAME_CHARS || name.contains('\0') {
        return Err(bad("1 to 63 characters"));
    }
    let p = Path::new(name);
    let rel = if p.is_absolute() {
        p.strip_prefix(base)
            .map_err(|_| bad("an absolute path must be inside it"))?
    } else {
        p
    };
    let mut dest = base.to_path_buf();
    let mut parts = 0;
    for c in rel.components() {
        match c {
            std::path::Component::Normal(part) => {
                dest.push(part);
                parts += 1;
                if std::fs::symlink_metadata(&dest).is_ok_and(|m| m.file_type().is_symlink()) {
                    return Err(bad("a symbolic link is in the way"));
                }
            }
            _ => return Err(bad("no `..`, `.` or root in a name")),
        }
    }
    if parts == 0 {
        return Err(bad("not the backup directory itself"));
    }
    Ok(dest)
}

/// Administration and the event log.
impl Service {
    /// This node's id.
    pub fn node_id(&self) -> &str {
        self.store.node_id()
    }

    /// Every configured language as the executor sees it.
    pub async fn languages(&self) -> Vec<crate::executor::LanguageInfo> {
        self.executor.languages().await
    }

    /// Every sink's delivery state.
    pub fn sinks(&self) -> Vec<SinkReport> {
        self.outbox.reports()
    }

    /// Redeliver `sink`'s events from `from_seq`; returns the new cursor.
    pub async fn replay(&self, sink: &str, from_seq: u64) -> Result<u64, ApiError> {
        match self.outbox.replay(sink, from_seq).await {
            Ok(cursor) => {
                tracing::info!(sink, from_seq, "replay requested");
                Ok(cursor)
            }
            Err(ReplayError::UnknownSink(_)) => Err(ApiError::not_found("sink")),
            Err(ReplayError::Store(e)) => Err(e.into()),
        }
    }

    /// Dead letters of one sink (or all), oldest first.
    pub fn dead_letters(
        &self,
        sink: Option<&str>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, ApiError> {
        Ok(self.store.dead_letters(sink, limit)?)
    }

    /// A consistent copy of the store under `backup_dir`: `name` is a relative path inside
    /// it (an absolute path inside it is accepted too); default: the current time.
    pub async fn backup(&self, name: Option<&str>) -> Result<BackupInfo, ApiError> {
        let dest = backup_destination(&self.cfg.backup_dir(), name)?;
        Ok(self.store.backup(dest).await?)
    }

    /// Pause or resume dispatching; returns whether it is paused now.
    pub fn set_paused(&self, paused: bool) -> bool {
        if paused {
            self.queue.pause();
        } else {
            self.queue.resume();
        }
        self.queue.is_paused()
    }

    /// The durable head: the last seq covered by a finished flush.
    pub fn head(&self) -> u64 {
        self.store.head()
    }

    /// Watch the durable head.
    pub fn subscribe_head(&self) -> watch::Receiver<u64> {
        self.store.subscribe_head()
    }

    /// The lowest retained seq.
    pub fn oldest_seq(&self) -> Result<u64, ApiError> {
        Ok(self.store.oldest_seq()?)
    }

    /// Events with `after < seq <= upto`, at most `max`.
    pub fn events(&self, after: u64, upto: u64, max: usize) -> Result<Vec<Event>, ApiError> {
        Ok(self.store.events(after, upto, max)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_query_parsing() {
        let id = "0193a0b4-7d2e-7c4a-9f00-00000000abcd";
        let q = ListQuery::parse(Some("failed"), Some("5"), Some(id), None).expect("valid");
        assert_eq!(
            q,
            ListQuery {
                status: Some(Status::Failed),
                limit: 5,
                after: Some(id.into()),
                offset: 0,
            }
        );
        let d = ListQuery::parse(None, None, None, None).expect("defaults");
        assert_eq!((d.status, d.limit, d.after), (None, DEFAULT_PAGE, None));
        let o = ListQuery::parse(None, Some("10"), None, Some("30")).expect("offset");
        assert_eq!((o.limit, o.offset), (10, 30));
        for (s, l, c, o, field) in [
            (Some("done"), None, None, None, "status"),
            (Some(""), None, None, None, "status"),
            (None, Some(""), None, None, "limit"),
            (None, Some("+5"), None, None, "limit"),
            (None, None, Some(""), None, "cursor"),
            (None, None, Some("01a2-ab"), None, "cursor"),
            (None, None, Some(&id.to_uppercase()), None, "cursor"),
            (None, Some("0"), None, None, "limit"),
            (None, Some("101"), None, None, "limit"),
            (None, Some("x"), None, None, "limit"),
            (None, None, Some("a b"), None, "cursor"),
            (None, None, Some(&"x".repeat(65)), None, "cursor"),
            (None, None, None, Some(""), "offset"),
            (None, None, None, Some("-1"), "offset"),
            (None, None, None, Some("1000001"), "offset"),
        ] {
            let e = ListQuery::parse(s, l, c, o).expect_err(field);
            assert_eq!(e.field.as_deref(), Some(field));
        }
        assert!(check_idempotency_key("abc-1", "k").is_ok());
        assert!(check_idempotency_key("has space", "k").is_err());
        assert!(check_idempotency_key(&"x".repeat(256), "k").is_err());
    }

    #[test]
    fn fingerprints_ignore_layout_not_content() {
        let a: Value = serde_json::from_str(r#"{"code": "x", "metadata": {"b": 1, "a": [1, 2]}}"#)
            .expect("json");
        let b: Value = serde_json::from_str(
            r#"{"metadata":{"a":[1,2],"b":1},"code":"x","idempotency_key":"k"}"#,
        )
        .expect("json");
        let c: Value = serde_json::from_str(r#"{"code": "y", "metadata": {"b": 1, "a": [1, 2]}}"#)
            .expect("json");
        let d: Value = serde_json::from_str(r#"{"code": "x", "metadata": {"b": 1, "a": [2, 1]}}"#)
            .expect("json");
        assert_eq!(fingerprint(&a), fingerprint(&b));
        assert_ne!(fingerprint(&a), fingerprint(&c));
        assert_ne!(fingerprint(&a), fingerprint(&d));
    }

    #[test]
    fn backups_stay_inside_the_backup_dir() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("backups");
        let ok = |n: &str| backup_destination(&base, Some(n)).expect(n);
        assert_eq!(ok("nightly"), base.join("nightly"));
        assert_eq!(ok("2026/12/01"), base.join("2026/12/01"));
        let abs = base.join("x").to_string_lossy().into_owned();
        assert_eq!(ok(&abs), base.join("x"));
        for bad in ["", "..", "../x", "a/../../x", "/etc/x", "/", ".", "a\0b"] {
            let e = backup_destination(&base, Some(bad)).expect_err(bad);
            assert_eq!(e.field.as_deref(), Some("path"), "{bad}");
        }
        std::fs::create_dir_all(&base).expect("mkdir");
        std::os::unix::fs::symlink("/tmp", base.join("link")).expect("symlink");
        assert!(backup_destination(&base, Some("link/x")).is_err());
        assert!(backup_destination(&base, None)
            .expect("default")
            .starts_with(&base));
    }
}
