//! Answers from memory: a manifest kept by digest (when the client's `Accept` names its media type;
//! 304 when its `If-None-Match` names the digest), a tag list kept for `CACHE_TTL`, and a blob HEAD
//! from the descriptor of a manifest this core served (its size). Also what is
//! kept: Harbor's headers without the per-response ones, copied out of hyper's read buffer.

use bytes::Bytes;
use http::header::{
    HeaderName, HeaderValue, ACCEPT, ACCEPT_RANGES, CONTENT_LENGTH, CONTENT_TYPE, ETAG,
    IF_NONE_MATCH,
};
use http::{HeaderMap, Response, StatusCode};

use crate::body::Body;
use crate::cache::Kept;

use super::ask::{Ask, Endpoint};
use super::remembered::Remembered;
use super::respond::{respond, whole};

/// The answer to `ask` from this core's memory, if it has one. `client` are the client's headers.
pub fn answer(remembered: &Remembered, ask: &Ask, client: &HeaderMap) -> Option<Response<Body>> {
    match &ask.endpoint {
        Endpoint::Manifest {
            reference,
            by_digest: true,
        } => {
            let m = remembered.manifest(&ask.memory_key()?)?;
            let ct = m.headers.get(CONTENT_TYPE)?.to_str().ok()?;
            if !accepts(client, ct) {
                return None;
            }
            if not_modified(client, reference) {
                // What the registry answers a matching `If-None-Match`: 304, headers, no body.
                let mut headers = m.headers;
                headers.remove(CONTENT_LENGTH);
                return Some(respond(StatusCode::NOT_MODIFIED, headers, Body::Empty));
            }
            Some(whole(StatusCode::OK, m.headers, m.body, ask.head))
        }
        Endpoint::Tags { .. } => {
            let t = remembered.tags(&ask.memory_key()?)?;
            Some(whole(StatusCode::OK, t.headers, t.body, ask.head))
        }
        // A blob HEAD, from the descriptor of a manifest this core served.
        Endpoint::Blob { digest } if ask.head => {
            let size = remembered.blob_size(&ask.mapping_key(), digest)?;
            let mut h = HeaderMap::with_capacity(5);
            h.insert(CONTENT_LENGTH, HeaderValue::from(size));
            h.insert(
                CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            let value = HeaderValue::from_str(digest).ok()?;
            h.insert(ETAG, HeaderValue::from_str(&format!("\"{digest}\"")).ok()?);
            h.insert(HeaderName::from_static("docker-content-digest"), value);
            h.insert(ACCEPT_RANGES, HeaderValue::from_static("bytes"));
            Some(respond(StatusCode::OK, h, Body::Empty))
        }
        _ => None,
    }
}

/// What is kept in memory: Harbor's headers without the per-response ones, every value and the
/// body copied out of hyper's read buffer (a slice would pin the whole buffer, up to ~400 KiB, for
/// as long as the entry lives, and the cache's byte budget would not see it).
pub fn keepable(headers: &HeaderMap, body: &Bytes) -> Kept {
    let mut kept = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        let per_response = name == http::header::DATE
            || name == http::header::SET_COOKIE
            || name.as_str().eq_ignore_ascii_case("x-request-id");
        if !per_response {
            if let Ok(v) = HeaderValue::from_bytes(value.as_bytes()) {
                kept.append(name.clone(), v);
            }
        }
    }
    Kept {
        headers: kept,
        body: Bytes::copy_from_slice(body),
    }
}

/// Whether an `If-None-Match` of the client names this digest (the registry's ETag is `"<digest>"`).
fn not_modified(headers: &HeaderMap, digest: &str) -> bool {
    headers
        .get_all(IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().trim_start_matches("W/").trim_matches('"'))
        .any(|t| t == digest || t == "*")
}

/// Whether the client's Accept lines name `content_type`.
fn accepts(headers: &HeaderMap, content_type: &str) -> bool {
    headers
        .get_all(ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|a| a.split(';').next().unwrap_or("").trim())
        .any(|a| a.eq_ignore_ascii_case(content_type))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_matching() {
        let mut h = HeaderMap::new();
        h.append(
            ACCEPT,
            HeaderValue::from_static("application/vnd.oci.image.index.v1+json"),
        );
        h.append(
            ACCEPT,
            HeaderValue::from_static(
                "application/vnd.docker.distribution.manifest.v2+json; q=0.5, */*",
            ),
        );
        assert!(accepts(&h, "application/vnd.oci.image.index.v1+json"));
        assert!(accepts(
            &h,
            "application/vnd.docker.distribution.manifest.v2+json"
        ));
        assert!(!accepts(&h, "application/vnd.oci.image.manifest.v1+json"));
        assert!(!accepts(
            &HeaderMap::new(),
            "application/vnd.oci.image.index.v1+json"
        ));
    }

    #[test]
    fn if_none_match() {
        let mut h = HeaderMap::new();
        h.append(
            IF_NONE_MATCH,
            HeaderValue::from_static("\"sha256:b\", W/\"sha256:a\""),
        );
        assert!(not_modified(&h, "sha256:a"));
        assert!(not_modified(&h, "sha256:b"));
        assert!(!not_modified(&h, "sha256:c"));
        assert!(!not_modified(&HeaderMap::new(), "sha256:a"));
    }

    #[test]
    fn per_response_headers_are_not_kept() {
        let mut h = HeaderMap::new();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("a/b"));
        h.insert(http::header::DATE, HeaderValue::from_static("now"));
        h.insert(http::header::SET_COOKIE, HeaderValue::from_static("sid=1"));
        h.insert("x-request-id", HeaderValue::from_static("1"));
        let kept = keepable(&h, &Bytes::from_static(b"{}"));
        assert_eq!(kept.headers.len(), 1);
        assert_eq!(kept.headers[CONTENT_TYPE], "a/b");
        assert_eq!(kept.body, "{}");
    }
}
