//! Harbor's answer, translated for the client: headers less hop-by-hop ones, bodies streamed; a
//! blob HEAD answered from its one-byte ranged GET; a manifest never larger than
//! [`MAX_MANIFEST_BYTES`] (refused when announced larger, cut when not announced); a manifest by
//! digest read whole, checked against its digest (sha256, sha384 or sha512) before any byte is sent,
//! and kept; a manifest by tag that came without its digest (Harbor sends `Docker-Content-Digest: ""`
//! for one it fetched from the upstream) read whole and given its digest; a tag list with its `name`
//! and `Link` pointing at the router's path, kept.

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_LENGTH, CONTENT_RANGE, ETAG, LINK};
use http::{HeaderMap, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use sha2::{Digest, Sha256, Sha384, Sha512};

use crate::body::Body;
use crate::error::Error;
use crate::names::MAX_MANIFEST_BYTES;
use crate::snapshot::Project;
use crate::upstream::pool::UpstreamBody;

use super::ask::{Ask, Endpoint};
use super::attempt::MAX_TAG_LIST;
use super::forward;
use super::memory::keepable;
use super::respond::{error, respond, whole};
use super::state::State;

const DIGEST: HeaderName = HeaderName::from_static("docker-content-digest");

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
    let manifest_like = matches!(
        ask.endpoint,
        Endpoint::Manifest { .. } | Endpoint::Referrers { .. }
    );
    let announced = len.and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if manifest_like && announced.is_some_and(|l| l > MAX_MANIFEST_BYTES) {
        tracing::warn!(
            name = ask.name,
            len = announced,
            "Harbor announced a manifest larger than 4 MiB"
        );
        return error(&Error::BadGateway {
            reason: "Harbor's manifest is larger than the registry limit of 4 MiB",
        });
    }
    match &ask.endpoint {
        Endpoint::Blob { .. } if ask.head => return blob_head(status, headers, body).await,
        Endpoint::Tags { .. } if status.is_success() => {
            return tags(state, project, ask, status, headers, body).await
        }
        Endpoint::Manifest {
            reference,
            by_digest: true,
        } if !ask.head && status == StatusCode::OK => {
            return match manifest(state, ask, reference, headers, body).await {
                Ok(res) => res,
                Err(e) => error(&e),
            };
        }
        Endpoint::Manifest {
            by_digest: false, ..
        } if !ask.head && status == StatusCode::OK && !names_digest(&parts.headers) => {
            return match digested(state, ask, headers, body).await {
                Ok(res) => res,
                Err(e) => error(&e),
            };
        }
        Endpoint::Referrers { .. } => {
            rewrite_project_links(&mut headers, project, ask, state.proxy_project())
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
    let body = if manifest_like {
        Body::Capped {
            body,
            left: MAX_MANIFEST_BYTES,
        }
    } else {
        match blob_check(ask, &headers).filter(|_| status == StatusCode::OK) {
            Some(check) => Body::Upstream(body).checked(check),
            None => Body::Upstream(body),
        }
    };
    respond(status, headers, body)
}

/// Reads a by-digest manifest whole (at most [`MAX_MANIFEST_BYTES`]), checks it against its digest,
/// keeps it, and answers it: no byte reaches the client before the whole was verified.
async fn manifest(
    state: &State,
    ask: &Ask,
    digest: &str,
    headers: HeaderMap,
    body: UpstreamBody,
) -> Result<Response<Body>, Error> {
    let bytes = read_manifest(ask, digest, body).await?;
    if !matches_digest(digest, &bytes) {
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
        state
            .remembered
            .keep_manifest(&key, keepable(&headers, &bytes));
    }
    state.remembered.learn_blobs(&ask.mapping_key(), &bytes);
    Ok(whole(StatusCode::OK, headers, bytes, false))
}

/// Whether Harbor's answer names a well-formed `Docker-Content-Digest`.
fn names_digest(headers: &HeaderMap) -> bool {
    headers
        .get(DIGEST)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|d| crate::names::valid_digest(d).is_ok())
}

/// A manifest by tag whose answer came without a digest, read whole (at most
/// [`MAX_MANIFEST_BYTES`]) and sent with its sha256 as `Docker-Content-Digest` and `ETag`: Harbor
/// answers `Docker-Content-Digest: ""` and `Etag: ""` to a GET by tag it fetched from the upstream
/// (`src/server/middleware/repoproxy/proxy.go`, `proxyManifestGet`), and clients that pin what they
/// pulled (containerd, skopeo's `--digestfile`) need the digest. Answers that carry one stream.
async fn digested(
    state: &State,
    ask: &Ask,
    mut headers: HeaderMap,
    body: UpstreamBody,
) -> Result<Response<Body>, Error> {
    let bytes = read_manifest(ask, "", body).await?;
    state.remembered.learn_blobs(&ask.mapping_key(), &bytes);
    let digest = format!("sha256:{:x}", Sha256::digest(&bytes));
    tracing::debug!(name = ask.name, %digest, "Harbor sent a manifest by tag without its digest; computed it");
    let value = HeaderValue::from_str(&digest).expect("a digest is a header value");
    let etag =
        HeaderValue::from_str(&format!("\"{digest}\"")).expect("a quoted digest is a header value");
    headers.insert(DIGEST, value);
    headers.insert(ETAG, etag);
    Ok(whole(StatusCode::OK, headers, bytes, false))
}

/// Reads a manifest whole (at most [`MAX_MANIFEST_BYTES`]).
async fn read_manifest(ask: &Ask, reference: &str, body: UpstreamBody) -> Result<Bytes, Error> {
    match Limited::new(body, MAX_MANIFEST_BYTES as usize)
        .collect()
        .await
    {
        Ok(b) => Ok(b.to_bytes()),
        Err(e) => {
            let too_large = e
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some();
            tracing::warn!(name = ask.name, reference, error = %e, "Harbor's manifest could not be read whole");
            Err(Error::BadGateway {
                reason: if too_large {
                    "Harbor's manifest is larger than the registry limit of 4 MiB"
                } else {
                    "Harbor's manifest could not be read"
                },
            })
        }
    }
}

/// Whether `bytes` hash to `digest` (`algorithm:hex`, as the route parser accepts it).
pub fn matches_digest(digest: &str, bytes: &[u8]) -> bool {
    Hashing::new(digest).is_some_and(|mut h| {
        h.update(bytes);
        h.matches()
    })
}

/// A digest computed as bytes go by, to be compared with the one it should be.
pub struct Hashing {
    hasher: Hasher,
    want: String,
}

enum Hasher {
    Sha256(Sha256),
    Sha384(Sha384),
    Sha512(Sha512),
}

impl Hashing {
    /// For `digest` (`algorithm:hex`); `None` for an algorithm the registry does not use.
    pub fn new(digest: &str) -> Option<Hashing> {
        let (algorithm, hex) = digest.split_once(':')?;
        let hasher = match algorithm {
            "sha256" => Hasher::Sha256(Sha256::new()),
            "sha384" => Hasher::Sha384(Sha384::new()),
            "sha512" => Hasher::Sha512(Sha512::new()),
            _ => return None,
        };
        Some(Hashing {
            hasher,
            want: hex.to_string(),
        })
    }

    pub fn update(&mut self, data: &[u8]) {
        match &mut self.hasher {
            Hasher::Sha256(h) => h.update(data),
            Hasher::Sha384(h) => h.update(data),
            Hasher::Sha512(h) => h.update(data),
        }
    }

    /// Whether what went by hashes to the digest (the hasher is spent: call once).
    pub fn matches(&mut self) -> bool {
        let computed = match &mut self.hasher {
            Hasher::Sha256(h) => format!("{:x}", h.finalize_reset()),
            Hasher::Sha384(h) => format!("{:x}", h.finalize_reset()),
            Hasher::Sha512(h) => format!("{:x}", h.finalize_reset()),
        };
        computed == self.want
    }
}

/// Whether Harbor's blob answer names its digest and length: a blob Harbor serves from its
/// storage, whose bytes are trusted as they are (the length framed by HTTP).
pub fn served_whole(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .is_some()
        && names_digest(headers)
}

/// The check a 200 blob answer with `headers` (as they go to the client) needs: one when Harbor
/// sent no length or no digest (see [`BlobCheck`]).
pub fn blob_check(ask: &Ask, headers: &HeaderMap) -> Option<BlobCheck> {
    let Endpoint::Blob { digest } = &ask.endpoint else {
        return None;
    };
    if served_whole(headers) {
        return None;
    }
    let announced = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    Some(BlobCheck {
        hashing: Hashing::new(digest)?,
        name: ask.name.clone(),
        digest: digest.clone(),
        bytes: 0,
        length: announced,
    })
}

/// Hashes a blob Harbor sent without its digest as it streams: Harbor up to v2.15 sends a blob it
/// has not cached yet without `Docker-Content-Digest`, chunked (or, when the whole answer fits Go's
/// 4 KiB write buffer, with the `Content-Length` of what it wrote), and when its upstream breaks
/// mid-blob it appends its error JSON to the 200 and ends the body cleanly
/// (`src/server/middleware/repoproxy/proxy.go`, `handleBlob` then `SendError`). The digest is in
/// the URL: a body that does not hash to it ends with an error instead of its clean end (a framed
/// one loses its last frame), so the client sees a broken transfer and retries, never a wrong blob
/// that looks complete.
pub struct BlobCheck {
    hashing: Hashing,
    name: String,
    digest: String,
    bytes: u64,
    /// The announced length: the check is made on the frame that completes it.
    length: Option<u64>,
}

impl BlobCheck {
    fn verdict(&mut self) -> std::io::Result<()> {
        if self.hashing.matches() {
            return Ok(());
        }
        tracing::warn!(
            name = self.name,
            digest = self.digest,
            bytes = self.bytes,
            "Harbor's blob does not hash to its digest: the transfer is cut"
        );
        Err(std::io::Error::other(
            "Harbor's blob did not match its digest",
        ))
    }
}

impl crate::body::Check for BlobCheck {
    fn data(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.bytes += data.len() as u64;
        self.hashing.update(data);
        match self.length {
            Some(length) if self.bytes >= length => self.verdict(),
            _ => Ok(()),
        }
    }

    fn end(&mut self) -> std::io::Result<()> {
        match self.length {
            // Decided on the last frame (or the body was short: hyper reports that itself).
            Some(_) => Ok(()),
            None => self.verdict(),
        }
    }
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
    let body = renamed_tag_list(bytes, &ask.client_repository(proxy));
    rewrite_project_links(&mut headers, project, ask, proxy);
    if let Some(key) = ask.memory_key() {
        state.remembered.keep_tags(&key, keepable(&headers, &body));
    }
    whole(status, headers, body, ask.head)
}

/// A tag list whose `name` is `name` (the router's path for it); anything but a JSON object passes
/// unchanged.
pub fn renamed_tag_list(bytes: Bytes, name: &str) -> Bytes {
    match serde_json::from_slice::<serde_json::Value>(&bytes) {
        Ok(serde_json::Value::Object(mut v)) => {
            v.insert("name".into(), name.into());
            Bytes::from(serde_json::Value::Object(v).to_string())
        }
        _ => bytes,
    }
}

/// Points `Link` headers (pagination) at the router's `/v2/<proxy>/<name>/` instead of the project's
/// path for the name, in either of its spellings (Harbor may have redirected `nginx` to
/// `library/nginx` when the router did not know the project was Docker Hub).
/// Points `Link` headers at the path the client used (its form, its repository).
fn rewrite_project_links(headers: &mut HeaderMap, project: &Project, ask: &Ask, proxy: &str) {
    let name = ask.name.as_str();
    let to = format!("/v2/{}/", ask.client_repository(proxy));
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
pub fn rewrite_links(headers: &mut HeaderMap, from: &str, to: &str) {
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
        // The whole blob, without its length: Harbor up to v2.15 ignores the range of a blob it
        // has not cached. The size is unknown without reading it all, and a HEAD without a length
        // would read as an empty blob: answered as Harbor answers a HEAD of such a blob.
        StatusCode::OK if !headers.contains_key(CONTENT_LENGTH) => {
            drop(body);
            return error(&Error::BlobNotCached);
        }
        other => other,
    };
    respond(status, headers, Body::Empty)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_of_every_algorithm_are_checked() {
        let body = b"{}";
        for (algorithm, hex) in [
            ("sha256", format!("{:x}", Sha256::digest(body))),
            ("sha384", format!("{:x}", Sha384::digest(body))),
            ("sha512", format!("{:x}", Sha512::digest(body))),
        ] {
            assert!(matches_digest(&format!("{algorithm}:{hex}"), body));
            assert!(!matches_digest(&format!("{algorithm}:{hex}"), b"{ }"));
        }
        assert!(!matches_digest(
            "md5:99914b932bd37a50b983c5e7c90ae93b",
            body
        ));
        assert!(!matches_digest("sha256", body));
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
}
