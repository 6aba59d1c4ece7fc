//! The pull endpoints: manifests, blobs, tag lists and referrers under `/v2/<PROXY_PROJECT>/<name>/`.
//! A pull's life is a short list of phases, each in its own module:
//! 1. [`memory`]: answer from this core's memory (manifest by digest, tag list);
//! 2. a remembered miss answers 404 at once;
//! 3. the mapping tiers (core shard, process map, Redis) give a mapping or a miss another pod found;
//!    [`mapped`]: with a mapping, one request to its project, shared with identical pulls on the
//!    core ([`super::sharing`]; a stale mapping is used, and
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
use crate::metrics::labels::{Answered, Layer, LookupResult};
use crate::registry::route::Route;
use crate::snapshot::Project;

use super::ask::{Ask, Endpoint};
use super::context::{Log, Pull};
use super::fanout::{self, Finding};
use super::mapped::{self, Mapped};
use super::mirror::{self, MirrorRequest};
use super::respond::{error, json};
use super::routing::{Freshness, Located};
use super::state::State;
use super::tags::Tell;
use super::trace::{Trace, REQUEST_ID};
use super::{answer, forward, memory, refresh, stale};

/// Serves one pull request; `trace` learns how. `mirror` says which registry a mirror request
/// names, and in which form it came. The phases, in order.
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
    let ask = Ask {
        name,
        endpoint,
        head: req.method == Method::HEAD,
        headers: forward::headers_up(&req.headers),
        root: mirror.as_ref().is_some_and(|m| m.root),
        registry: mirror.map(|m| m.registry),
    };
    // Before anything else is computed: a hit in memory costs nothing more (not even its key).
    if let Some(res) = from_memory(state, &ask, &req.headers) {
        trace.route = Answered::Memory;
        return res;
    }
    let mut pull = Pull {
        key: ask.key(),
        ask,
        snapshot: &snapshot,
        client,
        trace,
        log: Log::default(),
    };
    if let Some(res) = remembered_miss(state, &mut pull) {
        return res;
    }
    if let Some(res) = unmirrored(&pull) {
        return res;
    }
    // From here on the pull may go to Harbor: the request id goes with it.
    pull.ask.headers.insert(REQUEST_ID, pull.trace.id.clone());
    let res = ask_harbor(state, &mut pull).await;
    settle(state, &mut pull, res).await
}

/// Phase 1: a manifest by digest or a tag list this core keeps.
fn from_memory(state: &State, ask: &Ask, headers: &http::HeaderMap) -> Option<Response<Body>> {
    if !ask.kept_in_memory() {
        return None;
    }
    let metrics = state.metrics();
    let res = memory::answer(&state.remembered, ask, headers);
    metrics.lookup(
        Layer::Memory,
        if res.is_some() {
            LookupResult::Hit
        } else {
            LookupResult::Miss
        },
    );
    res
}

/// Phase 2: a miss this core remembers answers 404 at once.
fn remembered_miss(state: &State, pull: &mut Pull) -> Option<Response<Body>> {
    let detail = state.remembered.miss(&pull.key)?;
    state.metrics().lookup(Layer::Core, LookupResult::Negative);
    pull.trace.route = Answered::Negative;
    Some(not_found(&pull.ask, detail))
}

/// Phase 3: a mirror request for a registry no project mirrors.
fn unmirrored(pull: &Pull) -> Option<Response<Body>> {
    let host = pull.ask.registry.as_deref()?;
    (!mirror::mirrored(pull.snapshot, host)).then(|| {
        error(&Error::RegistryUnknown {
            host: host.to_string(),
        })
    })
}

/// Phase 6: for a tag, remember what it resolved to; or, when every project that could confirm it
/// failed, answer with what it last resolved to.
async fn settle(state: &Rc<State>, pull: &mut Pull<'_, '_>, res: Response<Body>) -> Response<Body> {
    if pull.ask.tag().is_none() || !state.tags.enabled() {
        return res;
    }
    let res = match pull.log.by {
        Some(project) => stale::remember(state, pull, project, res),
        None => res,
    };
    if let Some(why) = pull.log.failure {
        if let Some(stale) = stale::answer(state, pull, why).await {
            return stale;
        }
    }
    res
}

/// Phases 4 and 5: the mapped project's answer, else the fan-out's; the log learns who said what.
async fn ask_harbor(state: &Rc<State>, pull: &mut Pull<'_, '_>) -> Response<Body> {
    let snapshot = pull.snapshot;
    let ask = &pull.ask;
    match state
        .routing
        .lookup(snapshot, &ask.mapping_key(), &pull.key)
        .await
    {
        Located::Missing { detail, until } => {
            // Another pod found it missing: remembered here for the rest of its life there.
            state
                .remembered
                .remember_miss_until(&pull.key, detail.clone(), until);
            pull.trace.route = Answered::Negative;
            if ask.tag().is_some() {
                state.tags.forget_everywhere(&pull.key, Tell::ThisPod);
            }
            return not_found(ask, detail);
        }
        // A mirror request's mapping (keyed by registry) must still point into its registry.
        Located::Mapped { project, .. }
            if ask
                .registry
                .as_deref()
                .is_some_and(|host| !mirror::serves(snapshot, project, host)) => {}
        Located::Mapped { project, freshness } => {
            if freshness == Freshness::Stale {
                refresh::start(state, snapshot.clone(), ask);
            }
            pull.trace.route = Answered::Mapped;
            pull.trace.project(&project.name);
            if let Some(res) = ask_mapped(state, pull, project).await {
                return res;
            }
            pull.trace.project = None;
            tracing::debug!(name = pull.ask.name, project = %project.name, "mapped project answered 404; asking every project")
        }
        Located::Unknown => {}
    }
    pull.trace.route = Answered::FanOut;
    let candidates = mirror::asked(snapshot, &pull.ask, state.mirror_gap_logged());
    match fanout::find(state, pull, &candidates).await {
        // The race found the subject manifest of a referrers request: now ask for the referrers.
        Finding::Won(project, _) | Finding::Known(project)
            if matches!(pull.ask.endpoint, Endpoint::Referrers { .. }) =>
        {
            pull.trace.project(&project.name);
            answer_mapped(state, pull, project).await
        }
        Finding::Won(project, res) => {
            pull.trace.project(&project.name);
            pull.log.by = Some(project);
            let res = answer::answer(state, project, &pull.ask, *res).await;
            mapped::keep_won(state, project, &pull.ask, &pull.key, res).await
        }
        Finding::Known(project) => {
            pull.trace.project(&project.name);
            answer_mapped(state, pull, project).await
        }
        Finding::NotFound(detail) => not_found(&pull.ask, detail),
        Finding::Refused(e) => {
            // Refused before any project was asked (the client's fan-out budget).
            pull.trace.route = Answered::Refused;
            error(&e)
        }
        Finding::Lost(ending, answered) => {
            if ending.is_failure() {
                pull.log.failure = Some(ending.stale_reason());
            }
            pull.log.answered = answered;
            error(&ending.error())
        }
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
    state: &Rc<State>,
    pull: &mut Pull<'s, '_>,
    project: &'s Project,
) -> Response<Body> {
    ask_mapped(state, pull, project)
        .await
        .unwrap_or_else(|| error(&pull.ask.endpoint.not_found()))
}

/// What `project`, asked for this pull alone, said, told to the log: its answer, or `None` when it
/// said 404 (it counts as having answered, and a tag it last resolved is forgotten unless the 404
/// was Harbor's unsure one).
async fn ask_mapped<'s>(
    state: &Rc<State>,
    pull: &mut Pull<'s, '_>,
    project: &'s Project,
) -> Option<Response<Body>> {
    match mapped::shared(
        state,
        project,
        &pull.ask,
        &pull.key,
        &mut pull.trace.attempts,
    )
    .await
    {
        Mapped::Answer(res) => {
            pull.log.by = Some(project);
            Some(*res)
        }
        Mapped::Failed(res, heard) => {
            pull.log.failure = Some(heard.stale_reason());
            Some(*res)
        }
        Mapped::Gone { sure } => {
            if pull.ask.tag().is_some() {
                if sure {
                    state.tags.forget(&pull.key, &project.name);
                }
                pull.log.answered.push(project.name.clone());
            }
            None
        }
    }
}
