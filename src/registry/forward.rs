//! Turning a client's pull into a request on one Harbor project, and Harbor's answer into the client's:
//! the project path (with Docker Hub's `library/`), which headers go up and which come back, and
//! Harbor's same-project redirects followed internally.
//!
//! Up: every `Accept` value unchanged (a registry answers differently without them), `Range`,
//! `If-Range`, `If-None-Match`, `If-Modified-Since`. Never the client's `Authorization`, cookies or
//! hop-by-hop headers. Down: everything but hop-by-hop headers, `WWW-Authenticate` (the router
//! authenticates to Harbor itself; a challenge would send the client to Harbor's token service) and
//! `Set-Cookie` (a session Harbor opens for the robot's request must not reach an anonymous client).

use std::borrow::Cow;

use http::header::{self, HeaderMap, HeaderName, LOCATION};
use http::{Method, Response, StatusCode, Uri};

use crate::snapshot::{Project, UpstreamKind};
use crate::upstream::pool::UpstreamBody;
use crate::upstream::{AuthMode, Upstream, UpstreamError};

/// Same-project redirects followed before an answer is passed on as it is.
const MAX_REDIRECTS: usize = 3;

const FORWARDED_UP: [HeaderName; 5] = [
    header::ACCEPT,
    header::RANGE,
    header::IF_RANGE,
    header::IF_NONE_MATCH,
    header::IF_MODIFIED_SINCE,
];

/// Hop-by-hop headers (RFC 9110 §7.6.1) and others that must not cross the router.
const NOT_FORWARDED_DOWN: [HeaderName; 10] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::WWW_AUTHENTICATE,
    header::SET_COOKIE,
];

/// `<name>` as it lives in `project`: Docker Hub keeps official images under `library/`.
pub fn project_name<'a>(project: &Project, name: &'a str) -> Cow<'a, str> {
    if project.kind == UpstreamKind::DockerHub && !name.contains('/') {
        Cow::Owned(format!("library/{name}"))
    } else {
        Cow::Borrowed(name)
    }
}

/// Whether `<project>/<name in project>` stays within the registry's limit on repository names: a
/// project where it does not cannot have the name (and its registry would answer 500 to it).
pub fn fits(project: &Project, name: &str) -> bool {
    project.name.len() + 1 + project_name(project, name).len() <= crate::names::MAX_NAME_LEN
}

/// `/v2/<project>/<name in project>/<rest>` (`rest` like `manifests/latest` or `tags/list?n=10`).
pub fn project_path(project: &Project, name: &str, rest: impl std::fmt::Display) -> String {
    format!(
        "/v2/{}/{}/{rest}",
        project.name,
        project_name(project, name)
    )
}

/// The headers of the client's request that go to Harbor.
pub fn headers_up(client: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for name in FORWARDED_UP {
        for v in client.get_all(&name) {
            out.append(name.clone(), v.clone());
        }
    }
    out
}

/// Harbor's headers that go to the client.
pub fn headers_down(upstream: &HeaderMap) -> HeaderMap {
    let mut out = upstream.clone();
    for name in NOT_FORWARDED_DOWN {
        out.remove(name);
    }
    // Headers named by `Connection` are hop-by-hop too.
    for v in upstream.get_all(header::CONNECTION) {
        for name in v.to_str().unwrap_or("").split(',') {
            if let Ok(n) = HeaderName::from_bytes(name.trim().as_bytes()) {
                out.remove(n);
            }
        }
    }
    out
}

/// Sends `method path` to `project`, following Harbor's redirects to another `/v2/<project>/` path
/// on Harbor itself (Docker Hub's 301 for official images). Any other redirect (a presigned storage
/// URL on another host) is returned as it is, for the client.
pub async fn send(
    upstream: &Upstream,
    project: &Project,
    method: Method,
    path: String,
    headers: &HeaderMap,
) -> Result<Response<UpstreamBody>, UpstreamError> {
    let mut path = path;
    let mut hops = 0;
    loop {
        let res = upstream
            .send(method.clone(), &path, headers, AuthMode::Registry)
            .await?;
        if hops == MAX_REDIRECTS || !is_redirect(res.status()) {
            return Ok(res);
        }
        let Some(next) = same_project_target(upstream, project, &res) else {
            return Ok(res);
        };
        // Read the small redirect body so the connection can be reused.
        upstream.drain(res.into_body()).await;
        tracing::debug!(from = %path, to = %next, "following Harbor's redirect");
        path = next;
        hops += 1;
    }
}

fn is_redirect(s: StatusCode) -> bool {
    matches!(s.as_u16(), 301 | 302 | 303 | 307 | 308)
}

/// The redirect's target path when it stays on Harbor and in the same project.
fn same_project_target<B>(
    upstream: &Upstream,
    project: &Project,
    res: &Response<B>,
) -> Option<String> {
    let location = res.headers().get(LOCATION)?.to_str().ok()?;
    let uri: Uri = location.parse().ok()?;
    if uri.authority().is_some() && !upstream.is_harbor(&uri) {
        return None;
    }
    let pq = uri.path_and_query()?.as_str();
    let prefix = format!("/v2/{}/", project.name);
    pq.starts_with(&prefix).then(|| pq.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn project(kind: UpstreamKind) -> Project {
        Project::new("hub".into(), 1, 1, kind, None)
    }

    #[test]
    fn docker_hub_official_images_get_library() {
        let hub = project(UpstreamKind::DockerHub);
        let other = project(UpstreamKind::Other("quay".into()));
        assert_eq!(
            project_path(&hub, "nginx", "manifests/1"),
            "/v2/hub/library/nginx/manifests/1"
        );
        assert_eq!(
            project_path(&hub, "bitnami/redis", "tags/list"),
            "/v2/hub/bitnami/redis/tags/list"
        );
        assert_eq!(
            project_path(&other, "nginx", "manifests/1"),
            "/v2/hub/nginx/manifests/1"
        );
        assert_eq!(
            project_path(&project(UpstreamKind::Unknown), "nginx", "manifests/1"),
            "/v2/hub/nginx/manifests/1"
        );
    }

    #[test]
    fn names_that_fit_a_project() {
        let hub = project(UpstreamKind::DockerHub);
        let other = project(UpstreamKind::Unknown);
        // "hub/" is 4 characters; Docker Hub adds "library/" to a one-segment name.
        assert!(fits(&other, &"a".repeat(251)));
        assert!(!fits(&other, &"a".repeat(252)));
        assert!(fits(&hub, &"a".repeat(243)));
        assert!(!fits(&hub, &"a".repeat(244)));
        assert!(fits(&hub, &format!("a/{}", "b".repeat(249))));
    }

    #[test]
    fn headers_going_up() {
        let mut client = HeaderMap::new();
        for a in [
            "application/vnd.oci.image.index.v1+json",
            "application/vnd.docker.distribution.manifest.v2+json",
        ] {
            client.append(header::ACCEPT, HeaderValue::from_static(a));
        }
        client.insert(header::RANGE, HeaderValue::from_static("bytes=0-9"));
        client.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer client-token"),
        );
        client.insert(header::COOKIE, HeaderValue::from_static("a=b"));
        client.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        let up = headers_up(&client);
        assert_eq!(
            up.get_all(header::ACCEPT).iter().count(),
            2,
            "every Accept line, unchanged"
        );
        assert_eq!(up[header::RANGE], "bytes=0-9");
        assert!(
            !up.contains_key(header::AUTHORIZATION),
            "the client's credentials never go up"
        );
        assert!(!up.contains_key(header::COOKIE));
        assert!(!up.contains_key(header::CONNECTION));
    }

    #[test]
    fn headers_coming_down() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/vnd.oci.image.index.v1+json"),
        );
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("123"));
        h.insert(
            "docker-content-digest",
            HeaderValue::from_static("sha256:abc"),
        );
        h.insert(header::ETAG, HeaderValue::from_static("\"sha256:abc\""));
        h.insert(
            header::WARNING,
            HeaderValue::from_static("299 - \"deprecated\""),
        );
        h.insert(header::CONNECTION, HeaderValue::from_static("close, x-hop"));
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=x"),
        );
        h.append(
            header::SET_COOKIE,
            HeaderValue::from_static("sid=robot; Path=/"),
        );
        h.append(header::SET_COOKIE, HeaderValue::from_static("_xsrf=1"));
        let down = headers_down(&h);
        for kept in [
            "content-type",
            "content-length",
            "docker-content-digest",
            "etag",
            "warning",
        ] {
            assert_eq!(down.get(kept), h.get(kept), "{kept}");
        }
        for gone in [
            "connection",
            "x-hop",
            "transfer-encoding",
            "www-authenticate",
            "set-cookie",
        ] {
            assert!(!down.contains_key(gone), "{gone}");
        }
    }
}
