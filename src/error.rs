//! The error of an operation: an HTTP status, a stable machine code, a message, and for
//! validation errors the offending field. Every transport renders it its own way (HTTP:
//! `{"error": {"code", "message", "field"?}}`; Redis request/reply: `error` +
//! `error_code`), with the same code.

use crate::model::FieldError;
use crate::store::StoreError;
use http::StatusCode;

/// An error answer.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub field: Option<String>,
    pub retry_after: Option<u64>,
    pub allow: Option<&'static str>,
}

impl ApiError {
    /// A new error.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            field: None,
            retry_after: None,
            allow: None,
        }
    }

    pub fn not_found(what: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{what} not found"),
        )
    }

    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid `Authorization: Bearer <token>` header is required",
        )
    }

    pub fn method_not_allowed(allow: &'static str) -> Self {
        let mut e = Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("this path accepts {allow}"),
        );
        e.allow = Some(allow);
        e
    }

    pub fn field(
        status: StatusCode,
        code: &'static str,
        field: &str,
        message: impl Into<String>,
    ) -> Self {
        let mut e = Self::new(status, code, message);
        e.field = Some(field.to_string());
        e
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
}

impl From<FieldError> for ApiError {
    fn from(e: FieldError) -> Self {
        ApiError::field(
            StatusCode::UNPROCESSABLE_ENTITY,
            e.code,
            &e.field,
            e.message,
        )
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound => ApiError::not_found("evaluation"),
            StoreError::QueueFull { .. } => {
                let mut a =
                    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "queue_full", e.to_string());
                a.retry_after = Some(5);
                a
            }
            StoreError::AlreadyTerminal(_) | StoreError::WrongState(..) => {
                ApiError::new(StatusCode::CONFLICT, "already_terminal", e.to_string())
            }
            StoreError::ReplayOutOfWindow { .. } => ApiError::field(
                StatusCode::UNPROCESSABLE_ENTITY,
                "replay_out_of_window",
                "from_seq",
                e.to_string(),
            ),
            StoreError::Closed => {
                let mut a = ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "shutting_down",
                    "the appliance is shutting down",
                );
                a.retry_after = Some(5);
                a
            }
            StoreError::Storage(m) => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "store_error", m)
            }
        }
    }
}
