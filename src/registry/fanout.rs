//! Racing the candidate projects: one attempt per project whose circuit admits it, all in flight at
//! once on this core, each bounded by `RESOLVER_TIMEOUT`. The first attempt that wins ends the race;
//! the others are dropped, which cancels their requests (an HTTP/1.1 connection with a request in
//! flight is closed, never returned to the pool; on HTTP/2 only the stream is reset).
//!
//! The verdicts of the attempts that finished decide a race nobody won: every project said "not
//! here" → not found (negative-cacheable); some were rate-limited → 429 with Harbor's `Retry-After`;
//! some were left out by their breaker and no other failed → 503; otherwise → 502. A project left
//! out never counts as "not here". Breakers learn from every attempt: a timeout, a connection error or a 5xx is a
//! failure; any other answer is a success; an attempt cancelled before its verdict frees its probe.

use std::future::Future;
use std::rc::Rc;
use std::time::Instant;

use futures_util::stream::{FuturesUnordered, StreamExt};
use http::HeaderValue;

use crate::core::Core;
use crate::error::Error;
use crate::snapshot::Project;
use crate::upstream::breaker::Admission;

/// What one attempt found in one project.
#[derive(Debug)]
pub enum Verdict<T> {
    Win(T),
    /// The project does not have it (404, or a tag list that proves nothing).
    NotHere,
    /// 429 from Harbor, with its `Retry-After`.
    RateLimited(Option<HeaderValue>),
    /// An answer that is neither a win nor "not here" (401/403, another 4xx): not a breaker failure.
    Refused,
    /// Timeout, connection error, 5xx: a breaker failure.
    Failed(String),
}

/// How a race ended.
#[derive(Debug)]
pub enum Outcome<T> {
    Found(Project, T),
    NotFound,
    Failed(Error),
}

/// Runs `attempt` for every admitted candidate and returns the first win.
pub async fn race<T, F, Fut>(core: &Rc<Core>, candidates: &[Project], attempt: F) -> Outcome<T>
where
    F: Fn(Project) -> Fut,
    Fut: Future<Output = Verdict<T>>,
{
    let now = Instant::now();
    let timeout = core.config().resolver_timeout;
    let mut running = FuturesUnordered::new();
    let mut skipped = false;
    for project in candidates {
        let admission = core.breakers().borrow_mut().get(&project.name).admit(now);
        if admission == Admission::Rejected {
            // A project left out cannot say "not here": the outcome can no longer be NotFound.
            skipped = true;
            continue;
        }
        let guard = ProbeGuard::new(core, &project.name, admission);
        let fut = attempt(project.clone());
        let project = project.clone();
        running.push(async move {
            let mut guard = guard;
            let verdict = match monoio::time::timeout(timeout, fut).await {
                Ok(v) => v,
                Err(_) => {
                    Verdict::Failed(format!("no answer within RESOLVER_TIMEOUT ({timeout:?})"))
                }
            };
            guard.record(matches!(verdict, Verdict::Failed(_)));
            (project, verdict)
        });
    }
    if running.is_empty() {
        return Outcome::Failed(Error::Unavailable {
            reason: "every proxy-cache project's circuit is open",
        });
    }
    let mut all_not_here = !skipped;
    let mut retry_after = None;
    let mut rate_limited = false;
    let mut failed = false;
    while let Some((project, verdict)) = running.next().await {
        match verdict {
            Verdict::Win(t) => return Outcome::Found(project, t),
            Verdict::NotHere => {}
            Verdict::RateLimited(h) => {
                all_not_here = false;
                rate_limited = true;
                retry_after = retry_after.or(h);
            }
            Verdict::Refused => all_not_here = false,
            Verdict::Failed(why) => {
                all_not_here = false;
                failed = true;
                tracing::debug!(project = %project.name, why, "fan-out attempt failed");
            }
        }
    }
    if all_not_here {
        Outcome::NotFound
    } else if rate_limited {
        Outcome::Failed(Error::TooManyRequests { retry_after })
    } else if skipped && !failed {
        Outcome::Failed(Error::Unavailable {
            reason: "not found in the projects asked; the others' circuits are open",
        })
    } else {
        Outcome::Failed(Error::BadGateway {
            reason: "no proxy-cache project answered: Harbor failed or timed out",
        })
    }
}

/// Records a request's outcome in its project's breaker; dropped without one (the request lost a race
/// or its client went away), it frees a half-open probe so the next request can probe.
pub struct ProbeGuard {
    core: Rc<Core>,
    project: String,
    armed: bool,
}

impl ProbeGuard {
    pub fn new(core: &Rc<Core>, project: &str, admission: Admission) -> ProbeGuard {
        ProbeGuard {
            core: core.clone(),
            project: project.to_string(),
            armed: admission == Admission::Probe,
        }
    }

    pub fn record(&mut self, failed: bool) {
        self.armed = false;
        record(&self.core, &self.project, failed);
    }
}

impl Drop for ProbeGuard {
    fn drop(&mut self) {
        if self.armed {
            self.core
                .breakers()
                .borrow_mut()
                .get(&self.project)
                .on_abandoned();
        }
    }
}

/// Tells `project`'s breaker how a request went.
pub fn record(core: &Core, project: &str, failed: bool) {
    let mut breakers = core.breakers().borrow_mut();
    let b = breakers.get(project);
    let was = b.state_name();
    if failed {
        b.on_failure(Instant::now());
    } else {
        b.on_success();
    }
    match (was, b.state_name()) {
        ("closed", "open") => {
            tracing::warn!(
                project,
                "circuit opened: the project is left out until it recovers"
            )
        }
        ("half-open", "open") => tracing::warn!(project, "circuit probe failed: still open"),
        ("half-open", "closed") => tracing::info!(project, "circuit closed: the project recovered"),
        _ => {}
    }
}
