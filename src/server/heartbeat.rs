//! Each worker's heartbeat: a tick of its own loop every [`EVERY`] stores the time, and liveness
//! (`/healthz`, answered off the core) reads how long ago that was. A core stuck in a system call
//! or a loop stops its tick, which no other signal shows: its connections simply stop moving. One
//! store per second per core, never per request.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::LazyLock;
use std::time::{Duration, Instant};

/// How often a worker beats.
pub const EVERY: Duration = Duration::from_secs(1);
/// A worker whose last beat is this old is stuck.
pub const STUCK_AFTER: Duration = Duration::from_secs(10);

/// The process's monotonic origin (a wall clock that steps would fake a stuck core).
static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

/// Milliseconds from [`EPOCH`] to the last beat; one writer (the worker), any readers.
#[derive(Debug)]
pub struct Heartbeat(AtomicU64);

impl Default for Heartbeat {
    /// Beaten at creation: a worker that is starting is not stuck.
    fn default() -> Self {
        let h = Heartbeat(AtomicU64::new(0));
        h.beat();
        h
    }
}

impl Heartbeat {
    pub fn beat(&self) {
        self.0.store(since_epoch(Instant::now()), Ordering::Relaxed);
    }

    /// How long ago the last beat was, at `now`.
    pub fn age(&self, now: Instant) -> Duration {
        let last = self.0.load(Ordering::Relaxed);
        Duration::from_millis(since_epoch(now).saturating_sub(last))
    }

    /// Whether the worker has not beaten for [`STUCK_AFTER`] at `now`.
    pub fn stuck(&self, now: Instant) -> bool {
        self.age(now) >= STUCK_AFTER
    }
}

fn since_epoch(t: Instant) -> u64 {
    t.saturating_duration_since(*EPOCH).as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_that_stops_beating_is_stuck_after_the_limit() {
        let h = Heartbeat::default();
        let now = Instant::now();
        assert!(!h.stuck(now), "beaten when created");
        assert!(!h.stuck(now + STUCK_AFTER - Duration::from_millis(50)));
        assert!(h.stuck(now + STUCK_AFTER + Duration::from_millis(10)));
        h.beat();
        assert!(!h.stuck(Instant::now()));
    }
}
