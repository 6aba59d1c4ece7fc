//! Identical pulls on one core share one request to Harbor (`COALESCE_PULLS`, on by default).
//!
//! A rollout makes many nodes ask for the same tag, index and manifests within milliseconds; each
//! request Harbor gets for a tag is one more upstream request of its own (and, for Docker Hub, one
//! more against the pull limit). So on each core the first mapped request for a manifest (by tag or
//! by digest, not yet in memory) or a tag list leads a flight ([`crate::flight`]), and identical
//! ones that arrive while it is in the air wait for its answer instead of sending their own:
//! at most one request per core for one object, and nothing shared between cores (a pod sends at
//! most `WORKERS`).
//!
//! - **Identical** means the same project, endpoint, name, reference or query, Accept set and
//!   registry (the pull's key). Conditional requests (`If-None-Match`, `If-Modified-Since`) go
//!   alone: their answer is the asker's.
//! - **A HEAD may join a GET, never lead one**: a HEAD that finds a GET in the air takes its answer
//!   less the body; otherwise it leads a flight that only HEADs join. A GET never waits for a HEAD
//!   (its body would be missing) and is never turned into one.
//! - **Every check stays**: the leader's answer went through everything a solo answer does (size
//!   limit, digest verification, the tag's last-known-good record); what is shared is that answer,
//!   read whole (a manifest is at most 4 MiB, a tag list is bounded), with its failure, if any, so a
//!   follower of a failed tag answers from its last-known-good digest as the leader would.
//! - **Cancellation**: a leader whose client went away drops the flight; its followers ask again and
//!   one of them leads. An answer that cannot be shared (its body could not be read whole) sends the
//!   followers on requests of their own.
//!
//! Blobs are not shared here: they are large and streamed, and concurrent pulls of one blob mostly
//! land on different cores.

use bytes::Bytes;
use http::header::{IF_MODIFIED_SINCE, IF_NONE_MATCH};
use http::{HeaderMap, Response, StatusCode};
use http_body_util::{BodyExt, Limited};

use crate::body::Body;
use crate::error::Error;
use crate::flight::{Flights, Turn};
use crate::metrics::labels::SharedKind;
use crate::names::MAX_MANIFEST_BYTES;
use crate::snapshot::Project;

use super::ask::{Ask, Endpoint};
use super::mapped::{self, Mapped};
use super::outcome::Heard;
use super::respond::{error, respond, whole};
use super::state::State;

/// What a flight hands its followers: the leader's answer, or `None` when it could not be shared.
type Shared = Option<std::rc::Rc<Outcome>>;

/// One core's flights of mapped pulls.
#[derive(Default)]
pub struct Sharing {
    flights: std::rc::Rc<Flights<Shared>>,
}

/// A mapped request's result in a form every follower can answer from.
#[derive(Debug)]
enum Outcome {
    /// Harbor's answer (`failure` when it was one by the judge's rules); `head` when the leader
    /// was a HEAD, whose headers describe a body it never read.
    Answer {
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
        failure: Option<Heard>,
        head: bool,
    },
    /// The project answered 404 ([`Mapped::Gone`]).
    Gone { sure: bool },
}

/// `ask` to `project`, shared with identical requests on this core (see the module doc); `attempts`
/// counts a request this pull sent itself.
pub async fn request(state: &State, project: &Project, ask: &Ask, attempts: &mut u32) -> Mapped {
    let Some(kind) = shareable(state, ask) else {
        return mapped::request(state, project, ask, attempts).await;
    };
    let key = format!("{}\n{}", project.name, ask.key());
    let get = format!("GET {key}");
    let flights = &state.sharing.flights;
    loop {
        // A HEAD takes a GET's answer when one is in the air.
        let turn = match ask.head.then(|| flights.follow(&get)).flatten() {
            Some(rx) => Turn::Follow(rx),
            None if ask.head => flights.join(&format!("HEAD {key}")),
            None => flights.join(&get),
        };
        match turn {
            Turn::Lead(leader) => {
                let res = mapped::request(state, project, ask, attempts).await;
                let (res, shared) = share(res, ask.head).await;
                leader.finish(shared);
                return res;
            }
            Turn::Follow(rx) => match rx.await {
                Ok(Some(outcome)) => return follow(state, kind, &outcome, ask.head),
                // The leader's answer could not be shared: this pull asks for itself.
                Ok(None) => return mapped::request(state, project, ask, attempts).await,
                // The leader's client went away before it finished: ask again (one leads).
                Err(_) => continue,
            },
        }
    }
}

/// Whether `ask` may share, and as what.
fn shareable(state: &State, ask: &Ask) -> Option<SharedKind> {
    if !state.settings.coalesce_pulls
        || ask.headers.contains_key(IF_NONE_MATCH)
        || ask.headers.contains_key(IF_MODIFIED_SINCE)
    {
        return None;
    }
    match ask.endpoint {
        Endpoint::Manifest { .. } => Some(SharedKind::Manifest),
        Endpoint::Tags { .. } => Some(SharedKind::TagList),
        Endpoint::Blob { .. } | Endpoint::Referrers { .. } => None,
    }
}

/// The leader's result for its own client, and what its followers get: its answer read whole
/// (bounded as a solo answer is), or `None` when it cannot be shared.
async fn share(res: Mapped, head: bool) -> (Mapped, Shared) {
    let (res, failure) = match res {
        Mapped::Gone { sure } => {
            return (
                Mapped::Gone { sure },
                Some(std::rc::Rc::new(Outcome::Gone { sure })),
            )
        }
        Mapped::Answer(res) => (res, None),
        Mapped::Failed(res, heard) => (res, Some(heard)),
    };
    let (parts, body) = res.into_parts();
    let bytes = match body {
        Body::Empty => Bytes::new(),
        Body::Full(b) => b.unwrap_or_default(),
        // A manifest by tag that came with its digest streams in a solo answer; here it is read
        // whole (at most 4 MiB: the cap ends it with an error past that).
        body @ Body::Capped { .. } => {
            match Limited::new(body, MAX_MANIFEST_BYTES as usize + 1)
                .collect()
                .await
            {
                Ok(b) => b.to_bytes(),
                Err(e) => {
                    tracing::warn!(error = %e, "Harbor's manifest could not be read whole");
                    let e = Error::BadGateway {
                        reason: "Harbor's manifest could not be read",
                    };
                    return (Mapped::Answer(Box::new(error(&e))), None);
                }
            }
        }
        // Anything else streams and is not shared.
        body => {
            let res = Response::from_parts(parts, body);
            let res = Box::new(res);
            return (
                match failure {
                    Some(heard) => Mapped::Failed(res, heard),
                    None => Mapped::Answer(res),
                },
                None,
            );
        }
    };
    let outcome = Outcome::Answer {
        status: parts.status,
        headers: parts.headers.clone(),
        body: bytes.clone(),
        failure,
        head,
    };
    let own = Box::new(Response::from_parts(parts, Body::full(bytes)));
    let own = match failure {
        Some(heard) => Mapped::Failed(own, heard),
        None => Mapped::Answer(own),
    };
    (own, Some(std::rc::Rc::new(outcome)))
}

/// A follower's answer from the flight's outcome.
fn follow(state: &State, kind: SharedKind, outcome: &Outcome, head: bool) -> Mapped {
    match outcome {
        Outcome::Gone { sure } => Mapped::Gone { sure: *sure },
        Outcome::Answer {
            status,
            headers,
            body,
            failure,
            head: from_head,
        } => {
            let res = if *from_head {
                // A HEAD's answer: its headers describe the body (Content-Length included).
                respond(*status, headers.clone(), Body::Empty)
            } else {
                whole(*status, headers.clone(), body.clone(), head)
            };
            state
                .metrics()
                .shared(kind, if head { 0 } else { body.len() });
            let res = Box::new(res);
            match failure {
                Some(heard) => Mapped::Failed(res, *heard),
                None => Mapped::Answer(res),
            }
        }
    }
}
