//! Counters, gauges and histograms written by one thread and read by another (the metrics scrape).
//! Each value has one writer, its owner: a core for its own counters, a control thread for its own.
//! The owner's write is a relaxed load and a relaxed store (a plain add, no locked instruction, no
//! cache line shared with another writer); the reader loads relaxed and may see a value a moment old,
//! never a torn one. A counter written by several threads must not use [`Counter::inc`]: use
//! [`Counter::inc_shared`].

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// A monotonic count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one; call from the owning thread only.
    #[inline]
    pub fn inc(&self) {
        self.add(1);
    }

    /// Adds `n`; call from the owning thread only.
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.store(self.0.load(Relaxed).wrapping_add(n), Relaxed);
    }

    /// Adds one from any thread (a locked add: for counters without a single owner, off the hot
    /// path).
    pub fn inc_shared(&self) {
        self.0.fetch_add(1, Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    /// Call from the owning thread only.
    #[inline]
    pub fn set(&self, v: i64) {
        self.0.store(v, Relaxed);
    }

    /// Call from the owning thread only.
    #[inline]
    pub fn add(&self, d: i64) {
        self.0.store(self.0.load(Relaxed).wrapping_add(d), Relaxed);
    }

    pub fn get(&self) -> i64 {
        self.0.load(Relaxed)
    }
}

/// Bucket bounds for durations, in microseconds: 250 µs to 30 s.
pub const DURATION_BOUNDS_MICROS: &[u64] = &[
    250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000, 5_000_000, 10_000_000, 30_000_000,
];

/// Bucket bounds for small counts (how many projects a fan-out asked).
pub const COUNT_BOUNDS: &[u64] = &[1, 2, 3, 5, 10, 20, 50, 100];

/// A histogram over fixed bounds, in integer units (microseconds for durations). Each observation
/// adds to one bucket (the encoder makes them cumulative), the sum and the count.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [u64],
    /// One per bound, and one for `+Inf`.
    buckets: Box<[Counter]>,
    sum: Counter,
    count: Counter,
}

impl Histogram {
    pub fn new(bounds: &'static [u64]) -> Histogram {
        Histogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| Counter::default()).collect(),
            sum: Counter::default(),
            count: Counter::default(),
        }
    }

    pub fn durations() -> Histogram {
        Histogram::new(DURATION_BOUNDS_MICROS)
    }

    /// Call from the owning thread only.
    #[inline]
    pub fn observe(&self, v: u64) {
        let i = self.bounds.partition_point(|b| *b < v);
        self.buckets[i].inc();
        self.sum.add(v);
        self.count.inc();
    }

    /// Call from the owning thread only.
    #[inline]
    pub fn observe_duration(&self, d: Duration) {
        self.observe(d.as_micros().min(u64::MAX as u128) as u64);
    }

    pub fn bounds(&self) -> &'static [u64] {
        self.bounds
    }

    /// Per-bucket counts (not cumulative), the last one for `+Inf`.
    pub fn buckets(&self) -> impl Iterator<Item = u64> + '_ {
        self.buckets.iter().map(Counter::get)
    }

    pub fn sum(&self) -> u64 {
        self.sum.get()
    }

    pub fn count(&self) -> u64 {
        self.count.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_take_values_up_to_their_bound() {
        let h = Histogram::new(&[1, 5, 10]);
        for v in [0, 1, 2, 5, 6, 10, 11, 1000] {
            h.observe(v);
        }
        assert_eq!(h.buckets().collect::<Vec<_>>(), [2, 2, 2, 2]);
        assert_eq!(h.count(), 8);
        assert_eq!(h.sum(), 1035);
        let d = Histogram::durations();
        d.observe_duration(Duration::from_millis(3));
        assert_eq!(d.buckets().position(|c| c == 1), Some(4), "≤ 5 ms");
    }

    #[test]
    fn counters_and_gauges() {
        let c = Counter::default();
        c.inc();
        c.add(4);
        c.inc_shared();
        assert_eq!(c.get(), 6);
        let g = Gauge::default();
        g.add(3);
        g.add(-5);
        assert_eq!(g.get(), -2);
        g.set(7);
        assert_eq!(g.get(), 7);
    }
}
