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
//! - **Linger** (`COALESCE_LINGER`, 2 s by default; 0 turns it off): a successful answer (a 2xx
//!   Harbor sent, no failure) stays joinable on its core for the linger after its flight ended, so
//!   a rollout whose nodes arrive over seconds costs Harbor one request per core per linger, not
//!   one per burst. The price is freshness: a tag moved in Harbor is seen up to the linger late on
//!   a core that just answered it. Failures and 404s are never kept (the next pull asks again).
//!   What lingers is bounded per core ([`MAX_KEPT`] answers, [`MAX_KEPT_BYTES`]), oldest out first.
//!
//! Blobs are not shared here: they are large and streamed, and concurrent pulls of one blob mostly
//! land on different cores.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, StatusCode};

use crate::clock::Clock;
use crate::flight::{Flights, Leader, Turn};

use super::outcome::Heard;

/// What a flight hands its followers: the leader's answer, or `None` when it could not be shared.
pub type Shared = Option<Rc<Outcome>>;

/// Answers a core keeps lingering, at most.
pub const MAX_KEPT: usize = 1024;
/// Bytes of lingering answers a core keeps, at most (bodies and a share for the headers).
pub const MAX_KEPT_BYTES: usize = 16 << 20;
/// What an answer's headers are counted as.
const HEAD_BYTES: usize = 512;

/// One core's flights of mapped pulls, and the answers lingering after them.
pub struct Sharing {
    flights: Rc<Flights<Shared>>,
    kept: RefCell<Kept>,
    linger: Duration,
    clock: Clock,
}

#[derive(Default)]
struct Kept {
    by_key: HashMap<String, (Instant, Rc<Outcome>)>,
    /// Deadlines in the order they were set (every linger is the same length), oldest first.
    order: VecDeque<(Instant, String)>,
    bytes: usize,
}

impl Kept {
    /// Drops the answers whose linger is over.
    fn expire(&mut self, now: Instant) {
        while self.order.front().is_some_and(|(u, _)| *u <= now) {
            self.pop_oldest();
        }
    }

    /// Drops the oldest answer (when its entry is still the one this deadline was set for).
    fn pop_oldest(&mut self) {
        let Some((until, key)) = self.order.pop_front() else {
            return;
        };
        if self.by_key.get(&key).is_some_and(|(u, _)| *u == until) {
            let (_, outcome) = self.by_key.remove(&key).expect("checked");
            self.bytes -= size_of(&outcome);
        }
    }
}

fn size_of(outcome: &Outcome) -> usize {
    match outcome {
        Outcome::Answer { body, .. } => body.len() + HEAD_BYTES,
        Outcome::Gone { .. } => HEAD_BYTES,
    }
}

impl Sharing {
    pub fn new(linger: Duration, clock: Clock) -> Sharing {
        Sharing {
            flights: Rc::default(),
            kept: RefCell::default(),
            linger,
            clock,
        }
    }

    /// Whether the pull `key` (its project and its key) leads a flight or waits for one (or is
    /// answered by one that lingers): a HEAD follows a GET, else leads or follows a flight of
    /// HEADs; a GET leads or follows a flight of GETs.
    pub fn turn(&self, key: &str, head: bool) -> Turn<Shared> {
        let get = keyed(false, key);
        let now = (!self.linger.is_zero()).then(|| self.clock.now());
        if let Some(now) = now {
            self.kept.borrow_mut().expire(now);
        }
        if let Some(kept) = self.kept(&get, now) {
            return kept;
        }
        if head {
            if let Some(rx) = self.flights.follow(&get) {
                return Turn::Follow(rx);
            }
            let key = keyed(true, key);
            if let Some(kept) = self.kept(&key, now) {
                return kept;
            }
            return self.flights.join(&key);
        }
        self.flights.join(&get)
    }

    /// A lingering answer for `key`, as a flight already answered.
    fn kept(&self, key: &str, now: Option<Instant>) -> Option<Turn<Shared>> {
        let now = now?;
        let kept = self.kept.borrow();
        let (until, outcome) = kept.by_key.get(key)?;
        if *until <= now {
            return None;
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let _ = tx.send(Some(outcome.clone()));
        Some(Turn::Follow(rx))
    }

    /// Ends `leader`'s flight with `shared`, and keeps a successful answer for the linger.
    pub fn finish(&self, leader: Leader<Shared>, shared: Shared) {
        if let Some(outcome) = shared.as_ref().filter(|o| lingers(o)) {
            self.keep(leader.key(), outcome.clone());
        }
        leader.finish(shared);
    }

    /// Keeps `shared`, the answer to the pull `key` (as for [`Sharing::turn`]) that came another
    /// way (a fan-out's winner), for the linger when it may linger.
    pub fn keep_for(&self, key: &str, head: bool, shared: Shared) {
        if let Some(outcome) = shared.filter(|o| lingers(o)) {
            self.keep(&keyed(head, key), outcome);
        }
    }

    fn keep(&self, key: &str, outcome: Rc<Outcome>) {
        if self.linger.is_zero() {
            return;
        }
        let now = self.clock.now();
        let until = now + self.linger;
        let size = size_of(&outcome);
        let mut kept = self.kept.borrow_mut();
        kept.expire(now);
        if let Some((_, old)) = kept.by_key.insert(key.to_string(), (until, outcome)) {
            kept.bytes -= size_of(&old);
        }
        kept.bytes += size;
        kept.order.push_back((until, key.to_string()));
        while kept.by_key.len() > MAX_KEPT || kept.bytes > MAX_KEPT_BYTES {
            kept.pop_oldest();
        }
    }

    /// Answers lingering now (for tests).
    #[cfg(test)]
    fn lingering(&self) -> usize {
        self.kept.borrow().by_key.len()
    }
}

/// The key of a flight (and of the answer lingering after it): GETs and HEADs apart.
fn keyed(head: bool, key: &str) -> String {
    format!("{} {key}", if head { "HEAD" } else { "GET" })
}

/// Whether an answer may linger: Harbor's success, not a failure or a 404.
fn lingers(outcome: &Outcome) -> bool {
    matches!(outcome, Outcome::Answer { status, failure: None, .. } if status.is_success())
}

/// A mapped request's result in a form every follower can answer from.
#[derive(Debug)]
pub enum Outcome {
    /// Harbor's answer (`failure` when it was one by the judge's rules); `head` when the leader
    /// was a HEAD, whose headers describe a body it never read.
    Answer {
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
        failure: Option<Heard>,
        head: bool,
    },
    /// The project answered 404.
    Gone { sure: bool },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::TestClock;

    fn answer(status: StatusCode, body: Bytes, failure: Option<Heard>, head: bool) -> Shared {
        Some(Rc::new(Outcome::Answer {
            status,
            headers: HeaderMap::new(),
            body,
            failure,
            head,
        }))
    }

    fn ok(head: bool) -> Shared {
        answer(StatusCode::OK, Bytes::from_static(b"{}"), None, head)
    }

    fn lead(s: &Sharing, key: &str, head: bool) -> Leader<Shared> {
        match s.turn(key, head) {
            Turn::Lead(l) => l,
            Turn::Follow(_) => panic!("{key} leads"),
        }
    }

    /// The answer a turn follows, when it is already there.
    fn answered(s: &Sharing, key: &str, head: bool) -> Option<Shared> {
        match s.turn(key, head) {
            Turn::Lead(_) => None,
            Turn::Follow(mut rx) => Some(rx.try_recv().expect("answered at once")),
        }
    }

    #[test]
    fn a_finished_answer_lingers_then_the_next_pull_asks_again() {
        let time = TestClock::new();
        let s = Sharing::new(Duration::from_secs(2), time.clock());
        let l = lead(&s, "k", false);
        s.finish(l, ok(false));
        let got = answered(&s, "k", false).expect("within the linger, a GET is answered");
        assert!(matches!(
            got.as_deref(),
            Some(Outcome::Answer { head: false, .. })
        ));
        assert!(
            answered(&s, "k", true).is_some(),
            "a HEAD takes a GET's answer"
        );
        time.advance(Duration::from_millis(1999));
        assert!(answered(&s, "k", false).is_some());
        time.advance(Duration::from_millis(1));
        assert!(
            answered(&s, "k", false).is_none(),
            "past the linger, it leads"
        );
        assert_eq!(s.lingering(), 0);
    }

    #[test]
    fn a_heads_answer_lingers_for_heads_only() {
        let s = Sharing::new(Duration::from_secs(2), TestClock::new().clock());
        let l = lead(&s, "k", true);
        s.finish(l, ok(true));
        assert!(answered(&s, "k", true).is_some());
        assert!(
            answered(&s, "k", false).is_none(),
            "a GET never takes a HEAD's answer: its body is missing"
        );
    }

    #[test]
    fn failures_404s_and_unshareable_answers_do_not_linger_nor_does_anything_with_no_linger() {
        let s = Sharing::new(Duration::from_secs(2), TestClock::new().clock());
        let failed = answer(StatusCode::OK, Bytes::new(), Some(Heard::Unsure), false);
        let unavailable = answer(StatusCode::SERVICE_UNAVAILABLE, Bytes::new(), None, false);
        let gone = Some(Rc::new(Outcome::Gone { sure: true }));
        for (key, shared) in [("a", failed), ("b", unavailable), ("c", gone), ("d", None)] {
            let l = lead(&s, key, false);
            s.finish(l, shared);
            assert!(answered(&s, key, false).is_none(), "{key} asks again");
        }
        let off = Sharing::new(Duration::ZERO, TestClock::new().clock());
        let l = lead(&off, "k", false);
        off.finish(l, ok(false));
        assert!(
            answered(&off, "k", false).is_none(),
            "no linger: in the air only"
        );
    }

    #[test]
    fn a_core_keeps_a_bounded_number_of_answers_oldest_out_first() {
        let s = Sharing::new(Duration::from_secs(2), TestClock::new().clock());
        for i in 0..MAX_KEPT + 10 {
            let key = format!("k{i}");
            let l = lead(&s, &key, false);
            s.finish(l, ok(false));
        }
        assert_eq!(s.lingering(), MAX_KEPT);
        assert!(answered(&s, "k0", false).is_none(), "the oldest went first");
        assert!(answered(&s, &format!("k{}", MAX_KEPT + 9), false).is_some());
        let big = answer(
            StatusCode::OK,
            Bytes::from(vec![0u8; MAX_KEPT_BYTES / 2]),
            None,
            false,
        );
        for key in ["big1", "big2", "big3"] {
            let l = lead(&s, key, false);
            s.finish(l, big.clone());
        }
        assert!(s.kept.borrow().bytes <= MAX_KEPT_BYTES);
        assert!(answered(&s, "big3", false).is_some());
        assert!(
            answered(&s, "big1", false).is_none(),
            "bytes bound what lingers"
        );
    }
}
