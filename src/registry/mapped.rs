//! The mapped request: a pull whose project is known goes to that project alone. Its answer is
//! judged like any attempt (the breaker counts the same failures); a 404 means the image may have
//! moved, and the caller falls back to one fan-out. Identical mapped pulls in the air on one core
//! share one request ([`shared`], see [`super::sharing`]).

use std::future::poll_fn;
use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{
    CONTENT_LENGTH, CONTENT_RANGE, IF_MODIFIED_SINCE, IF_NONE_MATCH, IF_RANGE, RANGE, RETRY_AFTER,
};
use http::{HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Limited};

use crate::body::{Body, Continue, SharedBody};
use crate::error::Error;
use crate::flight::Turn;
use crate::metrics::labels::{ErrorKind, SharedKind};
use crate::names::MAX_MANIFEST_BYTES;
use crate::snapshot::Project;
use crate::transfer::{Head, Joined, Reader, Room, Transfer};
use crate::upstream::pool::UpstreamBody;
use crate::upstream::UpstreamError;

use super::answer;
use super::ask::{Ask, Endpoint};
use super::attempt;
use super::outcome::{Failure, Heard};
use super::respond::{error, respond, retry_after, whole};
use super::sharing::{Outcome, Shared};
use super::state::State;

/// A mapped request's result.
pub enum Mapped {
    Answer(Box<Response<Body>>),
    /// A failure by the judge's rules (see [`Heard::may_stand_in`]): the circuit is open, no
    /// answer in time, 500, 502–504 or 429. The answer for the client (Harbor's, read whole, so its
    /// connection is reused; or the router's), and the failure.
    Failed(Box<Response<Body>>, Heard),
    /// The mapped project answered 404: `sure` unless it was Harbor's local store answering for
    /// an upstream it did not ask ([`Heard::Unsure`]).
    Gone {
        sure: bool,
    },
}

/// Sends `ask` to `project` and answers with what it said; `attempts` counts the request when it
/// is sent (not when the project's circuit is open). A manifest request waits at most
/// `RESOLVER_TIMEOUT` for the answer's head, as a fan-out attempt does: past it, a tag's
/// last-known-good answer can stand in (and a manifest is small: Harbor that cannot start one in that
/// time is failing).
pub async fn request(state: &State, project: &Project, ask: &Ask, attempts: &mut u32) -> Mapped {
    let Some(ticket) = state.circuits.admit(&project.name, ask.lane()) else {
        let e = Error::Unavailable {
            reason: "the project that has this image is failing; its circuit is open",
        };
        return failed(error(&e), Heard::Failed(Failure::CircuitOpen));
    };
    *attempts += 1;
    let sent = if matches!(ask.endpoint, Endpoint::Manifest { .. }) {
        let limit = state.settings.resolver_timeout;
        monoio::time::timeout(limit, attempt::send(state, project, ask))
            .await
            .unwrap_or_else(|_| {
                state
                    .counters
                    .project(&project.name, |m| m.failed(ErrorKind::Timeout));
                Err(UpstreamError::ResponseTimeout(limit))
            })
    } else {
        attempt::send(state, project, ask).await
    };
    let res = match sent {
        Ok(res) => res,
        Err(e) => {
            state.circuits.record(ticket, true);
            tracing::warn!(project = %project.name, error = %e, "upstream request failed");
            let heard = Heard::Failed(attempt::failure_of(&e));
            let res = error(&Error::BadGateway {
                reason: "Harbor failed or timed out",
            });
            return failed(res, heard);
        }
    };
    let heard = attempt::judge(ask, res.status(), res.headers());
    state
        .circuits
        .record(ticket, heard.counts_against_circuit());
    match heard {
        Heard::NotHere | Heard::Unsure => {
            let body = state.upstream().read_small(res.into_body()).await;
            let sure = attempt::refine(heard, &project.name, body.as_deref()).proves_absence();
            if !sure {
                state.counters.project(&project.name, |m| m.unsure());
            }
            Mapped::Gone { sure }
        }
        Heard::Failed(failure) => {
            // Harbor's error, passed on whole (a small body: the connection goes back to the
            // pool), with a `Retry-After` for a rate limit (Harbor's own 429 carries none).
            let (parts, body) = res.into_parts();
            let body = state.upstream().read_small(body).await.unwrap_or_default();
            let mut headers = super::forward::headers_down(&parts.headers);
            if failure == Failure::RateLimited {
                let after = retry_after(parts.headers.get(RETRY_AFTER));
                headers.insert(RETRY_AFTER, after);
            }
            let res = super::respond::whole(parts.status, headers, body, ask.head);
            failed(res, heard)
        }
        Heard::Denied { challenged } => {
            let body = state.upstream().read_small(res.into_body()).await;
            match attempt::refined(state, project, ask, heard, body.as_deref()).await {
                // The project was deleted since the last discovery: the image is not there.
                Heard::NotHere => Mapped::Gone { sure: true },
                _ => answered(error(&denied(challenged))),
            }
        }
        _ => answered(answer::answer(state, project, ask, res).await),
    }
}

/// What the client is told when Harbor refused a pull for lack of rights: `challenged` (a 401 with
/// a challenge although the token flow ran, or a 403) means Harbor refused the router's
/// credentials; a 401 without one is Harbor relaying its upstream's refusal of its own.
pub fn denied(challenged: bool) -> Error {
    Error::Denied {
        reason: if challenged {
            CREDENTIALS_REFUSED
        } else {
            "Harbor answered 401 without a challenge: the project's upstream registry refused Harbor's own credentials for it"
        },
    }
}

/// Why a pull Harbor refused for lack of rights fails (a registry error's detail).
pub const CREDENTIALS_REFUSED: &str = "Harbor refused the router's credentials for the project that has this image: its robot account may not pull from that project, or Harbor no longer accepts the robot (the router's /healthz says which)";

fn answered(res: Response<Body>) -> Mapped {
    Mapped::Answer(Box::new(res))
}

fn failed(res: Response<Body>, heard: Heard) -> Mapped {
    Mapped::Failed(Box::new(res), heard)
}

/// [`request`], shared with identical pulls in the air on this core ([`super::sharing`]), and
/// for blobs on every core ([`crate::transfer`]); `pull_key` is the pull's [`Ask::key`] (computed
/// once per pull); `attempts` counts a request this pull sent itself.
pub async fn shared(
    state: &Rc<State>,
    project: &Project,
    ask: &Ask,
    pull_key: &str,
    attempts: &mut u32,
) -> Mapped {
    if shared_blob(state, ask) {
        return blob(state, project, ask, pull_key, attempts).await;
    }
    if let Some(range) = shared_range(state, ask) {
        return ranged_blob(state, project, ask, pull_key, range, attempts).await;
    }
    let Some(kind) = shareable(state, ask) else {
        return request(state, project, ask, attempts).await;
    };
    if !state.settings.coalesce_linger.is_zero() {
        // A pull that learned the mapping (from another core or pod) while this core's fan-out for
        // it is in the air waits for that fan-out: its winner lingers, and answers this pull too.
        if let Some(fan_out) = state.routing.fan_out_in_flight(pull_key) {
            state.metrics().coalesced.inc();
            let _ = fan_out.await;
        }
    }
    let key = answer_key(project, ask, pull_key);
    loop {
        match state.sharing.turn(&key, ask.head) {
            Turn::Lead(leader) => {
                let res = request(state, project, ask, attempts).await;
                let (res, shared) = share(res, ask.head).await;
                state.sharing.finish(leader, shared);
                return res;
            }
            Turn::Follow(rx) => match rx.await {
                Ok(Some(outcome)) => return follow(state, kind, &outcome, ask.head),
                // The leader's answer could not be shared: this pull asks for itself.
                Ok(None) => return request(state, project, ask, attempts).await,
                // The leader's client went away before it finished: ask again (one leads).
                Err(_) => continue,
            },
        }
    }
}

/// A fan-out's winning answer for its own client, kept for the linger as a mapped flight's answer
/// is ([`super::sharing`]): the pulls that waited for the fan-out then ask the project it found,
/// and are answered from this one instead of asking again.
pub async fn keep_won(
    state: &Rc<State>,
    project: &Project,
    ask: &Ask,
    pull_key: &str,
    res: Response<Body>,
) -> Response<Body> {
    if shareable(state, ask).is_none() || state.settings.coalesce_linger.is_zero() {
        return res;
    }
    let (own, shared) = share(Mapped::Answer(Box::new(res)), ask.head).await;
    state
        .sharing
        .keep_for(&answer_key(project, ask, pull_key), ask.head, shared);
    match own {
        Mapped::Answer(res) | Mapped::Failed(res, _) => *res,
        Mapped::Gone { .. } => unreachable!("an answer stays an answer"),
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
            return (Mapped::Gone { sure }, Some(Rc::new(Outcome::Gone { sure })))
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
    (own, Some(Rc::new(outcome)))
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

/// The key of a pull's shared answer: its flight's, and for a tag list the form the client named
/// the repository in (the list's `name` and `Link` are written for it; a mirror request's root
/// form and a prefixed one share a pull key).
fn answer_key(project: &Project, ask: &Ask, pull_key: &str) -> String {
    let mut key = flight_key(project, pull_key);
    if ask.root && matches!(ask.endpoint, Endpoint::Tags { .. }) {
        key.push_str(" root");
    }
    key
}

/// The key of a pull's flight or transfer: its project and its key.
fn flight_key(project: &Project, pull_key: &str) -> String {
    format!("{}\n{pull_key}", project.name)
}

/// Whether `ask` is an unconditional blob GET (the only blob pulls that share a transfer).
fn may_share_blob(state: &State, ask: &Ask) -> bool {
    state.settings.coalesce_pulls
        && ask.is_blob()
        && !ask.head
        && ![IF_RANGE, IF_NONE_MATCH, IF_MODIFIED_SINCE]
            .iter()
            .any(|h| ask.headers.contains_key(h))
}

/// Whether `ask` is a whole blob GET that may lead or join a transfer.
fn shared_blob(state: &State, ask: &Ask) -> bool {
    may_share_blob(state, ask) && !ask.headers.contains_key(RANGE)
}

/// The single byte range (`bytes=S-` or `bytes=S-E`) of an unconditional blob GET that may join a
/// transfer in progress.
fn shared_range(state: &State, ask: &Ask) -> Option<(u64, Option<u64>)> {
    if !may_share_blob(state, ask) {
        return None;
    }
    let range = ask
        .headers
        .get(RANGE)?
        .to_str()
        .ok()?
        .strip_prefix("bytes=")?;
    let (start, end) = range.split_once('-')?;
    let start: u64 = start.trim().parse().ok()?;
    let end = match end.trim() {
        "" => None,
        e => Some(e.parse::<u64>().ok().filter(|e| *e >= start)?),
    };
    Some((start, end))
}

/// A ranged blob GET: it joins a transfer of the whole blob in progress that still holds its first
/// byte, and is answered 206 from it (`Content-Range` from the transfer's announced length); it
/// never leads one. Without such a transfer (or without a length to range over) it goes alone.
async fn ranged_blob(
    state: &Rc<State>,
    project: &Project,
    ask: &Ask,
    pull_key: &str,
    (start, end): (u64, Option<u64>),
    attempts: &mut u32,
) -> Mapped {
    let key = flight_key(project, pull_key);
    let Some(t) = state.transfers.follow_from(&key, start) else {
        return request(state, project, ask, attempts).await;
    };
    let reader = Reader::at(t, start);
    let head = poll_fn(|cx| reader.transfer().poll_head(cx)).await;
    // A range needs the blob's length, and a start inside it.
    let usable = head.and_then(|h| {
        let length = length_of(&h.headers).filter(|l| start < *l)?;
        Some((h, length))
    });
    let Some((head, length)) = usable else {
        drop(reader);
        return request(state, project, ask, attempts).await;
    };
    let last = end.map_or(length - 1, |e| e.min(length - 1));
    state.metrics().shared(SharedKind::Blob, 0);
    let body = Body::Take {
        body: Box::new(shared_body(
            state,
            project,
            ask,
            reader,
            None,
            Some(counting(state)),
        )),
        left: last - start + 1,
    };
    let mut headers = head.headers.clone();
    headers.insert(CONTENT_LENGTH, HeaderValue::from(last - start + 1));
    let range = format!("bytes {start}-{last}/{length}");
    headers.insert(
        CONTENT_RANGE,
        HeaderValue::from_str(&range).expect("a content range"),
    );
    Mapped::Answer(Box::new(respond(
        StatusCode::PARTIAL_CONTENT,
        headers,
        body,
    )))
}

/// A blob GET, through the transfer identical GETs on every core share (see [`crate::transfer`]):
/// the first leads (asks Harbor, and its core pumps the body into the transfer), the others read
/// it from byte 0 as it arrives; an answer that cannot be shared (not a 200, a redirect, a body
/// that is not Harbor's stream) sends them on requests of their own.
async fn blob(
    state: &Rc<State>,
    project: &Project,
    ask: &Ask,
    pull_key: &str,
    attempts: &mut u32,
) -> Mapped {
    let key = flight_key(project, pull_key);
    match state.transfers.join(&key) {
        Joined::Alone => request(state, project, ask, attempts).await,
        Joined::Follow(t) => {
            let reader = Reader::new(t);
            match poll_fn(|cx| reader.transfer().poll_head(cx)).await {
                Some(head) => {
                    state.metrics().shared(SharedKind::Blob, 0);
                    let res =
                        shared_response(state, project, ask, &head, reader, Some(counting(state)));
                    Mapped::Answer(Box::new(res))
                }
                None => {
                    drop(reader);
                    request(state, project, ask, attempts).await
                }
            }
        }
        Joined::Lead(t) => {
            let reader = Reader::new(t.clone());
            // A leader cancelled before Harbor's head (its client went away) sends the waiting
            // readers on their own.
            let _undecided = Undecided(t.clone());
            let res = match request(state, project, ask, attempts).await {
                Mapped::Answer(res) if res.status() == StatusCode::OK && streams(res.body()) => res,
                other => {
                    t.unshared();
                    return other;
                }
            };
            let (parts, body) = res.into_parts();
            let upstream = match body {
                Body::Upstream(b) => b,
                Body::Checked { body, .. } => match *body {
                    Body::Upstream(b) => b,
                    _ => unreachable!("checked by streams()"),
                },
                _ => unreachable!("checked by streams()"),
            };
            let head = Head {
                status: parts.status,
                headers: parts.headers,
            };
            let proof = Proof::new(ask, &head.headers, state.settings.shared_blob_window);
            t.publish(head.clone());
            state.pumping(&t);
            let transfers = state.transfers.clone();
            crate::task::spawn(async move {
                if pump(t, upstream, proof).await {
                    // The finished blob lingers: once its time is up, it goes (unless a join
                    // already saw it go).
                    monoio::time::sleep(transfers.linger()).await;
                    transfers.expire();
                }
            });
            Mapped::Answer(Box::new(shared_response(
                state, project, ask, &head, reader, None,
            )))
        }
    }
}

/// Whether an answer's body is Harbor's stream (maybe under its blob check): what a pump can take.
fn streams(body: &Body) -> bool {
    match body {
        Body::Upstream(_) => true,
        Body::Checked { body, .. } => matches!(**body, Body::Upstream(_)),
        _ => false,
    }
}

/// Copies Harbor's body into the transfer while a reader is left and the window has room; a
/// failed body ends every reader with an error, a transfer nobody reads any more is abandoned (its
/// request to Harbor dropped). `true` when the finished transfer lingers ([`crate::transfer`]).
async fn pump(t: Arc<Transfer>, mut body: UpstreamBody, mut proof: Proof) -> bool {
    // A pump dropped unfinished (its core stopping) sends its readers on their own rather than
    // leave them waiting.
    let _ending = Ending(t.clone());
    loop {
        if poll_fn(|cx| t.poll_room(cx)).await == Room::NoReaders {
            return false;
        }
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    proof.see(&data);
                    t.push(&data);
                }
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "Harbor's blob failed mid-transfer: every reader of it ends with an error");
                t.fail();
                return false;
            }
            None => return t.complete(proof.good()),
        }
    }
}

/// Whether a transfer's bytes are the blob's, for its linger: Harbor named the digest and the
/// length (what a solo answer trusts too), or the bytes hashed to the digest in the URL. Only a
/// blob that may linger (at most two windows) is hashed.
struct Proof {
    named: bool,
    hashing: Option<answer::Hashing>,
    seen: u64,
    limit: u64,
}

impl Proof {
    fn new(ask: &Ask, headers: &http::HeaderMap, window: usize) -> Proof {
        let named = answer::served_whole(headers);
        let hashing = match &ask.endpoint {
            Endpoint::Blob { digest } if !named => answer::Hashing::new(digest),
            _ => None,
        };
        Proof {
            named,
            hashing,
            seen: 0,
            limit: 2 * window as u64,
        }
    }

    fn see(&mut self, data: &[u8]) {
        self.seen += data.len() as u64;
        if self.seen > self.limit {
            // Too long to linger: no need to hash it.
            self.hashing = None;
        } else if let Some(h) = &mut self.hashing {
            h.update(data);
        }
    }

    fn good(self) -> bool {
        self.seen <= self.limit && (self.named || self.hashing.is_some_and(|mut h| h.matches()))
    }
}

/// A reader's response: the leader's head, the transfer's bytes (under the blob check a solo
/// answer would have), and, should the reader fall out of the window, its own request from there.
fn shared_response(
    state: &Rc<State>,
    project: &Project,
    ask: &Ask,
    head: &Head,
    reader: Reader,
    on_shared: Option<Box<dyn FnMut(usize)>>,
) -> Response<Body> {
    let length = length_of(&head.headers);
    let mut body = shared_body(state, project, ask, reader, length, on_shared);
    if let Some(check) = answer::blob_check(ask, &head.headers) {
        body = body.checked(check);
    }
    respond(head.status, head.headers.clone(), body)
}

/// A reader's body: the transfer's bytes, then, should it fall out, its own request from there.
fn shared_body(
    state: &Rc<State>,
    project: &Project,
    ask: &Ask,
    reader: Reader,
    length: Option<u64>,
    on_shared: Option<Box<dyn FnMut(usize)>>,
) -> Body {
    let fall_out = continuation(state.clone(), project.clone(), ask.clone());
    Body::Shared(Box::new(SharedBody::new(
        reader, length, fall_out, on_shared,
    )))
}

/// Counts the bytes a follower reads from a transfer, on its core.
fn counting(state: &Rc<State>) -> Box<dyn FnMut(usize)> {
    let state = state.clone();
    Box::new(move |n| state.metrics().shared_bytes(n))
}

/// A head's `Content-Length`.
fn length_of(headers: &http::HeaderMap) -> Option<u64> {
    headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
}

/// How a reader that fell out of its transfer's window goes on: the blob from its offset, on a
/// request of its own (`Range: bytes=<offset>-`); Harbor may ignore the range (it does for a blob
/// it has not cached) and send the whole blob, whose first bytes are then skipped.
fn continuation(state: Rc<State>, project: Project, mut ask: Ask) -> Continue {
    Box::new(move |offset| {
        Box::pin(async move {
            state.metrics().shared_fallouts.inc();
            tracing::debug!(
                name = ask.name,
                offset,
                "a slow reader fell out of a shared blob transfer; continuing on its own"
            );
            let range = HeaderValue::from_str(&format!("bytes={offset}-")).expect("a range");
            ask.headers.insert(RANGE, range);
            let mut attempts = 0;
            let failed = || std::io::Error::other("Harbor failed the rest of a shared blob");
            match request(&state, &project, &ask, &mut attempts).await {
                Mapped::Answer(res) if res.status() == StatusCode::PARTIAL_CONTENT => {
                    let from = format!("bytes {offset}-");
                    let at_offset = res
                        .headers()
                        .get(CONTENT_RANGE)
                        .and_then(|v| v.to_str().ok())
                        .is_some_and(|v| v.starts_with(&from));
                    if at_offset {
                        Ok(res.into_body())
                    } else {
                        Err(failed())
                    }
                }
                Mapped::Answer(res) if res.status() == StatusCode::OK => Ok(Body::Skip {
                    body: Box::new(res.into_body()),
                    left: offset,
                }),
                _ => Err(failed()),
            }
        })
    })
}

/// Refuses the transfer's head unless it was decided, when dropped.
struct Undecided(Arc<Transfer>);

impl Drop for Undecided {
    fn drop(&mut self) {
        if !self.0.decided() {
            self.0.unshared();
        }
    }
}

/// Stops the transfer (its readers continue on their own), unless it ended, when dropped.
struct Ending(Arc<Transfer>);

impl Drop for Ending {
    fn drop(&mut self) {
        self.0.abandon();
    }
}
