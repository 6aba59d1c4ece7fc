//! Last-known-good tags (`STALE_IF_ERROR`). Resolving a tag needs Harbor to ask the upstream
//! registry; the manifest by digest and the blobs Harbor then serves from its own store. So when
//! every project that could confirm a tag fails (by the attempt judge's rules: no answer, a timeout,
//! 502–504, 429, circuits open), a tag confirmed within `STALE_IF_ERROR` is answered with the digest
//! it last resolved to:
//! - a HEAD from memory (digest, media type, length);
//! - a GET with the manifest by that digest, from this core's manifest memory or asked of the
//!   project that last answered the tag, by digest (and checked against it, as every manifest by
//!   digest is).
//!
//! Either answer carries `Warning: 110 harbor-router "Response is Stale"` and an `Age`. An answer
//! is never masked: a 404 (or any other answer that is not a failure) goes to the client, and a tag
//! whose own project said 404 is forgotten. A tag a project answers is always served fresh.

use http::header::{CONTENT_LENGTH, CONTENT_TYPE, ETAG};
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};

use crate::body::Body;
use crate::cache::Seen;
use crate::metrics::labels::{Answered, StaleReason};
use crate::snapshot::Project;

use super::ask::{Ask, Endpoint};
use super::context::Pull;
use super::mapped::{self, Mapped};
use super::respond::{respond, whole};
use super::state::State;

/// What a stale answer says, in the `Warning` header (RFC 9111 §5.5, warn-code 110).
pub const WARNING: HeaderValue =
    HeaderValue::from_static("110 harbor-router \"Response is Stale\"");

const DIGEST: HeaderName = HeaderName::from_static("docker-content-digest");

/// Remembers what `project`'s 200 to the tag pull `key` resolved to, from its headers.
pub fn remember(state: &State, key: &str, project: &Project, res: &Response<Body>) {
    if res.status() != StatusCode::OK {
        return;
    }
    let h = res.headers();
    let (Some(digest), Some(media_type), Some(length)) = (
        h.get(&DIGEST),
        h.get(CONTENT_TYPE),
        h.get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok()),
    ) else {
        return;
    };
    let digest_ok = digest
        .to_str()
        .is_ok_and(|d| crate::names::valid_digest(d).is_ok());
    if !digest_ok {
        return;
    }
    let seen = Seen {
        digest,
        media_type,
        length,
        project: &project.name,
    };
    state.tags.confirm(key, seen, project);
}

/// The last-known-good answer to the tag pull `pull`, standing in for the failure `why`, if there
/// is one and it can be served; `None` leaves the failure to be answered. A last-known-good answer
/// of a project that answered this pull (its log says who) does not stand in.
pub async fn answer(
    state: &State,
    pull: &mut Pull<'_, '_>,
    why: StaleReason,
) -> Option<Response<Body>> {
    let (snapshot, ask, key) = (pull.snapshot, &pull.ask, pull.key.as_str());
    let (resolved, age) = state.tags.last_good(key, snapshot).await?;
    if pull.log.answered.contains(&resolved.project) {
        return None;
    }
    let project = snapshot.project(&resolved.project)?;
    // A mirror request is answered only from a project of the registry it names.
    if let Some(host) = ask.registry.as_deref() {
        if !super::mirror::serves(snapshot, project, host) {
            return None;
        }
    }
    let digest = resolved.digest.to_str().ok()?.to_string();
    let mut res = if ask.head {
        let mut h = HeaderMap::with_capacity(6);
        h.insert(CONTENT_TYPE, resolved.media_type.clone());
        h.insert(DIGEST, resolved.digest.clone());
        h.insert(ETAG, HeaderValue::from_str(&format!("\"{digest}\"")).ok()?);
        h.insert(CONTENT_LENGTH, HeaderValue::from(resolved.length));
        respond(StatusCode::OK, h, Body::Empty)
    } else {
        by_digest(state, project, ask, digest, &mut pull.trace.attempts).await?
    };
    let h = res.headers_mut();
    h.insert(http::header::WARNING, WARNING);
    h.insert(http::header::AGE, HeaderValue::from(age.as_secs()));
    state.metrics().stale(why);
    state
        .tags
        .served_stale(&ask.name, &project.name, age, why.as_str());
    pull.trace.route = Answered::Stale;
    pull.trace.project(&project.name);
    Some(res)
}

/// The manifest `digest` for a GET of a tag: from this core's memory, else asked of `project`.
async fn by_digest(
    state: &State,
    project: &Project,
    ask: &Ask,
    digest: String,
    attempts: &mut u32,
) -> Option<Response<Body>> {
    let mut pinned = Ask {
        endpoint: Endpoint::Manifest {
            reference: digest,
            by_digest: true,
        },
        head: false,
        ..ask.clone()
    };
    // The client's conditions were about the tag: the manifest is asked whole.
    pinned.headers.remove(http::header::IF_NONE_MATCH);
    pinned.headers.remove(http::header::IF_MODIFIED_SINCE);
    if let Some(kept) = pinned
        .memory_key()
        .and_then(|k| state.remembered.manifest(&k))
    {
        return Some(whole(StatusCode::OK, kept.headers, kept.body, false));
    }
    // Bounded by RESOLVER_TIMEOUT (a manifest request), judged and recorded in the content lane.
    match mapped::request(state, project, &pinned, attempts).await {
        Mapped::Answer(res) if res.status() == StatusCode::OK => Some(*res),
        _ => None,
    }
}
