//! PostgreSQL: the one place that talks to PostgreSQL (the seed's storage worker).
//!
//! An outbox sink that keeps a queryable copy of every evaluation (`evaluations`, one
//! row per eval_id, every field of the record plus `version` and `node`) and every event
//! (`evaluation_events`, append-only, keyed by `event_id`). Each relay batch is one
//! transaction: the batch is deduplicated per evaluation keeping the highest version and
//! upserted with one `INSERT ... SELECT FROM UNNEST(...) ON CONFLICT DO UPDATE ... WHERE
//! evaluations.version < EXCLUDED.version` (an older version never overwrites a newer
//! one), and the events are inserted with `ON CONFLICT (event_id) DO NOTHING`. Only after
//! the commit does the relay move the cursor, appending `storage:evaluation:created` /
//! `storage:evaluation:updated` confirmations in the same store batch.
//!
//! Several appliances can write into one database: eval_ids are UUIDv7 and event_ids
//! UUIDv4, both global; `node` says where each came from. Migrations are versioned, run
//! at connection time under an advisory lock, and are idempotent.
//!
//! Errors: connection problems, shutdowns, resource and serialization errors are outages
//! (retry with backoff, reconnect); a data error (SQLSTATE class 22/23) is blamed on the
//! batch, which the relay then narrows down to the event that causes it (dead letter).

use crate::config::PostgresConfig;
use crate::events::Confirmation;
use crate::events::{Event, EventType};
use crate::model::Evaluation;
use crate::ops::metrics::Exposition;
use crate::ops::report::{Health, Probe, Report};
use crate::ops::worker::{State, Worker};
use crate::outbox::{Sink, SinkError};
use crate::BoxFuture;
use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;
use tokio_postgres::{Client, NoTls, Statement};
use tokio_util::sync::CancellationToken;

/// A connection with its prepared statements.
struct Conn {
    client: Client,
    upsert: Statement,
    insert_events: Statement,
}

/// Schema migrations, applied in order, each once.
pub const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "evaluations and evaluation_events",
        r#"
CREATE TABLE IF NOT EXISTS evaluations (
    eval_id          text PRIMARY KEY,
    node             text NOT NULL,
    status           text NOT NULL,
    language         text NOT NULL,
    code             text NOT NULL,
    stdin            text,
    timeout          double precision NOT NULL,
    created_at       timestamptz NOT NULL,
    started_at       timestamptz,
    completed_at     timestamptz,
    runtime_ms       bigint,
    exit_code        integer,
    success          boolean,
    output           text NOT NULL,
    stderr           text NOT NULL,
    error            text,
    output_truncated boolean NOT NULL,
    failure_reason   text,
    metadata         jsonb,
    version          bigint NOT NULL,
    created_seq      bigint NOT NULL,
    synced_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS evaluations_status_created ON evaluations (status, created_at DESC);
CREATE INDEX IF NOT EXISTS evaluations_node_created ON evaluations (node, created_at DESC);
CREATE TABLE IF NOT EXISTS evaluation_events (
    event_id   text PRIMARY KEY,
    node       text NOT NULL,
    seq        bigint NOT NULL,
    type       text NOT NULL,
    eval_id    text NOT NULL,
    version    bigint NOT NULL,
    timestamp  timestamptz NOT NULL,
    data       jsonb NOT NULL,
    synced_at  timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX IF NOT EXISTS evaluation_events_node_seq ON evaluation_events (node, seq);
CREATE INDEX IF NOT EXISTS evaluation_events_eval ON evaluation_events (eval_id, version);
"#,
    ),
    (
        2,
        "usage and limits of each run",
        r#"
ALTER TABLE evaluations ADD COLUMN IF NOT EXISTS cpu_ms bigint;
ALTER TABLE evaluations ADD COLUMN IF NOT EXISTS memory_peak_kb bigint;
ALTER TABLE evaluations ADD COLUMN IF NOT EXISTS limits jsonb;
"#,
    ),
    (
        3,
        "judging: files, args, tests, compile, verdict, score",
        r#"
ALTER TABLE evaluations ADD COLUMN IF NOT EXISTS files jsonb NOT NULL DEFAULT '[]';
ALTER TABLE evaluations ADD COLUMN IF NOT EXISTS args jsonb NOT NULL DEFAULT '[]';
ALTER TABLE evaluations ADD COLUMN IF NOT EXISTS tests jsonb NOT NULL DEFAULT '[]';
ALTER TABLE evaluations ADD COLUMN IF NOT EXISTS compare text NOT NULL DEFAULT 'trimmed';
ALTER TABLE evaluations ADD COLUMN IF NOT EXISTS float_tolerance double precision NOT NULL DEFAULT 1e-6;
ALTER TABLE evaluations ADD COLUMN IF NOT EXISTS stop_on_failure boolean NOT NULL DEFAULT false;
ALTER TABLE evaluations ADD COLUMN IF NOT EXISTS compile jsonb;
ALTER TABLE evaluations ADD COLUMN IF NOT EXISTS verdict text;
ALTER TABLE evaluations ADD COLUMN IF NOT EXISTS score jsonb;
CREATE INDEX IF NOT EXISTS evaluations_verdict_created ON evaluations (verdict, created_at DESC);
"#,
    ),
];

/// Advisory lock key serializing migrations across appliances.
const MIGRATION_LOCK: i64 = 0x0063_7275_6369_626c; // "crucibl"

const UPSERT: &str = r#"
INSERT INTO evaluations AS e (
    eval_id, node, status, language, code, stdin, timeout, created_at, started_at,
    completed_at, runtime_ms, exit_code, success, output, stderr, error, output_truncated,
    failure_reason, metadata, version, created_seq, cpu_ms, memory_peak_kb, limits,
    files, args, tests, compare, float_tolerance, stop_on_failure, compile, verdict, score)
SELECT * FROM UNNEST(
    $1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::float8[],
    $8::timestamptz[], $9::timestamptz[], $10::timestamptz[], $11::int8[], $12::int4[],
    $13::bool[], $14::text[], $15::text[], $16::text[], $17::bool[], $18::text[],
    $19::jsonb[], $20::int8[], $21::int8[], $22::int8[], $23::int8[], $24::jsonb[],
    $25::jsonb[], $26::jsonb[], $27::jsonb[], $28::text[], $29::float8[], $30::bool[],
    $31::jsonb[], $32::text[], $33::jsonb[])
ON CONFLICT (eval_id) DO UPDATE SET
    node = EXCLUDED.node, status = EXCLUDED.status, language = EXCLUDED.language,
    code = EXCLUDED.code, stdin = EXCLUDED.stdin, timeout = EXCLUDED.timeout,
    created_at = EXCLUDED.created_at, started_at = EXCLUDED.started_at,
    completed_at = EXCLUDED.completed_at, runtime_ms = EXCLUDED.runtime_ms,
    exit_code = EXCLUDED.exit_code, success = EXCLUDED.success, output = EXCLUDED.output,
    stderr = EXCLUDED.stderr, error = EXCLUDED.error,
    output_truncated = EXCLUDED.output_truncated, failure_reason = EXCLUDED.failure_reason,
    metadata = EXCLUDED.metadata, version = EXCLUDED.version,
    created_seq = EXCLUDED.created_seq, cpu_ms = EXCLUDED.cpu_ms,
    memory_peak_kb = EXCLUDED.memory_peak_kb, limits = EXCLUDED.limits,
    files = EXCLUDED.files, args = EXCLUDED.args, tests = EXCLUDED.tests,
    compare = EXCLUDED.compare, float_tolerance = EXCLUDED.float_tolerance,
    stop_on_failure = EXCLUDED.stop_on_failure, compile = EXCLUDED.compile,
    verdict = EXCLUDED.verdict, score = EXCLUDED.score, synced_at = now()
WHERE e.version < EXCLUDED.version
"#;

const INSERT_EVENTS: &str = r#"
INSERT INTO evaluation_events (event_id, node, seq, type, eval_id, version, timestamp, data)
SELECT i, n, s, t, e, v, ts, d::jsonb
FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::text[], $5::text[], $6::int8[],
            $7::timestamptz[], $8::text[]) AS u(i, n, s, t, e, v, ts, d)
ON CONFLICT (event_id) DO NOTHING
"#;

/// The PostgreSQL connection and its state.
pub struct Postgres {
    url: String,
    client: Mutex<Option<Conn>>,
    connected: AtomicBool,
    schema_version: AtomicI64,
    /// The connection check (every second, 1 s timeout).
    pub probe: Probe,
}

impl Postgres {
    /// The sync; it connects lazily (on the first delivery) and reconnects after errors.
    pub fn new(cfg: &PostgresConfig) -> Result<Arc<Postgres>, String> {
        let url = cfg.url.clone().ok_or("postgres.url is not set")?;
        url.parse::<tokio_postgres::Config>()
            .map_err(|e| format!("invalid postgres.url: {e}"))?;
        Ok(Arc::new(Postgres {
            url,
            client: Mutex::new(None),
            connected: AtomicBool::new(false),
            schema_version: AtomicI64::new(0),
            probe: Probe::default(),
        }))
    }

    /// Whether the last connection attempt or delivery succeeded.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
    }

    async fn connect(&self) -> Result<Conn, tokio_postgres::Error> {
        let mut cfg: tokio_postgres::Config =
            self.url.parse().map_err(|e: tokio_postgres::Error| e)?;
        cfg.connect_timeout(Duration::from_secs(5));
        cfg.application_name("crucible");
        let (mut client, connection) = cfg.connect(NoTls).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(error = %e, "postgres connection ended");
            }
        });
        let v = migrate(&mut client).await?;
        self.schema_version.store(v, Ordering::SeqCst);
        let upsert = client.prepare(UPSERT).await?;
        let insert_events = client.prepare(INSERT_EVENTS).await?;
        Ok(Conn {
            client,
            upsert,
            insert_events,
        })
    }
}

/// Checks PostgreSQL every second without taking a backend of its own: the sync's
/// connection must not have closed, and the server must accept a TCP connection within
/// 1 s. A server that is gone shows in `/health` at once, not at the next delivery.
pub struct PostgresProbe(pub Arc<Postgres>);

impl Postgres {
    /// One check: the sync's connection is not closed, and the server accepts a
    /// connection within 1 s.
    async fn check(&self) -> Result<(), String> {
        let pg = self;
        if let Ok(guard) = pg.client.try_lock() {
            if guard.as_ref().is_some_and(|c| c.client.is_closed()) {
                return Err("the connection was closed".into());
            }
        }
        let cfg: tokio_postgres::Config = pg.url.parse().map_err(|e| format!("{e}"))?;
        let port = cfg.get_ports().first().copied().unwrap_or(5432);
        let host = cfg.get_hosts().first().cloned();
        let connect = async {
            match host {
                Some(tokio_postgres::config::Host::Tcp(h)) => {
                    tokio::net::TcpStream::connect((h.as_str(), port))
                        .await
                        .map(drop)
                }
                Some(tokio_postgres::config::Host::Unix(dir)) => {
                    let sock = dir.join(format!(".s.PGSQL.{port}"));
                    tokio::net::UnixStream::connect(sock).await.map(drop)
                }
                None => tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .map(drop),
            }
        };
        match tokio::time::timeout(Duration::from_secs(1), connect).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("cannot connect: {e}")),
            Err(_) => Err("no connection within 1 s".into()),
        }
    }
}

impl Worker for PostgresProbe {
    fn name(&self) -> String {
        "probe:postgres".into()
    }

    fn work<'a>(
        &'a mut self,
        _stop: &'a CancellationToken,
    ) -> BoxFuture<'a, Result<State, String>> {
        Box::pin(async move {
            let r = self.0.check().await;
            self.0.probe.record("postgres", r);
            Ok(State::Idle)
        })
    }

    fn wait_for_work(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(tokio::time::sleep(Duration::from_secs(1)))
    }
}

impl Report for Postgres {
    fn key(&self) -> &'static str {
        "postgres"
    }

    fn health(&self) -> BoxFuture<'_, Health> {
        Box::pin(async move {
            // Down at the last check: look again now, so that a server that is back shows
            // as back (at most 1 s more for this request).
            if self.probe.checked() && !self.probe.is_up() {
                self.probe.record("postgres", self.check().await);
            }
            // Down (the last check could not reach it): working partly, events wait in
            // the outbox until it is back. Not connected yet with nothing to deliver is fine.
            Health::new(
                self.probe.level(),
                json!({
                    "connected": self.connected.load(Ordering::SeqCst) && self.probe.is_up(),
                    "reachable": self.probe.is_up(),
                    "last_check_error": self.probe.last_error(),
                    "schema_version": self.schema_version.load(Ordering::SeqCst),
                }),
            )
        })
    }

    fn metrics(&self, e: &mut Exposition) {
        e.flag(
            "crucible_postgres_connected",
            "1 while the PostgreSQL sync is connected and its last write succeeded.",
            self.is_connected(),
        );
    }
}

/// Apply every migration not yet recorded, under an advisory lock so that appliances
/// starting together do not race. Returns the schema version.
pub async fn migrate(client: &mut Client) -> Result<i64, tokio_postgres::Error> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    let result = async {
        client
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS crucible_schema_migrations (
                    version bigint PRIMARY KEY,
                    description text NOT NULL,
                    applied_at timestamptz NOT NULL DEFAULT now())",
            )
            .await?;
        let row = client
            .query_one(
                "SELECT COALESCE(MAX(version), 0) FROM crucible_schema_migrations",
                &[],
            )
            .await?;
        let mut current: i64 = row.get(0);
        for (version, description, sql) in MIGRATIONS {
            if *version <= current {
                continue;
            }
            let tx = client.transaction().await?;
            tx.batch_execute(sql).await?;
            tx.execute(
                "INSERT INTO crucible_schema_migrations (version, description) VALUES ($1, $2)",
                &[version, description],
            )
            .await?;
            tx.commit().await?;
            tracing::info!(version, description, "postgres migration applied");
            current = *version;
        }
        let newest = MIGRATIONS.last().map(|m| m.0).unwrap_or(0);
        if current > newest {
            tracing::warn!(
                database = current,
                known = newest,
                "the database schema is newer than this build; writing the columns it knows"
            );
        }
        Ok(current)
    }
    .await;
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await;
    result
}

/// PostgreSQL text and jsonb cannot hold NUL; program output can. Replace it with U+FFFD.
fn pg_text(s: &str) -> String {
    if s.contains('\0') {
        s.replace('\0', "\u{FFFD}")
    } else {
        s.to_string()
    }
}

fn pg_json(v: &Value) -> Value {
    match v {
        Value::String(s) => Value::String(pg_text(s)),
        Value::Array(a) => Value::Array(a.iter().map(pg_json).collect()),
        Value::Object(o) => {
            Value::Object(o.iter().map(|(k, v)| (pg_text(k), pg_json(v))).collect())
        }
        other => other.clone(),
    }
}

fn ts(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

fn is_evaluation_event(kind: EventType) -> bool {
    !matches!(kind, EventType::StorageCreated | EventType::StorageUpdated)
}

/// The newest record of each evaluation in the batch (an older version never wins).
pub fn latest_records(events: &[Event]) -> Vec<&Evaluation> {
    let mut latest: HashMap<&str, &Evaluation> = HashMap::new();
    for e in events.iter().filter(|e| is_evaluation_event(e.kind)) {
        match latest.get(e.eval_id.as_str()) {
            Some(cur) if cur.version >= e.data.version => {}
            _ => {
                latest.insert(&e.eval_id, &e.data);
            }
        }
    }
    let mut v: Vec<&Evaluation> = latest.into_values().collect();
    v.sort_by_key(|r| r.created_seq);
    v
}

async fn write_batch(conn: &mut Conn, events: &[Event]) -> Result<(), tokio_postgres::Error> {
    let rows = latest_records(events);
    let tx = conn.client.transaction().await?;
    if !rows.is_empty() {
        let n = rows.len();
        let mut c = (
            Vec::with_capacity(n), // eval_id
            Vec::with_capacity(n), // node
            Vec::with_capacity(n), // status
            Vec::with_capacity(n), // language
            Vec::with_capacity(n), // code
            Vec::with_capacity(n), // stdin
            Vec::with_capacity(n), // timeout
        );
        let mut t = (
            Vec::with_capacity(n), // created_at
            Vec::with_capacity(n), // started_at
            Vec::with_capacity(n), // completed_at
            Vec::with_capacity(n), // runtime_ms
            Vec::with_capacity(n), // exit_code
            Vec::with_capacity(n), // success
            Vec::with_capacity(n), // output
        );
        let mut u = (
            Vec::with_capacity(n), // stderr
            Vec::with_capacity(n), // error
            Vec::with_capacity(n), // output_truncated
            Vec::with_capacity(n), // failure_reason
            Vec::with_capacity(n), // metadata
            Vec::with_capacity(n), // version
            Vec::with_capacity(n), // created_seq
        );
        let mut w = (
            Vec::with_capacity(n), // cpu_ms
            Vec::with_capacity(n), // memory_peak_kb
            Vec::with_capacity(n), // limits
        );
        let mut j = (
            Vec::with_capacity(n), // files
            Vec::with_capacity(n), // args
            Vec::with_capacity(n), // tests
            Vec::with_capacity(n), // compare
            Vec::with_capacity(n), // float_tolerance
            Vec::with_capacity(n), // stop_on_failure
        );
        let mut k = (
            Vec::with_capacity(n), // compile
            Vec::with_capacity(n), // verdict
            Vec::with_capacity(n), // score
        );
        for r in rows {
            c.0.push(r.eval_id.clone());
            c.1.push(pg_text(&r.node));
            c.2.push(r.status.as_str().to_string());
            c.3.push(pg_text(&r.language));
            c.4.push(pg_text(&r.code));
            c.5.push(r.stdin.as_deref().map(pg_text));
            c.6.push(r.timeout);
            t.0.push(ts(&r.created_at).unwrap_or_else(Utc::now));
            t.1.push(r.started_at.as_deref().and_then(ts));
            t.2.push(r.completed_at.as_deref().and_then(ts));
            t.3.push(r.runtime_ms.map(|v| v as i64));
            t.4.push(r.exit_code);
            t.5.push(r.success);
            t.6.push(pg_text(&r.output));
            u.0.push(pg_text(&r.stderr));
            u.1.push(r.error.as_deref().map(pg_text));
            u.2.push(r.output_truncated);
            u.3.push(r.failure_reason.map(|f| f.as_str().to_string()));
            u.4.push(r.metadata.as_ref().map(pg_json));
            u.5.push(r.version as i64);
            u.6.push(r.created_seq as i64);
            w.0.push(r.cpu_ms.map(|v| v as i64));
            w.1.push(r.memory_peak_kb.map(|v| v as i64));
            w.2.push(
                r.limits
                    .map(|l| serde_json::to_value(l).unwrap_or(Value::Null)),
            );
            let json = |v: Result<Value, serde_json::Error>| pg_json(&v.unwrap_or(Value::Null));
            j.0.push(json(serde_json::to_value(&r.files)));
            j.1.push(json(serde_json::to_value(&r.args)));
            j.2.push(json(serde_json::to_value(&r.tests)));
            j.3.push(r.compare.as_str().to_string());
            j.4.push(r.float_tolerance);
            j.5.push(r.stop_on_failure);
            k.0.push(r.compile.as_ref().map(|c| json(serde_json::to_value(c))));
            k.1.push(r.verdict.map(|v| v.as_str().to_string()));
            k.2.push(r.score.map(|s| json(serde_json::to_value(s))));
        }
        tx.execute(
            &conn.upsert,
            &[
                &c.0, &c.1, &c.2, &c.3, &c.4, &c.5, &c.6, &t.0, &t.1, &t.2, &t.3, &t.4, &t.5, &t.6,
                &u.0, &u.1, &u.2, &u.3, &u.4, &u.5, &u.6, &w.0, &w.1, &w.2, &j.0, &j.1, &j.2, &j.3,
                &j.4, &j.5, &k.0, &k.1, &k.2,
            ],
        )
        .await?;
    }
    let n = events.len();
    let mut ev = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for e in events {
        ev.0.push(e.event_id.clone());
        ev.1.push(pg_text(&e.node));
        ev.2.push(e.seq as i64);
        ev.3.push(e.kind.as_str().to_string());
        ev.4.push(e.eval_id.clone());
        ev.5.push(e.version as i64);
        ev.6.push(ts(&e.timestamp).unwrap_or_else(Utc::now));
        // The stored JSON as is (PostgreSQL parses it into jsonb), unless it carries a
        // NUL escape that jsonb refuses.
        let raw = e.to_json();
        if raw.contains("\\u0000") {
            let data = pg_json(&serde_json::to_value(e).unwrap_or(Value::Null));
            ev.7.push(data.to_string());
        } else {
            ev.7.push(raw.into_owned());
        }
    }
    tx.execute(
        &conn.insert_events,
        &[&ev.0, &ev.1, &ev.2, &ev.3, &ev.4, &ev.5, &ev.6, &ev.7],
    )
    .await?;
    tx.commit().await
}

fn classify(e: &tokio_postgres::Error) -> SinkError {
    let msg = format!("postgres: {e}");
    match e.code() {
        Some(code) => {
            let class = &code.code()[..2];
            // 22: data exception, 23: integrity constraint violation: the data is at fault.
            if class == "22" || class == "23" {
                SinkError::Failed(msg)
            } else {
                SinkError::Unavailable(msg)
            }
        }
        None => SinkError::Unavailable(msg),
    }
}

/// The outbox sink (`postgres`).
pub struct PostgresSink {
    pg: Arc<Postgres>,
}

impl PostgresSink {
    pub fn new(pg: Arc<Postgres>) -> PostgresSink {
        PostgresSink { pg }
    }
}

impl Sink for PostgresSink {
    fn name(&self) -> &str {
        "postgres"
    }

    fn deliver<'a>(&'a self, events: &'a [Event]) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            let mut guard = self.pg.client.lock().await;
            if guard.as_ref().is_some_and(|c| c.client.is_closed()) {
                *guard = None;
            }
            if guard.is_none() {
                match self.pg.connect().await {
                    Ok(c) => {
                        tracing::info!("postgres connected");
                        *guard = Some(c);
                    }
                    Err(e) => {
                        self.pg.connected.store(false, Ordering::SeqCst);
                        return Err(SinkError::Unavailable(format!("postgres: {e}")));
                    }
                }
            }
            let Some(conn) = guard.as_mut() else {
                return Err(SinkError::Unavailable("postgres: not connected".into()));
            };
            match write_batch(conn, events).await {
                Ok(()) => {
                    self.pg.connected.store(true, Ordering::SeqCst);
                    Ok(())
                }
                Err(e) => {
                    let err = classify(&e);
                    if matches!(err, SinkError::Unavailable(_)) {
                        // Start over with a fresh connection next time.
                        *guard = None;
                        self.pg.connected.store(false, Ordering::SeqCst);
                    }
                    Err(err)
                }
            }
        })
    }

    fn confirmations(&self, delivered: &[Event]) -> Vec<Confirmation> {
        latest_records(delivered)
            .into_iter()
            .map(|rec| {
                let created = delivered
                    .iter()
                    .any(|e| e.eval_id == rec.eval_id && e.kind == EventType::Queued);
                Confirmation {
                    kind: if created {
                        EventType::StorageCreated
                    } else {
                        EventType::StorageUpdated
                    },
                    data: rec.clone(),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(seq: u64, id: &str, kind: EventType, version: u64) -> Event {
        Event {
            event_id: format!("e{seq}"),
            seq,
            kind,
            eval_id: id.into(),
            version,
            timestamp: "2026-01-01T00:00:00.000Z".into(),
            node: "n".into(),
            data: {
                let (mut r, _) = Evaluation::submitted(
                    id.into(),
                    "n".into(),
                    "2026-01-01T00:00:00.000Z".into(),
                    crate::model::NewEvaluation::for_tests("x"),
                );
                r.version = version;
                r.created_seq = 1;
                r
            },
            raw: None,
        }
    }

    #[test]
    fn batches_keep_the_highest_version_and_confirm_once_per_evaluation() {
        let batch = vec![
            ev(1, "a", EventType::Queued, 1),
            ev(2, "b", EventType::Started, 2),
            ev(3, "a", EventType::Started, 2),
            ev(4, "a", EventType::Completed, 3),
            ev(5, "c", EventType::StorageCreated, 1),
        ];
        let latest = latest_records(&batch);
        let versions: Vec<(&str, u64)> = latest
            .iter()
            .map(|r| (r.eval_id.as_str(), r.version))
            .collect();
        assert!(versions.contains(&("a", 3)) && versions.contains(&("b", 2)));
        assert_eq!(versions.len(), 2, "storage events are not upserted");
        let sink = PostgresSink::new(
            Postgres::new(&PostgresConfig {
                url: Some("postgres://u@localhost/db".into()),
            })
            .expect("config"),
        );
        let conf = sink.confirmations(&batch);
        let kinds: HashMap<&str, EventType> = conf
            .iter()
            .map(|c| (c.data.eval_id.as_str(), c.kind))
            .collect();
        assert_eq!(kinds.get("a"), Some(&EventType::StorageCreated));
        assert_eq!(kinds.get("b"), Some(&EventType::StorageUpdated));
        assert_eq!(kinds.len(), 2);
    }

    #[test]
    fn nul_is_replaced_for_postgres() {
        assert_eq!(pg_text("a\0b"), "a\u{FFFD}b");
        let v = pg_json(&json!({"k\0": ["x\0"]}));
        assert_eq!(v, json!({"k\u{FFFD}": ["x\u{FFFD}"]}));
    }
}
