//! The mapped request: a pull whose project is known goes to that project alone. Its answer is
//! judged like any attempt (the breaker counts the same failures); a 404 means the image may have
//! moved, and the caller falls back to one fan-out.

use http::Response;

use crate::body::Body;
use crate::error::Error;
use crate::metrics::labels::UpstreamError as UpstreamErrorKind;
use crate::snapshot::Project;
use crate::upstream::UpstreamError;

use super::answer;
use super::ask::Ask;
use super::attempt::{self, Judgement};
use super::respond::error;
use super::state::State;

/// A mapped request's result.
pub enum Mapped {
    Answer(Box<Response<Body>>),
    /// The mapped project answered 404.
    Gone,
}

/// Sends `ask` to `project` and answers with what it said; `attempts` counts the request when it
/// is sent (not when the project's circuit is open). A tag lookup waits at most `RESOLVER_TIMEOUT`
/// for the answer's head, as a fan-out attempt does: past it, a last-known-good answer can stand in.
pub async fn request(state: &State, project: &Project, ask: &Ask, attempts: &mut u32) -> Mapped {
    let Some(ticket) = state.admit(&project.name, ask.lane()) else {
        return answered(error(&Error::Unavailable {
            reason: "the project that has this image is failing; its circuit is open",
        }));
    };
    *attempts += 1;
    let sent = if ask.tag().is_some() {
        let limit = state.resolver_timeout();
        monoio::time::timeout(limit, attempt::send(state, project, ask))
            .await
            .unwrap_or_else(|_| {
                state.project_metrics(&project.name, |m| m.failed(UpstreamErrorKind::Timeout));
                Err(UpstreamError::ResponseTimeout(limit))
            })
    } else {
        attempt::send(state, project, ask).await
    };
    let res = match sent {
        Ok(res) => res,
        Err(e) => {
            state.record(ticket, true);
            tracing::warn!(project = %project.name, error = %e, "upstream request failed");
            return answered(error(&Error::BadGateway {
                reason: "Harbor failed or timed out",
            }));
        }
    };
    let status = res.status();
    let judgement = attempt::judge(ask, status);
    state.record(ticket, judgement.is_failure());
    if judgement == Judgement::NotHere {
        state.upstream().drain(res.into_body()).await;
        return Mapped::Gone;
    }
    if status == http::StatusCode::UNAUTHORIZED || status == http::StatusCode::FORBIDDEN {
        state.upstream().drain(res.into_body()).await;
        return answered(error(&Error::Denied {
            reason: "the router's robot account may not pull from the project that has this image",
        }));
    }
    answered(answer::answer(state, project, ask, res).await)
}

fn answered(res: Response<Body>) -> Mapped {
    Mapped::Answer(Box::new(res))
}
