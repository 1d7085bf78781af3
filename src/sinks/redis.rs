//! The Redis outbox sink (`redis`): for every event, PUBLISH its JSON on the seed
//! channel named by its type, and XADD it to a capped stream (`crucible:events`) with its
//! `event_id`, so consumers that must not miss an event read the stream through a consumer
//! group. A batch goes out as one pipeline; the relay moves the cursor only after Redis
//! answered every command. Redis errors are outages (retried with backoff), never poison:
//! no single event makes PUBLISH or XADD fail. The API never waits for Redis.

use crate::events::Event;
use crate::outbox::{Sink, SinkError};
use crate::redis::Redis;
use crate::BoxFuture;
use fred::prelude::{
    ClientLike, Error as FredError, PubsubInterface, StreamsInterface, Value as FredValue,
};
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
                    let _: () = p
                        .publish(e.kind.as_str(), body.clone())
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
