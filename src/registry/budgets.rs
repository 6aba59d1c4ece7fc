//! The per-client-IP budgets as a core spends them ([`Limits`], shared by the cores): requests under
//! `RATE_LIMIT_PER_IP`, fan-outs under `FANOUT_BUDGET_PER_IP`, with the core's clock. A refusal is a
//! registry error with `Retry-After`.

use std::net::IpAddr;
use std::sync::Arc;

use crate::clock::Clock;
use crate::error::Error;
use crate::limit::Limits;

pub struct Budgets {
    limits: Arc<Limits>,
    clock: Clock,
}

impl Budgets {
    pub fn new(limits: Arc<Limits>, clock: Clock) -> Budgets {
        Budgets { limits, clock }
    }

    /// One request from `client`, under `RATE_LIMIT_PER_IP` (free when the limit is off).
    pub fn admit_request(&self, client: IpAddr) -> Result<(), Error> {
        if !self.limits.limits_requests() {
            return Ok(());
        }
        self.limits
            .admit_request(client, self.clock.now())
            .map_err(|r| Error::ClientRateLimited {
                retry_after_secs: r.seconds(),
                reason: "this client sent more requests than RATE_LIMIT_PER_IP allows",
            })
    }

    /// One fan-out for `client` (a request that asks every project), under `FANOUT_BUDGET_PER_IP`.
    pub fn admit_fan_out(&self, client: IpAddr) -> Result<(), Error> {
        self.limits
            .admit_fan_out(client, self.clock.now())
            .map_err(|r| Error::ClientRateLimited {
                retry_after_secs: r.seconds(),
                reason:
                    "this client asked for more unknown images than FANOUT_BUDGET_PER_IP allows",
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::TestClock;
    use crate::limit::Rate;
    use std::time::Duration;

    #[test]
    fn a_spent_fan_out_budget_refills_with_the_clock() {
        let clock = TestClock::new();
        let limits = Arc::new(Limits::new(Rate::new(0, 0), Rate::new(1, 2)));
        let b = Budgets::new(limits, clock.clock());
        let ip: IpAddr = "198.51.100.7".parse().unwrap();
        assert!(b.admit_request(ip).is_ok(), "the request limit is off");
        assert!(b.admit_fan_out(ip).is_ok());
        assert!(b.admit_fan_out(ip).is_ok());
        let e = b.admit_fan_out(ip).unwrap_err();
        assert!(matches!(e, Error::ClientRateLimited { .. }), "{e:?}");
        assert!(
            b.admit_fan_out("203.0.113.9".parse().unwrap()).is_ok(),
            "another client's own"
        );
        clock.advance(Duration::from_secs(1));
        assert!(b.admit_fan_out(ip).is_ok(), "refilled");
    }
}
