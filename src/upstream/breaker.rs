//! Per-project circuit breakers: a pure state machine with `now` passed in, so tests drive time.
//!
//! Closed: requests flow; `CIRCUIT_BREAKER_THRESHOLD` consecutive failures (connect error, timeout,
//! 5xx; a 404 or 429 is an answer, not a failure) open the circuit. Open: the project is left out of
//! fan-outs and mapped requests fail fast, for `CIRCUIT_BREAKER_TIMEOUT`. Half-open: exactly one
//! probe request is let through; its success closes the circuit, its failure opens it again for
//! another timeout, and a probe that ends without a verdict (cancelled) lets the next request probe.
//!
//! Each core keeps its own breakers: recording an outcome on every request would otherwise be a write
//! shared by all cores on the hot path. The cost is that each core learns of an outage on its own
//! (`THRESHOLD` failures per core), which for a handful of cores is a handful of extra failed requests.

use std::collections::HashMap;
use std::time::{Duration, Instant};

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

/// One project's breaker.
#[derive(Debug, Clone)]
pub struct Breaker {
    state: State,
    threshold: u32,
    open_for: Duration,
}

impl Breaker {
    pub fn new(threshold: u32, open_for: Duration) -> Breaker {
        Breaker {
            state: State::Closed { failures: 0 },
            threshold: threshold.max(1),
            open_for,
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

    /// Whether a request would be admitted at `now`, without reserving anything.
    pub fn available(&self, now: Instant) -> bool {
        match self.state {
            State::Closed { .. } | State::HalfOpen { probing: false } => true,
            State::Open { until } => now >= until,
            State::HalfOpen { probing: true } => false,
        }
    }

    pub fn on_success(&mut self) {
        self.state = State::Closed { failures: 0 };
    }

    pub fn on_failure(&mut self, now: Instant) {
        self.state = match self.state {
            State::Closed { failures } if failures + 1 < self.threshold => State::Closed {
                failures: failures + 1,
            },
            // The threshold is reached, a probe failed, or a request admitted before the circuit
            // opened failed late: (re)open.
            _ => State::Open {
                until: now + self.open_for,
            },
        };
    }

    /// A probe ended without a verdict (its request was cancelled): let the next request probe.
    pub fn on_abandoned(&mut self) {
        if self.state == (State::HalfOpen { probing: true }) {
            self.state = State::HalfOpen { probing: false };
        }
    }

    pub fn state_name(&self) -> &'static str {
        match self.state {
            State::Closed { .. } => "closed",
            State::Open { .. } => "open",
            State::HalfOpen { .. } => "half-open",
        }
    }
}

/// One core's breakers, by project name.
#[derive(Debug)]
pub struct Breakers {
    map: HashMap<String, Breaker>,
    threshold: u32,
    open_for: Duration,
}

impl Breakers {
    pub fn new(threshold: u32, open_for: Duration) -> Breakers {
        Breakers {
            map: HashMap::new(),
            threshold,
            open_for,
        }
    }

    pub fn get(&mut self, project: &str) -> &mut Breaker {
        if !self.map.contains_key(project) {
            self.map.insert(
                project.to_string(),
                Breaker::new(self.threshold, self.open_for),
            );
        }
        self.map.get_mut(project).expect("inserted above")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(30);

    #[test]
    fn opens_after_threshold_consecutive_failures() {
        let now = Instant::now();
        let mut b = Breaker::new(3, T);
        for _ in 0..2 {
            assert_eq!(b.admit(now), Admission::Allowed);
            b.on_failure(now);
            assert_eq!(b.state_name(), "closed");
        }
        b.on_failure(now);
        assert_eq!(b.state_name(), "open");
        assert_eq!(b.admit(now), Admission::Rejected);
        assert!(!b.available(now + T - Duration::from_millis(1)));
    }

    #[test]
    fn a_success_resets_the_count() {
        let now = Instant::now();
        let mut b = Breaker::new(3, T);
        b.on_failure(now);
        b.on_failure(now);
        b.on_success();
        b.on_failure(now);
        b.on_failure(now);
        assert_eq!(b.state_name(), "closed", "failures must be consecutive");
        b.on_failure(now);
        assert_eq!(b.state_name(), "open");
    }

    #[test]
    fn half_open_lets_exactly_one_probe_through() {
        let now = Instant::now();
        let mut b = Breaker::new(1, T);
        b.on_failure(now);
        let later = now + T;
        assert!(b.available(later));
        assert_eq!(b.admit(later), Admission::Probe);
        assert_eq!(b.state_name(), "half-open");
        assert!(!b.available(later));
        assert_eq!(b.admit(later), Admission::Rejected, "one probe at a time");
        b.on_success();
        assert_eq!(b.state_name(), "closed");
        assert_eq!(b.admit(later), Admission::Allowed);
    }

    #[test]
    fn a_failed_probe_reopens_for_another_timeout() {
        let now = Instant::now();
        let mut b = Breaker::new(2, T);
        b.on_failure(now);
        b.on_failure(now);
        let t1 = now + T;
        assert_eq!(b.admit(t1), Admission::Probe);
        b.on_failure(t1);
        assert_eq!(b.state_name(), "open");
        assert_eq!(
            b.admit(t1 + T - Duration::from_secs(1)),
            Admission::Rejected
        );
        assert_eq!(b.admit(t1 + T), Admission::Probe);
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
        assert_eq!(b.state_name(), "closed");
    }

    #[test]
    fn per_project() {
        let now = Instant::now();
        let mut all = Breakers::new(1, T);
        assert_eq!(
            all.get("a").admit(now),
            Admission::Allowed,
            "unknown projects are closed"
        );
        all.get("a").on_failure(now);
        assert_eq!(all.get("a").admit(now), Admission::Rejected);
        assert_eq!(all.get("b").admit(now), Admission::Allowed);
    }

    #[test]
    fn threshold_zero_is_treated_as_one() {
        let now = Instant::now();
        let mut b = Breaker::new(0, T);
        b.on_failure(now);
        assert_eq!(b.state_name(), "open");
    }
}
