//! A cheap "no progress for too long" detector for streams. Progress only stores an instant; a timer
//! is armed only when the stream has to wait, so a stream that keeps moving costs no timer work.
//! Used for downstream writes (a client that stops reading a blob) and upstream bodies (a Harbor that
//! stops sending one), so neither can pin a connection forever.

use std::future::Future;
use std::pin::Pin;
use std::task::Context;
use std::time::{Duration, Instant};

pub struct StallTimer {
    limit: Duration,
    last: Instant,
    sleep: Option<Pin<Box<monoio::time::Sleep>>>,
}

impl StallTimer {
    pub fn new(limit: Duration) -> StallTimer {
        StallTimer {
            limit,
            last: Instant::now(),
            sleep: None,
        }
    }

    /// The stream moved.
    #[inline]
    pub fn progress(&mut self) {
        self.last = Instant::now();
    }

    /// The stream has to wait: `true` when it has made no progress for the limit. Otherwise a timer
    /// is registered with `cx`, so the task is woken to check again.
    pub fn stalled(&mut self, cx: &mut Context<'_>) -> bool {
        loop {
            let deadline = self.last + self.limit;
            if Instant::now() >= deadline {
                return true;
            }
            let sleep = self
                .sleep
                .get_or_insert_with(|| Box::pin(monoio::time::sleep_until(deadline.into())));
            if sleep.deadline() != deadline.into() {
                sleep.as_mut().reset(deadline.into());
            }
            if sleep.as_mut().poll(cx).is_pending() {
                return false;
            }
            // The timer fired: loop to compare with the latest progress.
        }
    }
}
