//! The pull endpoints: manifests, blobs, tag lists and referrers under `/v2/<PROXY_PROJECT>/<name>/`.
//! Each one: use the name's mapping when there is one (one upstream request), else race the
//! candidate projects (coalesced per core), learn the winner, and answer with exactly what Harbor's
//! project answered: status, headers (less hop-by-hop ones) and body, streamed.
//!
//! A request on a mapped project that answers 404 falls back to one fan-out (the image may have
//! moved); the mapping moves if another project has it and stays otherwise. Requests on a project
//! whose circuit is open fail fast with 503.

use std::rc::Rc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{
    HeaderValue, ACCEPT, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, LINK, RANGE, RETRY_AFTER,
};
use http::request::Parts;
use http::{HeaderMap, Method, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use sha2::{Digest, Sha256};

use crate::body::Body;
use crate::core::Core;
use crate::error::Error;
use crate::flight::Turn;
use crate::registry::fanout::{self, Outcome, Verdict};
use crate::registry::forward;
use crate::registry::handle::error;
use crate::registry::resolve::{self, classify_failure, Probe, Shared};
use crate::registry::route::Reference;
use crate::snapshot::{Project, Snapshot};
use crate::upstream::breaker::Admission;
use crate::upstream::pool::UpstreamBody;

/// Largest manifest kept by digest (the distribution registry refuses larger ones).
const MAX_CACHED_MANIFEST: u64 = 4 << 20;

/// Which endpoint a request is for, with what it needs.
#[derive(Debug, Clone, Copy)]
pub enum Pull<'a> {
    Manifest(Reference<'a>),
    Blob(&'a str),
    Tags,
    Referrers(&'a str),
}

impl Pull<'_> {
    fn rest(&self, query: Option<&str>) -> String {
        match self {
            Pull::Manifest(r) => format!("manifests/{}", r.as_str()),
            Pull::Blob(d) => format!("blobs/{d}"),
            Pull::Tags => match tags_query(query) {
                q if q.is_empty() => "tags/list".to_string(),
                q => format!("tags/list?{q}"),
            },
            Pull::Referrers(d) => match query.and_then(artifact_type) {
                Some(t) => format!("referrers/{d}?artifactType={t}"),
                None => format!("referrers/{d}"),
            },
        }
    }

    fn not_found(&self) -> Error {
        match self {
            Pull::Blob(_) => Error::BlobUnknown,
            Pull::Tags => Error::NameUnknown {
                detail: "no proxy-cache project has tags for this repository",
            },
            _ => Error::ManifestUnknown,
        }
    }

    fn probe(&self) -> Probe {
        match self {
            Pull::Manifest(r) => Probe::Manifest(r.as_str().to_string()),
            Pull::Referrers(d) => Probe::Manifest((*d).to_string()),
            Pull::Blob(d) => Probe::Blob((*d).to_string()),
            Pull::Tags => Probe::Tags,
        }
    }
}

/// Serves one pull request.
pub async fn serve(core: &Rc<Core>, req: &Parts, name: &str, pull: Pull<'_>) -> Response<Body> {
    let Some(snapshot) = core.view().filter(|s| !s.projects.is_empty()) else {
        return error(&Error::Unavailable {
            reason: "no proxy-cache project is known yet: Harbor discovery has not succeeded",
        });
    };
    let now = Instant::now();
    let head = req.method == Method::HEAD;
    let query = req.uri.query();
    if let Some(res) = from_cache(core, req, name, &pull, now) {
        return res;
    }
    let up_headers = forward::headers_up(&req.headers);
    let rest = pull.rest(query);
    // One key for coalescing and for remembered misses: name, endpoint with its query, Accept set
    // (a manifest that is "unknown" without an OCI Accept may well exist with one).
    let key = resolve::flight_key(kind(&pull), name, &rest, &up_headers);
    if core.cache().borrow().is_miss(&key, now) {
        return error(&pull.not_found());
    }
    let ctx = Ctx {
        core,
        name,
        pull,
        head,
        rest,
        headers: &up_headers,
    };

    if let Some((project, stale)) = resolve::cached(core, &snapshot, name, now) {
        if stale {
            resolve::refresh(
                core,
                snapshot.clone(),
                name,
                pull.probe(),
                up_headers.clone(),
            );
        }
        match ctx.mapped(&project).await {
            Mapped::Answer(res) => return *res,
            // The mapped project does not have this reference. The image may have moved: ask every
            // project once. The mapping is replaced if another project has it, and kept otherwise
            // (a missing tag of a mapped image must not cost every later pull a fan-out).
            Mapped::Gone => {
                tracing::debug!(name, project = %project.name, "mapped project answered 404; asking every project")
            }
        }
    }
    ctx.fan_out(&snapshot, &key).await
}

/// The by-digest manifest cache and the tag-list cache.
fn from_cache(
    core: &Core,
    req: &Parts,
    name: &str,
    pull: &Pull,
    now: Instant,
) -> Option<Response<Body>> {
    let head = req.method == Method::HEAD;
    match pull {
        Pull::Manifest(Reference::Digest(d)) => {
            let cache = core.cache().borrow();
            let m = cache.manifest(&format!("{name}@{d}"), now)?;
            let ct = m.headers.get(CONTENT_TYPE)?.to_str().ok()?;
            if !accepts(&req.headers, ct) {
                return None;
            }
            if not_modified(&req.headers, d) {
                // What the registry answers a matching `If-None-Match`: 304, headers, no body.
                let mut res = Response::new(Body::Empty);
                *res.status_mut() = StatusCode::NOT_MODIFIED;
                *res.headers_mut() = m.headers.clone();
                res.headers_mut().remove(CONTENT_LENGTH);
                return Some(res);
            }
            Some(whole(
                StatusCode::OK,
                m.headers.clone(),
                m.body.clone(),
                head,
            ))
        }
        Pull::Tags => {
            let cache = core.cache().borrow();
            let t = cache.tags(&tags_key(name, req.uri.query()), now)?;
            Some(whole(
                StatusCode::OK,
                t.headers.clone(),
                t.body.clone(),
                head,
            ))
        }
        _ => None,
    }
}

/// Whether an `If-None-Match` of the client names this digest (the registry's ETag is `"<digest>"`).
fn not_modified(headers: &HeaderMap, digest: &str) -> bool {
    headers
        .get_all(http::header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().trim_start_matches("W/").trim_matches('"'))
        .any(|t| t == digest || t == "*")
}

/// What is kept in memory: Harbor's headers without the per-response ones, every value and the
/// body copied out of hyper's read buffer (a slice would pin the whole buffer, up to ~400 KiB, for
/// as long as the entry lives, and the cache's byte budget would not see it).
fn keepable(headers: &HeaderMap, body: &Bytes) -> (HeaderMap, Bytes) {
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
    (kept, Bytes::copy_from_slice(body))
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

fn whole(status: StatusCode, mut headers: HeaderMap, body: Bytes, head: bool) -> Response<Body> {
    headers.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
    let mut res = Response::new(if head { Body::Empty } else { Body::full(body) });
    *res.status_mut() = status;
    *res.headers_mut() = headers;
    res
}

/// A mapped request's result: the answer, or `Gone` when the mapped project answered 404.
enum Mapped {
    Answer(Box<Response<Body>>),
    Gone,
}

/// One request's context.
struct Ctx<'a> {
    core: &'a Rc<Core>,
    name: &'a str,
    pull: Pull<'a>,
    head: bool,
    /// The path after `/v2/<project>/<name>/`.
    rest: String,
    headers: &'a HeaderMap,
}

impl Ctx<'_> {
    async fn mapped(&self, project: &Project) -> Mapped {
        let admission = self
            .core
            .breakers()
            .borrow_mut()
            .get(&project.name)
            .admit(Instant::now());
        if admission == Admission::Rejected {
            return Mapped::Answer(Box::new(error(&Error::Unavailable {
                reason: "the project that has this image is failing; its circuit is open",
            })));
        }
        let mut guard = fanout::ProbeGuard::new(self.core, &project.name, admission);
        let res = match self.send(project).await {
            Ok(res) => res,
            Err(e) => {
                guard.record(true);
                tracing::warn!(project = %project.name, error = %e, "upstream request failed");
                return Mapped::Answer(Box::new(error(&Error::BadGateway {
                    reason: "Harbor failed or timed out",
                })));
            }
        };
        let status = res.status();
        guard.record(status.is_server_error());
        if status == StatusCode::NOT_FOUND {
            self.core.upstream().drain(res.into_body()).await;
            return Mapped::Gone;
        }
        if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
            return Mapped::Answer(Box::new(error(&Error::Denied {
                reason:
                    "the router's robot account may not pull from the project that has this image",
            })));
        }
        Mapped::Answer(Box::new(self.answer(project, res).await))
    }

    async fn fan_out(&self, snapshot: &Rc<Snapshot>, key: &str) -> Response<Body> {
        loop {
            match self.core.flights().join(key) {
                Turn::Follow(rx) => match rx.await {
                    Ok(Shared::Found(p)) => match snapshot.project(&p) {
                        Some(project) => {
                            return match self.mapped(project).await {
                                Mapped::Answer(res) => *res,
                                Mapped::Gone => error(&self.pull.not_found()),
                            }
                        }
                        None => return error(&self.pull.not_found()),
                    },
                    Ok(Shared::NotFound) => return error(&self.pull.not_found()),
                    Ok(Shared::Failed(e)) => return error(&e),
                    Err(_) => continue, // the leading request was cancelled: lead ourselves
                },
                Turn::Lead(leader) => {
                    let outcome =
                        fanout::race(self.core, &snapshot.projects, |p| self.attempt(p)).await;
                    return match outcome {
                        Outcome::Found(project, res) => {
                            resolve::learn(self.core, self.name, &project.name);
                            leader.finish(Shared::Found(project.name.clone()));
                            if let Pull::Referrers(_) = self.pull {
                                // The race found the subject manifest; now ask for its referrers.
                                drop(res);
                                return match self.mapped(&project).await {
                                    Mapped::Answer(res) => *res,
                                    Mapped::Gone => error(&self.pull.not_found()),
                                };
                            }
                            self.answer(&project, res).await
                        }
                        Outcome::NotFound => {
                            self.core
                                .cache()
                                .borrow_mut()
                                .remember_miss(key, Instant::now());
                            leader.finish(Shared::NotFound);
                            error(&self.pull.not_found())
                        }
                        Outcome::Failed(e) => {
                            leader.finish(Shared::Failed(e.clone()));
                            error(&e)
                        }
                    };
                }
            }
        }
    }

    /// One fan-out attempt: the client's request, on one project.
    async fn attempt(&self, project: Project) -> Verdict<Response<UpstreamBody>> {
        let sent = match self.pull {
            // Harbor answers a referrers request with 200 and an empty index for any subject, which
            // proves nothing: race for the subject manifest itself.
            Pull::Referrers(digest) => {
                let path =
                    forward::project_path(&project, self.name, &format!("manifests/{digest}"));
                forward::send(self.core, &project, Method::HEAD, path, self.headers).await
            }
            _ => self.send(&project).await,
        };
        let res = match sent {
            Ok(r) => r,
            Err(e) => return Verdict::Failed(e.to_string()),
        };
        let status = res.status();
        let blob = matches!(self.pull, Pull::Blob(_));
        // An empty blob answers the one-byte range of a HEAD with 416: it is there.
        let empty_blob = self.head && blob && status == StatusCode::RANGE_NOT_SATISFIABLE;
        // Only a blob may be redirected elsewhere (object storage); a manifest or a list never is.
        let redirected = blob && status.is_redirection();
        if status.is_success() || redirected || empty_blob {
            if let Pull::Tags = self.pull {
                let (parts, body) = res.into_parts();
                return match resolve::read_tag_list(body).await {
                    Ok((bytes, true)) => {
                        Verdict::Win(Response::from_parts(parts, UpstreamBody::whole(bytes)))
                    }
                    Ok((_, false)) => Verdict::NotHere,
                    Err(e) => Verdict::Failed(e),
                };
            }
            return Verdict::Win(res);
        }
        let retry_after = res.headers().get(RETRY_AFTER).cloned();
        classify_failure(self.core.upstream(), status, retry_after, res.into_body()).await
    }

    /// Sends this request to `project`. A blob HEAD goes up as a one-byte ranged GET: Harbor answers
    /// HEAD with 404 for blobs it has not cached yet.
    async fn send(
        &self,
        project: &Project,
    ) -> Result<Response<UpstreamBody>, crate::upstream::UpstreamError> {
        let path = forward::project_path(project, self.name, &self.rest);
        let method = match (&self.pull, self.head) {
            (Pull::Blob(_), true) => {
                let mut h = self.headers.clone();
                h.insert(RANGE, HeaderValue::from_static("bytes=0-0"));
                return forward::send(self.core, project, Method::GET, path, &h).await;
            }
            // Harbor routes only GET for tag lists; a HEAD is answered from the GET's headers.
            (Pull::Tags, true) => Method::GET,
            (_, true) => Method::HEAD,
            _ => Method::GET,
        };
        forward::send(self.core, project, method, path, self.headers).await
    }

    /// Harbor's answer, for the client.
    async fn answer(&self, project: &Project, res: Response<UpstreamBody>) -> Response<Body> {
        let (parts, body) = res.into_parts();
        let mut headers = forward::headers_down(&parts.headers);
        if let Pull::Referrers(_) = self.pull {
            rewrite_project_links(&mut headers, project, self.name, self.core.proxy_project());
        }
        match self.pull {
            Pull::Blob(_) if self.head => return blob_head(parts.status, headers, body).await,
            Pull::Tags if parts.status.is_success() => {
                return self.tags_answer(project, parts.status, headers, body).await
            }
            Pull::Manifest(Reference::Digest(d))
                if !self.head && parts.status == StatusCode::OK =>
            {
                if let Some(res) = self
                    .keep_manifest(d, &headers, body_len(&parts.headers), body)
                    .await
                {
                    return res;
                }
                return error(&Error::BadGateway {
                    reason: "Harbor's manifest did not match its digest",
                });
            }
            _ => {}
        }
        if self.head {
            // hyper sends no body for HEAD but keeps the Content-Length set here.
            drop(body);
            let mut res = Response::new(Body::Empty);
            *res.status_mut() = parts.status;
            *res.headers_mut() = headers;
            return res;
        }
        if let Some(len) = parts.headers.get(CONTENT_LENGTH) {
            headers.insert(CONTENT_LENGTH, len.clone());
        }
        let mut res = Response::new(Body::Upstream(body));
        *res.status_mut() = parts.status;
        *res.headers_mut() = headers;
        res
    }

    /// Reads a by-digest manifest whole, checks it against its digest, keeps it, and answers it.
    /// `None` when it does not match the digest.
    async fn keep_manifest(
        &self,
        digest: &str,
        headers: &HeaderMap,
        len: Option<u64>,
        body: UpstreamBody,
    ) -> Option<Response<Body>> {
        let cacheable =
            len.is_some_and(|l| l <= MAX_CACHED_MANIFEST) && digest.starts_with("sha256:");
        if !cacheable {
            let mut res = Response::new(Body::Upstream(body));
            *res.headers_mut() = headers.clone();
            if let Some(l) = len {
                res.headers_mut()
                    .insert(CONTENT_LENGTH, HeaderValue::from(l));
            }
            return Some(res);
        }
        let bytes = Limited::new(body, MAX_CACHED_MANIFEST as usize)
            .collect()
            .await
            .ok()?
            .to_bytes();
        if format!("sha256:{:x}", Sha256::digest(&bytes)) != digest {
            tracing::warn!(
                name = self.name,
                digest,
                "Harbor's manifest does not hash to its digest"
            );
            return None;
        }
        let key = format!("{}@{digest}", self.name);
        let (kept_headers, kept_body) = keepable(headers, &bytes);
        self.core
            .cache()
            .borrow_mut()
            .keep_manifest(&key, kept_headers, kept_body, Instant::now());
        Some(whole(StatusCode::OK, headers.clone(), bytes, false))
    }

    /// A tag list with `name` and `Link` rewritten to the router's path, kept for `CACHE_TTL`.
    async fn tags_answer(
        &self,
        project: &Project,
        status: StatusCode,
        mut headers: HeaderMap,
        body: UpstreamBody,
    ) -> Response<Body> {
        let Ok(bytes) = Limited::new(body, resolve::MAX_TAG_LIST)
            .collect()
            .await
            .map(|c| c.to_bytes())
        else {
            return error(&Error::BadGateway {
                reason: "Harbor's tag list could not be read",
            });
        };
        let proxy = self.core.proxy_project();
        let body = match serde_json::from_slice::<serde_json::Value>(&bytes) {
            Ok(serde_json::Value::Object(mut v)) => {
                v.insert("name".into(), format!("{proxy}/{}", self.name).into());
                Bytes::from(serde_json::Value::Object(v).to_string())
            }
            _ => bytes,
        };
        rewrite_project_links(&mut headers, project, self.name, proxy);
        let key = tags_key(self.name, query_of(&self.rest));
        let (kept_headers, kept_body) = keepable(&headers, &body);
        self.core
            .cache()
            .borrow_mut()
            .keep_tags(&key, kept_headers, kept_body, Instant::now());
        whole(status, headers, body, self.head)
    }
}

/// Points `Link` headers (pagination) at the router's `/v2/<proxy>/<name>/` instead of the project's
/// path for the name, in either of its spellings (Harbor may have redirected `nginx` to
/// `library/nginx` when the router did not know the project was Docker Hub).
fn rewrite_project_links(headers: &mut HeaderMap, project: &Project, name: &str, proxy: &str) {
    let to = format!("/v2/{proxy}/{name}/");
    rewrite_links(headers, &format!("/v2/{}/{}/", project.name, name), &to);
    if !name.contains('/') {
        rewrite_links(
            headers,
            &format!("/v2/{}/library/{}/", project.name, name),
            &to,
        );
    }
}

/// Points `Link` headers (tag-list pagination) at the router's path instead of the project's.
fn rewrite_links(headers: &mut HeaderMap, from: &str, to: &str) {
    let links: Vec<HeaderValue> = headers
        .get_all(LINK)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| HeaderValue::from_str(&v.replace(from, to)).ok())
        .collect();
    headers.remove(LINK);
    for l in links {
        headers.append(LINK, l);
    }
}

/// A blob HEAD answered from a one-byte ranged GET: 200 with the blob's full length, no body.
async fn blob_head(
    status: StatusCode,
    mut headers: HeaderMap,
    body: UpstreamBody,
) -> Response<Body> {
    let mut res = Response::new(Body::Empty);
    if status == StatusCode::RANGE_NOT_SATISFIABLE {
        // `bytes=0-0` of an empty blob: its length is 0.
        drop(body);
        headers.remove(CONTENT_RANGE);
        headers.insert(CONTENT_LENGTH, HeaderValue::from(0));
        *res.status_mut() = StatusCode::OK;
    } else if status == StatusCode::PARTIAL_CONTENT {
        let total = headers
            .get(CONTENT_RANGE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit('/').next())
            .and_then(|t| t.parse::<u64>().ok());
        let _ = Limited::new(body, 1024).collect().await;
        headers.remove(CONTENT_RANGE);
        match total {
            Some(t) => headers.insert(CONTENT_LENGTH, HeaderValue::from(t)),
            // `bytes 0-0/*`: the length is unknown; never claim the range's one byte.
            None => headers.remove(CONTENT_LENGTH),
        };
        *res.status_mut() = StatusCode::OK;
    } else {
        *res.status_mut() = status;
    }
    *res.headers_mut() = headers;
    res
}

fn body_len(headers: &HeaderMap) -> Option<u64> {
    headers.get(CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

fn kind(pull: &Pull) -> &'static str {
    match pull {
        Pull::Manifest(_) => "m",
        Pull::Blob(_) => "b",
        Pull::Tags => "t",
        Pull::Referrers(_) => "r",
    }
}

fn tags_key(name: &str, query: Option<&str>) -> String {
    format!("{name}?{}", tags_query(query))
}

fn query_of(rest: &str) -> Option<&str> {
    rest.split_once('?').map(|(_, q)| q)
}

/// `n` and `last` of a tag-list query, re-encoded; anything else is dropped.
fn tags_query(query: Option<&str>) -> String {
    let mut out = Vec::new();
    for pair in query.unwrap_or("").split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let ok = match k {
            "n" => !v.is_empty() && v.len() <= 6 && v.bytes().all(|b| b.is_ascii_digit()),
            "last" => {
                v.len() <= 256
                    && v.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"._-%".contains(&b))
            }
            _ => false,
        };
        if ok {
            out.push(format!("{k}={v}"));
        }
    }
    out.join("&")
}

/// `artifactType` of a referrers query, if it looks like a media type.
fn artifact_type(query: &str) -> Option<&str> {
    query.split('&').find_map(|p| {
        let v = p.strip_prefix("artifactType=")?;
        (v.len() <= 255
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-+%/".contains(&b)))
        .then_some(v)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_queries_keep_only_n_and_last() {
        assert_eq!(tags_query(None), "");
        assert_eq!(tags_query(Some("n=10&last=v1.2")), "n=10&last=v1.2");
        assert_eq!(tags_query(Some("last=a&evil=1&n=x")), "last=a");
        assert_eq!(tags_query(Some("n=1%0d%0a")), "");
        assert_eq!(tags_query(Some("last=a b")), "");
    }

    #[test]
    fn tag_list_links_point_at_the_router() {
        let mut h = HeaderMap::new();
        h.insert(
            LINK,
            HeaderValue::from_static(
                r#"</v2/dockerhub/library/nginx/tags/list?last=1.25&n=100>; rel="next""#,
            ),
        );
        rewrite_links(&mut h, "/v2/dockerhub/library/nginx/", "/v2/proxy/nginx/");
        assert_eq!(
            h[LINK],
            r#"</v2/proxy/nginx/tags/list?last=1.25&n=100>; rel="next""#
        );
        assert_eq!(h.get_all(LINK).iter().count(), 1);
    }

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
}
