//! Per-project circuit breakers: a pure state machine with `now` passed in, so tests drive time.
//!
//! Closed: requests flow; `CIRCUIT_BREAKER_THRESHOLD` consecutive failures (connect error, timeout,
//! 5xx; a 404 or 429 is an answer, not a failure) open the circuit. Open: the project is left out of
//! fan-outs and mapped requests fail fast, first for [`FIRST_OPEN`], then for twice as long after
//! each failed probe, up to `CIRCUIT_BREAKER_TIMEOUT`. Half-open: exactly one probe request is let
//! through; its success closes the circuit (and the next opening starts short again), its failure
//! opens it again for the doubled time, and a probe that ends without a verdict (cancelled) lets the
//! next request probe.
//!
//! Why the doubling: a circuit that opens for the full timeout at once keeps a project out for that
//! long after a blip. A restart of Harbor resets every connection of every project at once, so every
//! circuit opens, and with a flat 30 s they all stay open for 25 s after Harbor is back (the soak in
//! docs/reliability.md found it). Doubling from one second bounds the time a circuit stays open
//! after its project recovers to about the outage's own length (or the timeout, whichever is less),
//! for one probe per circuit and core per period: a handful in the first half-minute.
//!
//! A request admitted by a breaker holds a [`Ticket`] that records its outcome; a ticket dropped
//! without one (the request lost a race, or its client went away) frees the half-open probe.
//!
//! A project has two breakers, one per [`Lane`]: tag lookups (manifests by tag, tag lists) need
//! Harbor to ask the project's upstream registry, while content by digest (manifests, blobs,
//! referrers) Harbor serves from its own store once it holds it. An upstream outage fails the first
//! and not the second; one breaker for both would refuse the content Harbor still serves, and with it
//! every pull that survives on a last-known-good tag.
//!
//! Each core keeps its own breakers: recording an outcome on every request would otherwise be a write
//! shared by all cores on the hot path. The cost is that each core learns of an outage on its own
//! (`THRESHOLD` failures per core), which for a handful of cores is a handful of extra failed requests.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// How long a circuit first stays open (or the timeout, when shorter); each failed probe doubles it.
pub const FIRST_OPEN: Duration = Duration::from_secs(1);

/// A project's circuit: tag lookups need Harbor's upstream, content by digest does not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lane {
    /// Manifests by tag, tag lists.
    Tags,
    /// Manifests by digest, blobs, referrers.
    Content,
}

impl Lane {
    pub const ALL: &'static [Lane] = &[Lane::Tags, Lane::Content];
    pub const COUNT: usize = Lane::ALL.len();

    pub fn as_str(self) -> &'static str {
        match self {
            Lane::Tags => "tags",
            Lane::Content => "content",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probing: bool },
}

/// What a breaker says about sending a request now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Closed: send it.
    Allowed,
    /// Half-open: send it as the one probe; report its outcome.
    Probe,
    /// Open (or a probe is already out): do not send.
    Rejected,
}

/// How an outcome changed a breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Unchanged,
    /// Closed → open: the threshold of consecutive failures was reached.
    Opened,
    /// Half-open → open: the probe failed.
    Reopened,
    /// Half-open → closed: the probe succeeded.
    Closed,
}

/// One project's breaker.
#[derive(Debug, Clone)]
pub struct Breaker {
    state: State,
    threshold: u32,
    /// The longest an open circuit waits (`CIRCUIT_BREAKER_TIMEOUT`).
    open_for: Duration,
    /// How long the circuit stays open the next time it opens (or reopens).
    next_open: Duration,
    /// How long it stayed open last, for a late failure while open to restart the same wait.
    last_open: Duration,
}

impl Breaker {
    pub fn new(threshold: u32, open_for: Duration) -> Breaker {
        Breaker {
            state: State::Closed { failures: 0 },
            threshold: threshold.max(1),
            open_for,
            next_open: FIRST_OPEN.min(open_for),
            last_open: FIRST_OPEN.min(open_for),
        }
    }

    /// Asks to send one request at `now`. A `Probe` answer reserves the single half-open probe.
    pub fn admit(&mut self, now: Instant) -> Admission {
        match self.state {
            State::Closed { .. } => Admission::Allowed,
            State::Open { until } if now < until => Admission::Rejected,
            State::Open { .. } | State::HalfOpen { probing: false } => {
                self.state = State::HalfOpen { probing: true };
                Admission::Probe
            }
            State::HalfOpen { probing: true } => Admission::Rejected,
        }
    }

    /// A success closes the circuit, whatever state it was in: the probe succeeded, or a request
    /// admitted before the circuit opened succeeded late (the project answers again).
    pub fn on_success(&mut self) -> Transition {
        let was_closed = matches!(self.state, State::Closed { .. });
        self.state = State::Closed { failures: 0 };
        self.next_open = FIRST_OPEN.min(self.open_for);
        if was_closed {
            Transition::Unchanged
        } else {
            Transition::Closed
        }
    }

    pub fn on_failure(&mut self, now: Instant) -> Transition {
        let (next, transition) = match self.state {
            State::Closed { failures } if failures + 1 < self.threshold => (
                State::Closed {
                    failures: failures + 1,
                },
                Transition::Unchanged,
            ),
            State::Closed { .. } => (self.opened(now), Transition::Opened),
            State::HalfOpen { .. } => (self.opened(now), Transition::Reopened),
            // A request admitted before the circuit opened failed late: the same wait starts again
            // (it says nothing new about the project, so it does not lengthen the next one).
            State::Open { .. } => (
                State::Open {
                    until: now + self.last_open,
                },
                Transition::Unchanged,
            ),
        };
        self.state = next;
        transition
    }

    /// Opens for the next wait and doubles the one after, up to the timeout.
    fn opened(&mut self, now: Instant) -> State {
        self.last_open = self.next_open;
        self.next_open = (self.next_open * 2).min(self.open_for);
        State::Open {
            until: now + self.last_open,
        }
    }

    /// A probe ended without a verdict (its request was cancelled): let the next request probe.
    pub fn on_abandoned(&mut self) {
        if self.state == (State::HalfOpen { probing: true }) {
            self.state = State::HalfOpen { probing: false };
        }
    }
}

/// One core's breakers, by lane and project name.
#[derive(Debug)]
pub struct Breakers {
    lanes: [RefCell<HashMap<String, Breaker>>; Lane::COUNT],
    threshold: u32,
    open_for: Duration,
}

impl Breakers {
    pub fn new(threshold: u32, open_for: Duration) -> Rc<Breakers> {
        Rc::new(Breakers {
            lanes: Default::default(),
            threshold,
            open_for,
        })
    }

    /// A ticket to send one request of `lane` to `project` at `now`, or `None` when that circuit is
    /// open.
    pub fn admit(self: &Rc<Self>, project: &str, lane: Lane, now: Instant) -> Option<Ticket> {
        let admission = self.with(project, lane, |b| b.admit(now));
        (admission != Admission::Rejected).then(|| Ticket {
            breakers: self.clone(),
            project: project.to_string(),
            lane,
            probe: admission == Admission::Probe,
        })
    }

    fn with<T>(&self, project: &str, lane: Lane, f: impl FnOnce(&mut Breaker) -> T) -> T {
        let mut map = self.lanes[lane.index()].borrow_mut();
        if let Some(b) = map.get_mut(project) {
            return f(b);
        }
        let b = map
            .entry(project.to_string())
            .or_insert_with(|| Breaker::new(self.threshold, self.open_for));
        f(b)
    }
}

/// A request admitted by a project's breaker. [`Ticket::record`] reports how it went; dropped without
/// a verdict, it frees a half-open probe so the next request can probe.
pub struct Ticket {
    breakers: Rc<Breakers>,
    project: String,
    lane: Lane,
    probe: bool,
}

impl Ticket {
    /// Records the request's outcome (`failed` as the attempt judge defines it); returns the change
    /// of state (the caller logs it), the project's name and the lane.
    pub fn record(mut self, failed: bool, now: Instant) -> (Transition, String, Lane) {
        self.probe = false;
        let project = std::mem::take(&mut self.project);
        let t = self.breakers.with(&project, self.lane, |b| {
            if failed {
                b.on_failure(now)
            } else {
                b.on_success()
            }
        });
        (t, project, self.lane)
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.probe {
            self.breakers
                .with(&self.project, self.lane, Breaker::on_abandoned);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(30);

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn opens_after_threshold_consecutive_failures() {
        let now = Instant::now();
        let mut b = Breaker::new(3, T);
        for _ in 0..2 {
            assert_eq!(b.admit(now), Admission::Allowed);
            assert_eq!(b.on_failure(now), Transition::Unchanged);
        }
        assert_eq!(b.on_failure(now), Transition::Opened);
        assert_eq!(b.admit(now), Admission::Rejected);
        assert_eq!(b.admit(now + FIRST_OPEN - MS), Admission::Rejected);
        assert_eq!(b.admit(now + FIRST_OPEN), Admission::Probe);
    }

    #[test]
    fn a_success_resets_the_count() {
        let now = Instant::now();
        let mut b = Breaker::new(3, T);
        b.on_failure(now);
        b.on_failure(now);
        assert_eq!(b.on_success(), Transition::Unchanged);
        b.on_failure(now);
        assert_eq!(
            b.on_failure(now),
            Transition::Unchanged,
            "failures must be consecutive"
        );
        assert_eq!(b.on_failure(now), Transition::Opened);
    }

    #[test]
    fn half_open_lets_exactly_one_probe_through() {
        let now = Instant::now();
        let mut b = Breaker::new(1, T);
        assert_eq!(b.on_failure(now), Transition::Opened);
        let later = now + T;
        assert_eq!(b.admit(later), Admission::Probe);
        assert_eq!(b.admit(later), Admission::Rejected, "one probe at a time");
        assert_eq!(b.on_success(), Transition::Closed);
        assert_eq!(b.admit(later), Admission::Allowed);
    }

    /// Waits the breaker makes after each failed probe, from its opening on.
    fn waits(b: &mut Breaker, mut now: Instant, n: usize) -> (Vec<Duration>, Instant) {
        let mut waits = Vec::new();
        for _ in 0..n {
            let opened = now;
            while b.admit(now) == Admission::Rejected {
                now += MS * 10;
            }
            waits.push(now - opened);
            assert_eq!(b.on_failure(now), Transition::Reopened);
        }
        (waits, now)
    }

    #[test]
    fn each_failed_probe_doubles_the_wait_up_to_the_timeout() {
        let now = Instant::now();
        let mut b = Breaker::new(2, T);
        b.on_failure(now);
        assert_eq!(b.on_failure(now), Transition::Opened);
        let (w, later) = waits(&mut b, now, 7);
        let secs: Vec<u64> = w.iter().map(Duration::as_secs).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 30, 30]);

        // A probe that succeeds closes it, and the next opening starts short again.
        let later = later + T;
        assert_eq!(b.admit(later), Admission::Probe);
        assert_eq!(b.on_success(), Transition::Closed);
        b.on_failure(later);
        assert_eq!(b.on_failure(later), Transition::Opened);
        assert_eq!(b.admit(later + FIRST_OPEN - MS), Admission::Rejected);
        assert_eq!(b.admit(later + FIRST_OPEN), Admission::Probe);
    }

    #[test]
    fn a_timeout_shorter_than_the_first_wait_is_the_wait() {
        let now = Instant::now();
        let short = Duration::from_millis(200);
        let mut b = Breaker::new(1, short);
        assert_eq!(b.on_failure(now), Transition::Opened);
        assert_eq!(b.admit(now + short - MS), Admission::Rejected);
        assert_eq!(b.admit(now + short), Admission::Probe);
        assert_eq!(b.on_failure(now + short), Transition::Reopened);
        assert_eq!(b.admit(now + short * 2), Admission::Probe, "never longer");
    }

    #[test]
    fn a_late_failure_while_open_restarts_the_same_wait() {
        let now = Instant::now();
        let mut b = Breaker::new(1, T);
        b.on_failure(now);
        let t1 = now + FIRST_OPEN / 2;
        assert_eq!(b.on_failure(t1), Transition::Unchanged);
        assert_eq!(b.admit(now + FIRST_OPEN), Admission::Rejected);
        assert_eq!(
            b.admit(t1 + FIRST_OPEN),
            Admission::Probe,
            "a late failure restarts the wait without lengthening it"
        );
        assert_eq!(b.on_failure(t1 + FIRST_OPEN), Transition::Reopened);
        assert_eq!(
            b.admit(t1 + FIRST_OPEN * 3 - MS),
            Admission::Rejected,
            "the probe's failure doubles it"
        );
        assert_eq!(b.admit(t1 + FIRST_OPEN * 3), Admission::Probe);
    }

    #[test]
    fn an_abandoned_probe_frees_the_slot() {
        let now = Instant::now();
        let mut b = Breaker::new(1, T);
        b.on_failure(now);
        assert_eq!(b.admit(now + T), Admission::Probe);
        b.on_abandoned();
        assert_eq!(b.admit(now + T), Admission::Probe);
        // Abandoning outside a probe changes nothing.
        b.on_success();
        b.on_abandoned();
        assert_eq!(b.admit(now + T), Admission::Allowed);
    }

    #[test]
    fn tickets_record_and_a_dropped_probe_ticket_frees_the_probe() {
        let now = Instant::now();
        let all = Breakers::new(1, T);
        let t = all
            .admit("a", Lane::Tags, now)
            .expect("unknown projects are closed");
        assert_eq!(t.record(true, now).0, Transition::Opened);
        assert!(all.admit("a", Lane::Tags, now).is_none());
        assert!(all.admit("b", Lane::Tags, now).is_some(), "per project");
        let later = now + T;
        let probe = all
            .admit("a", Lane::Tags, later)
            .expect("half-open: one probe");
        assert!(
            all.admit("a", Lane::Tags, later).is_none(),
            "the probe is out"
        );
        drop(probe);
        let probe = all
            .admit("a", Lane::Tags, later)
            .expect("a dropped probe frees the slot");
        assert_eq!(probe.record(false, later).0, Transition::Closed);
        let t = all.admit("a", Lane::Tags, later).expect("closed");
        drop(t);
        assert!(
            all.admit("a", Lane::Tags, later).is_some(),
            "dropping a closed-state ticket changes nothing"
        );
    }

    #[test]
    fn lanes_open_apart() {
        let now = Instant::now();
        let all = Breakers::new(1, T);
        let t = all.admit("a", Lane::Tags, now).expect("closed");
        assert_eq!(t.record(true, now).0, Transition::Opened);
        assert!(all.admit("a", Lane::Tags, now).is_none());
        let t = all
            .admit("a", Lane::Content, now)
            .expect("tag lookups failing leave content by digest flowing");
        assert_eq!(t.record(false, now).0, Transition::Unchanged);
        assert!(all.admit("a", Lane::Tags, now).is_none(), "still open");
    }

    #[test]
    fn threshold_zero_is_treated_as_one() {
        let now = Instant::now();
        let mut b = Breaker::new(0, T);
        assert_eq!(b.on_failure(now), Transition::Opened);
    }

    #[test]
    fn a_late_success_closes_an_open_circuit_and_says_so() {
        let now = Instant::now();
        let mut b = Breaker::new(1, Duration::from_secs(30));
        assert_eq!(b.on_failure(now), Transition::Opened);
        assert_eq!(b.admit(now), Admission::Rejected);
        assert_eq!(
            b.on_success(),
            Transition::Closed,
            "a request admitted before it opened"
        );
        assert_eq!(b.admit(now), Admission::Allowed);
        assert_eq!(b.on_success(), Transition::Unchanged);
    }
}
