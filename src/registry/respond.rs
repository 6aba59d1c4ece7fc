//! Building the responses the router sends: one helper for every answer made from parts, the
//! registry's JSON errors, and whole bodies from memory.

use bytes::Bytes;
use http::header::{HeaderValue, ALLOW, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, Response, StatusCode};

use crate::body::Body;
use crate::error::Error;

/// Sent on every `/v2/` answer so clients know they speak to a registry v2 API.
pub const API_VERSION_HEADER: &str = "docker-distribution-api-version";
pub const API_VERSION: HeaderValue = HeaderValue::from_static("registry/2.0");
pub const JSON: HeaderValue = HeaderValue::from_static("application/json; charset=utf-8");
const GET_HEAD: HeaderValue = HeaderValue::from_static("GET, HEAD");

/// A response from its parts.
pub fn respond(status: StatusCode, headers: HeaderMap, body: Body) -> Response<Body> {
    let mut res = Response::new(body);
    *res.status_mut() = status;
    *res.headers_mut() = headers;
    res
}

/// A whole body with its length; a HEAD gets the length and no body (hyper sends none for HEAD but
/// keeps the `Content-Length` set here).
pub fn whole(
    status: StatusCode,
    mut headers: HeaderMap,
    body: Bytes,
    head: bool,
) -> Response<Body> {
    headers.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
    let body = if head { Body::Empty } else { Body::full(body) };
    respond(status, headers, body)
}

/// A JSON body the router made.
pub fn json(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_TYPE, JSON);
    respond(status, headers, Body::full(body))
}

/// A registry error in the spec's JSON form.
pub fn error(e: &Error) -> Response<Body> {
    let mut res = json(e.status(), e.body());
    let h = res.headers_mut();
    h.insert(API_VERSION_HEADER, API_VERSION);
    if e.status() == StatusCode::METHOD_NOT_ALLOWED {
        h.insert(ALLOW, GET_HEAD);
    }
    match e {
        Error::TooManyRequests {
            retry_after: Some(v),
        } => {
            h.insert(RETRY_AFTER, v.clone());
        }
        Error::ClientRateLimited {
            retry_after_secs, ..
        } => {
            h.insert(RETRY_AFTER, HeaderValue::from(*retry_after_secs));
        }
        _ => {}
    }
    res
}
