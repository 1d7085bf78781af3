//! The error of an operation: a stable machine [`Code`] (which fixes the HTTP status), a
//! message, and for validation errors the offending field. Every transport renders it its
//! own way (HTTP: `{"error": {"code", "message", "field"?}}`; Redis request/reply:
//! `error` + `error_code`), from the same table.
//!
//! A new stable code is one line in [`codes!`] below. This module depends on nothing of
//! the product; the modules whose errors map to codes (model, store) implement the
//! conversion next to their own error types.

use http::StatusCode;

macro_rules! codes {
    ($($(#[doc = $doc:literal])* $variant:ident => $status:ident, $name:literal;)*) => {
        /// Every stable error code, with its HTTP status and its wire name.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Code {
            $($(#[doc = $doc])* $variant,)*
        }

        impl Code {
            /// Every code, for docs and tests.
            pub const ALL: &'static [Code] = &[$(Code::$variant,)*];

            /// The wire name (`error.code`).
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Code::$variant => $name,)*
                }
            }

            /// The HTTP status this code is answered with.
            pub fn status(self) -> StatusCode {
                match self {
                    $(Code::$variant => StatusCode::$status,)*
                }
            }

            /// What the code means (its doc comment above), for the OpenAPI document.
            pub fn meaning(self) -> &'static str {
                match self {
                    $(Code::$variant => concat!($($doc),*).trim_ascii(),)*
                }
            }
        }
    };
}

codes! {
    /// The request could not be read (broken body, bad header).
    BadRequest => BAD_REQUEST, "bad_request";
    /// The body is not valid JSON.
    MalformedJson => BAD_REQUEST, "malformed_json";
    /// A bearer token is required and was missing or wrong.
    Unauthorized => UNAUTHORIZED, "unauthorized";
    /// No such evaluation, sink, page or route.
    NotFound => NOT_FOUND, "not_found";
    /// The path exists but not for this method (`Allow` says which).
    MethodNotAllowed => METHOD_NOT_ALLOWED, "method_not_allowed";
    /// The request body did not arrive within `http.body_timeout_secs`.
    RequestTimeout => REQUEST_TIMEOUT, "request_timeout";
    /// The evaluation already reached a terminal state.
    AlreadyTerminal => CONFLICT, "already_terminal";
    /// The same Idempotency-Key came with a different request.
    IdempotencyKeyConflict => CONFLICT, "idempotency_key_conflict";
    /// The body is larger than `http.max_body_bytes`.
    PayloadTooLarge => PAYLOAD_TOO_LARGE, "payload_too_large";
    /// The body is not `application/json`.
    UnsupportedMediaType => UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type";
    /// A field is missing, of the wrong type or out of range (`field` names it).
    InvalidField => UNPROCESSABLE_ENTITY, "invalid_field";
    /// The language is unknown, or its toolchain is missing on this host.
    UnsupportedLanguage => UNPROCESSABLE_ENTITY, "unsupported_language";
    /// A requested limit is above the server's maximum (`field` names it).
    LimitTooHigh => UNPROCESSABLE_ENTITY, "limit_too_high";
    /// More evaluations in one batch than allowed.
    BatchTooLarge => UNPROCESSABLE_ENTITY, "batch_too_large";
    /// The replay start is outside the retained event log.
    ReplayOutOfWindow => UNPROCESSABLE_ENTITY, "replay_out_of_window";
    /// The backup destination cannot be used.
    BackupFailed => UNPROCESSABLE_ENTITY, "backup_failed";
    /// A backup of that name exists already (choose another `path`).
    BackupExists => CONFLICT, "backup_exists";
    /// A bug or an unexpected state inside the appliance.
    Internal => INTERNAL_SERVER_ERROR, "internal";
    /// The store could not read or write (disk trouble).
    StoreError => INTERNAL_SERVER_ERROR, "store_error";
    /// The queue is at `max_queued`; retry after `Retry-After`.
    QueueFull => SERVICE_UNAVAILABLE, "queue_full";
    /// The appliance is stopping; retry after `Retry-After` (elsewhere or later).
    ShuttingDown => SERVICE_UNAVAILABLE, "shutting_down";
    /// Free space on the data dir is below `[store] min_free_mb`; retry after space is freed.
    InsufficientStorage => INSUFFICIENT_STORAGE, "insufficient_storage";
}

/// An error answer.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: Code,
    pub message: String,
    pub field: Option<String>,
    pub retry_after: Option<u64>,
    pub allow: Option<&'static str>,
}

impl ApiError {
    /// A new error.
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
            field: None,
            retry_after: None,
            allow: None,
        }
    }

    /// The HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        self.code.status()
    }

    /// Name the field the error is about.
    pub fn with_field(mut self, field: &str) -> Self {
        self.field = Some(field.to_string());
        self
    }

    /// Ask the client to retry after `secs` seconds.
    pub fn with_retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }

    /// `invalid_field` naming `field`.
    pub fn invalid_field(field: &str, message: impl Into<String>) -> Self {
        Self::new(Code::InvalidField, message).with_field(field)
    }

    /// `not_found`: "<what> not found".
    pub fn not_found(what: &str) -> Self {
        Self::new(Code::NotFound, format!("{what} not found"))
    }

    /// `unauthorized`.
    pub fn unauthorized() -> Self {
        Self::new(
            Code::Unauthorized,
            "a valid `Authorization: Bearer <token>` header is required",
        )
    }

    /// `method_not_allowed` with the methods the path accepts.
    pub fn method_not_allowed(allow: &'static str) -> Self {
        let mut e = Self::new(Code::MethodNotAllowed, format!("this path accepts {allow}"));
        e.allow = Some(allow);
        e
    }

    /// `internal`.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(Code::Internal, message)
    }

    /// `shutting_down`, with `Retry-After`.
    pub fn shutting_down() -> Self {
        Self::new(Code::ShuttingDown, "the appliance is shutting down").with_retry_after(5)
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message)
    }
}

impl std::error::Error for ApiError {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn every_code_has_a_unique_name_and_an_error_status() {
        let mut seen = HashSet::new();
        for c in Code::ALL {
            assert!(seen.insert(c.as_str()), "duplicate code {}", c.as_str());
            assert!(
                c.status().is_client_error() || c.status().is_server_error(),
                "{}",
                c.as_str()
            );
            assert!(c
                .as_str()
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b == b'_'));
        }
    }
}
