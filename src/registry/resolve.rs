//! `name → project`: the core's shard first, then the process-wide learned map, then a fan-out.
//! This module owns the lookups, the learning and forgetting, the coalescing of concurrent misses
//! (one fan-out per name, reference and Accept set on a core; the others wait for its project), and the
//! background refresh of stale mappings (at most one per name at a time).

use std::rc::Rc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{ACCEPT, RANGE};
use http::{HeaderMap, HeaderValue, Method};
use http_body_util::{BodyExt, Limited};

use crate::cache::Lookup;
use crate::core::Core;
use crate::error::Error;
use crate::flight;
use crate::registry::fanout::{self, Outcome, Verdict};
use crate::registry::forward;
use crate::snapshot::{Project, Snapshot};
use crate::upstream::pool::UpstreamBody;
use crate::upstream::Upstream;

/// The project a name is mapped to, and whether the mapping is stale (serve it, refresh it).
pub fn cached(
    core: &Core,
    snapshot: &Snapshot,
    name: &str,
    now: Instant,
) -> Option<(Project, bool)> {
    let mut lookup = core.cache().borrow().lookup(name, now);
    if lookup == Lookup::Miss {
        // Another core may have learned it: adopt its mapping, with its age.
        if let Some(m) = core.learned().get(name) {
            let mut cache = core.cache().borrow_mut();
            cache.learn(name, &m.project, m.learned_at);
            lookup = cache.lookup(name, now);
        }
    }
    let (project, stale) = match lookup {
        Lookup::Fresh(p) => (p, false),
        Lookup::Stale(p) => (p, true),
        Lookup::Miss => return None,
    };
    match snapshot.project(&project) {
        Some(p) => Some((p.clone(), stale)),
        None => {
            // The project is gone from Harbor (or from the fan-out cut): the mapping is useless.
            forget(core, name, &project);
            None
        }
    }
}

pub fn learn(core: &Core, name: &str, project: &str) {
    let now = Instant::now();
    core.cache().borrow_mut().learn(name, project, now);
    core.learned().learn(name, project, now);
}

pub fn forget(core: &Core, name: &str, project: &str) {
    core.cache().borrow_mut().forget(name);
    core.learned().forget(name, project);
}

/// What a fan-out leader tells the requests that waited for it.
#[derive(Debug, Clone)]
pub enum Shared {
    Found(String),
    NotFound,
    Failed(Error),
}

/// Fan-outs in flight on one core.
pub type Flights = flight::Flights<Shared>;

/// The coalescing key: name, reference and the Accept set (sorted, so the order of lines does not
/// matter).
pub fn flight_key(kind: &str, name: &str, reference: &str, headers: &HeaderMap) -> String {
    let mut accepts: Vec<&str> = headers
        .get_all(ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    accepts.sort_unstable();
    format!("{kind} {name} {reference} {}", accepts.join(","))
}

/// How to check a name during a background refresh.
#[derive(Debug, Clone)]
pub enum Probe {
    /// HEAD `manifests/<reference>`.
    Manifest(String),
    /// GET `blobs/<digest>` with `Range: bytes=0-0` (a blob HEAD is 404 in Harbor until cached).
    Blob(String),
    /// GET `tags/list`, won by a non-empty list.
    Tags,
}

/// Starts a background fan-out that refreshes `name`'s stale mapping, unless one is running.
pub fn refresh(
    core: &Rc<Core>,
    snapshot: Rc<Snapshot>,
    name: &str,
    probe: Probe,
    headers: HeaderMap,
) {
    if !core.refreshing().borrow_mut().insert(name.to_string()) {
        return;
    }
    let core = core.clone();
    let name = name.to_string();
    monoio::spawn(async move {
        let outcome = fanout::race(&core, &snapshot.projects, |p| {
            probe_attempt(
                core.clone(),
                p,
                name.clone(),
                probe.clone(),
                headers.clone(),
            )
        })
        .await;
        match outcome {
            Outcome::Found(p, ()) => learn(&core, &name, &p.name),
            // Not found anywhere (for this probe's reference) or failing: keep the mapping; it ages
            // out on its own, and a reference that is only missing must not unmap the name.
            Outcome::NotFound => {}
            Outcome::Failed(e) => {
                tracing::debug!(name, error = %e, "refresh failed; keeping the stale mapping")
            }
        }
        core.refreshing().borrow_mut().remove(&name);
    });
}

async fn probe_attempt(
    core: Rc<Core>,
    project: Project,
    name: String,
    probe: Probe,
    mut headers: HeaderMap,
) -> Verdict<()> {
    let (method, rest) = match &probe {
        Probe::Manifest(reference) => (Method::HEAD, format!("manifests/{reference}")),
        Probe::Blob(digest) => {
            headers.insert(RANGE, HeaderValue::from_static("bytes=0-0"));
            (Method::GET, format!("blobs/{digest}"))
        }
        Probe::Tags => (Method::GET, "tags/list".to_string()),
    };
    let path = forward::project_path(&project, &name, &rest);
    let res = match forward::send(&core, &project, method, path, &headers).await {
        Ok(r) => r,
        Err(e) => return Verdict::Failed(e.to_string()),
    };
    let status = res.status();
    let body = res.into_body();
    match status.as_u16() {
        200..=299 if matches!(probe, Probe::Tags) => match read_tag_list(body).await {
            Ok((_, true)) => Verdict::Win(()),
            Ok((_, false)) => Verdict::NotHere,
            Err(e) => Verdict::Failed(e),
        },
        200..=299 => Verdict::Win(()),
        // Only a blob may be redirected elsewhere (object storage).
        300..=399 if matches!(probe, Probe::Blob(_)) => Verdict::Win(()),
        _ => classify_failure(core.upstream(), status, None, body).await,
    }
}

/// Largest tag list read whole (to judge it, or to rewrite it).
pub const MAX_TAG_LIST: usize = 4 << 20;

/// Reads a tag list whole; `true` when it proves the repository is there. Harbor answers 200 with
/// its local, possibly empty, list for any name, so only a non-empty list is proof.
pub async fn read_tag_list(body: UpstreamBody) -> Result<(Bytes, bool), String> {
    let bytes = Limited::new(body, MAX_TAG_LIST)
        .collect()
        .await
        .map_err(|e| format!("tag list: {e}"))?
        .to_bytes();
    let has_tags = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|v| v.get("tags")?.as_array().map(|t| !t.is_empty()))
        .unwrap_or(false);
    Ok((bytes, has_tags))
}

/// The verdict for a non-success answer; reads small bodies so the connection can be reused.
pub async fn classify_failure<T>(
    upstream: &Upstream,
    status: http::StatusCode,
    retry_after: Option<HeaderValue>,
    body: UpstreamBody,
) -> Verdict<T> {
    let code = status.as_u16();
    if code < 500 {
        upstream.drain(body).await;
    }
    match code {
        404 => Verdict::NotHere,
        429 => Verdict::RateLimited(retry_after),
        500..=599 => Verdict::Failed(format!("Harbor answered {status}")),
        _ => Verdict::Refused,
    }
}
