//! Finding the project that has a pull: the coalesced fan-out. On one core the first request for a
//! key leads, the others wait for its result; the leader races the candidate projects: one attempt
//! per project whose circuit admits it, all in flight at once on this core, each bounded by
//! `RESOLVER_TIMEOUT`. The first attempt that wins ends the race; the others finish off the request,
//! in a task of the core's own ([`finish_in_background`]): dropping them would close every HTTP/1.1
//! connection with a request in flight, so each cold pull would open (and, over TLS, handshake) a
//! connection to Harbor for nearly every project asked.
//!
//! The verdicts of the attempts that finished decide a race nobody won: every project said "not
//! here" → not found (negative-cacheable; with the registry's own error when the projects that said
//! more than "not found" agree, such as "OCI index found, but accept header does not support OCI
//! indexes"); a project refused it by policy (412) → that answer, as Harbor sent it (the project
//! has the image: it is learned); some were rate-limited → 429 with Harbor's `Retry-After` (or the
//! router's); some failed → 502; some were left out by their breaker → 503; Harbor refused the
//! router's credentials for some (and the others said "not here") → 403 `DENIED`, which is an
//! answer, not a failure, and never a remembered miss. A project left
//! out by its breaker never counts as "not here"; a project where the name would be longer than the
//! registry allows is not asked and cannot have it (none left: 400 `NAME_INVALID`). Breakers learn
//! from every attempt that got a verdict; an attempt cancelled before its verdict frees its probe
//! (the ticket is dropped).

use std::future::Future;
use std::net::IpAddr;
use std::rc::Rc;

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use http::Response;

use crate::error::Error;
use crate::flight::Turn;
use crate::metrics::labels::{self, RaceKind, RaceOutcome, Rejected};
use crate::snapshot::{Project, Snapshot};
use crate::upstream::pool::UpstreamBody;

use super::ask::Ask;
use super::attempt::{self, Verdict};
use super::forward;
use super::state::{FanOutResult, State};

/// What a race did besides its outcome.
#[derive(Debug, Default, Clone)]
pub struct RaceInfo {
    /// For a tag: the projects that answered "not here" (the tag is forgotten where it last
    /// resolved in one of them).
    pub not_here: Vec<String>,
    /// For a tag: the projects that answered at all ("not here", or 401, 403, 500: not a failure). A
    /// last-known-good answer from one of them must not stand in for the others' failures.
    pub answered: Vec<String>,
    /// Projects asked.
    pub asked: usize,
    /// With `FANOUT_ORDER`: the winner won because a project preferred to it failed (or its
    /// circuit was open), not because that project said "not here". Such a mapping is learned for
    /// a short life, so the preferred project takes over when it recovers.
    pub second_choice: bool,
}

/// How a race ended.
#[derive(Debug)]
pub enum Outcome<'a> {
    Won(&'a Project, Box<Response<UpstreamBody>>),
    /// With the registry's error body when the projects that said more than "not found" agreed.
    NotFound(Option<Bytes>),
    Failed(Error),
}

impl Outcome<'_> {
    pub fn label(&self) -> RaceOutcome {
        match self {
            Outcome::Won(..) => RaceOutcome::Found,
            Outcome::NotFound(_) => RaceOutcome::NotFound,
            Outcome::Failed(_) => RaceOutcome::Failed,
        }
    }
}

/// What a client request learns from the fan-out it led or waited for.
pub enum Found<'s> {
    /// This request led the race: the winner's answer to `ask.locator()`.
    Won(&'s Project, Box<Response<UpstreamBody>>),
    /// Another request led it: the project is known, this request sends its own.
    Known(&'s Project),
    NotFound(Option<Bytes>),
    /// With the projects that answered rather than failed (for a tag; see [`RaceInfo::answered`]).
    Failed(Error, Vec<String>),
}

/// Finds the project that has `ask` on this core, coalesced by `key`; learns the winner, remembers
/// a miss. Leading a fan-out costs `client` one unit of its fan-out budget; waiting for one is free.
/// `candidates` are the projects that may have it (all of them, or a mirror request's registry's);
/// `attempts` counts the requests sent (for the access log).
#[allow(clippy::too_many_arguments)]
pub async fn find<'s>(
    state: &Rc<State>,
    snapshot: &'s Snapshot,
    candidates: &[&'s Project],
    ask: &Ask,
    key: &str,
    client: IpAddr,
    attempts: &mut u32,
) -> Found<'s> {
    let locator = ask.locator();
    let mut waited = false;
    loop {
        let leader = match state.join_fan_out(key) {
            Turn::Lead(leader) => leader,
            Turn::Follow(rx) => {
                if !std::mem::replace(&mut waited, true) {
                    state.metrics().coalesced.inc();
                }
                match rx.await {
                    Ok(FanOutResult::Found(p)) => match snapshot.project(&p) {
                        Some(project) => return Found::Known(project),
                        None => return Found::NotFound(None),
                    },
                    Ok(FanOutResult::NotFound(detail)) => return Found::NotFound(detail),
                    Ok(FanOutResult::Failed(e, answered)) => return Found::Failed(e, answered),
                    Err(_) => continue, // the leading request was cancelled: lead ourselves
                }
            }
        };
        if let Err(e) = state.admit_fan_out(client) {
            // Dropping the lead lets a waiting request (maybe another client's) lead instead.
            drop(leader);
            state.metrics().rejected(Rejected::FanOutBudget);
            return Found::Failed(e, Vec::new());
        }
        let mut info = RaceInfo::default();
        let outcome = race(state, candidates, &locator, &mut info).await;
        *attempts += info.asked as u32;
        state.metrics().race(RaceKind::Request, outcome.label());
        return match outcome {
            Outcome::Won(project, res) => {
                state.learn_won(&ask.mapping_key(), &project.name, info.second_choice);
                leader.finish(FanOutResult::Found(project.name.clone()));
                Found::Won(project, res)
            }
            Outcome::NotFound(detail) => {
                if ask.tag().is_some() {
                    // No project has the tag: nothing may stand in for it any more.
                    state.forget_tag_everywhere(key, true);
                }
                state.remember_miss(key, detail.clone());
                leader.finish(FanOutResult::NotFound(detail.clone()));
                Found::NotFound(detail)
            }
            Outcome::Failed(e) => {
                // Before the waiters wake: they look for a last-known-good answer too.
                for project in &info.not_here {
                    state.forget_tag(key, project);
                }
                leader.finish(FanOutResult::Failed(e.clone(), info.answered.clone()));
                Found::Failed(e, info.answered)
            }
        };
    }
}

/// Sends `ask` to every admitted candidate and returns the first win; `info` says the number
/// of projects asked. With `FANOUT_ORDER`, a win is held until every project preferred to it has
/// answered "not here" or failed (each bounded by `RESOLVER_TIMEOUT`): the most preferred project
/// that has it wins, whatever answered first.
pub async fn race<'a>(
    state: &Rc<State>,
    candidates: &[&'a Project],
    ask: &Ask,
    info: &mut RaceInfo,
) -> Outcome<'a> {
    let timeout = state.resolver_timeout();
    let mut running = FuturesUnordered::new();
    let mut skipped = false;
    let fitting: Vec<&'a Project> = candidates
        .iter()
        .copied()
        .filter(|p| forward::fits(p, &ask.name))
        .collect();
    let repositories = fitting
        .iter()
        .map(|p| format!("{}/{}", p.name, forward::project_name(p, &ask.name)));
    state
        .upstream()
        .prefetch_tokens(repositories, timeout)
        .await;
    // The attempts own what they use, so those still running when the race is decided can finish
    // in the background.
    let shared_ask = Rc::new(ask.clone());
    // Ranks: FANOUT_ORDER's position; unlisted projects after it, by name (the candidates' order).
    let rank_of = |i: usize, p: &Project| state.fanout_rank(&p.name).unwrap_or(usize::MAX / 2 + i);
    let ordered = state.fanout_ordered();
    // Ranks of the projects that cannot answer (circuit open) or failed: a win ranked below one of
    // them is a second choice.
    let mut unavailable: Vec<usize> = Vec::new();
    let mut pending: Vec<usize> = Vec::new();
    for (i, project) in fitting.iter().enumerate() {
        let rank = rank_of(i, project);
        let Some(ticket) = state.admit(&project.name, ask.lane()) else {
            // A project left out cannot say "not here": the outcome can no longer be NotFound.
            skipped = true;
            unavailable.push(rank);
            continue;
        };
        pending.push(rank);
        let (state, ask, project) = (state.clone(), shared_ask.clone(), (*project).clone());
        running.push(async move {
            let attempt = attempt::attempt(&state, &project, &ask);
            let verdict = match monoio::time::timeout(timeout, attempt).await {
                Ok(v) => v,
                Err(_) => {
                    state.project_metrics(&project.name, |m| {
                        m.failed(labels::UpstreamError::Timeout)
                    });
                    Verdict::Failed(format!("no answer within RESOLVER_TIMEOUT ({timeout:?})"))
                }
            };
            state.record(ticket, verdict.is_failure());
            (i, rank, verdict)
        });
    }
    info.asked = running.len();
    state.metrics().race_width(running.len());
    if running.is_empty() && !skipped {
        return Outcome::Failed(Error::NameInvalid {
            reason: "the name is too long for every proxy-cache project: with the project's prefix it exceeds the registry's 255 characters",
        });
    }
    if running.is_empty() {
        return Outcome::Failed(Error::Unavailable {
            reason: "every proxy-cache project's circuit is open",
        });
    }
    let mut all_not_here = !skipped;
    // The telling 404 bodies: passed on only when they agree.
    let mut detail: Option<Bytes> = None;
    let mut details_agree = true;
    let mut retry_after = None;
    let mut rate_limited = false;
    let mut failed = false;
    let mut denied = false;
    // A policy refusal (412): the project has it; passed on if nothing wins.
    let mut policy: Option<(&'a Project, Response<UpstreamBody>)> = None;
    // With FANOUT_ORDER: the best win so far, held until nothing better can come.
    let mut held: Option<(usize, &'a Project, Response<UpstreamBody>)> = None;
    let tag = ask.tag().is_some();
    while let Some((i, rank, verdict)) = running.next().await {
        let project = fitting[i];
        pending.retain(|r| *r != rank);
        if tag {
            match verdict {
                Verdict::NotHere(_) => {
                    info.not_here.push(project.name.clone());
                    info.answered.push(project.name.clone());
                }
                Verdict::Refused | Verdict::Denied | Verdict::Policy(_) => {
                    info.answered.push(project.name.clone())
                }
                _ => {}
            }
        }
        match verdict {
            Verdict::Win(res) if !ordered => {
                finish_in_background(state, running);
                return Outcome::Won(project, Box::new(res));
            }
            Verdict::Win(res) => {
                // The worse of two wins is read to its end in the background, and let go.
                if held.as_ref().is_none_or(|(r, _, _)| rank < *r) {
                    if let Some((_, _, worse)) = held.replace((rank, project, res)) {
                        drain_later(state, worse);
                    }
                } else {
                    drain_later(state, res);
                }
            }
            Verdict::NotHere(Some(body)) => match &detail {
                None => detail = Some(body),
                Some(d) => details_agree &= *d == body,
            },
            Verdict::NotHere(None) => {}
            Verdict::RateLimited(h) => {
                all_not_here = false;
                rate_limited = true;
                retry_after = retry_after.or(h);
                unavailable.push(rank);
            }
            Verdict::Refused => {
                all_not_here = false;
                unavailable.push(rank);
            }
            Verdict::Denied => {
                all_not_here = false;
                denied = true;
                unavailable.push(rank);
            }
            Verdict::Policy(res) => {
                all_not_here = false;
                unavailable.push(rank);
                if policy.is_none() {
                    policy = Some((project, res));
                }
            }
            Verdict::Failed(why) => {
                all_not_here = false;
                failed = true;
                unavailable.push(rank);
                tracing::debug!(project = %project.name, why, "fan-out attempt failed");
            }
        }
        if let Some((best, _, _)) = &held {
            if pending.iter().all(|r| r > best) {
                let (best, project, res) = held.take().expect("held");
                info.second_choice = unavailable.iter().any(|r| *r < best);
                finish_in_background(state, running);
                return Outcome::Won(project, Box::new(res));
            }
        }
    }
    if all_not_here {
        Outcome::NotFound(detail.filter(|_| details_agree))
    } else if let Some((project, res)) = policy {
        Outcome::Won(project, Box::new(res))
    } else if rate_limited {
        Outcome::Failed(Error::TooManyRequests { retry_after })
    } else if skipped && !failed {
        Outcome::Failed(Error::Unavailable {
            reason: "not found in the projects asked; the others' circuits are open",
        })
    } else if denied && !failed {
        // An answer: Harbor refused the robot where the image may be. Not a miss, not a failure.
        Outcome::Failed(super::mapped::denied(true))
    } else {
        Outcome::Failed(Error::BadGateway {
            reason: "no proxy-cache project answered: Harbor failed or timed out",
        })
    }
}

/// Lets the attempts still running when a race is decided finish in a task of this core: each is
/// bounded by `RESOLVER_TIMEOUT` and records its verdict (so a project that hangs while others win
/// still opens its circuit), and each answer is read to its end, so its HTTP/1.1 connection goes
/// back to the pool instead of being closed. A second win's body is drained the same way (a small
/// body, within `UPSTREAM_RESPONSE_TIMEOUT`; a large one is dropped with its connection). At most
/// `MAX_IDLE_CONNS_PER_HOST` attempts per core finish this way, and none over HTTP/2: past that,
/// or there, they are dropped (cancelled) as the race ends.
fn finish_in_background<F>(state: &Rc<State>, mut running: FuturesUnordered<F>)
where
    F: Future<Output = (usize, usize, Verdict<Response<UpstreamBody>>)> + 'static,
{
    if running.is_empty() || !state.take_leftovers(running.len()) {
        return;
    }
    let state = state.clone();
    monoio::spawn(async move {
        while let Some((_, _, verdict)) = running.next().await {
            state.leftover_done();
            if let Verdict::Win(res) = verdict {
                drain_later(&state, res);
            }
        }
    });
}

/// Reads a win nobody will serve to its end in a task of this core, so its connection is reused.
fn drain_later(state: &Rc<State>, res: Response<UpstreamBody>) {
    let state = state.clone();
    monoio::spawn(async move { state.upstream().drain(res.into_body()).await });
}
