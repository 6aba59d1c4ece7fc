//! Finding the project that has a pull: the coalesced fan-out. On one core the first request for a
//! key leads, the others wait for its result; the leader races the candidate projects: one attempt
//! per project whose circuit admits it, all in flight at once on this core, each bounded by
//! `RESOLVER_TIMEOUT`. What wins and how a race nobody wins ends is decided by a pure tally
//! ([`super::tally`]); this module does the IO. The attempts still running when a race is decided
//! finish off the request in a task of the core's own ([`finish_in_background`]): dropping them
//! would close every HTTP/1.1 connection with a request in flight, so each cold pull would open
//! (and, over TLS, handshake) a connection to Harbor for nearly every project asked.
//!
//! A project left out by its breaker never counts as "not here"; a project where the name would be
//! longer than the registry allows is not asked and cannot have it (none left: 400 `NAME_INVALID`).
//! Breakers learn from every attempt that got a verdict; an attempt cancelled before its verdict
//! frees its probe (the ticket is dropped).

use std::future::Future;
use std::rc::Rc;

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use http::Response;

use crate::error::Error;
use crate::flight::Turn;
use crate::metrics::labels::{self, RaceKind, RaceOutcome, Rejected, StaleReason};
use crate::snapshot::Project;
use crate::upstream::pool::UpstreamBody;

use super::ask::Ask;
use super::attempt::{self, Verdict};
use super::context::Pull;
use super::forward;
use super::outcome::{Failure, Heard};
use super::routing::{Choice, FanOutResult};
use super::state::State;
use super::tags::Tell;
pub use super::tally::Ending;
use super::tally::Tally;

/// What a race did besides its outcome.
#[derive(Debug, Clone)]
pub struct RaceInfo {
    /// Who said what, in the order they answered (projects left out by their circuit included).
    pub heard: Vec<(String, Heard)>,
    /// Projects asked.
    pub asked: usize,
    /// With `FANOUT_ORDER`: whether the winner won because a project preferred to it failed (or
    /// its circuit was open), not because that project said "not here". Such a mapping is learned
    /// for a short life, so the preferred project takes over when it recovers.
    pub choice: Choice,
}

impl Default for RaceInfo {
    fn default() -> RaceInfo {
        RaceInfo {
            heard: Vec::new(),
            asked: 0,
            choice: Choice::First,
        }
    }
}

impl RaceInfo {
    /// The projects that answered at all (not a failure): a last-known-good answer from one of them
    /// must not stand in for the others' failures.
    pub fn answered(&self) -> Vec<String> {
        self.heard
            .iter()
            .filter(|(_, h)| h.answered())
            .map(|(p, _)| p.clone())
            .collect()
    }
}

/// How a race ended.
#[derive(Debug)]
pub enum Outcome<'a> {
    /// A project has it: its answer (a policy refusal too, when nothing else won).
    Won(&'a Project, Box<Response<UpstreamBody>>),
    /// With the registry's error body when the projects that said more than "not found" agreed;
    /// `sure` unless a project said Harbor's unsure 404.
    NotFound { detail: Option<Bytes>, sure: bool },
    /// Nothing to serve: how it ended (a failure, a refusal).
    Lost(Ending),
}

impl Outcome<'_> {
    pub fn label(&self) -> RaceOutcome {
        match self {
            Outcome::Won(..) => RaceOutcome::Found,
            Outcome::NotFound { .. } => RaceOutcome::NotFound,
            Outcome::Lost(_) => RaceOutcome::Failed,
        }
    }
}

impl Ending {
    /// Whether the race's end stands for failures (a last-known-good answer may stand in), not for
    /// what projects answered.
    pub fn is_failure(&self) -> bool {
        matches!(
            self,
            Ending::Failed | Ending::RateLimited(_) | Ending::Unavailable | Ending::AllOpen
        )
    }

    /// How a stale answer standing in for this end is counted.
    pub fn stale_reason(&self) -> StaleReason {
        match self {
            Ending::RateLimited(_) => StaleReason::RateLimited,
            Ending::Unavailable | Ending::AllOpen => StaleReason::Unavailable,
            _ => StaleReason::Failed,
        }
    }

    /// The error the client gets.
    pub fn error(&self) -> Error {
        match self {
            Ending::NotFound { .. } | Ending::Policy { .. } => Error::ManifestUnknown,
            Ending::RateLimited(retry_after) => Error::TooManyRequests {
                retry_after: retry_after.clone(),
            },
            Ending::Unavailable => Error::Unavailable {
                reason: "not found in the projects asked; the others' circuits are open",
            },
            Ending::AllOpen => Error::Unavailable {
                reason: "every proxy-cache project's circuit is open",
            },
            // Harbor refused the robot (or relayed its upstream's refusal) where it may be.
            Ending::Denied { challenged } => super::mapped::denied(*challenged),
            Ending::NameTooLong => Error::NameInvalid {
                reason: "the name is too long for every proxy-cache project: with the project's prefix it exceeds the registry's 255 characters",
            },
            Ending::Failed => Error::BadGateway {
                reason: "no proxy-cache project answered: Harbor failed or timed out",
            },
        }
    }
}

/// What a client request learns from the fan-out it led or waited for.
pub enum Finding<'s> {
    /// This request led the race: the winner's answer to `ask.locator()`.
    Won(&'s Project, Box<Response<UpstreamBody>>),
    /// Another request led it: the project is known, this request sends its own.
    Known(&'s Project),
    NotFound(Option<Bytes>),
    /// Nobody won: how it ended, and the projects that answered rather than failed.
    Lost(Ending, Vec<String>),
    /// The client's fan-out budget is spent: no project was asked.
    Refused(Error),
}

/// Finds the project that has the pull on this core, coalesced by its key; learns the winner,
/// remembers a miss. Leading a fan-out costs the pull's client one unit of its fan-out budget;
/// waiting for one is free. `candidates` are the projects that may have it (all of them, or a
/// mirror request's registry's); the pull's trace counts the requests sent.
pub async fn find<'s>(
    state: &Rc<State>,
    pull: &mut Pull<'s, '_>,
    candidates: &[&'s Project],
) -> Finding<'s> {
    let (snapshot, ask, key) = (pull.snapshot, &pull.ask, pull.key.as_str());
    let locator = ask.locator();
    let mut waited = false;
    loop {
        let leader = match state.routing.join_fan_out(key) {
            Turn::Lead(leader) => leader,
            Turn::Follow(rx) => {
                if !std::mem::replace(&mut waited, true) {
                    state.metrics().coalesced.inc();
                }
                match rx.await {
                    Ok(FanOutResult::Found(p)) => match snapshot.project(&p) {
                        Some(project) => return Finding::Known(project),
                        None => return Finding::NotFound(None),
                    },
                    Ok(FanOutResult::NotFound(detail)) => return Finding::NotFound(detail),
                    Ok(FanOutResult::Lost(e, answered)) => return Finding::Lost(e, answered),
                    Err(_) => continue, // the leading request was cancelled: lead ourselves
                }
            }
        };
        if let Err(e) = state.budgets.admit_fan_out(pull.client) {
            // Dropping the lead lets a waiting request (maybe another client's) lead instead.
            drop(leader);
            state.metrics().rejected(Rejected::FanOutBudget);
            return Finding::Refused(e);
        }
        let mut info = RaceInfo::default();
        let outcome = race(state, candidates, &locator, &mut info).await;
        pull.trace.attempts += info.asked as u32;
        state.metrics().race(RaceKind::Request, outcome.label());
        return match outcome {
            Outcome::Won(project, res) => {
                state
                    .routing
                    .learn_won(&ask.mapping_key(), &project.name, info.choice);
                leader.finish(FanOutResult::Found(project.name.clone()));
                Finding::Won(project, res)
            }
            Outcome::NotFound { detail, sure: true } => {
                if ask.tag().is_some() {
                    // No project has the tag: nothing may stand in for it any more.
                    state.tags.forget_everywhere(key, Tell::OtherPods);
                }
                let ttl = state.settings.ttls.miss;
                state.routing.missed(key, detail.as_ref(), ttl);
                if !ttl.is_zero() {
                    state.remembered.remember_miss(key, detail.clone());
                }
                leader.finish(FanOutResult::NotFound(detail.clone()));
                Finding::NotFound(detail)
            }
            Outcome::NotFound {
                detail,
                sure: false,
            } => {
                // Absent, or an upstream Harbor could not ask: remembered briefly on this core,
                // never shared, and a last-known-good tag stays, unless its own project said
                // surely that the tag is gone.
                if ask.tag().is_some() {
                    forget_where_absent(state, key, &info);
                }
                state.remembered.remember_unsure_miss(key, detail.clone());
                leader.finish(FanOutResult::NotFound(detail.clone()));
                Finding::NotFound(detail)
            }
            Outcome::Lost(ending) => {
                // Before the waiters wake: they look for a last-known-good answer too.
                if ask.tag().is_some() {
                    forget_where_absent(state, key, &info);
                }
                let answered = info.answered();
                leader.finish(FanOutResult::Lost(ending.clone(), answered.clone()));
                Finding::Lost(ending, answered)
            }
        };
    }
}

/// Forgets the last-known-good answer of the tag pull `key` if its project is one that proved the
/// tag absent in this race.
fn forget_where_absent(state: &State, key: &str, info: &RaceInfo) {
    for (project, _) in info.heard.iter().filter(|(_, h)| h.proves_absence()) {
        state.tags.forget(key, project);
    }
}

/// Sends `ask` to every admitted candidate and returns the first win ([`Tally`] decides); `info`
/// says who said what and how many projects were asked. With `FANOUT_ORDER`, a win is held until
/// every project preferred to it has answered "not here" or failed (each bounded by
/// `RESOLVER_TIMEOUT`): the most preferred project that has it wins, whatever answered first.
pub async fn race<'a>(
    state: &Rc<State>,
    candidates: &[&'a Project],
    ask: &Ask,
    info: &mut RaceInfo,
) -> Outcome<'a> {
    let timeout = state.settings.resolver_timeout;
    let mut running = FuturesUnordered::new();
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
    let rank_of = |i: usize, p: &Project| state.routing.rank(&p.name).unwrap_or(usize::MAX / 2 + i);
    let mut tally = Tally::new(fitting.len(), state.routing.ordered());
    for (i, project) in fitting.iter().enumerate() {
        let rank = rank_of(i, project);
        let Some(ticket) = state.circuits.admit(&project.name, ask.lane()) else {
            tally.skip(rank);
            info.heard
                .push((project.name.clone(), Heard::Failed(Failure::CircuitOpen)));
            continue;
        };
        tally.start(i, rank);
        let (state, ask, project) = (state.clone(), shared_ask.clone(), (*project).clone());
        running.push(async move {
            let attempt = attempt::attempt(&state, &project, &ask);
            let verdict = match monoio::time::timeout(timeout, attempt).await {
                Ok(v) => v,
                Err(_) => {
                    state
                        .counters
                        .project(&project.name, |m| m.failed(labels::ErrorKind::Timeout));
                    Verdict::failed(Failure::Timeout)
                }
            };
            state
                .circuits
                .record(ticket, verdict.heard.counts_against_circuit());
            (i, verdict)
        });
    }
    info.asked = running.len();
    state.metrics().race_width(running.len());
    if let Some(ending) = tally.nothing_asked() {
        return Outcome::Lost(ending);
    }
    // The answers the tally may still take (held wins, a policy refusal), by slot.
    let mut answers: Vec<Option<Response<UpstreamBody>>> = Vec::new();
    answers.resize_with(fitting.len(), || None);
    while let Some((i, verdict)) = running.next().await {
        let Verdict {
            heard,
            answer,
            detail,
            retry_after,
        } = verdict;
        info.heard.push((fitting[i].name.clone(), heard));
        if !heard.proves_absence() {
            tracing::debug!(project = %fitting[i].name, ?heard, "fan-out attempt");
        }
        answers[i] = answer;
        let step = tally.observe(i, heard, detail, retry_after);
        if let Some(worse) = step.release.and_then(|s| answers[s].take()) {
            // The worse of two wins is read to its end in the background, and let go.
            drain_later(state, worse);
        }
        if let Some(take) = step.take {
            if take.second_choice {
                info.choice = Choice::Second;
            }
            finish_in_background(state, running);
            let res = answers[take.slot].take().expect("a win has its answer");
            return Outcome::Won(fitting[take.slot], Box::new(res));
        }
    }
    match tally.end() {
        Ending::NotFound { detail, sure } => Outcome::NotFound { detail, sure },
        Ending::Policy {
            slot,
            second_choice,
        } => match answers[slot].take() {
            Some(res) => {
                if second_choice {
                    info.choice = Choice::Second;
                }
                Outcome::Won(fitting[slot], Box::new(res))
            }
            None => Outcome::Lost(Ending::Failed),
        },
        ending => Outcome::Lost(ending),
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
    F: Future<Output = (usize, Verdict)> + 'static,
{
    let multiplexed = state.upstream.multiplexed();
    if running.is_empty() || !state.routing.take_leftovers(running.len(), multiplexed) {
        return;
    }
    let state = state.clone();
    crate::task::spawn(async move {
        while let Some((_, verdict)) = running.next().await {
            state.routing.leftover_done();
            if let Some(res) = verdict.answer {
                drain_later(&state, res);
            }
        }
    });
}

/// Reads a win nobody will serve to its end in a task of this core, so its connection is reused.
fn drain_later(state: &Rc<State>, res: Response<UpstreamBody>) {
    let state = state.clone();
    crate::task::spawn(async move { state.upstream().drain(res.into_body()).await });
}
