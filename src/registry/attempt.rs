//! One request to one project and the one judge of its answer, shared by the mapped request, every
//! fan-out attempt and the background refresh: what wins, what proves "not here", what is a failure
//! (and so counts against the project's breaker). The rules are in docs/architecture.md ("What wins",
//! and "What counts as a failure": only what no client can provoke by its choice of name or
//! reference, that is no answer at all, a timeout, or 502/503/504).

use std::time::Instant;

use bytes::Bytes;
use http::header::RETRY_AFTER;
use http::{HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Limited};

use crate::metrics::labels;
use crate::snapshot::Project;
use crate::upstream::pool::UpstreamBody;
use crate::upstream::UpstreamError;

use super::ask::{Ask, Endpoint};
use super::forward;
use super::state::State;

/// Largest 404 body kept (and remembered with a miss) to be passed on: registry errors are small.
const MAX_DETAIL: usize = 4096;

/// Largest tag list read whole (to judge it, or to rewrite it).
pub const MAX_TAG_LIST: usize = 4 << 20;

/// What one attempt found in one project.
#[derive(Debug)]
pub enum Verdict<T> {
    Win(T),
    /// The project does not have it (404, or a tag list that proves nothing), with the registry's
    /// error body when it says more than "not found" ([`telling`]).
    NotHere(Option<Bytes>),
    /// 429 from Harbor, with its `Retry-After`.
    RateLimited(Option<HeaderValue>),
    /// Harbor refused the router's credentials for this project (401 although the token flow ran,
    /// or 403): the project may have it, the robot may not pull it. Not a breaker failure.
    Denied,
    /// The project has it and its policy refuses the pull (412 `PROJECTPOLICYVIOLATION`, a
    /// vulnerability or signature policy): Harbor's answer, read whole, to pass on if nothing wins.
    Policy(Response<UpstreamBody>),
    /// Another answer that is neither a win nor "not here" (400, 500, another 4xx): not a breaker
    /// failure.
    Refused,
    /// No answer (connection error, timeout) or 502/503/504: a breaker failure.
    Failed(String),
}

impl<T> Verdict<T> {
    pub fn is_failure(&self) -> bool {
        matches!(self, Verdict::Failed(_))
    }
}

/// Sends `ask` to `project` (following Harbor's same-project redirects).
pub async fn send(
    state: &State,
    project: &Project,
    ask: &Ask,
) -> Result<Response<UpstreamBody>, UpstreamError> {
    let (method, path, headers) = ask.request(project);
    let headers = headers.as_ref().unwrap_or(&ask.headers);
    let started = Instant::now();
    let sent = forward::send(state.upstream(), project, method, path, headers).await;
    state.project_metrics(&project.name, |m| match &sent {
        Ok(res) => m.answered(res.status(), started.elapsed()),
        Err(e) => m.failed(error_kind(e)),
    });
    sent
}

/// The metrics' name for why a request got no answer.
pub fn error_kind(e: &UpstreamError) -> labels::UpstreamError {
    use labels::UpstreamError as K;
    match e {
        UpstreamError::NoAddress
        | UpstreamError::Connect(_)
        | UpstreamError::Tls(_)
        | UpstreamError::Handshake(_) => K::Connect,
        UpstreamError::ConnectTimeout(_) | UpstreamError::ResponseTimeout(_) => K::Timeout,
        UpstreamError::Token(_) => K::Token,
        UpstreamError::Request(_) | UpstreamError::BadPath(_) => K::Protocol,
    }
}

/// What an answer's status says about the project, for `ask`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Judgement {
    /// The project has it (for a tag list: if the list is not empty).
    Win,
    NotHere,
    RateLimited,
    Denied,
    Policy,
    Refused,
    Failed,
}

impl Judgement {
    /// Whether the project's breaker counts this as a failure.
    pub fn is_failure(self) -> bool {
        self == Judgement::Failed
    }
}

/// The one judge of a project's answer to `ask`.
pub fn judge(ask: &Ask, status: StatusCode) -> Judgement {
    // An empty blob answers the one-byte range of a HEAD with 416: it is there.
    let empty_blob = ask.head && ask.is_blob() && status == StatusCode::RANGE_NOT_SATISFIABLE;
    // Only a blob may be redirected elsewhere (object storage); a manifest or a list never is.
    let redirected = ask.is_blob() && status.is_redirection();
    if status.is_success() || redirected || empty_blob {
        return Judgement::Win;
    }
    match status.as_u16() {
        404 => Judgement::NotHere,
        429 => Judgement::RateLimited,
        // The upstream client has already fetched a fresh token once (upstream::Upstream::send).
        401 | 403 => Judgement::Denied,
        412 => Judgement::Policy,
        // Harbor or its upstream is down or overloaded. A 500 is not counted: a name the registry
        // refuses (too long, say) makes one, and a client chooses the name.
        502..=504 => Judgement::Failed,
        _ => Judgement::Refused,
    }
}

/// Sends `ask` to `project` and judges the answer. A winning answer is handed back with its body
/// (a tag list already read whole: only a non-empty list wins).
pub async fn attempt(
    state: &State,
    project: &Project,
    ask: &Ask,
) -> Verdict<Response<UpstreamBody>> {
    let upstream = state.upstream();
    let res = match send(state, project, ask).await {
        Ok(res) => res,
        Err(e) => return Verdict::Failed(e.to_string()),
    };
    let status = res.status();
    match judge(ask, status) {
        Judgement::Win => {}
        Judgement::Failed => return Verdict::Failed(format!("Harbor answered {status}")),
        Judgement::Policy => {
            let (parts, body) = res.into_parts();
            return match upstream.read_small(body).await {
                Some(bytes) => {
                    Verdict::Policy(Response::from_parts(parts, UpstreamBody::whole(bytes)))
                }
                None => Verdict::Refused,
            };
        }
        other => {
            let retry_after = res.headers().get(RETRY_AFTER).cloned();
            // Read the small body so the connection can be reused.
            let body = upstream.read_small(res.into_body()).await;
            return match other {
                Judgement::NotHere => {
                    Verdict::NotHere(body.filter(|b| b.len() <= MAX_DETAIL && telling(b)))
                }
                Judgement::RateLimited => Verdict::RateLimited(retry_after),
                Judgement::Denied => Verdict::Denied,
                _ => Verdict::Refused,
            };
        }
    }
    if let Endpoint::Tags { .. } = ask.endpoint {
        let (parts, body) = res.into_parts();
        return match read_tag_list(body).await {
            Ok((bytes, true)) => {
                Verdict::Win(Response::from_parts(parts, UpstreamBody::whole(bytes)))
            }
            Ok((_, false)) => Verdict::NotHere(None),
            Err(e) => Verdict::Failed(e),
        };
    }
    Verdict::Win(res)
}

/// Whether a 404 body is a registry error that says more than "not found" (for example "OCI index
/// found, but accept header does not support OCI indexes"): one error, whose message says none of
/// "unknown", "not known", "not found", "does not exist".
pub fn telling(body: &[u8]) -> bool {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return false;
    };
    let errors = v.get("errors").and_then(|e| e.as_array());
    let [e] = errors.map(Vec::as_slice).unwrap_or(&[]) else {
        return false;
    };
    let (Some(code), Some(message)) = (
        e.get("code").and_then(|c| c.as_str()),
        e.get("message").and_then(|m| m.as_str()),
    ) else {
        return false;
    };
    let m = message.to_ascii_lowercase();
    let absent = ["unknown", "not known", "not found", "does not exist"];
    !code.is_empty() && !absent.iter().any(|a| m.contains(a))
}

/// Reads a tag list whole; `true` when it proves the repository is there. Harbor answers 200 with
/// its local, possibly empty, list for any name, so only a non-empty list is proof.
pub async fn read_tag_list(body: UpstreamBody) -> Result<(Bytes, bool), String> {
    let bytes = Limited::new(body, MAX_TAG_LIST)
        .collect()
        .await
        .map_err(|e| format!("tag list: {e}"))?
        .to_bytes();
    let has_tags = lists_tags(&bytes);
    Ok((bytes, has_tags))
}

/// Whether a tag-list body names at least one tag.
pub fn lists_tags(body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("tags")?.as_array().map(|t| !t.is_empty()))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::ask::Endpoint;
    use http::HeaderMap;

    fn ask(endpoint: Endpoint, head: bool) -> Ask {
        Ask {
            name: "a".into(),
            endpoint,
            head,
            headers: HeaderMap::new(),
            registry: None,
            root: false,
        }
    }

    #[test]
    fn telling_404s() {
        assert!(telling(
            br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"OCI index found, but accept header does not support OCI indexes"}]}"#
        ));
        for generic in [
            &br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown","detail":"x"}]}"#[..],
            br#"{"errors":[{"code":"NAME_UNKNOWN","message":"repository name not known to registry"}]}"#,
            br#"{"errors":[{"code":"NOT_FOUND","message":"artifact a/b:1 not found"}]}"#,
            br#"{"errors":[]}"#,
            br#"<html>404</html>"#,
            br#"{"errors":[{"code":"A","message":"x"},{"code":"B","message":"y"}]}"#,
        ] {
            assert!(!telling(generic), "{}", String::from_utf8_lossy(generic));
        }
    }

    #[test]
    fn the_judgements() {
        use Judgement::*;
        let blob = || Endpoint::Blob {
            digest: "sha256:0".into(),
        };
        let manifest = || Endpoint::Manifest {
            reference: "1".into(),
            by_digest: false,
        };
        let cases = [
            (ask(manifest(), false), 200, Win),
            (ask(manifest(), true), 200, Win),
            (ask(manifest(), false), 307, Refused),
            (ask(manifest(), false), 404, NotHere),
            (ask(manifest(), false), 416, Refused),
            (ask(manifest(), false), 429, RateLimited),
            (ask(manifest(), false), 401, Denied),
            (ask(manifest(), false), 403, Denied),
            (ask(blob(), false), 401, Denied),
            (ask(manifest(), false), 412, Policy),
            (ask(manifest(), false), 500, Refused),
            (ask(manifest(), false), 502, Failed),
            (ask(manifest(), false), 503, Failed),
            (ask(manifest(), false), 504, Failed),
            (ask(manifest(), false), 400, Refused),
            (ask(blob(), true), 206, Win),
            (ask(blob(), true), 416, Win),
            (ask(blob(), false), 416, Refused),
            (ask(blob(), false), 307, Win),
            (ask(blob(), true), 302, Win),
            (ask(blob(), false), 404, NotHere),
        ];
        for (a, status, want) in cases {
            let got = judge(&a, StatusCode::from_u16(status).unwrap());
            assert_eq!(got, want, "{} head={} {status}", a.endpoint.kind(), a.head);
        }
    }
}
