//! Harbor's answer, translated for the client: headers less hop-by-hop ones, bodies streamed; a
//! blob HEAD answered from its one-byte ranged GET; a manifest by digest read whole, checked against
//! its digest and kept; a tag list with its `name` and `Link` pointing at the router's path, kept.

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_LENGTH, CONTENT_RANGE, LINK};
use http::{HeaderMap, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use sha2::{Digest, Sha256};

use crate::body::Body;
use crate::error::Error;
use crate::snapshot::Project;
use crate::upstream::pool::UpstreamBody;

use super::ask::{Ask, Endpoint};
use super::attempt::MAX_TAG_LIST;
use super::forward;
use super::memory::keepable;
use super::respond::{error, respond, whole};
use super::state::State;

/// Largest manifest kept by digest (the distribution registry refuses larger ones).
const MAX_CACHED_MANIFEST: u64 = 4 << 20;

/// `project`'s answer to `ask`, for the client.
pub async fn answer(
    state: &State,
    project: &Project,
    ask: &Ask,
    res: Response<UpstreamBody>,
) -> Response<Body> {
    let (parts, body) = res.into_parts();
    let status = parts.status;
    let mut headers = forward::headers_down(&parts.headers);
    let len = parts.headers.get(CONTENT_LENGTH);
    match &ask.endpoint {
        Endpoint::Blob { .. } if ask.head => return blob_head(status, headers, body).await,
        Endpoint::Tags { .. } if status.is_success() => {
            return tags(state, project, ask, status, headers, body).await
        }
        Endpoint::Manifest {
            reference,
            by_digest: true,
        } if !ask.head && status == StatusCode::OK => {
            let len = len.and_then(|v| v.to_str().ok()?.parse().ok());
            return match manifest(state, ask, reference, headers, len, body).await {
                Ok(res) => res,
                Err(e) => error(&e),
            };
        }
        Endpoint::Referrers { .. } => {
            rewrite_project_links(&mut headers, project, &ask.name, state.proxy_project())
        }
        _ => {}
    }
    if ask.head {
        // hyper sends no body for HEAD but keeps the Content-Length set here.
        return respond(status, headers, Body::Empty);
    }
    if let Some(len) = len {
        headers.insert(CONTENT_LENGTH, len.clone());
    }
    respond(status, headers, Body::Upstream(body))
}

/// Reads a by-digest manifest whole, checks it against its digest, keeps it, and answers it. One
/// that cannot be kept (no length, too large, a digest other than sha256) streams through.
async fn manifest(
    state: &State,
    ask: &Ask,
    digest: &str,
    mut headers: HeaderMap,
    len: Option<u64>,
    body: UpstreamBody,
) -> Result<Response<Body>, Error> {
    let cacheable = len.is_some_and(|l| l <= MAX_CACHED_MANIFEST) && digest.starts_with("sha256:");
    if !cacheable {
        if let Some(l) = len {
            headers.insert(CONTENT_LENGTH, HeaderValue::from(l));
        }
        return Ok(respond(StatusCode::OK, headers, Body::Upstream(body)));
    }
    let bytes = Limited::new(body, MAX_CACHED_MANIFEST as usize)
        .collect()
        .await
        .map_err(|e| {
            tracing::warn!(name = ask.name, digest, error = %e, "Harbor's manifest could not be read");
            Error::BadGateway {
                reason: "Harbor's manifest could not be read",
            }
        })?
        .to_bytes();
    if format!("sha256:{:x}", Sha256::digest(&bytes)) != digest {
        tracing::warn!(
            name = ask.name,
            digest,
            "Harbor's manifest does not hash to its digest"
        );
        return Err(Error::BadGateway {
            reason: "Harbor's manifest did not match its digest",
        });
    }
    if let Some(key) = ask.memory_key() {
        state.keep_manifest(&key, keepable(&headers, &bytes));
    }
    Ok(whole(StatusCode::OK, headers, bytes, false))
}

/// A tag list with `name` and `Link` rewritten to the router's path, kept for `CACHE_TTL`.
async fn tags(
    state: &State,
    project: &Project,
    ask: &Ask,
    status: StatusCode,
    mut headers: HeaderMap,
    body: UpstreamBody,
) -> Response<Body> {
    let Ok(bytes) = Limited::new(body, MAX_TAG_LIST)
        .collect()
        .await
        .map(|c| c.to_bytes())
    else {
        return error(&Error::BadGateway {
            reason: "Harbor's tag list could not be read",
        });
    };
    let proxy = state.proxy_project();
    let body = match serde_json::from_slice::<serde_json::Value>(&bytes) {
        Ok(serde_json::Value::Object(mut v)) => {
            v.insert("name".into(), format!("{proxy}/{}", ask.name).into());
            Bytes::from(serde_json::Value::Object(v).to_string())
        }
        _ => bytes,
    };
    rewrite_project_links(&mut headers, project, &ask.name, proxy);
    if let Some(key) = ask.memory_key() {
        state.keep_tags(&key, keepable(&headers, &body));
    }
    whole(status, headers, body, ask.head)
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

/// Points `Link` headers at the router's path instead of the project's.
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
    let status = match status {
        StatusCode::RANGE_NOT_SATISFIABLE => {
            // `bytes=0-0` of an empty blob: its length is 0.
            drop(body);
            headers.remove(CONTENT_RANGE);
            headers.insert(CONTENT_LENGTH, HeaderValue::from(0));
            StatusCode::OK
        }
        StatusCode::PARTIAL_CONTENT => {
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
            StatusCode::OK
        }
        other => other,
    };
    respond(status, headers, Body::Empty)
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
