//! `/v2/` forwarding to the real registry with Harbor's proxy-cache quirks on top: Harbor's own
//! authentication first (`auth.rs`: tokens checked by the stand-in, challenges as Harbor words
//! them), Harbor's database down (500), the per-project faults of [`Fault`] in Harbor's words
//! (`src/lib/http/error.go`), docker-hub single-segment 301, then, in a proxy project, Harbor's
//! `repoproxy` middlewares by the project's [`Upstream`]:
//!
//! - manifests (`handleManifest`, `UseLocalManifest`): held by digest → the local store; else the
//!   upstream (`Up`: the registry, an empty `Docker-Content-Digest` on a tag fetched upstream
//!   ([`EmptyDigests`]), Harbor's 404 "repo R, tag T not found"), the local store (`Refused`, and
//!   docker-hub's unknown repositories), or no answer (`Hanging`);
//! - blobs (`handleBlob`): cached → the registry's answer; else streamed from the upstream as
//!   Harbor does (`blobs.rs`), `BLOB_UNKNOWN`, or no answer; a HEAD is 404 until cached (#22609);
//! - tag lists (`repoproxy/tag.go`): the local tags, plus the upstream's when it answers, paged
//!   as Harbor pages (`tags.rs`).
//!
//! What Harbor holds locally is `store.rs`'s. Request headers (repeated `Accept` lines included)
//! and response status/headers/body otherwise pass through unchanged and streamed; only hop-by-hop
//! headers are dropped, and `Authorization` is replaced by the stand-in's internal token (Harbor's
//! registry trusts Harbor's core, not the client).

use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::auth::{refusal, rights};
use crate::blobs::Break;
use crate::standin::{full, harbor_error, json_response, Body, BoxError, State};
use crate::{EmptyDigests, Fault, Upstream};

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
    if p.kind == Kind::Tags {
        bump(c.tag_list_requests.entry(p.project.clone()).or_default());
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
    let mut faults = Faults::default();
    if let Some(p) = &parsed {
        count(&state, p, 1);
        if let Some(q) = req.uri().query() {
            state.counters.lock().unwrap().queries.insert(q.to_string());
        }
        if let Some(id) = req.headers().get("x-request-id") {
            let id = String::from_utf8_lossy(id.as_bytes()).into_owned();
            state.counters.lock().unwrap().request_ids.insert(id);
        }
        if state.switches().database_down {
            // Harbor's first step past authentication reads the project from its database.
            return fault_response(500, &p.kind);
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
            Some(Fault::Hold(gate)) => faults.hold = Some(gate),
            Some(Fault::HoldHeads(gate)) if req.method() == Method::HEAD => {
                faults.hold = Some(gate)
            }
            Some(Fault::Status(code)) => return fault_response(code, &p.kind),
            Some(Fault::Hang) => std::future::pending::<()>().await,
            Some(Fault::ResetMidBody) => faults.reset_mid_body = true,
            Some(Fault::BreakUncached) => faults.break_uncached = true,
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
        .map(|r| r.kind.clone());
    if let (Some(p), Some("docker-hub")) = (&parsed, proxy_kind.as_deref()) {
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
    let mut out = match (parsed, proxy_kind) {
        (Some(p), Some(kind)) if p.kind != Kind::Other => {
            let cx = Cx {
                upstream: state.upstream(&p.project),
                docker_hub_401s: kind == "docker-hub" && state.switches().docker_hub_401s,
                state: state.clone(),
                p,
                faults,
            };
            let out = cx.answer(req).await;
            cx.faults.pass().await;
            out
        }
        (parsed, _) => {
            let repository = parsed
                .as_ref()
                .filter(|p| !p.name.is_empty())
                .map(|p| format!("{}/{}", p.project, p.name))
                .unwrap_or_default();
            let out = match forward(&state, req, &repository).await {
                Ok(r) => r.map(box_incoming),
                Err(e) => return unavailable(&e),
            };
            faults.pass().await;
            out
        }
    };
    strip_hop_by_hop(out.headers_mut());
    out
}

/// The faults of a request that change how it is answered rather than replacing the answer.
#[derive(Default)]
struct Faults {
    hold: Option<crate::Gate>,
    reset_mid_body: bool,
    break_uncached: bool,
}

impl Faults {
    /// Waits for a held answer's gate (at once when none, or when already released).
    async fn pass(&self) {
        if let Some(gate) = &self.hold {
            gate.pass().await;
        }
    }
}

fn unavailable(e: &anyhow::Error) -> Response<Body> {
    harbor_error(StatusCode::BAD_GATEWAY, "UNAVAILABLE", &e.to_string())
}

/// Never answers: Harbor waiting on an upstream that hangs.
async fn hang() -> Response<Body> {
    std::future::pending().await
}

/// Harbor's 404 for what its local store lacks (`src/lib/http/error.go`: code `NOT_FOUND`).
fn not_found(message: &str) -> Response<Body> {
    harbor_error(StatusCode::NOT_FOUND, "NOT_FOUND", message)
}

/// One request to a proxy project (manifest, blob or tag list), after authentication and faults:
/// what Harbor answers with this project's upstream and local store.
struct Cx {
    state: Arc<State>,
    p: V2Path,
    upstream: Upstream,
    /// The upstream is Docker Hub, modelled answering 401 for an unknown repository.
    docker_hub_401s: bool,
    faults: Faults,
}

impl Cx {
    /// `<project>/<repository>`
    fn repository(&self) -> String {
        format!("{}/{}", self.p.project, self.p.name)
    }

    /// The reference of a manifest path (tag or digest).
    fn reference(&self) -> String {
        self.p.suffix.rsplit('/').next().unwrap_or("").to_string()
    }

    /// Asks the registry `method path` with the client's `headers` (and the stand-in's token), then
    /// waits for a held answer's gate.
    async fn ask(
        &self,
        method: Method,
        path: &str,
        headers: &HeaderMap,
    ) -> anyhow::Result<Response<Incoming>> {
        let res = ask(&self.state, method, path, headers, &self.repository()).await;
        self.faults.pass().await;
        res
    }

    async fn answer(&self, req: Request<Incoming>) -> Response<Body> {
        let (parts, _body) = req.into_parts();
        let (method, headers) = (parts.method, parts.headers);
        let path = parts
            .uri
            .path_and_query()
            .map(|pq| pq.as_str().to_string())
            .unwrap_or_default();
        let result = match (&self.p.kind, &method) {
            (Kind::Manifest, &Method::GET | &Method::HEAD) => {
                self.manifest(&method, &path, &headers).await
            }
            (Kind::Blob(digest), &Method::GET) => self.blob_get(digest, &path, &headers).await,
            (Kind::Blob(digest), &Method::HEAD) => self.blob_head(digest, &path, &headers).await,
            (Kind::Tags, &Method::GET) => self.tags(parts.uri.query(), &headers).await,
            _ => self
                .ask(method.clone(), &path, &headers)
                .await
                .map(|r| r.map(box_incoming)),
        };
        result.unwrap_or_else(|e| unavailable(&e))
    }

    /// A manifest GET or HEAD (`repoproxy/proxy.go`, `handleManifest`; `controller.go`,
    /// `UseLocalManifest`).
    async fn manifest(
        &self,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
    ) -> anyhow::Result<Response<Body>> {
        let reference = self.reference();
        let by_digest = reference.contains(':');
        let held = by_digest
            && self
                .state
                .store()
                .holds_manifest(&self.p.project, &self.p.name, &reference);
        match self.upstream {
            // Held by digest: served locally without asking the upstream.
            _ if held => return self.local_manifest(method, headers, &reference).await,
            Upstream::Refused => return self.local_manifest(method, headers, &reference).await,
            // A tag is always checked upstream first (a HEAD), and so is what is not held.
            Upstream::Hanging => return Ok(hang().await),
            Upstream::Up => {}
        }
        let mut res = self.ask(method.clone(), path, headers).await?;
        if res.status() == StatusCode::NOT_FOUND && !self.upstream_has(path).await? {
            if self.docker_hub_401s && !self.registry_knows_repository().await? {
                // Docker Hub answers 401 for a repository it does not know: Harbor falls back to
                // its local store.
                return self.local_manifest(method, headers, &reference).await;
            }
            let tag = if by_digest { "" } else { reference.as_str() };
            let repo = self.repository();
            return Ok(not_found(&format!("repo {repo}, tag {tag} not found")));
        }
        if res.status() == StatusCode::OK && method == Method::GET {
            let value = |name| {
                res.headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string()
            };
            let (digest, media_type) = (value("docker-content-digest"), value("content-type"));
            let empty = !by_digest && self.fetched_upstream(&reference);
            if !digest.is_empty() {
                self.state.store().record_manifest(
                    &self.p.project,
                    &self.p.name,
                    &reference,
                    &digest,
                    &media_type,
                );
            }
            if empty {
                // `proxyManifestGet` sets the headers from the request's digest: empty for a tag.
                let h = res.headers_mut();
                h.insert("docker-content-digest", HeaderValue::from_static(""));
                h.insert(header::ETAG, HeaderValue::from_static(""));
            }
        }
        Ok(res.map(box_incoming))
    }

    /// Whether Harbor fetched this GET of `tag` from the upstream (rather than its own store).
    fn fetched_upstream(&self, tag: &str) -> bool {
        let mode = self.state.switches().digests;
        match mode {
            EmptyDigests::Always => true,
            EmptyDigests::Never => false,
            EmptyDigests::FirstFetch => self
                .state
                .store()
                .tag(&self.p.project, &self.p.name, tag)
                .is_none(),
        }
    }

    /// Whether the upstream has the manifest of `path`, asked as Harbor asks it (`ManifestExist`: a
    /// HEAD accepting every manifest type). A 404 to the client's own `Accept` lines (an OCI index
    /// it does not accept) is no "not found".
    async fn upstream_has(&self, path: &str) -> anyhow::Result<bool> {
        let mut all = HeaderMap::new();
        for t in crate::images::ALL_MANIFEST_TYPES {
            all.append(header::ACCEPT, HeaderValue::from_static(t));
        }
        let res = ask(&self.state, Method::HEAD, path, &all, &self.repository()).await?;
        Ok(res.status().is_success())
    }

    /// Whether the registry (the upstream) has the repository at all: its tag list answers.
    async fn registry_knows_repository(&self) -> anyhow::Result<bool> {
        let path = format!("/v2/{}/tags/list", self.repository());
        let res = ask(
            &self.state,
            Method::GET,
            &path,
            &HeaderMap::new(),
            &self.repository(),
        )
        .await?;
        Ok(res.status().is_success())
    }

    /// A manifest from Harbor's local store (the registry behind `getManifest`): by tag as it was
    /// fetched (an index trimmed to the children held), by digest when held, else Harbor's 404s
    /// (`artifact/controller.go`, `getByTag`; `artifact/dao/dao.go`; `repository/manager.go`).
    async fn local_manifest(
        &self,
        method: &Method,
        headers: &HeaderMap,
        reference: &str,
    ) -> anyhow::Result<Response<Body>> {
        let (project, name, repo) = (&self.p.project, &self.p.name, self.repository());
        let manifest_path = |digest: &str| format!("/v2/{repo}/manifests/{digest}");
        if reference.contains(':') {
            let (kept, held) = {
                let store = self.state.store();
                let kept = store.trimmed(project, name, reference);
                (kept, store.holds_manifest(project, name, reference))
            };
            if let Some(kept) = kept {
                self.faults.pass().await;
                if !accepts(headers, &kept.media_type) {
                    return Ok(oci_index_refused());
                }
                return Ok(serve_kept(method, &kept));
            }
            if !held {
                // Harbor looks the artifact up by repository name and digest at once.
                return Ok(not_found(&format!("artifact {repo}@{reference} not found")));
            }
            let res = self
                .ask(method.clone(), &manifest_path(reference), headers)
                .await?;
            return Ok(res.map(box_incoming));
        }
        let (resolved, known) = {
            let store = self.state.store();
            (
                store.tag(project, name, reference),
                store.holds_repository(project, name),
            )
        };
        let Some(resolved) = resolved else {
            return Ok(not_found(&if known {
                format!("artifact {repo}:{reference} not found")
            } else {
                format!("repository {repo} not found")
            }));
        };
        let path = manifest_path(&resolved.digest);
        if !crate::store::is_index(&resolved.media_type) {
            let res = self.ask(method.clone(), &path, headers).await?;
            return Ok(res.map(box_incoming));
        }
        if !accepts(headers, &resolved.media_type) {
            // Harbor asks its registry by digest with the client's Accept lines: an OCI index the
            // client does not accept is the registry's 404 (a Docker list is served as it is).
            let res = self.ask(method.clone(), &path, headers).await?;
            return Ok(res.map(box_incoming));
        }
        // An index: Harbor holds it trimmed to the children that reached its store.
        let mut accept = HeaderMap::new();
        let mt = HeaderValue::from_str(&resolved.media_type)?;
        accept.insert(header::ACCEPT, mt);
        let res = self.ask(Method::GET, &path, &accept).await?;
        if res.status() != StatusCode::OK {
            return Ok(res.map(box_incoming));
        }
        let original = res.into_body().collect().await?.to_bytes();
        let trimmed = {
            let store = self.state.store();
            crate::store::trim(&original, |d| store.holds_manifest(project, name, d))
        };
        let kept = match trimmed {
            Some(kept) => {
                self.state.store().keep_trimmed(project, name, kept.clone());
                kept
            }
            None => crate::store::Kept {
                media_type: resolved.media_type.clone(),
                digest: resolved.digest.clone(),
                body: original,
            },
        };
        Ok(serve_kept(method, &kept))
    }

    /// A blob GET (`repoproxy/proxy.go`, `handleBlob`): a cached blob is the registry's answer;
    /// one not cached comes from the upstream as Harbor streams it.
    async fn blob_get(
        &self,
        digest: &str,
        path: &str,
        headers: &HeaderMap,
    ) -> anyhow::Result<Response<Body>> {
        let held = self.state.store().holds_blob(&self.p.project, digest);
        if held {
            let res = self.ask(Method::GET, path, headers).await?;
            if self.faults.reset_mid_body && res.status().is_success() {
                return Ok(crate::blobs::reset_mid_body(res));
            }
            return Ok(res.map(box_incoming));
        }
        match self.upstream {
            Upstream::Refused => return Ok(blob_unknown(digest)),
            Upstream::Hanging => return Ok(hang().await),
            Upstream::Up => {}
        }
        // Harbor reads the whole blob from its upstream: the client's range is not passed on.
        let mut whole = headers.clone();
        for h in [header::RANGE, header::IF_RANGE] {
            whole.remove(h);
        }
        let res = self.ask(Method::GET, path, &whole).await?;
        if !res.status().is_success() {
            return Ok(res.map(box_incoming));
        }
        let mode = self.state.switches().uncached_blobs;
        let brk = if self.faults.reset_mid_body {
            Break::Reset
        } else if self.faults.break_uncached {
            Break::Upstream
        } else {
            // Harbor copies the blob to its store in the background: held from now on.
            self.state.store().record_blob(&self.p.project, digest);
            Break::None
        };
        Ok(crate::blobs::uncached(res, digest, mode, brk).await)
    }

    /// A blob HEAD: Harbor answers from its own store, 404 until the blob is cached (#22609).
    async fn blob_head(
        &self,
        digest: &str,
        path: &str,
        headers: &HeaderMap,
    ) -> anyhow::Result<Response<Body>> {
        let res = self.ask(Method::HEAD, path, headers).await?;
        let held = self.state.store().holds_blob(&self.p.project, digest);
        if res.status().is_success() && !held {
            return Ok(harbor_error(
                StatusCode::NOT_FOUND,
                "BLOB_UNKNOWN",
                "blob unknown to registry",
            ));
        }
        Ok(res.map(box_incoming))
    }

    /// A tag list (`repoproxy/tag.go`): the local tags, and the upstream's when it answers.
    async fn tags(
        &self,
        query: Option<&str>,
        headers: &HeaderMap,
    ) -> anyhow::Result<Response<Body>> {
        let repo = self.repository();
        let list_path = format!("/v2/{repo}/tags/list");
        let Some((n, last)) = crate::tags::parse_n_last(query) else {
            return Ok(crate::tags::bad_n());
        };
        if n == Some(0) {
            return Ok(crate::tags::page(&repo, Vec::new(), n, &last, &list_path));
        }
        let mut tags = self.state.store().tags_of(&self.p.project, &self.p.name);
        match self.upstream {
            Upstream::Refused => {}
            Upstream::Hanging => return Ok(hang().await),
            Upstream::Up => {
                let mut plain = headers.clone();
                plain.remove(header::ACCEPT);
                let res = self.ask(Method::GET, &list_path, &plain).await?;
                if res.status() == StatusCode::OK {
                    let body = res.into_body().collect().await?.to_bytes();
                    let listed: serde_json::Value = serde_json::from_slice(&body)?;
                    let listed = listed["tags"].as_array().cloned().unwrap_or_default();
                    tags.extend(listed.iter().filter_map(|t| t.as_str().map(str::to_string)));
                }
                let key = (self.p.project.clone(), self.p.name.clone());
                if let Some(extra) = self.state.switches().upstream_tags.get(&key) {
                    tags.extend(extra.iter().cloned());
                }
            }
        }
        self.faults.pass().await;
        Ok(crate::tags::page(&repo, tags, n, &last, &list_path))
    }
}

/// Whether distribution serves a manifest of `media_type` by digest to a client with these `Accept`
/// lines: an OCI manifest or index only when it is named, anything else always.
fn accepts(headers: &HeaderMap, media_type: &str) -> bool {
    let oci = [crate::images::OCI_INDEX, crate::images::OCI_MANIFEST];
    if !oci.contains(&media_type) {
        return true;
    }
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.split(';').next().unwrap_or("").trim() == media_type)
}

/// distribution's answer to a client that does not accept the OCI index it holds.
fn oci_index_refused() -> Response<Body> {
    harbor_error(
        StatusCode::NOT_FOUND,
        "MANIFEST_UNKNOWN",
        "OCI index found, but accept header does not support OCI indexes",
    )
}

/// The registry's 404 for a blob it does not hold (Harbor's local store passes it on).
fn blob_unknown(digest: &str) -> Response<Body> {
    json_response(
        StatusCode::NOT_FOUND,
        &serde_json::json!({"errors": [{
            "code": "BLOB_UNKNOWN", "message": "blob unknown to registry", "detail": digest
        }]}),
    )
}

/// A manifest the stand-in holds in memory, as the registry would serve it.
fn serve_kept(method: &Method, kept: &crate::store::Kept) -> Response<Body> {
    let body = if method == Method::HEAD {
        Bytes::new()
    } else {
        kept.body.clone()
    };
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, kept.media_type.as_str())
        .header(header::CONTENT_LENGTH, kept.body.len())
        .header("docker-content-digest", kept.digest.as_str())
        .header(header::ETAG, format!("\"{}\"", kept.digest))
        .header("docker-distribution-api-version", "registry/2.0")
        .body(full(body))
        .expect("response")
}

fn box_incoming(b: Incoming) -> Body {
    b.map_err(|e| Box::new(e) as BoxError).boxed()
}

/// A bodiless request of the stand-in's own to the registry: `method path` with `headers` (hop-by-hop
/// ones dropped) and the stand-in's token for `repository`.
async fn ask(
    state: &State,
    method: Method,
    path: &str,
    headers: &HeaderMap,
    repository: &str,
) -> anyhow::Result<Response<Incoming>> {
    let registry = state
        .registry
        .ok_or_else(|| anyhow::anyhow!("no registry behind this stand-in"))?;
    let mut req = Request::builder()
        .method(method)
        .uri(format!("http://{registry}{path}"))
        .body(http_body_util::Empty::new())?;
    let mut headers = headers.clone();
    strip_hop_by_hop(&mut headers);
    headers.remove(header::CONTENT_LENGTH);
    headers.insert(header::AUTHORIZATION, state.auth.internal(repository));
    *req.headers_mut() = headers;
    Ok(state.plain.request(req).await?)
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
