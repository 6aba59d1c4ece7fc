//! The pull endpoints: manifests, blobs, tag lists and referrers under `/v2/<PROXY_PROJECT>/<name>/`.
//! A pull's life is a short list of phases, each in its own module:
//! 1. [`memory`]: answer from this core's memory (manifest by digest, tag list);
//! 2. a remembered miss answers 404 at once;
//! 3. the mapping tiers (core shard, process map, Redis) give a mapping or a miss another pod found;
//!    [`mapped`]: with a mapping, one request to its project (a stale mapping is used, and
//!    [`refresh`]ed in the background); a 404 there falls through to
//! 4. [`fanout`]: race the candidate projects (coalesced per core), learn the winner;
//! 5. [`answer`]: translate the winner's answer for the client;
//! 6. for a tag: remember what it resolved to, or, when every project that could confirm it failed,
//!    answer with what it last resolved to ([`stale`]).
//!
//! The mapping moves when a fan-out after a mapped 404 finds another project, and stays otherwise
//! (a missing tag of a mapped image must not cost every later pull a fan-out).

use std::net::IpAddr;
use std::rc::Rc;

use http::request::Parts;
use http::{Method, Response};

use crate::body::Body;
use crate::error::Error;
use crate::metrics::labels::{Found as Seen, Layer, Route as Answered};
use crate::registry::route::Route;
use crate::snapshot::{Project, Snapshot};

use super::ask::{Ask, Endpoint};
use super::fanout::{self, Found};
use super::mapped::{self, Mapped};
use super::mirror::{self, MirrorRequest};
use super::respond::{error, json};
use super::state::{Lookup, State};
use super::trace::{Trace, REQUEST_ID};
use super::{answer, forward, memory, refresh, stale};

/// Serves one pull request; `trace` learns how. `mirror` says which registry a mirror request
/// names, and in which form it came.
pub async fn serve(
    state: &Rc<State>,
    req: &Parts,
    route: &Route<'_>,
    client: IpAddr,
    mirror: Option<MirrorRequest>,
    trace: &mut Trace,
) -> Response<Body> {
    let Some((name, endpoint)) = Endpoint::of(route, req.uri.query()) else {
        return error(&Error::NameUnknown {
            detail: "unknown registry endpoint",
        });
    };
    let Some(snapshot) = state.view().filter(|s| !s.projects.is_empty()) else {
        return error(&Error::Unavailable {
            reason: "no proxy-cache project is known yet: Harbor discovery has not succeeded",
        });
    };
    let mut ask = Ask {
        name,
        endpoint,
        head: req.method == Method::HEAD,
        headers: forward::headers_up(&req.headers),
        root: mirror.as_ref().is_some_and(|m| m.root),
        registry: mirror.map(|m| m.registry),
    };
    let now = state.now();
    let metrics = state.metrics();
    if ask.kept_in_memory() {
        if let Some(res) = memory::answer(state, &ask, &req.headers, now) {
            metrics.lookup(Layer::Memory, Seen::Hit);
            trace.route = Answered::Memory;
            return res;
        }
        metrics.lookup(Layer::Memory, Seen::Miss);
    }
    let key = ask.key();
    if let Some(detail) = state.miss(&key, now) {
        metrics.lookup(Layer::Core, Seen::Negative);
        trace.route = Answered::Negative;
        return not_found(&ask, detail);
    }
    if let Some(host) = ask.registry.as_deref() {
        if !mirror::mirrored(&snapshot, host) {
            return error(&Error::RegistryUnknown {
                host: host.to_string(),
            });
        }
    }
    // From here on the pull may go to Harbor: the request id goes with it.
    ask.headers.insert(REQUEST_ID, trace.id.clone());
    let mut said = Said::default();
    let res = ask_harbor(state, &snapshot, &ask, &key, client, trace, &mut said).await;
    if ask.tag().is_none() || !state.stale_if_error() {
        return res;
    }
    if let Some(project) = said.by {
        stale::remember(state, &key, project, &res);
    }
    // Every project that could confirm the tag failed, by the judge's rules.
    if said.failed {
        let why = stale::failure(res.status());
        if let Some(stale) =
            stale::answer(state, &snapshot, &ask, &key, why, &said.answered, trace).await
        {
            return stale;
        }
    }
    res
}

/// What the projects asked for a pull said, beyond the answer itself.
#[derive(Default)]
struct Said<'s> {
    /// The project whose answer this is (a 2xx, or what the mapped project said).
    by: Option<&'s Project>,
    /// The answer stands for a failure by the judge's rules (no answer in time, 502–504, 429, open
    /// circuits), not for anything a project answered, nor the router refusing the client.
    failed: bool,
    /// For a tag: the projects that answered (404, 401, 403, 500…) rather than failed.
    answered: Vec<String>,
}

/// The mapped project's answer, else the fan-out's; `said` learns who said what.
async fn ask_harbor<'s>(
    state: &Rc<State>,
    snapshot: &'s Rc<Snapshot>,
    ask: &Ask,
    key: &str,
    client: IpAddr,
    trace: &mut Trace,
    said: &mut Said<'s>,
) -> Response<Body> {
    let now = state.now();
    match state.lookup(snapshot, &ask.mapping_key(), key, now).await {
        Lookup::Missing(detail) => {
            trace.route = Answered::Negative;
            if ask.tag().is_some() {
                state.forget_tag_everywhere(key, false);
            }
            return not_found(ask, detail);
        }
        // A mirror request's mapping (keyed by registry) must still point into its registry.
        Lookup::Mapped(project, _)
            if ask
                .registry
                .as_deref()
                .is_some_and(|host| !mirror::serves(snapshot, project, host)) => {}
        Lookup::Mapped(project, stale) => {
            if stale {
                refresh::start(state, snapshot.clone(), ask);
            }
            trace.route = Answered::Mapped;
            trace.project(&project.name);
            let mapped = mapped::request(state, project, ask, &mut trace.attempts).await;
            if let Some(res) = heard(state, ask, key, project, mapped, said) {
                return res;
            }
            trace.project = None;
            tracing::debug!(name = ask.name, project = %project.name, "mapped project answered 404; asking every project")
        }
        Lookup::Unknown => {}
    }
    trace.route = Answered::FanOut;
    let candidates = candidates(state, snapshot, ask);
    let found = fanout::find(
        state,
        snapshot,
        &candidates,
        ask,
        key,
        client,
        &mut trace.attempts,
    );
    match found.await {
        // The race found the subject manifest of a referrers request: now ask for the referrers.
        Found::Won(project, _) | Found::Known(project)
            if matches!(ask.endpoint, Endpoint::Referrers { .. }) =>
        {
            trace.project(&project.name);
            answer_mapped(state, project, ask, key, &mut trace.attempts, said).await
        }
        Found::Won(project, res) => {
            trace.project(&project.name);
            said.by = Some(project);
            answer::answer(state, project, ask, *res).await
        }
        Found::Known(project) => {
            trace.project(&project.name);
            answer_mapped(state, project, ask, key, &mut trace.attempts, said).await
        }
        Found::NotFound(detail) => not_found(ask, detail),
        Found::Failed(e @ Error::ClientRateLimited { .. }, _) => {
            // Refused before any project was asked (the client's fan-out budget).
            trace.route = Answered::Refused;
            error(&e)
        }
        // Harbor refused the router's credentials: an answer, not a failure (nothing stands in).
        Found::Failed(e @ Error::Denied { .. }, _) => error(&e),
        Found::Failed(e, answered) => {
            said.failed = true;
            said.answered = answered;
            error(&e)
        }
    }
}

/// The projects that may have `ask`: every one, or for a mirror request those of its registry.
pub fn candidates<'s>(state: &State, snapshot: &'s Snapshot, ask: &Ask) -> Vec<&'s Project> {
    match &ask.registry {
        None => snapshot.projects.iter().collect(),
        Some(host) => mirror::candidates(snapshot, host, state.mirror_gap_logged()),
    }
}

/// 404: the registry's own error when the projects agreed on one that says more, else the router's.
fn not_found(ask: &Ask, detail: Option<bytes::Bytes>) -> Response<Body> {
    match detail {
        Some(body) => json(http::StatusCode::NOT_FOUND, body),
        None => error(&ask.endpoint.not_found()),
    }
}

/// The answer of a project found by a fan-out, asked again for this request.
async fn answer_mapped<'s>(
    state: &State,
    project: &'s Project,
    ask: &Ask,
    key: &str,
    attempts: &mut u32,
    said: &mut Said<'s>,
) -> Response<Body> {
    let mapped = mapped::request(state, project, ask, attempts).await;
    heard(state, ask, key, project, mapped, said)
        .unwrap_or_else(|| error(&ask.endpoint.not_found()))
}

/// What `project`, asked for the pull `key` alone, said, told to `said`: its answer, or `None` when
/// it said 404 (a tag it last resolved is forgotten, and it counts as having answered).
fn heard<'s>(
    state: &State,
    ask: &Ask,
    key: &str,
    project: &'s Project,
    mapped: Mapped,
    said: &mut Said<'s>,
) -> Option<Response<Body>> {
    match mapped {
        Mapped::Answer(res) => {
            said.by = Some(project);
            Some(*res)
        }
        Mapped::Failed(res) => {
            said.failed = true;
            Some(*res)
        }
        Mapped::Gone => {
            if ask.tag().is_some() {
                state.forget_tag(key, &project.name);
                said.answered.push(project.name.clone());
            }
            None
        }
    }
}
