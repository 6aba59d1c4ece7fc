//! This core's circuits: a breaker per project and lane ([`Breakers`]), with each transition
//! logged (with the worker that saw it) and counted. A request is admitted with a ticket and its
//! outcome recorded with it; the decisions are the breaker's, made with the core's clock.

use std::rc::Rc;

use crate::clock::Clock;
use crate::metrics::labels::Circuit;
use crate::upstream::breaker::{Breakers, Lane, Ticket, Transition};

use super::counters::Counters;

pub struct Circuits {
    breakers: Rc<Breakers>,
    clock: Clock,
    counters: Rc<Counters>,
    /// Named in the log line of each transition: circuits are per core.
    worker: usize,
}

impl Circuits {
    pub fn new(
        threshold: u32,
        timeout: std::time::Duration,
        clock: Clock,
        counters: Rc<Counters>,
        worker: usize,
    ) -> Circuits {
        Circuits {
            breakers: Breakers::new(threshold, timeout),
            clock,
            counters,
            worker,
        }
    }

    /// A ticket to send one request of `lane` to `project`, or `None` when that circuit is open.
    pub fn admit(&self, project: &str, lane: Lane) -> Option<Ticket> {
        self.breakers.admit(project, lane, self.clock.now())
    }

    /// Records how an admitted request went: `failed` when its outcome counts against the circuit.
    pub fn record(&self, ticket: Ticket, failed: bool) {
        let (t, project, lane) = ticket.record(failed, self.clock.now());
        let worker = self.worker;
        let lane_name = lane.as_str();
        let to = match t {
            Transition::Opened => {
                tracing::warn!(
                    project,
                    lane = lane_name,
                    worker,
                    "circuit opened on this core: the project's lane is left out until it recovers"
                );
                Circuit::Open
            }
            Transition::Reopened => {
                tracing::warn!(
                    project,
                    lane = lane_name,
                    worker,
                    "circuit probe failed on this core: still open"
                );
                Circuit::Open
            }
            Transition::Closed => {
                tracing::info!(
                    project,
                    lane = lane_name,
                    worker,
                    "circuit closed on this core: the project recovered"
                );
                Circuit::Closed
            }
            Transition::Unchanged => return,
        };
        self.counters.project(&project, |m| m.circuit(lane, to));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::TestClock;
    use crate::metrics::CoreMetrics;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn a_circuit_opens_after_its_threshold_and_probes_after_its_timeout() {
        let clock = TestClock::new();
        let counters = Rc::new(Counters::new(Arc::new(CoreMetrics::new(0, Arc::default()))));
        let c = Circuits::new(2, Duration::from_secs(30), clock.clock(), counters, 0);
        for _ in 0..2 {
            let t = c.admit("quay", Lane::Tags).expect("closed");
            c.record(t, true);
        }
        assert!(c.admit("quay", Lane::Tags).is_none(), "open");
        assert!(
            c.admit("quay", Lane::Content).is_some(),
            "the other lane is not"
        );
        assert!(c.admit("ghcr", Lane::Tags).is_some(), "nor another project");
        clock.advance(Duration::from_secs(30));
        let probe = c
            .admit("quay", Lane::Tags)
            .expect("one probe after the timeout");
        assert!(c.admit("quay", Lane::Tags).is_none(), "only one");
        c.record(probe, false);
        assert!(c.admit("quay", Lane::Tags).is_some(), "closed again");
    }
}
