//! `/v2/` forwarding to the real registry with Harbor's proxy-cache quirks on top: Harbor's own
//! authentication first (`auth.rs`: tokens checked by the stand-in, challenges as Harbor words
//! them), then docker-hub single-segment 301, `tags/list` 200-empty for unknown repositories, blob
//! `HEAD` 404 until the blob was fetched with GET (#22609), an empty `Docker-Content-Digest` on a
//! manifest GET by tag fetched upstream ([`EmptyDigests`]), and the per-project faults of [`Fault`]
//! in Harbor's words (`src/lib/http/error.go`).
//!
//! Request headers (repeated `Accept` lines included) and response status/headers/body pass through
//! unchanged and streamed; only hop-by-hop headers are dropped, and `Authorization` is replaced by
//! the stand-in's internal token (Harbor's registry trusts Harbor's core, not the client).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, Method, Request, Response, StatusCode};
use http_body::{Body as HttpBody, Frame};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::auth::{refusal, rights};
use crate::standin::{full, harbor_error, json_response, Body, BoxError, State};
use crate::{EmptyDigests, Fault};

/// What a `/v2/<project>/<name>/<kind>` path asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Manifest,
    Blob(String),
    Tags,
    Other,
}

/// A parsed `/v2/` path (everything after `/v2/`).
#[derive(Debug)]
struct V2Path {
    project: String,
    /// Repository name inside the project (empty when the path has no recognised suffix).
    name: String,
    /// `/manifests/<ref>`, `/blobs/<digest>`, `/tags/list`, …
    suffix: String,
    kind: Kind,
}

fn parse(rest: &str) -> Option<V2Path> {
    let (project, remainder) = rest.split_once('/').unwrap_or((rest, ""));
    if project.is_empty() {
        return None;
    }
    let split = |marker: &str| remainder.rfind(marker).filter(|&i| i > 0);
    let (idx, kind) = if let Some(i) = split("/manifests/") {
        (i, Kind::Manifest)
    } else if let Some(i) = split("/blobs/uploads") {
        (i, Kind::Other)
    } else if let Some(i) = split("/blobs/") {
        let digest = remainder[i + "/blobs/".len()..].to_string();
        (i, Kind::Blob(digest))
    } else if remainder.ends_with("/tags/list") && remainder.len() > "/tags/list".len() {
        (remainder.len() - "/tags/list".len(), Kind::Tags)
    } else {
        return Some(V2Path {
            project: project.to_string(),
            name: String::new(),
            suffix: remainder.to_string(),
            kind: Kind::Other,
        });
    };
    Some(V2Path {
        project: project.to_string(),
        name: remainder[..idx].to_string(),
        suffix: remainder[idx..].to_string(),
        kind,
    })
}

/// A fault's answer in Harbor's words (`src/lib/http/error.go`: a 5xx is always "internal server
/// error"; a rate limit is `TOO_MANY_REQUEST` with no `Retry-After`).
fn fault_response(status: u16, kind: &Kind) -> Response<Body> {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let (code, message) = match (status.as_u16(), kind) {
        (404, Kind::Manifest) => ("MANIFEST_UNKNOWN", "manifest unknown"),
        (404, Kind::Blob(_)) => ("BLOB_UNKNOWN", "blob unknown to registry"),
        (404, _) => ("NAME_UNKNOWN", "repository name not known to registry"),
        // An upstream 401 relayed on a blob: no challenge with it.
        (401, _) => ("UNAUTHORIZED", "unauthorized"),
        (403, _) => ("DENIED", "requested access to the resource is denied"),
        (412, _) => ("PROJECTPOLICYVIOLATION", POLICY_MESSAGE),
        (429, _) => ("TOO_MANY_REQUEST", "too many requests to upstream registry"),
        (500, _) => ("UNKNOWN", "internal server error"),
        (503, _) => ("UNAVAILABLE", "service unavailable"),
        _ => ("UNKNOWN", "injected fault"),
    };
    harbor_error(status, code, message)
}

/// Harbor's vulnerability-policy refusal (`src/server/middleware/vulnerable/vulnerable.go`).
const POLICY_MESSAGE: &str = "current image with 2 vulnerabilities cannot be pulled due to configured policy in 'Prevent images with vulnerability severity of \"High\" or higher from running.' To continue with pull, please contact your project administrator to exempt matched vulnerabilities through configuring the CVE allowlist.";

const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    for h in HOP_BY_HOP {
        headers.remove(*h);
    }
}

/// Adds `delta` to the project's request counters.
fn count(state: &State, p: &V2Path, delta: i64) {
    let mut c = state.counters.lock().unwrap();
    let bump = |v: &mut u64| *v = v.saturating_add_signed(delta);
    bump(c.v2_requests.entry(p.project.clone()).or_default());
    if p.kind == Kind::Manifest {
        bump(c.manifest_requests.entry(p.project.clone()).or_default());
    }
}

/// Answers one `/v2/` request and counts the answer (401 challenges aside).
pub(crate) async fn handle(state: Arc<State>, req: Request<Incoming>) -> Response<Body> {
    let project = req
        .uri()
        .path()
        .strip_prefix("/v2/")
        .and_then(parse)
        .map(|p| p.project);
    let res = answer(&state, req).await;
    if let Some(project) = project {
        if res.status() != StatusCode::UNAUTHORIZED {
            let mut c = state.counters.lock().unwrap();
            *c.answered.entry(project).or_default() += 1;
        }
    }
    res
}

/// Harbor's `v2auth` check, or `None` when the request may go on: `/v2/` itself needs an
/// authenticated caller; a repository needs pull on its project, and a GET or HEAD without
/// `Authorization` is always challenged.
fn authorize(
    state: &State,
    req: &Request<Incoming>,
    parsed: Option<&V2Path>,
) -> Option<Response<Body>> {
    let headers = req.headers();
    if let Some(a) = headers.get(header::AUTHORIZATION) {
        let a = String::from_utf8_lossy(a.as_bytes()).into_owned();
        state.counters.lock().unwrap().authorizations.insert(a);
    }
    let carried = headers.contains_key(header::AUTHORIZATION);
    let rights = rights(state, headers);
    let refused = match parsed.filter(|p| !p.name.is_empty()) {
        None => (!rights.authenticated()).then(|| refusal(state, headers, None, "unauthorized")),
        Some(p) => {
            let repository = format!("{}/{}", p.project, p.name);
            let scope = format!("repository:{repository}:pull");
            let cli = matches!(*req.method(), Method::GET | Method::HEAD);
            if !carried && cli {
                Some(refusal(
                    state,
                    headers,
                    Some(&scope),
                    "authorize header needed to send HEAD to repository",
                ))
            } else if state.project(&p.project).is_none() {
                // Harbor cannot find the project: the error has no challenge with it.
                let mut res = harbor_error(
                    StatusCode::UNAUTHORIZED,
                    "UNAUTHORIZED",
                    &format!("project {} not found", p.project),
                );
                res.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, http::HeaderValue::from_static(""));
                Some(res)
            } else if !rights.may_pull(state, &p.project) {
                let message =
                    format!("unauthorized to access repository: {repository}, action: pull");
                Some(refusal(state, headers, Some(&scope), &message))
            } else {
                None
            }
        }
    };
    if refused.is_some() && carried {
        state.counters.lock().unwrap().refused += 1;
    }
    refused
}

async fn answer(state: &Arc<State>, req: Request<Incoming>) -> Response<Body> {
    let state = state.clone();
    let rest = req
        .uri()
        .path()
        .strip_prefix("/v2/")
        .unwrap_or("")
        .to_string();
    let parsed = parse(&rest);
    if let Some(refused) = authorize(&state, &req, parsed.as_ref()) {
        return refused;
    }
    let mut reset_mid_body = false;
    let mut hold = None;
    if let Some(p) = &parsed {
        count(&state, p, 1);
        if let Some(q) = req.uri().query() {
            state.counters.lock().unwrap().queries.insert(q.to_string());
        }
        if let Some(id) = req.headers().get("x-request-id") {
            let id = String::from_utf8_lossy(id.as_bytes()).into_owned();
            state.counters.lock().unwrap().request_ids.insert(id);
        }
        let mut fault = state.faults.lock().unwrap().get(&p.project).cloned();
        if let Some(Fault::TagLookups(inner)) = fault {
            let by_tag = p.kind == Kind::Manifest
                && !p.suffix.rsplit('/').next().unwrap_or("").contains(':');
            fault = by_tag.then_some(*inner);
        }
        match fault {
            Some(Fault::Policy) if p.kind == Kind::Manifest && req.method() == Method::GET => {
                return fault_response(412, &p.kind)
            }
            Some(Fault::Hold(gate)) => hold = Some(gate),
            Some(Fault::HoldHeads(gate)) if req.method() == Method::HEAD => hold = Some(gate),
            Some(Fault::Status(code)) => return fault_response(code, &p.kind),
            Some(Fault::Hang) => std::future::pending::<()>().await,
            Some(Fault::ResetMidBody) => reset_mid_body = true,
            Some(Fault::RedirectBlobs(location)) if matches!(p.kind, Kind::Blob(_)) => {
                return Response::builder()
                    .status(StatusCode::TEMPORARY_REDIRECT)
                    .header(header::LOCATION, location)
                    .header(header::CONTENT_LENGTH, 0)
                    .body(full(Bytes::new()))
                    .expect("redirect");
            }
            Some(
                Fault::RedirectBlobs(_)
                | Fault::HoldHeads(_)
                | Fault::TagLookups(_)
                | Fault::Policy,
            )
            | None => {}
        }
    }
    let spec = parsed.as_ref().and_then(|p| state.project(&p.project));
    let proxy_kind = spec
        .as_ref()
        .and_then(|s| s.registry.as_ref())
        .map(|r| r.kind.as_str());
    if let (Some(p), Some("docker-hub")) = (&parsed, proxy_kind) {
        if p.kind != Kind::Other && !p.name.contains('/') {
            let query = req
                .uri()
                .query()
                .map(|q| format!("?{q}"))
                .unwrap_or_default();
            let location = format!("/v2/{}/library/{}{}{query}", p.project, p.name, p.suffix);
            return Response::builder()
                .status(StatusCode::MOVED_PERMANENTLY)
                .header(header::LOCATION, location)
                .header(header::CONTENT_LENGTH, 0)
                .body(full(Bytes::new()))
                .expect("redirect");
        }
    }
    let method = req.method().clone();
    let repository = parsed
        .as_ref()
        .filter(|p| !p.name.is_empty())
        .map(|p| format!("{}/{}", p.project, p.name))
        .unwrap_or_default();
    let mut resp = match forward(&state, req, &repository).await {
        Ok(r) => r,
        Err(e) => {
            return harbor_error(StatusCode::BAD_GATEWAY, "UNAVAILABLE", &e.to_string());
        }
    };
    strip_hop_by_hop(resp.headers_mut());
    if let Some(gate) = hold {
        gate.pass().await;
    }
    let (Some(p), true) = (&parsed, proxy_kind.is_some()) else {
        return resp.map(box_incoming);
    };
    let mut out = match (&p.kind, &method) {
        (Kind::Tags, &Method::GET) if resp.status() == StatusCode::NOT_FOUND => {
            let name = format!("{}/{}", p.project, p.name);
            json_response(
                StatusCode::OK,
                &serde_json::json!({"name": name, "tags": []}),
            )
        }
        (Kind::Blob(digest), &Method::HEAD) if resp.status().is_success() => {
            let key = (p.project.clone(), digest.clone());
            if state.fetched_blobs.lock().unwrap().contains(&key) {
                resp.map(box_incoming)
            } else {
                harbor_error(
                    StatusCode::NOT_FOUND,
                    "BLOB_UNKNOWN",
                    "blob unknown to registry",
                )
            }
        }
        (Kind::Blob(digest), &Method::GET) if resp.status().is_success() => {
            if reset_mid_body {
                let len: u64 = resp
                    .headers()
                    .get(header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok()?.parse().ok())
                    .unwrap_or(0);
                resp.map(|b| {
                    CutOff {
                        inner: b,
                        remaining: len / 2,
                        pause: None,
                    }
                    .boxed()
                })
            } else {
                let key = (p.project.clone(), digest.clone());
                state.fetched_blobs.lock().unwrap().insert(key);
                resp.map(box_incoming)
            }
        }
        (Kind::Manifest, &Method::GET) if resp.status() == StatusCode::OK => {
            let tag = p.suffix.rsplit('/').next().unwrap_or("");
            if !tag.contains(':') && fetched_upstream(&state, p, tag) {
                // `proxyManifestGet` sets the headers from the request's digest: empty for a tag.
                let h = resp.headers_mut();
                h.insert("docker-content-digest", http::HeaderValue::from_static(""));
                h.insert(header::ETAG, http::HeaderValue::from_static(""));
            }
            resp.map(box_incoming)
        }
        _ => resp.map(box_incoming),
    };
    strip_hop_by_hop(out.headers_mut());
    out
}

/// Whether Harbor fetched this GET of `tag` from the upstream (rather than its own store).
fn fetched_upstream(state: &State, p: &V2Path, tag: &str) -> bool {
    let mut s = state.switches();
    match s.digests {
        EmptyDigests::Always => true,
        EmptyDigests::Never => false,
        EmptyDigests::FirstFetch => {
            let key = (p.project.clone(), p.name.clone(), tag.to_string());
            s.fetched_tags.insert(key)
        }
    }
}

fn box_incoming(b: Incoming) -> Body {
    b.map_err(|e| Box::new(e) as BoxError).boxed()
}

/// Sends the request on to the registry with the stand-in's own token for `repository` (empty for
/// `/v2/` itself).
async fn forward(
    state: &State,
    req: Request<Incoming>,
    repository: &str,
) -> anyhow::Result<Response<Incoming>> {
    let registry = state
        .registry
        .ok_or_else(|| anyhow::anyhow!("no registry behind this stand-in"))?;
    let (mut parts, body) = req.into_parts();
    let path_and_query = parts
        .uri
        .path_and_query()
        .map(|pq| pq.as_str())
        .unwrap_or("/");
    parts.uri = format!("http://{registry}{path_and_query}").parse()?;
    parts.version = http::Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers);
    parts
        .headers
        .insert(header::AUTHORIZATION, state.auth.internal(repository));
    let resp = state
        .client
        .request(Request::from_parts(parts, body))
        .await?;
    Ok(resp)
}

/// A body that passes `remaining` bytes, pauses briefly (so they reach the client), then fails,
/// which makes hyper abort the connection: the `ResetMidBody` fault.
struct CutOff {
    inner: Incoming,
    remaining: u64,
    pause: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl HttpBody for CutOff {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.remaining == 0 {
            let pause = self
                .pause
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(Duration::from_millis(100))));
            std::task::ready!(pause.as_mut().poll(cx));
            return Poll::Ready(Some(Err(
                "connection reset mid-body (injected fault)".into()
            )));
        }
        match std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx)) {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(mut data) => {
                    if data.len() as u64 > self.remaining {
                        data.truncate(self.remaining as usize);
                    }
                    self.remaining -= data.len() as u64;
                    Poll::Ready(Some(Ok(Frame::data(data))))
                }
                Err(frame) => Poll::Ready(Some(Ok(frame))),
            },
            Some(Err(e)) => Poll::Ready(Some(Err(Box::new(e)))),
            None => Poll::Ready(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_v2_paths() {
        let p = parse("dockerhub/library/nginx/manifests/latest").unwrap();
        assert_eq!(
            (p.project.as_str(), p.name.as_str()),
            ("dockerhub", "library/nginx")
        );
        assert_eq!(
            (p.suffix.as_str(), p.kind),
            ("/manifests/latest", Kind::Manifest)
        );
        let p = parse("dockerhub/nginx/blobs/sha256:ab").unwrap();
        assert_eq!(p.kind, Kind::Blob("sha256:ab".into()));
        assert_eq!(p.name, "nginx");
        let p = parse("q/a/b/tags/list").unwrap();
        assert_eq!((p.name.as_str(), p.kind), ("a/b", Kind::Tags));
        assert_eq!(parse("q/a/blobs/uploads/").unwrap().kind, Kind::Other);
        assert!(parse("").is_none());
    }
}
