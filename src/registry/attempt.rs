//! One request to one project and the one judge of its answer, shared by the mapped request, every
//! fan-out attempt and the background refresh: [`judge`] turns Harbor's answer into the typed
//! [`Heard`] that every later decision asks its questions of (see [`super::outcome`]). The rules are
//! in docs/architecture.md ("What wins", and "What counts as a failure": only what no client can
//! provoke by its choice of name or reference, that is no answer at all, a timeout, or 502/503/504).

use std::time::Instant;

use bytes::Bytes;
use http::header::{RETRY_AFTER, WWW_AUTHENTICATE};
use http::{HeaderMap, HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Limited};

use crate::metrics::labels;
use crate::snapshot::Project;
use crate::upstream::pool::UpstreamBody;
use crate::upstream::UpstreamError;

use super::ask::{Ask, Endpoint};
use super::forward;
use super::outcome::{Failure, Heard};
use super::state::State;

/// Largest 404 body kept (and remembered with a miss) to be passed on: registry errors are small.
const MAX_DETAIL: usize = 4096;

/// Largest tag list read whole (to judge it, or to rewrite it).
pub const MAX_TAG_LIST: usize = 4 << 20;

/// What one attempt found in one project: the outcome, and what goes with it.
#[derive(Debug)]
pub struct Verdict {
    pub heard: Heard,
    /// The answer to pass on: a win's (its body streaming; a tag list read whole), or a policy
    /// refusal's (read whole).
    pub answer: Option<Response<UpstreamBody>>,
    /// A 404's registry error body when it says more than "not found" ([`telling`]).
    pub detail: Option<Bytes>,
    /// A 429's `Retry-After`.
    pub retry_after: Option<HeaderValue>,
}

impl Verdict {
    pub fn of(heard: Heard) -> Verdict {
        Verdict {
            heard,
            answer: None,
            detail: None,
            retry_after: None,
        }
    }

    pub fn failed(failure: Failure) -> Verdict {
        Verdict::of(Heard::Failed(failure))
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
    state.counters.project(&project.name, |m| match &sent {
        Ok(res) => m.answered(res.status(), started.elapsed()),
        Err(e) => m.failed(error_kind(e)),
    });
    sent
}

/// Why a request that got no answer failed.
pub fn failure_of(e: &UpstreamError) -> Failure {
    match e {
        UpstreamError::ConnectTimeout(_) | UpstreamError::ResponseTimeout(_) => Failure::Timeout,
        _ => Failure::Transport,
    }
}

/// The metrics' name for why a request got no answer.
pub fn error_kind(e: &UpstreamError) -> labels::ErrorKind {
    use labels::ErrorKind as K;
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

/// The one judge of a project's answer to `ask`, from its status and headers.
pub fn judge(ask: &Ask, status: StatusCode, headers: &HeaderMap) -> Heard {
    // An empty blob answers the one-byte range of a HEAD with 416: it is there.
    let empty_blob = ask.head && ask.is_blob() && status == StatusCode::RANGE_NOT_SATISFIABLE;
    // Only a blob may be redirected elsewhere (object storage); a manifest or a list never is.
    let redirected = ask.is_blob() && status.is_redirection();
    if status.is_success() || redirected || empty_blob {
        return Heard::Has;
    }
    match status.as_u16() {
        // A HEAD's 404 has no body, so Harbor's two 404s (the upstream's "not found", and its local
        // store's for an upstream it could not ask) cannot be told apart: unsure.
        404 if ask.head && matches!(ask.endpoint, Endpoint::Manifest { .. }) => Heard::Unsure,
        404 => Heard::NotHere,
        429 => Heard::Failed(Failure::RateLimited),
        // The upstream client has already fetched a fresh token once (upstream::Upstream::send): a
        // 401 with a challenge, or a 403, is Harbor refusing the router's credentials; a 401
        // without one is Harbor relaying its upstream's refusal.
        401 => Heard::Denied {
            challenged: headers
                .get(WWW_AUTHENTICATE)
                .is_some_and(crate::upstream::challenges),
        },
        403 => Heard::Denied { challenged: true },
        412 => Heard::Policy,
        // Harbor failed inside (`src/lib/http/error.go`: any 5xx it makes is `UNKNOWN`, "internal
        // server error"): a failure, but never a circuit's (a name the registry refuses, too long
        // say, makes one too, and a client chooses the name).
        500 => Heard::Failed(Failure::Internal),
        // Harbor or its upstream is down or overloaded.
        s @ 502..=504 => Heard::Failed(Failure::Status(s)),
        s => Heard::Refused(s),
    }
}

/// Sends `ask` to `project` and judges the answer. A winning answer is handed back with its body
/// (a tag list already read whole: only a non-empty list wins); the other answers are read (small
/// bodies) so their connections are reused.
pub async fn attempt(state: &State, project: &Project, ask: &Ask) -> Verdict {
    let upstream = state.upstream();
    let res = match send(state, project, ask).await {
        Ok(res) => res,
        Err(e) => return Verdict::failed(failure_of(&e)),
    };
    let heard = judge(ask, res.status(), res.headers());
    match heard {
        Heard::Has => {}
        Heard::Failed(Failure::Status(_) | Failure::Internal) => return Verdict::of(heard),
        Heard::Policy => {
            let (parts, body) = res.into_parts();
            return match upstream.read_small(body).await {
                Some(bytes) => Verdict {
                    answer: Some(Response::from_parts(parts, UpstreamBody::whole(bytes))),
                    ..Verdict::of(heard)
                },
                None => Verdict::of(Heard::Refused(412)),
            };
        }
        _ => {
            let retry_after = res.headers().get(RETRY_AFTER).cloned();
            let body = upstream.read_small(res.into_body()).await;
            let heard = refined(state, project, ask, heard, body.as_deref()).await;
            if heard == Heard::Unsure {
                state.counters.project(&project.name, |m| m.unsure());
            }
            return Verdict {
                detail: body.filter(|b| heard.is_absence() && b.len() <= MAX_DETAIL && telling(b)),
                retry_after,
                ..Verdict::of(heard)
            };
        }
    }
    if let Endpoint::Tags { .. } = ask.endpoint {
        let (parts, body) = res.into_parts();
        return match read_tag_list(body).await {
            Ok((bytes, true)) => Verdict {
                answer: Some(Response::from_parts(parts, UpstreamBody::whole(bytes))),
                ..Verdict::of(Heard::Has)
            },
            Ok((_, false)) => Verdict::of(Heard::NotHere),
            Err(_) => Verdict::failed(Failure::Transport),
        };
    }
    Verdict {
        answer: Some(res),
        ..Verdict::of(Heard::Has)
    }
}

/// An answer judged with its body: a 404 that is Harbor's answer from its local store after it did
/// not, or could not, ask the upstream is [`Heard::Unsure`] ([`unsure`]); a 401 without a
/// challenge saying `project` does not exist ([`project_gone`]) is "not here"; the rest stay.
pub fn refine(heard: Heard, project: &str, body: Option<&[u8]>) -> Heard {
    match (heard, body) {
        (Heard::NotHere, Some(b)) if unsure(b) => Heard::Unsure,
        (Heard::Denied { challenged: false }, Some(b)) if project_gone(project, b) => {
            Heard::NotHere
        }
        _ => heard,
    }
}

/// [`refine`], and for a HEAD's 401 without a challenge (no body to judge: a refusal relayed, or a
/// project deleted since the last discovery) the answer of [`gone`].
pub async fn refined(
    state: &State,
    project: &Project,
    ask: &Ask,
    heard: Heard,
    body: Option<&[u8]>,
) -> Heard {
    let heard = refine(heard, &project.name, body);
    let upstream_401 = Heard::Denied { challenged: false };
    if heard == upstream_401 && ask.head && gone(state, project, ask).await {
        return Heard::NotHere;
    }
    heard
}

/// Whether Harbor says `project` does not exist, asked with a GET of `ask`'s repository's tag list
/// with `n=0`: Harbor's project check comes before any handler, so the answer is the same "not
/// found" as for any other path, with a body to read, and a project that exists answers `n=0` with
/// an empty list without asking its upstream (`src/server/middleware/repoproxy/tag.go`,
/// `TagsListMiddleware`). Only a HEAD refused without a challenge pays for it: one small request.
async fn gone(state: &State, project: &Project, ask: &Ask) -> bool {
    let probe = Ask {
        name: ask.name.clone(),
        endpoint: Endpoint::Tags {
            query: "n=0".to_string(),
        },
        head: false,
        headers: HeaderMap::new(),
        registry: ask.registry.clone(),
        root: ask.root,
    };
    let Ok(res) = send(state, project, &probe).await else {
        return false;
    };
    if res.status() != StatusCode::UNAUTHORIZED {
        state.upstream().drain(res.into_body()).await;
        return false;
    }
    let body = state.upstream().read_small(res.into_body()).await;
    body.is_some_and(|b| project_gone(&project.name, &b))
}

/// Whether a 401 body is Harbor saying the project itself does not exist: it was deleted since the
/// last discovery. Harbor checks the project before any right (`src/server/middleware/v2auth/
/// auth.go`, `reqChecker.check` → `projectID`), and answers the controller's not-found error as
/// `401 UNAUTHORIZED` with its message, `project <name> not found` (`src/pkg/project/dao/dao.go`),
/// and an empty `Www-Authenticate`. The image is not in a project that is not there; answered as a
/// refusal, one deleted project would turn every cold pull into a 403 until the next discovery.
pub fn project_gone(project: &str, body: &[u8]) -> bool {
    only_error(body).is_some_and(|(code, message)| {
        code == "UNAUTHORIZED"
            && message
                .strip_prefix("project ")
                .and_then(|m| m.strip_suffix(" not found"))
                == Some(project)
    })
}

/// Whether a 404 body is Harbor's local store saying it does not hold the artifact, which Harbor
/// answers both when the upstream said "not found" with the project set to serve local content on
/// a miss, and (the common case) when the upstream could not be asked: down, failing, or Docker Hub
/// refusing Harbor for a repository that does not exist (`src/server/middleware/repoproxy/proxy.go`
/// falls back to the local registry handler on any upstream error but "not found" and a rate
/// limit). The local handler's messages, the same in Harbor v2.9 through main:
/// - `artifact <repo>:<tag> not found` (`src/controller/artifact/controller.go`, `getByTag`);
/// - `artifact <repo>@<digest> not found` (`src/pkg/artifact/dao/dao.go`, `GetByDigest`);
/// - `repository <repo> not found` (`src/pkg/repository/manager.go`, `GetByName`).
///
/// What the upstream's own "not found" gives is `repo <repo>, tag <tag> not found`
/// (`src/controller/proxy/controller.go`, `UseLocalManifest`): a proof of absence, not matched here.
pub fn unsure(body: &[u8]) -> bool {
    let Some((code, message)) = only_error(body) else {
        return false;
    };
    let Some(what) = message.strip_suffix(" not found") else {
        return false;
    };
    let one_word = |w: &str| !w.is_empty() && !w.contains(' ');
    let artifact = what
        .strip_prefix("artifact ")
        .is_some_and(|a| one_word(a) && (a.contains(':') || a.contains('@')));
    let repository = what.strip_prefix("repository ").is_some_and(one_word);
    code == "NOT_FOUND" && (artifact || repository)
}

/// The code and message of a registry error body holding exactly one error.
fn only_error(body: &[u8]) -> Option<(String, String)> {
    let v = serde_json::from_slice::<serde_json::Value>(body).ok()?;
    let [e] = v.get("errors")?.as_array()?.as_slice() else {
        return None;
    };
    let code = e.get("code")?.as_str()?;
    let message = e.get("message")?.as_str()?;
    Some((code.to_string(), message.to_string()))
}

/// Whether a 404 body is a registry error that says more than "not found" (for example "OCI index
/// found, but accept header does not support OCI indexes"): one error, whose message says none of
/// "unknown", "not known", "not found", "does not exist".
pub fn telling(body: &[u8]) -> bool {
    let Some((code, message)) = only_error(body) else {
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

    fn error(code: &str, message: &str) -> String {
        serde_json::json!({"errors": [{"code": code, "message": message}]}).to_string()
    }

    #[test]
    fn harbor_local_misses_are_unsure() {
        for unsure_one in [
            error(
                "NOT_FOUND",
                "artifact dockerhub/library/nginx:1.27 not found",
            ),
            error("NOT_FOUND", "artifact ghcr/a/b@sha256:0123 not found"),
            error("NOT_FOUND", "repository quay/x/y not found"),
        ] {
            assert!(unsure(unsure_one.as_bytes()), "{unsure_one}");
            assert_eq!(
                refine(Heard::NotHere, "p", Some(unsure_one.as_bytes())),
                Heard::Unsure
            );
            assert!(!telling(unsure_one.as_bytes()), "{unsure_one}");
        }
        for sure in [
            // The upstream said "not found" (for a digest the tag part is empty).
            error(
                "NOT_FOUND",
                "repo dockerhub/library/nginx, tag 1.27 not found",
            ),
            error("NOT_FOUND", "repo ghcr/a/b, tag  not found"),
            error("MANIFEST_UNKNOWN", "manifest unknown"),
            error("NAME_UNKNOWN", "repository name not known to registry"),
            error("MANIFEST_UNKNOWN", "artifact a:b not found"),
            error("NOT_FOUND", "artifact 12 not found"),
            error(
                "NOT_FOUND",
                "repository \"a\" does not match project repository filter",
            ),
            "<html>404</html>".to_string(),
        ] {
            assert!(!unsure(sure.as_bytes()), "{sure}");
            assert_eq!(
                refine(Heard::NotHere, "p", Some(sure.as_bytes())),
                Heard::NotHere
            );
        }
        let two = r#"{"errors":[{"code":"NOT_FOUND","message":"repository a not found"},{"code":"X","message":"y"}]}"#;
        assert!(!unsure(two.as_bytes()));
        // Only a 404 is refined.
        let local = error("NOT_FOUND", "repository a not found");
        assert_eq!(refine(Heard::Has, "p", Some(local.as_bytes())), Heard::Has);
        assert_eq!(refine(Heard::NotHere, "p", None), Heard::NotHere);
    }

    #[test]
    fn a_project_harbor_cannot_find_is_not_a_refusal() {
        let gone = error("UNAUTHORIZED", "project extra0 not found");
        assert!(project_gone("extra0", gone.as_bytes()));
        let upstream_401 = Heard::Denied { challenged: false };
        assert_eq!(
            refine(upstream_401, "extra0", Some(gone.as_bytes())),
            Heard::NotHere
        );
        // Another project's name, a challenged 401 (the router's own credentials refused), or
        // another message: still a refusal.
        assert!(!project_gone("extra", gone.as_bytes()));
        assert!(!project_gone("xtra0", gone.as_bytes()));
        let challenged = Heard::Denied { challenged: true };
        assert_eq!(
            refine(challenged, "extra0", Some(gone.as_bytes())),
            challenged
        );
        for refusal in [
            error(
                "UNAUTHORIZED",
                "unauthorized to access repository: extra0/a",
            ),
            error("UNAUTHORIZED", "project extra0 not found, and more"),
            error("DENIED", "project extra0 not found"),
            error("UNAUTHORIZED", ""),
            "project extra0 not found".to_string(),
        ] {
            assert!(!project_gone("extra0", refusal.as_bytes()), "{refusal}");
            assert_eq!(
                refine(upstream_401, "extra0", Some(refusal.as_bytes())),
                upstream_401,
                "{refusal}"
            );
        }
        assert_eq!(refine(upstream_401, "extra0", None), upstream_401);
    }

    #[test]
    fn the_judgements() {
        use Failure::*;
        use Heard::*;
        let (denied, upstream_401) = (Denied { challenged: true }, Denied { challenged: false });
        let blob = || Endpoint::Blob {
            digest: "sha256:0".into(),
        };
        let manifest = || Endpoint::Manifest {
            reference: "1".into(),
            by_digest: false,
        };
        let cases = [
            (ask(manifest(), false), 200, Has),
            (ask(manifest(), true), 200, Has),
            (ask(manifest(), false), 307, Refused(307)),
            (ask(manifest(), false), 404, NotHere),
            (ask(manifest(), true), 404, Unsure),
            (ask(manifest(), false), 416, Refused(416)),
            (ask(manifest(), false), 429, Failed(RateLimited)),
            (ask(manifest(), false), 401, upstream_401),
            (ask(manifest(), false), 403, denied),
            (ask(blob(), false), 401, upstream_401),
            (ask(manifest(), false), 412, Policy),
            (ask(manifest(), false), 500, Failed(Internal)),
            (ask(manifest(), false), 502, Failed(Status(502))),
            (ask(manifest(), false), 503, Failed(Status(503))),
            (ask(manifest(), false), 504, Failed(Status(504))),
            (ask(manifest(), false), 400, Refused(400)),
            (ask(blob(), true), 206, Has),
            (ask(blob(), true), 416, Has),
            (ask(blob(), false), 416, Refused(416)),
            (ask(blob(), false), 307, Has),
            (ask(blob(), true), 302, Has),
            (ask(blob(), false), 404, NotHere),
        ];
        for (a, status, want) in cases {
            let got = judge(&a, StatusCode::from_u16(status).unwrap(), &HeaderMap::new());
            assert_eq!(got, want, "{} head={} {status}", a.endpoint.kind(), a.head);
        }
        // A 401 with Harbor's challenge: the router's credentials were refused.
        let mut challenged = HeaderMap::new();
        challenged.insert(
            WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"harbor\""),
        );
        let got = judge(
            &ask(manifest(), false),
            StatusCode::UNAUTHORIZED,
            &challenged,
        );
        assert_eq!(got, denied);
    }
}
