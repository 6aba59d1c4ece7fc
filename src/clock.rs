//! The clock a core makes its decisions with: mapping and cache expiry, breakers, budgets, token
//! lives, health. One [`Clock`] is handed to each of them when the core is built, so a test can move
//! time forward for all of them at once ([`TestClock`]) instead of sleeping, and production code has
//! no way to move it. Durations measured for metrics and logs (how long a request took) read the
//! system clock directly: they are measurements, not decisions.

use std::cell::Cell;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// The system's monotonic clock, or a test's (the system's plus what the test moved it by).
/// `!Send`: one per core, like everything it decides for.
#[derive(Clone, Default)]
pub struct Clock {
    moved: Option<Rc<Cell<Duration>>>,
}

impl Clock {
    pub fn system() -> Clock {
        Clock::default()
    }

    pub fn now(&self) -> Instant {
        match &self.moved {
            None => Instant::now(),
            Some(by) => Instant::now() + by.get(),
        }
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.moved {
            None => f.write_str("Clock(system)"),
            Some(by) => write!(f, "Clock(system + {:?})", by.get()),
        }
    }
}

/// A clock a test moves forward: every [`Clock`] it hands out reads the system clock plus how far
/// the test moved it.
#[derive(Clone, Default, Debug)]
pub struct TestClock(Rc<Cell<Duration>>);

impl TestClock {
    pub fn new() -> TestClock {
        TestClock::default()
    }

    /// A clock that follows this one.
    pub fn clock(&self) -> Clock {
        Clock {
            moved: Some(self.0.clone()),
        }
    }

    /// Moves every clock of this one forward by `by`.
    pub fn advance(&self, by: Duration) {
        self.0.set(self.0.get() + by);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_test_clock_moves_every_clock_it_handed_out() {
        let test = TestClock::new();
        let (a, b) = (test.clock(), test.clock());
        let before = a.now();
        test.advance(Duration::from_secs(3600));
        assert!(a.now() >= before + Duration::from_secs(3600));
        assert!(b.now() >= before + Duration::from_secs(3600));
        let system = Clock::system();
        assert!(system.now() < a.now(), "the system clock is not moved");
    }
}
