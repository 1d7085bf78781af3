//! The Redis outbox sink (`redis`): for every event, PUBLISH its JSON on the seed
//! channel named by its type, and XADD it to a capped stream (`crucible:events`) with its
//! `event_id`, so consumers that must not miss an event read the stream through a consumer
//! group. A batch goes out as one pipeline; the relay moves the cursor only after Redis
//! answered every command. Redis errors are outages (retried with backoff), never poison:
//! no single event makes PUBLISH or XADD fail. The API never waits for Redis.
//!
//! With `payload = "seed"` the PUBLISHed messages take the seed platform's flat shape
//! ([`seed_message`]) and `evaluation:started` is also published on `evaluation:running`,
//! so the seed's own consumers work unchanged; the stream keeps the envelope.

use crate::config::RedisPayload;
use crate::events::{Event, EventType};
use crate::outbox::{Sink, SinkError};
use crate::redis::Redis;
use crate::BoxFuture;
use fred::prelude::{
    ClientLike, Error as FredError, PubsubInterface, StreamsInterface, Value as FredValue,
};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

/// The outbox sink (`redis`).
pub struct RedisSink {
    redis: Arc<Redis>,
}

impl RedisSink {
    pub fn new(redis: Arc<Redis>) -> RedisSink {
        RedisSink { redis }
    }
}

fn unavailable(e: FredError) -> SinkError {
    SinkError::Unavailable(format!("redis: {e}"))
}

impl Sink for RedisSink {
    fn name(&self) -> &str {
        "redis"
    }

    fn deliver<'a>(&'a self, events: &'a [Event]) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            let r = &self.redis;
            if !r.client.is_connected() {
                // Wait briefly for the next connection attempt rather than failing at
                // once: at start-up and after an outage delivery resumes the moment the
                // connection is back instead of after the next backoff sleep.
                let attempt =
                    tokio::time::timeout(Duration::from_secs(1), r.client.wait_for_connect()).await;
                if !matches!(attempt, Ok(Ok(()))) || !r.client.is_connected() {
                    return Err(SinkError::Unavailable("redis: not connected".into()));
                }
            }
            let cap = ("MAXLEN", "~", r.cfg.stream_maxlen as i64);
            let p = r.client.pipeline();
            for e in events {
                // One shared buffer for the PUBLISH payload and the stream field.
                let body = FredValue::String(e.to_json().into_owned().into());
                if r.cfg.publish {
                    let message = match r.cfg.payload {
                        RedisPayload::Envelope => body.clone(),
                        RedisPayload::Seed => FredValue::String(seed_message(e).into()),
                    };
                    if e.kind == EventType::Started && r.cfg.payload == RedisPayload::Seed {
                        let _: () = p
                            .publish(SEED_RUNNING, message.clone())
                            .await
                            .map_err(unavailable)?;
                    }
                    let _: () = p
                        .publish(e.kind.as_str(), message)
                        .await
                        .map_err(unavailable)?;
                }
                let fields: Vec<(&str, FredValue)> = vec![
                    ("event_id", e.event_id.as_str().into()),
                    ("seq", (e.seq as i64).into()),
                    ("type", e.kind.as_str().into()),
                    ("eval_id", e.eval_id.as_str().into()),
                    ("event", body),
                ];
                let _: () = p
                    .xadd(r.cfg.stream.as_str(), false, cap, "*", fields)
                    .await
                    .map_err(unavailable)?;
            }
            for res in p.try_all::<FredValue>().await {
                res.map_err(unavailable)?;
            }
            Ok(())
        })
    }
}

/// The seed platform's channel for "execution began" (ours is `evaluation:started`).
pub const SEED_RUNNING: &str = "evaluation:running";

/// The seed platform's flat message for `e`: every field of the record at the top level
/// (`eval_id`, `status`, `code`, `language`, `output`, `error`, `exit_code`, `success`,
/// `metadata`, ...), plus what the seed's consumers read that the record names
/// differently: `executor_id` (this node; the seed's storage worker needs it on
/// `evaluation:running`), `container_id`, and `result` {`output`, `error`, `exit_code`,
/// `metadata`} (its older storage worker). `error` is `""` and `metadata` `{}` when
/// empty, as the seed sent them. The event's `type`, `event_id`, `seq` and `timestamp`
/// are kept, so a consumer can still dedupe and order.
pub fn seed_message(e: &Event) -> String {
    let mut m = match serde_json::to_value(&e.data) {
        Ok(serde_json::Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    };
    let error = json!(e.data.error.clone().unwrap_or_default());
    let metadata = e.data.metadata.clone().unwrap_or_else(|| json!({}));
    m.insert("error".into(), error.clone());
    m.insert("metadata".into(), metadata.clone());
    m.insert("type".into(), json!(e.kind.as_str()));
    m.insert("event_id".into(), json!(e.event_id));
    m.insert("seq".into(), json!(e.seq));
    m.insert("timestamp".into(), json!(e.timestamp));
    m.insert("executor_id".into(), json!(e.node));
    m.insert("container_id".into(), serde_json::Value::Null);
    m.insert(
        "result".into(),
        json!({
            "output": e.data.output,
            "error": error,
            "exit_code": e.data.exit_code,
            "metadata": metadata,
        }),
    );
    serde_json::Value::Object(m).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Evaluation, Status};

    #[test]
    fn seed_messages_are_flat() {
        let rec: Evaluation = serde_json::from_value(json!({
            "eval_id": "e1", "status": "completed", "language": "python", "code": "print(1)",
            "stdin": null, "timeout": 5.0, "created_at": "t0", "started_at": "t1",
            "completed_at": "t2", "runtime_ms": 3, "exit_code": 0, "success": true,
            "output": "1\n", "stderr": "", "error": null, "output_truncated": false,
            "failure_reason": null, "metadata": null, "version": 3, "node": "n1",
            "created_seq": 1
        }))
        .expect("record");
        assert_eq!(rec.status, Status::Completed);
        let e = Event {
            event_id: "ev3".into(),
            seq: 3,
            kind: EventType::Completed,
            eval_id: "e1".into(),
            version: 3,
            timestamp: "t2".into(),
            node: "n1".into(),
            data: rec,
            raw: None,
        };
        let m: serde_json::Value = serde_json::from_str(&seed_message(&e)).expect("json");
        for (k, v) in [
            ("eval_id", json!("e1")),
            ("status", json!("completed")),
            ("code", json!("print(1)")),
            ("output", json!("1\n")),
            ("error", json!("")),
            ("exit_code", json!(0)),
            ("metadata", json!({})),
            ("executor_id", json!("n1")),
            ("type", json!("evaluation:completed")),
            ("event_id", json!("ev3")),
        ] {
            assert_eq!(m[k], v, "{k}: {m}");
        }
        assert_eq!(m["result"]["output"], "1\n");
        assert!(m.get("data").is_none(), "no envelope: {m}");
    }
}
