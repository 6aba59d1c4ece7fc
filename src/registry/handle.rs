//! Answers one parsed request. It owns the responses the router makes itself (`/v2/`, health, errors)
//! and decides which requests would go upstream; the upstream work itself lives in `resolve`,
//! `fanout` and `upstream` once the pull path lands.

use http::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use std::rc::Rc;
use std::time::Instant;

use http::{Request, Response, StatusCode};

use crate::body::Body;
use crate::core::Core;
use crate::error::Error;
use crate::registry::pull::{self, Pull};
use crate::registry::route::{self, Route};

/// Sent on every `/v2/` answer so clients know they speak to a registry v2 API.
pub const API_VERSION_HEADER: &str = "docker-distribution-api-version";
const API_VERSION: HeaderValue = HeaderValue::from_static("registry/2.0");
const JSON: HeaderValue = HeaderValue::from_static("application/json; charset=utf-8");
const GET_HEAD: HeaderValue = HeaderValue::from_static("GET, HEAD");

/// Routes and answers one request. Never fails: every problem becomes a registry error response.
pub async fn handle<B>(core: &Rc<Core>, req: Request<B>) -> Response<Body> {
    let (parts, _body) = req.into_parts();
    let path = parts.uri.path();
    let (name, pull) = match route::parse(&parts.method, path, core.proxy_project()) {
        Ok(Route::Base) => return base(),
        Ok(Route::Healthz) => return health(core, false),
        Ok(Route::Readyz) => return health(core, true),
        Ok(Route::Manifest { name, reference }) => (name, Pull::Manifest(reference)),
        Ok(Route::Blob { name, digest }) => (name, Pull::Blob(digest)),
        Ok(Route::TagsList { name }) => (name, Pull::Tags),
        Ok(Route::Referrers { name, digest }) => (name, Pull::Referrers(digest)),
        Err(e) => {
            let req = &parts;
            tracing::debug!(method = %req.method, path = req.uri.path(), code = e.code(), "refused");
            return error(&e);
        }
    };
    let mut res = pull::serve(core, &parts, name, pull).await;
    res.headers_mut()
        .entry(API_VERSION_HEADER)
        .or_insert(API_VERSION);
    res
}

/// `GET /v2/`: 200 `{}`.
fn base() -> Response<Body> {
    let mut res = Response::new(Body::full(&b"{}"[..]));
    let h = res.headers_mut();
    h.insert(CONTENT_TYPE, JSON);
    h.insert(API_VERSION_HEADER, API_VERSION);
    res
}

/// `/healthz` and `/readyz`: 200 once discovery has published at least one proxy-cache project, 503
/// before. `/readyz` also turns 503 when the project list is older than three discovery intervals
/// (Harbor unreachable for that long). The body names the worker that answered, so an operator (or a
/// test) can see every core serving.
fn health(core: &Core, readiness: bool) -> Response<Body> {
    let now = Instant::now();
    let snapshot = core.snapshot().load();
    let max_age = core.config().discovery_interval * 3;
    let (ok, body) = match snapshot.as_ref() {
        None => (
            false,
            serde_json::json!({
                "status": "unavailable",
                "reason": "no proxy-cache project discovered yet",
                "worker": core.id(),
            }),
        ),
        Some(s) if s.projects.is_empty() => (
            false,
            serde_json::json!({
                "status": "unavailable",
                "reason": "Harbor lists no proxy-cache project the robot can see",
                "worker": core.id(),
            }),
        ),
        Some(s) => {
            let age = s.age(now);
            let stale = readiness && age > max_age;
            let mut v = serde_json::json!({
                "status": if stale { "unavailable" } else { "ok" },
                "projects": s.projects.len(),
                "snapshot_age_seconds": age.as_secs(),
                "worker": core.id(),
            });
            if stale {
                v["reason"] = "the project list is older than 3 discovery intervals: Harbor has not answered discovery since".into();
            }
            (!stale, v)
        }
    };
    let mut res = Response::new(Body::full(body.to_string()));
    if !ok {
        *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    }
    res.headers_mut().insert(CONTENT_TYPE, JSON);
    res
}

/// A registry error in the spec's JSON form.
pub fn error(e: &Error) -> Response<Body> {
    let mut res = Response::new(Body::full(e.body()));
    *res.status_mut() = e.status();
    let h = res.headers_mut();
    h.insert(CONTENT_TYPE, JSON);
    h.insert(API_VERSION_HEADER, API_VERSION);
    if e.status() == StatusCode::METHOD_NOT_ALLOWED {
        h.insert(ALLOW, GET_HEAD);
    }
    if let Error::TooManyRequests {
        retry_after: Some(v),
    } = e
    {
        h.insert(http::header::RETRY_AFTER, v.clone());
    }
    res
}
