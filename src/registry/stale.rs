//! Last-known-good tags (`STALE_IF_ERROR`). Resolving a tag needs Harbor to ask the upstream
//! registry; the manifest by digest and the blobs Harbor then serves from its own store. So when
//! every project that could confirm a tag fails (by the attempt judge's rules: no answer, a timeout,
//! Harbor's 500, 502–504, 429, circuits open), a tag confirmed within `STALE_IF_ERROR` is answered
//! with the digest it last resolved to:
//! - a HEAD from memory (digest, media type, length);
//! - a GET with the manifest kept with the tag (a GET that streamed it whole kept it, once per
//!   digest), which also goes into the manifest memory for the by-digest GET that follows; else from
//!   this core's manifest memory, else asked of the project that last answered the tag, by digest
//!   (and checked against it, as every manifest by digest is). Harbor keeps a multi-arch index
//!   trimmed under its tag and never under its original digest (`src/controller/proxy/
//!   manifestcache.go`), so that last request often fails exactly when it is needed.
//!
//! Either answer carries `Warning: 110 harbor-router "Response is Stale"` and an `Age`. An answer
//! is never masked: a 404 (or any other answer that is not a failure) goes to the client, and a tag
//! whose own project said 404 is forgotten. A tag a project answers is always served fresh.

use http::header::{CONTENT_LENGTH, CONTENT_TYPE, ETAG};
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};

use std::rc::Rc;

use bytes::BytesMut;

use crate::body::{Body, Check};
use crate::cache::{Seen, MAX_KEPT_MANIFEST};
use crate::metrics::labels::{Answered, StaleReason};
use crate::snapshot::Project;

use super::answer::Hashing;
use super::ask::{Ask, Endpoint};
use super::context::Pull;
use super::mapped::{self, Mapped};
use super::memory::keepable;
use super::respond::{respond, whole};
use super::state::State;

/// What a stale answer says, in the `Warning` header (RFC 9111 §5.5, warn-code 110).
pub const WARNING: HeaderValue =
    HeaderValue::from_static("110 harbor-router \"Response is Stale\"");

const DIGEST: HeaderName = HeaderName::from_static("docker-content-digest");

/// Remembers what `project`'s 200 to the tag pull `key` resolved to, from its headers; the answer
/// of a GET comes back watched when the entry wants the manifest itself (once per digest): the
/// bytes are kept as they stream, and handed to the entry once all of them went by and they hash
/// to the digest.
pub fn remember(
    state: &Rc<State>,
    pull: &Pull<'_, '_>,
    project: &Project,
    res: Response<Body>,
) -> Response<Body> {
    let (key, head, name) = (pull.key.as_str(), pull.ask.head, pull.ask.mapping_key());
    let Some((digest, length)) = confirm(state, key, project, &res) else {
        return res;
    };
    if head || length > MAX_KEPT_MANIFEST as u64 || length == 0 {
        return res;
    }
    let Some(hashing) = digest.to_str().ok().and_then(Hashing::new) else {
        return res;
    };
    let keep = KeepManifest {
        state: state.clone(),
        key: key.to_string(),
        name: name.to_string(),
        digest,
        length: length as usize,
        seen: BytesMut::with_capacity(length as usize),
        hashing,
    };
    res.map(|body| body.checked(keep))
}

/// Keeps a tag GET's manifest as it streams ([`remember`]).
struct KeepManifest {
    state: Rc<State>,
    key: String,
    /// The pull's mapping key (its blobs are learned under it).
    name: String,
    digest: HeaderValue,
    length: usize,
    seen: BytesMut,
    hashing: Hashing,
}

impl Check for KeepManifest {
    fn data(&mut self, data: &[u8]) -> std::io::Result<()> {
        // hyper stops polling a body once its Content-Length went by: the last byte completes it.
        if self.seen.len() + data.len() > self.length {
            self.length = 0; // longer than announced: nothing is kept
            return Ok(());
        }
        self.seen.extend_from_slice(data);
        self.hashing.update(data);
        if self.seen.len() == self.length && self.hashing.matches() {
            let manifest = std::mem::take(&mut self.seen).freeze();
            self.state.remembered.learn_blobs(&self.name, &manifest);
            self.state
                .tags
                .keep_manifest(&self.key, &self.digest, manifest);
        }
        Ok(())
    }

    fn end(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Confirms the tag's entry from a 200's headers; its digest and length when the entry wants the
/// manifest itself.
fn confirm(
    state: &State,
    key: &str,
    project: &Project,
    res: &Response<Body>,
) -> Option<(HeaderValue, u64)> {
    if res.status() != StatusCode::OK {
        return None;
    }
    let h = res.headers();
    let (Some(digest), Some(media_type), Some(length)) = (
        h.get(&DIGEST),
        h.get(CONTENT_TYPE),
        h.get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok()),
    ) else {
        return None;
    };
    let digest_ok = digest
        .to_str()
        .is_ok_and(|d| crate::names::valid_digest(d).is_ok());
    if !digest_ok {
        return None;
    }
    let seen = Seen {
        digest,
        media_type,
        length,
        project: &project.name,
    };
    state
        .tags
        .confirm(key, seen, project)
        .then(|| (digest.clone(), length))
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
    let mut h = HeaderMap::with_capacity(6);
    h.insert(CONTENT_TYPE, resolved.media_type.clone());
    h.insert(DIGEST, resolved.digest.clone());
    h.insert(ETAG, HeaderValue::from_str(&format!("\"{digest}\"")).ok()?);
    h.insert(CONTENT_LENGTH, HeaderValue::from(resolved.length));
    let kept = match (ask.head, resolved.manifest.clone()) {
        (false, None) => state.tags.shared_manifest(key, &resolved).await,
        (_, kept) => kept,
    };
    let mut res = match (ask.head, kept) {
        (true, _) => respond(StatusCode::OK, h, Body::Empty),
        // Kept with the tag (here, or by another pod through Redis): nothing is asked of Harbor,
        // and the by-digest GET a client sends next (containerd, docker) is answered from memory
        // too.
        (false, Some(manifest)) => {
            let pinned = pinned(ask, digest);
            if let Some(key) = pinned.memory_key() {
                state
                    .remembered
                    .keep_manifest(&key, keepable(&h, &manifest));
            }
            whole(StatusCode::OK, h, manifest, false)
        }
        (false, None) => by_digest(state, project, ask, digest, &mut pull.trace.attempts).await?,
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

/// The GET of the manifest `digest` a tag `ask` resolved to.
fn pinned(ask: &Ask, digest: String) -> Ask {
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
    pinned
}

/// The manifest `digest` for a GET of a tag: from this core's memory, else asked of `project`.
async fn by_digest(
    state: &State,
    project: &Project,
    ask: &Ask,
    digest: String,
    attempts: &mut u32,
) -> Option<Response<Body>> {
    let pinned = pinned(ask, digest);
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
