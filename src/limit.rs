//! Per-client-IP limits shared by every core: the request rate limit (`RATE_LIMIT_PER_IP`, opt-in)
//! and the fan-out budget (`FANOUT_BUDGET_PER_IP`, always on), each a GCRA (generic cell rate
//! algorithm, the token bucket's single-number form) with `now` passed in, over one bounded table.
//!
//! This is the one place where cores share memory written per request: a client's budget must hold
//! across cores, or N cores would give it N budgets. The request limit is consulted on every request
//! only when it is on; the fan-out budget only when a request is about to ask Harbor's projects (a
//! miss), never on a hit. The table is a `quick_cache::sync` cache (sharded, bounded, evicting cold
//! entries first): an address scan cannot grow it past its capacity, and an evicted entry only
//! returns to a fresh budget. Entry values are atomics, so a check is a shard read lock and one
//! compare-and-swap.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use quick_cache::sync::Cache;

/// Client addresses tracked at once (each entry is a few dozen bytes).
const TRACKED: usize = 100_000;

/// What a budget is spent on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Request,
    FanOut,
}

/// A rate with a burst: `per_second` on average, up to `burst` at once.
#[derive(Debug, Clone, Copy)]
pub struct Rate {
    /// Nanoseconds between two admissions at the steady rate.
    interval: u64,
    /// How far ahead of `now` the theoretical arrival time may run: `(burst - 1) * interval`.
    tolerance: u64,
}

impl Rate {
    /// `None` for a rate of 0 (no limit).
    pub fn new(per_second: u32, burst: u32) -> Option<Rate> {
        if per_second == 0 {
            return None;
        }
        let interval = 1_000_000_000 / u64::from(per_second);
        Some(Rate {
            interval: interval.max(1),
            tolerance: interval.max(1) * u64::from(burst.max(1) - 1),
        })
    }

    /// One GCRA step on `tat` (the theoretical arrival time, ns since the epoch) at `now`: `Ok`
    /// admits and advances it; `Err` says how long until one more would be admitted.
    fn admit(&self, tat: &AtomicU64, now: u64) -> Result<(), Duration> {
        let mut current = tat.load(Ordering::Relaxed);
        loop {
            let start = current.max(now);
            if start - now > self.tolerance {
                return Err(Duration::from_nanos(start - now - self.tolerance));
            }
            match tat.compare_exchange_weak(
                current,
                start + self.interval,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(()),
                Err(seen) => current = seen,
            }
        }
    }
}

/// The limits of one process, shared by its cores.
pub struct Limits {
    requests: Option<Rate>,
    fan_outs: Option<Rate>,
    table: Cache<(IpAddr, Kind), Arc<AtomicU64>>,
    epoch: Instant,
}

/// Refused: retry after this long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryAfter(pub Duration);

impl RetryAfter {
    /// Whole seconds, rounded up, at least 1, as `Retry-After` says them.
    pub fn seconds(&self) -> u64 {
        (self.0.as_nanos().div_ceil(1_000_000_000) as u64).max(1)
    }
}

impl Limits {
    pub fn new(requests: Option<Rate>, fan_outs: Option<Rate>) -> Limits {
        Limits::with_capacity(requests, fan_outs, TRACKED)
    }

    fn with_capacity(requests: Option<Rate>, fan_outs: Option<Rate>, tracked: usize) -> Limits {
        Limits {
            requests,
            fan_outs,
            table: Cache::new(tracked),
            epoch: Instant::now(),
        }
    }

    /// Whether the request limit is on (when off, a request costs nothing here).
    pub fn limits_requests(&self) -> bool {
        self.requests.is_some()
    }

    /// One request from `ip` at `now`.
    pub fn admit_request(&self, ip: IpAddr, now: Instant) -> Result<(), RetryAfter> {
        match self.requests {
            Some(rate) => self.admit(rate, (ip, Kind::Request), now),
            None => Ok(()),
        }
    }

    /// One fan-out started for `ip` at `now`.
    pub fn admit_fan_out(&self, ip: IpAddr, now: Instant) -> Result<(), RetryAfter> {
        match self.fan_outs {
            Some(rate) => self.admit(rate, (ip, Kind::FanOut), now),
            None => Ok(()),
        }
    }

    fn admit(
        &self,
        rate: Rate,
        (ip, kind): (IpAddr, Kind),
        now: Instant,
    ) -> Result<(), RetryAfter> {
        let key = (client_block(ip), kind);
        let now = now.saturating_duration_since(self.epoch).as_nanos() as u64;
        let tat = self
            .table
            .get_or_insert_with(&key, || Ok::<_, ()>(Arc::new(AtomicU64::new(0))))
            .expect("the constructor does not fail");
        rate.admit(&tat, now).map_err(RetryAfter)
    }

    /// Addresses tracked right now.
    pub fn tracked(&self) -> usize {
        self.table.len()
    }
}

/// What one client is, for the budgets: an IPv4 address, or an IPv6 /64 (one host commonly holds a
/// whole /64, so per-address keys would give it unlimited budgets).
fn client_block(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(bits.into())
            }
        },
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_burst_then_the_steady_rate() {
        let l = Limits::new(Rate::new(10, 5), None);
        let t0 = Instant::now();
        for i in 0..5 {
            assert!(l.admit_request(ip("10.0.0.1"), t0).is_ok(), "burst {i}");
        }
        let refused = l.admit_request(ip("10.0.0.1"), t0).unwrap_err();
        assert_eq!(refused, RetryAfter(Duration::from_millis(100)));
        assert_eq!(refused.seconds(), 1);
        assert!(
            l.admit_request(ip("10.0.0.2"), t0).is_ok(),
            "another address has its own budget"
        );
        // One more every 100 ms.
        let t1 = t0 + Duration::from_millis(100);
        assert!(l.admit_request(ip("10.0.0.1"), t1).is_ok());
        assert!(l.admit_request(ip("10.0.0.1"), t1).is_err());
        // Idle for a while: the whole burst again, never more.
        let t2 = t1 + Duration::from_secs(60);
        for _ in 0..5 {
            assert!(l.admit_request(ip("10.0.0.1"), t2).is_ok());
        }
        assert!(l.admit_request(ip("10.0.0.1"), t2).is_err());
    }

    #[test]
    fn an_ipv6_host_is_one_client_per_64() {
        let l = Limits::new(Rate::new(1, 1), None);
        let t0 = Instant::now();
        assert!(l.admit_request(ip("2001:db8:1:2::1"), t0).is_ok());
        assert!(
            l.admit_request(ip("2001:db8:1:2:ffff::9"), t0).is_err(),
            "same /64"
        );
        assert!(
            l.admit_request(ip("2001:db8:1:3::1"), t0).is_ok(),
            "another /64"
        );
        assert!(l.admit_request(ip("::ffff:192.0.2.1"), t0).is_ok());
        assert!(
            l.admit_request(ip("192.0.2.1"), t0).is_err(),
            "a v4-mapped address is its IPv4 address"
        );
    }

    #[test]
    fn requests_and_fan_outs_are_separate_budgets() {
        let l = Limits::new(Rate::new(1, 1), Rate::new(1, 2));
        let t0 = Instant::now();
        let a = ip("192.0.2.44");
        assert!(l.admit_request(a, t0).is_ok());
        assert!(l.admit_request(a, t0).is_err());
        assert!(l.admit_fan_out(a, t0).is_ok());
        assert!(l.admit_fan_out(a, t0).is_ok());
        assert!(l.admit_fan_out(a, t0).is_err());
    }

    #[test]
    fn off_costs_nothing_and_admits_all() {
        let l = Limits::new(Rate::new(0, 10), None);
        assert!(!l.limits_requests());
        let t0 = Instant::now();
        for _ in 0..1000 {
            assert!(l.admit_request(ip("10.0.0.1"), t0).is_ok());
            assert!(l.admit_fan_out(ip("10.0.0.1"), t0).is_ok());
        }
        assert_eq!(l.tracked(), 0, "nothing tracked when off");
    }

    #[test]
    fn an_address_scan_cannot_grow_the_table_past_its_capacity() {
        let l = Limits::with_capacity(Rate::new(1, 1), None, 1000);
        let t0 = Instant::now();
        for i in 0..200_000u32 {
            let _ = l.admit_request(IpAddr::from(i.to_be_bytes()), t0);
        }
        assert!(l.tracked() <= 1000, "{} tracked", l.tracked());
        // A client that keeps asking stays tracked (hot entries survive) and limited.
        let busy = ip("192.0.2.1");
        assert!(l.admit_request(busy, t0).is_ok());
        for i in 0..10_000u32 {
            let _ = l.admit_request(IpAddr::from((i + 1_000_000).to_be_bytes()), t0);
            assert!(l.admit_request(busy, t0).is_err(), "after {i} others");
        }
    }

    #[test]
    fn shared_across_threads() {
        let l = Arc::new(Limits::new(Rate::new(1, 100), None));
        let t0 = Instant::now();
        let admitted: usize = (0..4)
            .map(|_| {
                let l = l.clone();
                std::thread::spawn(move || {
                    (0..100)
                        .filter(|_| l.admit_request(ip("10.0.0.9"), t0).is_ok())
                        .count()
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .sum();
        assert_eq!(admitted, 100, "one budget, whatever thread asks");
    }
}
