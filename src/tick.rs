//! Periodic work on a core: a task that calls `tick` on a value every `period` for as long as the
//! value lives (it holds only a `Weak`, so it never keeps the value alive and ends with it). Used by
//! the cache sweeper, the upstream pool's idle sweeper, the parking sweep and the memory return.

use std::rc::Weak;
use std::time::Duration;

/// Spawns the task on the current monoio runtime.
pub fn every<T: 'static>(period: Duration, target: Weak<T>, tick: impl Fn(&T) + 'static) {
    crate::task::spawn(async move {
        loop {
            monoio::time::sleep(period).await;
            match target.upgrade() {
                Some(t) => tick(&t),
                None => return,
            }
        }
    });
}
