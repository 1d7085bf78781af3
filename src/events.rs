//! The one event type. Every state change of an evaluation produces exactly one
//! [`Event`], written in the same atomic store batch as the record it describes. Sinks,
//! the SSE stream and replays all read these from the durable log; nothing else
//! constructs events. The kinds of change ([`EventType`]) belong to the record's state
//! machine in [`crate::model`] and are re-exported here.

use crate::model::Evaluation;
pub use crate::model::EventType;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::sync::Arc;

/// `{"event_id", "seq", "type", "eval_id", "version", "timestamp", "node", "data"}`.
///
/// `seq` is this node's log position (strictly increasing, no gaps); `event_id` is stable
/// across redeliveries so consumers dedupe on it; `version` is the evaluation's version
/// after the change; `data` is the full evaluation record after the change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Event {
    /// Stable across redeliveries: consumers dedupe on it.
    pub event_id: String,
    /// This node's log position: strictly increasing, no gaps.
    pub seq: u64,
    /// What happened (also the Redis channel).
    #[serde(rename = "type")]
    pub kind: EventType,
    pub eval_id: String,
    /// The evaluation's version after the change.
    pub version: u64,
    /// When it happened (RFC 3339, UTC).
    #[schema(format = DateTime)]
    pub timestamp: String,
    /// The node that wrote it.
    pub node: String,
    /// The whole record after the change.
    pub data: Evaluation,
    /// The exact JSON this event was stored as, when it was read from the log: sinks
    /// forward these bytes instead of serializing the event again.
    #[serde(skip)]
    pub raw: Option<Arc<str>>,
}

impl Event {
    /// The event JSON as one line (no trailing newline): the stored bytes when known.
    pub fn to_json(&self) -> Cow<'_, str> {
        match &self.raw {
            Some(r) => Cow::Borrowed(r),
            // Serializing plain data with string keys cannot fail.
            None => Cow::Owned(serde_json::to_string(self).unwrap_or_default()),
        }
    }
}

/// An event a sink asks to add to the log once its delivery is recorded (the PostgreSQL
/// sync's `storage:evaluation:created|updated`). It carries the record it confirms and
/// does not change it: its `version` is the one it confirms.
#[derive(Debug, Clone)]
pub struct Confirmation {
    pub kind: EventType,
    pub data: Evaluation,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Status;

    #[test]
    fn type_names_are_the_seed_channels() {
        for t in EventType::ALL {
            let v = serde_json::to_value(t).expect("ser");
            assert_eq!(v, serde_json::Value::String(t.as_str().to_string()));
        }
        assert_eq!(
            EventType::for_status(Status::Running).as_str(),
            "evaluation:started"
        );
    }
}
