//! Answers one parsed request. It owns the responses the router makes itself (`/v2/`, health, errors)
//! and decides which requests would go upstream; the upstream work itself lives in `resolve`,
//! `fanout` and `upstream` once the pull path lands.

use http::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use http::{Request, Response, StatusCode};

use crate::body::Body;
use crate::core::Core;
use crate::error::Error;
use crate::registry::route::{self, Route};

/// Sent on every `/v2/` answer so clients know they speak to a registry v2 API.
pub const API_VERSION_HEADER: &str = "docker-distribution-api-version";
const API_VERSION: HeaderValue = HeaderValue::from_static("registry/2.0");
const JSON: HeaderValue = HeaderValue::from_static("application/json; charset=utf-8");
const GET_HEAD: HeaderValue = HeaderValue::from_static("GET, HEAD");

/// Routes and answers one request. Never fails: every problem becomes a registry error response.
pub async fn handle<B>(core: &Core, req: Request<B>) -> Response<Body> {
    match route::parse(req.method(), req.uri().path(), core.proxy_project()) {
        Ok(Route::Base) => base(),
        Ok(Route::Healthz | Route::Readyz) => health(core),
        Ok(Route::Manifest { .. } | Route::Blob { .. } | Route::TagsList { .. })
        | Ok(Route::Referrers { .. }) => error(&Error::Unavailable {
            reason: "no proxy-cache project is known: Harbor discovery has not produced one yet",
        }),
        Err(e) => {
            tracing::debug!(method = %req.method(), path = req.uri().path(), code = e.code(), "refused");
            error(&e)
        }
    }
}

/// `GET /v2/`: 200 `{}`.
fn base() -> Response<Body> {
    let mut res = Response::new(Body::full(&b"{}"[..]));
    let h = res.headers_mut();
    h.insert(CONTENT_TYPE, JSON);
    h.insert(API_VERSION_HEADER, API_VERSION);
    res
}

/// `/healthz` and `/readyz`: 503 until a proxy-cache project is known. The body names the worker that
/// answered, so an operator (or a test) can see every core serving.
fn health(core: &Core) -> Response<Body> {
    let body = serde_json::json!({
        "status": "unavailable",
        "reason": "no proxy-cache project is known: Harbor discovery has not produced one yet",
        "worker": core.id(),
    });
    let mut res = Response::new(Body::full(body.to_string()));
    *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
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
    res
}
