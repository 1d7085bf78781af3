//! The OpenAPI document (`GET /api/openapi.json`), generated, never written by hand:
//!
//! - schemas from the request and response types (`utoipa::ToSchema` on the types the
//!   handlers read and answer: a new field is a field with its doc line);
//! - operations from the `#[utoipa::path]` attribute on each handler (its own statuses);
//! - what the router decides for every route from the route table ([`super::routes`]):
//!   the bearer token and its 401, the 422 for an unknown query parameter, and for JSON
//!   bodies the 400, 408, 413 and 415 of [`super::api`]'s body reader;
//! - every error answer from the one table of codes ([`crate::error::Code`]): a response
//!   per HTTP status, whose `code` enum lists exactly the codes of that status;
//! - the bounds the configuration sets (lengths, the timeout range, the languages that
//!   run here, the limits) from the same rules the validation uses
//!   ([`crate::model::document_submission`]).
//!
//! Built once per process; each answer only sets `servers` to the address the request
//! came to.

use super::routes::{self, QueryRule};
use super::{api, sse};
use crate::error::Code;
use serde_json::{json, Map, Value};
use utoipa::OpenApi;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Crucible",
        description = "Self-hosted code-evaluation appliance. Errors are `{\"error\": {\"code\", \"message\", \"field\"?}}` with a stable `code` (see each response). When an API token is configured, the operations marked with the `bearer` security scheme need `Authorization: Bearer <token>`.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    paths(
        api::health,
        api::api_health,
        api::metrics,
        api::openapi,
        api::submit,
        api::submit_batch,
        api::get_eval,
        api::get_eval_status,
        api::get_eval_seed_status,
        api::cancel,
        api::languages,
        api::list,
        sse::events,
        api::sinks,
        api::replay,
        api::dead_letters,
        api::backup,
        api::pause,
        api::resume,
    ),
    components(
        schemas(Error),
        // E405 is no operation's: any path answers it to a method it does not take.
        responses(E400, E401, E404, E405, E408, E409, E413, E415, E422, E500, E503, E507),
    ),
    tags(
        (name = "evaluations", description = "Submit, read, list and cancel evaluations"),
        (name = "events", description = "The durable event stream"),
        (name = "admin", description = "Sinks, dead letters, backups, the queue"),
        (name = "ops", description = "Health, metrics and this document"),
    ),
)]
struct ApiDoc;

/// An error answer (the schema of every error response; each response narrows `code`).
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct Error {
    error: ErrorBody,
}

/// The body of an error answer.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct ErrorBody {
    /// The stable machine code.
    code: String,
    /// What went wrong, in words.
    message: String,
    /// The field, parameter or header the error is about (422).
    field: Option<String>,
}

/// A response per HTTP status that error codes have: the handlers' `#[utoipa::path]`
/// attributes name them (`(status = 404, response = E404)`); their content is written
/// from the code table in [`error_response`]. A new status in the table needs a line
/// here (a unit test says so).
macro_rules! error_responses {
    ($($name:ident => $status:literal),* $(,)?) => {
        $(
            /// Error answers of one HTTP status.
            #[allow(dead_code)]
            pub struct $name;
            impl<'r> utoipa::ToResponse<'r> for $name {
                fn response() -> (&'r str, utoipa::openapi::RefOr<utoipa::openapi::response::Response>) {
                    (stringify!($name), utoipa::openapi::response::Response::new("").into())
                }
            }
        )*
        /// The statuses that have an error response, and its name.
        const ERROR_RESPONSES: &[(u16, &str)] = &[$(($status, stringify!($name))),*];
    };
}

error_responses!(
    E400 => 400,
    E401 => 401,
    E404 => 404,
    E405 => 405,
    E408 => 408,
    E409 => 409,
    E413 => 413,
    E415 => 415,
    E422 => 422,
    E500 => 500,
    E503 => 503,
    E507 => 507,
);

/// The error response of `status`: the codes answered with it, each with its meaning.
fn error_response(status: u16) -> Value {
    let codes: Vec<Code> = Code::ALL
        .iter()
        .copied()
        .filter(|c| c.status().as_u16() == status)
        .collect();
    let names: Vec<&str> = codes.iter().map(|c| c.as_str()).collect();
    let lines: Vec<String> = codes
        .iter()
        .map(|c| format!("- `{}`: {}", c.as_str(), c.meaning()))
        .collect();
    let mut resp = json!({
        "description": lines.join("\n"),
        "content": {"application/json": {"schema": {
            "type": "object",
            "required": ["error"],
            "properties": {"error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {
                    "code": {"type": "string", "enum": names},
                    "message": {"type": "string"},
                    "field": {"type": "string", "description": "The field, parameter or header the error is about"},
                },
            }},
        }}},
    });
    if status == 503 {
        resp["headers"] = json!({"Retry-After": {
            "description": "Seconds to wait before retrying",
            "required": true,
            "schema": {"type": "integer", "minimum": 0},
        }});
    }
    if status == 405 {
        resp["headers"] = json!({"Allow": {
            "description": "The methods the path accepts",
            "required": true,
            "schema": {"type": "string"},
        }});
    }
    resp
}

/// What the document needs to know about this server.
pub struct Settings<'a> {
    /// Writes the configured bounds of a submission into `components.schemas`.
    pub document_submission: &'a dyn Fn(&mut Value),
}

/// Response types whose every property is always present (`null` when empty): all of
/// them are `required` in the document.
const ALWAYS_COMPLETE: &[&str] = &[
    "Evaluation",
    "Event",
    "RunLimits",
    "SinkReport",
    "DeadLetter",
    "BackupInfo",
    "Page",
    "Accepted",
    "BatchAccepted",
    "Sinks",
    "DeadLetters",
    "Replayed",
    "Paused",
    "SseEvent",
];

/// The document for this server (without `servers`, which [`with_server`] adds).
pub fn document(settings: &Settings<'_>) -> Value {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_default();
    apply_routes(&mut doc);
    let codes: Vec<&str> = Code::ALL.iter().map(|c| c.as_str()).collect();
    doc["components"]["schemas"]["ErrorBody"]["properties"]["code"]["enum"] = json!(codes);
    doc["components"]["securitySchemes"] = json!({"bearer": {"type": "http", "scheme": "bearer"}});
    for (status, name) in ERROR_RESPONSES {
        doc["components"]["responses"][*name] = error_response(*status);
    }
    for name in ALWAYS_COMPLETE {
        let Some(schema) = doc["components"]["schemas"].get_mut(*name) else {
            continue; // a unit test fails for a name that is not a schema
        };
        if let Some(props) = schema.get("properties").and_then(|p| p.as_object()) {
            let all: Vec<Value> = props.keys().map(|k| json!(k)).collect();
            schema["required"] = Value::Array(all);
        }
    }
    // Each SSE event's `data` is an Event in JSON.
    doc["components"]["schemas"]["SseEvent"]["properties"]["data"]["contentMediaType"] =
        json!("application/json");
    doc["components"]["schemas"]["SseEvent"]["properties"]["data"]["contentSchema"] =
        json!({"$ref": "#/components/schemas/Event"});
    (settings.document_submission)(&mut doc["components"]["schemas"]);
    add_links(&mut doc);
    doc
}

/// Links from a submission's answer to the operations that take its `eval_id`.
fn add_links(doc: &mut Value) {
    let to = |from: &str| {
        let mut links = Map::new();
        for (name, op) in [
            ("GetEvaluation", "get_eval"),
            ("GetEvaluationBySeedPath", "get_eval_status"),
            ("GetEvaluationStatus", "get_eval_seed_status"),
            ("CancelEvaluation", "cancel"),
        ] {
            links.insert(
                name.into(),
                json!({"operationId": op, "parameters": {"id": format!("$response.body#{from}")}}),
            );
        }
        Value::Object(links)
    };
    for (path, status, from) in [
        ("/api/eval", "202", "/eval_id"),
        ("/api/eval-batch", "202", "/evaluations/0/eval_id"),
    ] {
        if let Some(r) = doc
            .get_mut("paths")
            .and_then(|p| p.get_mut(path))
            .and_then(|p| p.get_mut("post"))
            .and_then(|o| o.get_mut("responses"))
            .and_then(|r| r.get_mut(status))
        {
            r["links"] = to(from);
        }
    }
}

/// What the router decides for every route, written into its operation.
fn apply_routes(doc: &mut Value) {
    for r in routes::table() {
        if r.query == QueryRule::Ignored {
            continue; // the web UI, not part of the API
        }
        let method = r.method.as_str().to_ascii_lowercase();
        let Some(op) = doc
            .get_mut("paths")
            .and_then(|p| p.get_mut(r.path))
            .and_then(|p| p.get_mut(method.as_str()))
        else {
            continue; // a unit test fails for an undocumented route
        };
        let responses = &mut op["responses"];
        let mut add = |status: &str, name: &str| {
            if responses.get(status).is_none() {
                responses[status] = json!({"$ref": format!("#/components/responses/{name}")});
            }
        };
        if r.auth {
            add("401", "E401");
        }
        add("422", "E422");
        if op.get("requestBody").is_some() {
            let responses = &mut op["responses"];
            for (status, name) in [
                ("400", "E400"),
                ("408", "E408"),
                ("413", "E413"),
                ("415", "E415"),
            ] {
                if responses.get(status).is_none() {
                    responses[status] = json!({"$ref": format!("#/components/responses/{name}")});
                }
            }
        }
        if r.auth {
            op["security"] = json!([{"bearer": []}]);
        }
        sort_responses(&mut op["responses"]);
        if let Some(params) = op.get_mut("parameters").and_then(|p| p.as_array_mut()) {
            for p in params {
                let Some(schema) = p.get_mut("schema") else {
                    continue;
                };
                // A header or query value is never JSON `null`: an optional one is left out.
                if let Some(types) = schema["type"].as_array() {
                    let t: Vec<Value> = types.iter().filter(|t| *t != "null").cloned().collect();
                    if t.len() == 1 {
                        schema["type"] = t[0].clone();
                    }
                }
                // A seq is any non-negative integer (one beyond the head means the head),
                // not bounded by a 64-bit format.
                if p["name"] == "Last-Event-ID" || p["name"] == "last_event_id" {
                    if let Some(s) = p["schema"].as_object_mut() {
                        s.remove("format");
                    }
                }
            }
        }
    }
}

/// Responses in status order.
fn sort_responses(responses: &mut Value) {
    if let Some(map) = responses.as_object_mut() {
        let mut entries: Vec<(String, Value)> = std::mem::take(map).into_iter().collect();
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        *map = entries.into_iter().collect::<Map<String, Value>>();
    }
}

/// `doc` with `servers` naming the address the request came to: the `Host` header when
/// it is a valid authority, else the local address of the connection; none if neither.
pub fn with_server(doc: &Value, host: Option<&str>, local: Option<std::net::SocketAddr>) -> Value {
    let mut doc = doc.clone();
    let authority = host
        .and_then(|h| h.parse::<http::uri::Authority>().ok())
        .filter(|a| a.as_str().len() <= 255 && !a.as_str().contains('@'))
        .map(|a| a.as_str().to_string())
        .or_else(|| local.map(|a| a.to_string()));
    if let (Some(a), Some(map)) = (authority, doc.as_object_mut()) {
        // After `info`, where readers look for it.
        let mut out = Map::new();
        for (k, v) in std::mem::take(map) {
            let after_info = k == "info";
            out.insert(k, v);
            if after_info {
                out.insert("servers".into(), json!([{"url": format!("http://{a}")}]));
            }
        }
        *map = out;
    }
    doc
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn doc() -> Value {
        document(&Settings {
            document_submission: &|_| {},
        })
    }

    #[test]
    fn the_router_and_the_document_agree() {
        let d = doc();
        for name in ALWAYS_COMPLETE {
            assert!(d["components"]["schemas"].get(*name).is_some(), "{name}");
        }
        for (path, ops) in d["paths"].as_object().expect("paths") {
            for (method, op) in ops.as_object().expect("operations") {
                if let Some(p) = op.get("parameters") {
                    assert!(p.is_array(), "{method} {path}: parameters {p}");
                }
            }
        }
        let mut documented = BTreeSet::new();
        for (path, ops) in d["paths"].as_object().expect("paths") {
            for (method, op) in ops.as_object().expect("operations") {
                documented.insert(format!("{} {path}", method.to_uppercase()));
                let _ = op;
            }
        }
        let mut routed = BTreeSet::new();
        for r in routes::table() {
            if r.query == QueryRule::Ignored {
                continue;
            }
            let key = format!("{} {}", r.method, r.path);
            let op = &d["paths"][r.path][r.method.as_str().to_ascii_lowercase().as_str()];
            assert_eq!(
                op.get("security").is_some(),
                r.auth,
                "{key}: the document's security and the route's token check"
            );
            routed.insert(key);
        }
        assert_eq!(documented, routed);
    }

    #[test]
    fn bounds_in_attributes_are_the_servers_constants() {
        use crate::service::{MAX_BATCH, MAX_OFFSET, MAX_PAGE};
        let d = doc();
        let param = |path: &str, name: &str| -> Value {
            d["paths"][path]["get"]["parameters"]
                .as_array()
                .and_then(|ps| ps.iter().find(|p| p["name"] == name))
                .map(|p| p["schema"].clone())
                .unwrap_or(Value::Null)
        };
        assert_eq!(
            param("/api/evaluations", "limit")["maximum"],
            json!(MAX_PAGE)
        );
        assert_eq!(
            param("/api/evaluations", "offset")["maximum"],
            json!(MAX_OFFSET)
        );
        assert_eq!(
            param("/api/admin/dead-letters", "limit")["maximum"],
            json!(api::MAX_DEAD_LETTERS)
        );
        assert_eq!(
            d["components"]["schemas"]["BatchRequest"]["properties"]["evaluations"]["maxItems"],
            json!(MAX_BATCH)
        );
    }

    #[test]
    fn every_error_status_has_a_response() {
        for c in Code::ALL {
            let s = c.status().as_u16();
            assert!(
                ERROR_RESPONSES.iter().any(|(st, _)| *st == s),
                "add `E{s} => {s}` to error_responses! for `{}`",
                c.as_str()
            );
        }
        let d = doc();
        let e404 = &d["components"]["responses"]["E404"];
        assert_eq!(
            e404["content"]["application/json"]["schema"]["properties"]["error"]["properties"]
                ["code"]["enum"],
            json!(["not_found"])
        );
        // Every $ref points at something.
        let text = d.to_string();
        for part in text.split("\"$ref\":\"#/components/").skip(1) {
            let target = part.split('"').next().unwrap_or("");
            let (kind, name) = target.split_once('/').unwrap_or(("", ""));
            assert!(
                d["components"][kind].get(name).is_some(),
                "dangling $ref {target}"
            );
        }
    }

    #[test]
    fn servers_follow_the_request() {
        let d = json!({"openapi": "3.1.0", "info": {}, "paths": {}});
        let local = "10.0.0.5:8080".parse().ok();
        let s = with_server(&d, Some("crucible.example:8080"), local);
        assert_eq!(
            s["servers"],
            json!([{"url": "http://crucible.example:8080"}])
        );
        let keys: Vec<&String> = s
            .as_object()
            .map(|m| m.keys().collect())
            .unwrap_or_default();
        assert_eq!(keys, ["openapi", "info", "servers", "paths"]);
        let s = with_server(&d, Some("bad host\"/"), local);
        assert_eq!(s["servers"], json!([{"url": "http://10.0.0.5:8080"}]));
        let s = with_server(&d, Some("user@evil"), None);
        assert!(s.get("servers").is_none());
        assert!(with_server(&d, None, None).get("servers").is_none());
    }
}
