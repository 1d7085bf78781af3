//! The route table: every path the gateway answers, its method, whether it needs the API
//! token, and its handler. Matching is `matchit` (the router under axum); what happens
//! around a match (405 with `Allow`, 401, the metrics label) is decided here, from the
//! table, so a route is one line.

use super::{api, sse, ui, ApiError, Body, State};
use crate::BoxFuture;
use http::{Method, Request, Response};
use hyper::body::Incoming;
use std::sync::{Arc, LazyLock};

/// What a handler gets: the request and the value of the route's path parameter
/// (`{id}`, `{name}`, `{file}`; empty when the route has none), exactly as it appears in
/// the path (not percent-decoded).
pub struct Call {
    pub req: Request<Incoming>,
    pub param: String,
    /// The local address of the connection (the address that served the request).
    pub local: Option<std::net::SocketAddr>,
}

/// A handler: the state and the call in, the answer (or an error answer) out.
pub type Handler =
    for<'a> fn(&'a Arc<State>, Call) -> BoxFuture<'a, Result<Response<Body>, ApiError>>;

/// One route.
pub struct Route {
    /// GET (which also answers HEAD) or POST.
    pub method: Method,
    /// The path template (`matchit` syntax, as in the OpenAPI document).
    pub path: &'static str,
    /// The `route` label of `crucible_http_requests_total`.
    pub label: &'static str,
    /// Needs `Authorization: Bearer <token>` when a token is configured.
    pub auth: bool,
    /// How its query string is read.
    pub query: QueryRule,
    pub handler: Handler,
}

/// How a route reads its query string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryRule {
    /// It takes none: any parameter is a 422 naming it (checked before the handler).
    None,
    /// The handler parses its own typed parameters (unknown ones are a 422 there).
    Typed,
    /// Ignored (static UI assets, where browsers and caches add their own).
    Ignored,
}

const GET: Method = Method::GET;
const POST: Method = Method::POST;

/// Every route. A path with several methods has one line per method.
pub fn table() -> Vec<Route> {
    fn r(method: Method, path: &'static str, auth: bool, handler: Handler) -> Route {
        Route {
            method,
            path,
            label: path,
            auth,
            query: QueryRule::None,
            handler,
        }
    }
    vec![
        Route {
            label: "/",
            query: QueryRule::Ignored,
            ..r(GET, "/", false, |_, c| {
                Box::pin(async move { ui::asset("index.html", c.req.headers()) })
            })
        },
        Route {
            label: "/",
            query: QueryRule::Ignored,
            ..r(GET, "/ui/{file}", false, |_, c| {
                Box::pin(async move { ui::asset(&c.param, c.req.headers()) })
            })
        },
        r(GET, "/health", false, |s, _| {
            Box::pin(async move { Ok(api::health(s).await) })
        }),
        r(GET, "/api/health", false, |s, _| {
            Box::pin(async move { Ok(api::api_health(s).await) })
        }),
        r(GET, "/metrics", true, |s, _| {
            Box::pin(async move { Ok(api::metrics(s).await) })
        }),
        r(GET, "/api/openapi.json", false, |s, c| {
            Box::pin(async move { Ok(api::openapi(s, &c.req, c.local)) })
        }),
        r(POST, "/api/eval", true, |s, c| {
            Box::pin(api::submit(s, c.req))
        }),
        r(POST, "/api/eval-batch", true, |s, c| {
            Box::pin(api::submit_batch(s, c.req))
        }),
        Route {
            query: QueryRule::Typed,
            ..r(GET, "/api/eval-status/{id}", true, |s, c| {
                Box::pin(
                    async move { api::get_eval_status(s, &c.param, c.req.uri().query()).await },
                )
            })
        },
        Route {
            query: QueryRule::Typed,
            ..r(GET, "/api/eval/{id}", true, |s, c| {
                Box::pin(async move { api::get_eval(s, &c.param, c.req.uri().query()).await })
            })
        },
        r(GET, "/api/eval/{id}/status", true, |s, c| {
            Box::pin(async move { api::get_eval_seed_status(s, &c.param).await })
        }),
        r(GET, "/api/languages", true, |s, _| {
            Box::pin(async move { Ok(api::languages(s).await) })
        }),
        r(POST, "/api/eval/{id}/cancel", true, |s, c| {
            Box::pin(async move { api::cancel(s, &c.param).await })
        }),
        Route {
            query: QueryRule::Typed,
            ..r(GET, "/api/evaluations", true, |s, c| {
                Box::pin(async move { api::list(s, c.req.uri().query()).await })
            })
        },
        Route {
            query: QueryRule::Typed,
            ..r(GET, "/api/events", true, |s, c| {
                Box::pin(async move { sse::events(s, &c.req) })
            })
        },
        r(GET, "/api/admin/sinks", true, |s, _| {
            Box::pin(async move { Ok(api::sinks(s)) })
        }),
        r(POST, "/api/admin/sinks/{name}/replay", true, |s, c| {
            Box::pin(async move { api::replay(s, &c.param, c.req).await })
        }),
        Route {
            query: QueryRule::Typed,
            ..r(GET, "/api/admin/dead-letters", true, |s, c| {
                Box::pin(async move { api::dead_letters(s, c.req.uri().query()) })
            })
        },
        r(POST, "/api/admin/backup", true, |s, c| {
            Box::pin(api::backup(s, c.req))
        }),
        Route {
            label: "/api/admin/queue",
            ..r(POST, "/api/admin/queue/pause", true, |s, _| {
                Box::pin(async move { Ok(api::pause(s)) })
            })
        },
        Route {
            label: "/api/admin/queue",
            ..r(POST, "/api/admin/queue/resume", true, |s, _| {
                Box::pin(async move { Ok(api::resume(s)) })
            })
        },
    ]
}

/// The routes of one path, and its `Allow` header.
struct PathRoutes {
    routes: Vec<Route>,
    allow: String,
}

/// The table, indexed by path.
pub struct Router {
    paths: matchit::Router<PathRoutes>,
}

/// What a request path and method resolved to.
pub enum Resolved<'r> {
    /// A route, and the value of its path parameter.
    Route(&'r Route, String),
    /// The path exists, not for this method: the `Allow` value and the path's label.
    WrongMethod(&'r str, &'static str),
    NotFound,
}

impl Router {
    /// Index `routes` by path.
    ///
    /// # Panics
    /// If two templates conflict: a bug in [`table`], caught by the unit tests.
    pub fn new(routes: Vec<Route>) -> Router {
        let mut by_path: Vec<PathRoutes> = Vec::new();
        for route in routes {
            match by_path.iter_mut().find(|p| p.routes[0].path == route.path) {
                Some(p) => p.routes.push(route),
                None => by_path.push(PathRoutes {
                    routes: vec![route],
                    allow: String::new(),
                }),
            }
        }
        let mut paths = matchit::Router::new();
        for mut p in by_path {
            let mut methods: Vec<&str> = Vec::new();
            for r in &p.routes {
                methods.push(r.method.as_str());
                if r.method == Method::GET {
                    methods.push("HEAD");
                }
            }
            p.allow = methods.join(", ");
            let path = p.routes[0].path;
            paths
                .insert(path, p)
                .expect("the route table has no conflicting paths");
        }
        Router { paths }
    }

    /// The route for `method` on `path`. HEAD is answered by the GET route; a trailing
    /// slash and repeated leading or trailing slashes are ignored.
    pub fn resolve(&self, method: &Method, path: &str) -> Resolved<'_> {
        let trimmed = path.trim_matches('/');
        let mut normalized = String::with_capacity(trimmed.len() + 1);
        normalized.push('/');
        normalized.push_str(trimmed);
        let Ok(m) = self.paths.at(&normalized) else {
            return Resolved::NotFound;
        };
        let method = if method == Method::HEAD {
            &Method::GET
        } else {
            method
        };
        let param = m
            .params
            .iter()
            .next()
            .map(|(_, v)| v.to_string())
            .unwrap_or_default();
        match m.value.routes.iter().find(|r| r.method == method) {
            Some(r) => Resolved::Route(r, param),
            None => Resolved::WrongMethod(&m.value.allow, m.value.routes[0].label),
        }
    }
}

/// The gateway's router, built on first use.
pub fn router() -> &'static Router {
    static ROUTER: LazyLock<Router> = LazyLock::new(|| Router::new(table()));
    &ROUTER
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(m: Method, p: &str) -> String {
        match router().resolve(&m, p) {
            Resolved::Route(r, param) => format!("{} {} [{param}]", r.method, r.path),
            Resolved::WrongMethod(allow, label) => format!("405 {allow} ({label})"),
            Resolved::NotFound => "404".into(),
        }
    }

    #[test]
    fn paths_resolve_as_before() {
        let id = "0193a0b4-7d2e-7c4a-9f00-000000000000";
        for (m, path, want) in [
            (GET, "/", "GET / []".to_string()),
            (GET, "//", "GET / []".into()),
            (GET, "/ui/app.js", "GET /ui/{file} [app.js]".into()),
            (GET, "/ui/", "404".into()),
            (GET, "/ui/a/b", "404".into()),
            (POST, "/api/eval", "POST /api/eval []".into()),
            (POST, "/api/eval/", "POST /api/eval []".into()),
            (
                GET,
                &format!("/api/eval/{id}"),
                format!("GET /api/eval/{{id}} [{id}]"),
            ),
            (
                Method::HEAD,
                &format!("/api/eval-status/{id}"),
                format!("GET /api/eval-status/{{id}} [{id}]"),
            ),
            (
                POST,
                "/api/eval/..%2F../cancel",
                "POST /api/eval/{id}/cancel [..%2F..]".into(),
            ),
            (GET, "/api/eval", "405 POST (/api/eval)".into()),
            (Method::PUT, "/health", "405 GET, HEAD (/health)".into()),
            (Method::DELETE, "/ui/app.js", "405 GET, HEAD (/)".into()),
            (
                POST,
                "/api/admin/queue/resume",
                "POST /api/admin/queue/resume []".into(),
            ),
            (GET, "/api/eval/a/b", "404".into()),
            (GET, "/api//eval", "404".into()),
            (GET, "/api", "404".into()),
            (GET, "/x", "404".into()),
        ] {
            assert_eq!(resolve(m.clone(), path), want, "{m} {path}");
        }
    }

    #[test]
    fn every_path_has_one_route_per_method() {
        let t = table();
        for (i, a) in t.iter().enumerate() {
            for b in &t[i + 1..] {
                assert!(
                    !(a.path == b.path && a.method == b.method),
                    "{} {} twice",
                    a.method,
                    a.path
                );
            }
        }
    }
}
