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

/// `Retry-After` of a rate limit when Harbor sends none (Harbor's own 429 never carries one,
/// `src/lib/http/error.go`): long enough that a client does not hammer a rate-limited upstream,
/// short enough that a pull resumes soon after the limit lifts.
pub const DEFAULT_RETRY_AFTER_SECS: u64 = 10;
/// Longest `Retry-After` in seconds passed on: a client told to wait longer would sit out an
/// outage that may already be over.
pub const MAX_RETRY_AFTER_SECS: u64 = 3600;

/// The `Retry-After` a rate-limited client gets: Harbor's when it sent delay-seconds (at least 1, at
/// most [`MAX_RETRY_AFTER_SECS`]), else [`DEFAULT_RETRY_AFTER_SECS`] (a date, which would need the
/// two clocks to agree, is replaced too).
pub fn retry_after(harbor: Option<&HeaderValue>) -> HeaderValue {
    let secs = harbor
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(DEFAULT_RETRY_AFTER_SECS, |s| {
            s.clamp(1, MAX_RETRY_AFTER_SECS)
        });
    HeaderValue::from(secs)
}

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
        Error::TooManyRequests { retry_after } => {
            h.insert(RETRY_AFTER, self::retry_after(retry_after.as_ref()));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_limit_always_says_when_to_come_back() {
        let v = |s: &str| HeaderValue::from_str(s).unwrap();
        assert_eq!(retry_after(None), "10");
        assert_eq!(retry_after(Some(&v("7"))), "7");
        assert_eq!(retry_after(Some(&v("86400"))), "3600");
        assert_eq!(retry_after(Some(&v("Wed, 02 Dec 2026 16:00:00 GMT"))), "10");
        assert_eq!(retry_after(Some(&v("0"))), "1");
        assert_eq!(retry_after(Some(&v("soon"))), "10");
        assert_eq!(retry_after(Some(&v("-1"))), "10");
        let res = error(&Error::TooManyRequests { retry_after: None });
        assert_eq!(res.headers()[RETRY_AFTER], "10");
    }
}
