//! What a core remembers between requests, with expiry instants stored in the values and `now` passed
//! in (quick_cache has no per-entry TTL):
//! - [`Mappings`]: `name → project`, the one seam every lookup goes through, in tiers: the core's own
//!   shard, then each shared [`Tier`] in order: the process-wide [`LearnedMap`], then Redis when
//!   configured (`crate::share`). A mapping is fresh for `CACHE_TTL`, then served stale (and refreshed in the
//!   background) for `STALE_WHILE_REVALIDATE`, then gone.
//! - [`Answers`]: remembered misses, manifests by digest and tag lists, per core.
//! - [`LastGood`]: what each tag last resolved to, per core, for answers when every project fails.
//!
//! Nothing a core reads on a hit is shared with another core: the shared tiers are read on a local
//! miss only and written on a learn, never on a hit.

mod answers;
mod last_good;
mod learned;
mod mappings;

use std::time::{Duration, Instant};

pub use answers::{Answers, Kept};
pub use last_good::{
    Confirmed, LastGood, Resolved, Seen, LAST_GOOD_BYTES_PER_CORE, LAST_GOOD_PER_CORE,
    MAX_KEPT_MANIFEST,
};
pub use learned::LearnedMap;
pub use mappings::{Asked, Found, Mappings, Tier, TierAnswer, TierLookup};

/// Where a name was found, and when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    pub project: String,
    pub learned_at: Instant,
}

/// A mapping's state at `now`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Freshness {
    Fresh,
    /// Past `CACHE_TTL` but within `STALE_WHILE_REVALIDATE`: use it, and refresh it.
    Stale,
    Expired,
}

/// Lifetimes, from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct Ttls {
    pub mapping: Duration,
    pub stale: Duration,
    pub miss: Duration,
    pub manifest: Duration,
}

impl Ttls {
    /// How old a mapping may get before nobody uses it any more.
    pub fn mapping_life(&self) -> Duration {
        self.mapping + self.stale
    }
}

impl Mapping {
    pub fn freshness(&self, ttls: &Ttls, now: Instant) -> Freshness {
        let age = now.saturating_duration_since(self.learned_at);
        if age < ttls.mapping {
            Freshness::Fresh
        } else if age < ttls.mapping_life() {
            Freshness::Stale
        } else {
            Freshness::Expired
        }
    }
}
