//! The one seam for `name → project`: a lookup tries the core's shard, then each shared tier in
//! order; a tier's answer is adopted by the shard and by the tiers before it (with its original
//! learning instant, so it ages as it would have), so the next request stops earlier. Learning and
//! forgetting go to every tier. Callers see one lookup, one learn, one forget: a new tier (a store
//! shared between pods) is one more entry in the list, not an edit of every caller.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::time::{Duration, Instant};

use quick_cache::unsync::Cache;

use super::{Freshness, Mapping, Ttls};

/// Names remembered per core.
const MAPPINGS_PER_CORE: usize = 100_000;

/// What a tier's lookup returns: it may have to wait (a network store does).
pub type TierLookup<'a> = Pin<Box<dyn Future<Output = Option<Mapping>> + 'a>>;

/// A place mappings are shared beyond one core. Asked only when the core's shard misses.
pub trait Tier {
    fn get<'a>(&'a self, name: &'a str) -> TierLookup<'a>;
    fn learn(&self, name: &str, mapping: &Mapping);
    /// Forgets `name` if this tier still maps it to `project`.
    fn forget(&self, name: &str, project: &str);
    /// Drops what is older than `max_age` (called by one core, off the request path).
    fn sweep(&self, _now: Instant, _max_age: Duration) {}
}

/// A usable mapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Known {
    pub project: String,
    /// Past `CACHE_TTL`: use it, and refresh it in the background.
    pub stale: bool,
}

/// One core's view of the mappings: its shard, then the shared tiers.
pub struct Mappings {
    ttls: Ttls,
    shard: RefCell<Cache<String, Mapping>>,
    tiers: Vec<Rc<dyn Tier>>,
}

impl Mappings {
    pub fn new(ttls: Ttls, tiers: Vec<Rc<dyn Tier>>) -> Mappings {
        Mappings {
            ttls,
            shard: RefCell::new(Cache::new(MAPPINGS_PER_CORE)),
            tiers,
        }
    }

    /// The shard alone: no tier is asked, nothing is awaited.
    pub fn local(&self, name: &str, now: Instant) -> Option<Known> {
        let shard = self.shard.borrow();
        let m = shard.get(name)?;
        self.known(m, now)
    }

    /// The shard, then each tier in order.
    pub async fn lookup(&self, name: &str, now: Instant) -> Option<Known> {
        if let Some(k) = self.local(name, now) {
            return Some(k);
        }
        for (i, tier) in self.tiers.iter().enumerate() {
            let Some(m) = tier.get(name).await else {
                continue;
            };
            let Some(known) = self.known(&m, now) else {
                continue;
            };
            for earlier in &self.tiers[..i] {
                earlier.learn(name, &m);
            }
            self.shard.borrow_mut().insert(name.to_string(), m);
            return Some(known);
        }
        None
    }

    /// `name` lives in `project`, as found at `now`: every tier learns it.
    pub fn learn(&self, name: &str, project: &str, now: Instant) {
        let m = Mapping {
            project: project.to_string(),
            learned_at: now,
        };
        for tier in &self.tiers {
            tier.learn(name, &m);
        }
        self.shard.borrow_mut().insert(name.to_string(), m);
    }

    /// `name` is not in `project` after all (the project is gone): every tier forgets it.
    pub fn forget(&self, name: &str, project: &str) {
        self.shard.borrow_mut().remove(name);
        for tier in &self.tiers {
            tier.forget(name, project);
        }
    }

    /// Drops expired mappings from the shard, and from the shared tiers when `shared` (one core does
    /// that for all).
    pub fn sweep(&self, now: Instant, shared: bool) {
        let ttls = self.ttls;
        self.shard
            .borrow_mut()
            .retain(|_, m| m.freshness(&ttls, now) != Freshness::Expired);
        if shared {
            for tier in &self.tiers {
                tier.sweep(now, ttls.mapping_life());
            }
        }
    }

    fn known(&self, m: &Mapping, now: Instant) -> Option<Known> {
        let stale = match m.freshness(&self.ttls, now) {
            Freshness::Fresh => false,
            Freshness::Stale => true,
            Freshness::Expired => return None,
        };
        Some(Known {
            project: m.project.clone(),
            stale,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::LearnedMap;
    use std::sync::Arc;

    fn ttls(stale: u64) -> Ttls {
        Ttls {
            mapping: Duration::from_secs(300),
            stale: Duration::from_secs(stale),
            miss: Duration::from_secs(30),
            manifest: Duration::from_secs(3600),
        }
    }

    fn block_on<F: Future>(f: F) -> F::Output {
        futures_util::FutureExt::now_or_never(f).expect("a ready tier")
    }

    fn known(project: &str, stale: bool) -> Option<Known> {
        Some(Known {
            project: project.into(),
            stale,
        })
    }

    #[test]
    fn mappings_go_fresh_stale_gone() {
        let t0 = Instant::now();
        let s = |secs| t0 + Duration::from_secs(secs);
        let m = Mappings::new(ttls(60), vec![]);
        assert_eq!(m.local("nginx", t0), None);
        m.learn("nginx", "dockerhub", t0);
        assert_eq!(m.local("nginx", s(299)), known("dockerhub", false));
        assert_eq!(m.local("nginx", s(300)), known("dockerhub", true));
        assert_eq!(m.local("nginx", s(359)), known("dockerhub", true));
        assert_eq!(m.local("nginx", s(360)), None);
        m.learn("nginx", "other", s(360));
        assert_eq!(m.local("nginx", s(361)), known("other", false));
        m.forget("nginx", "other");
        assert_eq!(m.local("nginx", s(361)), None);
    }

    #[test]
    fn stale_disabled() {
        let t0 = Instant::now();
        let m = Mappings::new(ttls(0), vec![]);
        m.learn("a", "p", t0);
        assert_eq!(m.local("a", t0 + Duration::from_secs(300)), None);
    }

    #[test]
    fn a_tier_answers_a_shard_miss_and_the_shard_adopts_it_with_its_age() {
        let t0 = Instant::now();
        let shared = Arc::new(LearnedMap::default());
        let core_a = Mappings::new(ttls(60), vec![Rc::new(shared.clone())]);
        let core_b = Mappings::new(ttls(60), vec![Rc::new(shared.clone())]);
        core_a.learn("nginx", "dockerhub", t0);
        assert_eq!(core_b.local("nginx", t0), None, "not in b's shard yet");
        let later = t0 + Duration::from_secs(301);
        assert_eq!(
            block_on(core_b.lookup("nginx", later)),
            known("dockerhub", true),
            "found in the shared tier, stale by its original age"
        );
        assert_eq!(core_b.local("nginx", later), known("dockerhub", true));
        // Forgetting on one core removes it from the shared tier too.
        core_b.forget("nginx", "dockerhub");
        assert_eq!(shared.mapping("nginx"), None);
        assert_eq!(
            core_a.local("nginx", t0),
            known("dockerhub", false),
            "another core's shard keeps its own copy until it ages out"
        );
    }

    #[test]
    fn an_expired_mapping_in_a_tier_is_not_used_and_sweeps_drop_it() {
        let t0 = Instant::now();
        let shared = Arc::new(LearnedMap::default());
        let m = Mappings::new(ttls(60), vec![Rc::new(shared.clone())]);
        m.learn("a", "p", t0);
        let gone = t0 + Duration::from_secs(360);
        let fresh = Mappings::new(ttls(60), vec![Rc::new(shared.clone())]);
        assert_eq!(block_on(fresh.lookup("a", gone)), None);
        m.sweep(gone, false);
        assert!(
            shared.mapping("a").is_some(),
            "only the sweeping core clears shared tiers"
        );
        m.sweep(gone, true);
        assert_eq!(shared.mapping("a"), None);
        assert_eq!(
            m.local("a", t0),
            None,
            "swept, even when asked with an old now"
        );
    }
}
