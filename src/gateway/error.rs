//! HTTP rendering of [`ApiError`]: `{"error": {"code", "message", "field"?}}`, plus
//! `Retry-After` and `Allow` headers where they apply.

use super::{json_response, Body};
use crate::error::ApiError;
use http::{HeaderValue, Response};
use serde_json::json;

impl ApiError {
    /// The HTTP response.
    pub fn into_response(self) -> Response<Body> {
        let mut err = json!({"code": self.code.as_str(), "message": self.message});
        if let Some(f) = &self.field {
            err["field"] = json!(f);
        }
        let mut r = json_response(self.status(), &json!({ "error": err }));
        if let Some(s) = self.retry_after {
            if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                r.headers_mut().insert(http::header::RETRY_AFTER, v);
            }
        }
        if let Some(a) = self.allow {
            r.headers_mut()
                .insert(http::header::ALLOW, HeaderValue::from_static(a));
        }
        r
    }
}
