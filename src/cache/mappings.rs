//! The one seam for `name → project`: a lookup tries the core's shard, then each shared tier in
//! order; a tier's answer is adopted by the shard and by the tiers before it (with its original
//! learning instant, so it ages as it would have), so the next request stops earlier. Learning and
//! forgetting go to every tier. Callers see one lookup, one learn, one forget: a new tier (a store
//! shared between pods) is one more entry in the list, not an edit of every caller. A tier may also
//! know that a pull is missing everywhere (a miss another pod found): the lookup then says so, and no
//! later tier is asked.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use quick_cache::unsync::Cache;

use super::{Freshness, Mapping, Ttls};

/// Names remembered per core.
const MAPPINGS_PER_CORE: usize = 100_000;

/// What a tier knows about a pull.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TierAnswer {
    /// The tier was not asked (a store that is down, or too busy): it knows nothing, and the
    /// lookup does not count it as asked.
    NotAsked,
    Mapped(Mapping),
    /// No project has it (with the registry's error body when the projects agreed on one), until
    /// `until`.
    Missing {
        detail: Option<Bytes>,
        until: Instant,
    },
}

/// What a tier's lookup returns: it may have to wait (a network store does).
pub type TierLookup<'a> = Pin<Box<dyn Future<Output = Option<TierAnswer>> + 'a>>;

/// A place mappings are shared beyond one core. Asked only when the core's shard misses.
pub trait Tier {
    /// What the tier knows of `name`, or of the pull whose miss key is `miss_key`.
    fn get<'a>(&'a self, name: &'a str, miss_key: &'a str) -> TierLookup<'a>;
    fn learn(&self, name: &str, mapping: &Mapping);
    /// `name` moved to another project (the one it was mapped to answered 404).
    fn moved(&self, name: &str, mapping: &Mapping) {
        self.learn(name, mapping);
    }
    /// Forgets `name` if this tier still maps it to `project`.
    fn forget(&self, name: &str, project: &str);
    /// No project has the pull `key` (a fan-out said so); remembered for `ttl`.
    fn missed(&self, _key: &str, _detail: Option<&Bytes>, _ttl: Duration) {}
    /// Drops what is older than `max_age` (called by one core, off the request path).
    fn sweep(&self, _now: Instant, _max_age: Duration) {}
}

/// What a lookup found in the shard or a tier: a mapping, or a miss another pod found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    Known(Known),
    Missing {
        detail: Option<Bytes>,
        until: Instant,
    },
}

/// Which layers a lookup asked: layer 0 is the shard, layer `i + 1` tier `i`. With an answer, the
/// layer at `depth` gave it and the ones before missed; without one, the `depth` layers before
/// missed. A layer whose bit is set in `skipped` was not asked at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Asked {
    pub depth: usize,
    pub skipped: u32,
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

    /// The shard, then each tier in order. `miss_key` names the pull, for tiers that remember
    /// misses. Also says which layers were asked ([`Asked`]).
    pub async fn lookup(&self, name: &str, miss_key: &str, now: Instant) -> (Option<Found>, Asked) {
        let mut asked = Asked {
            depth: 0,
            skipped: 0,
        };
        if let Some(k) = self.local(name, now) {
            return (Some(Found::Known(k)), asked);
        }
        for (i, tier) in self.tiers.iter().enumerate() {
            asked.depth = i + 1;
            let m = match tier.get(name, miss_key).await {
                None => continue,
                Some(TierAnswer::NotAsked) => {
                    asked.skipped |= 1 << (i + 1);
                    continue;
                }
                Some(TierAnswer::Missing { detail, until }) if now < until => {
                    return (Some(Found::Missing { detail, until }), asked)
                }
                Some(TierAnswer::Missing { .. }) => continue,
                Some(TierAnswer::Mapped(m)) => m,
            };
            let Some(known) = self.known(&m, now) else {
                continue;
            };
            for earlier in &self.tiers[..i] {
                earlier.learn(name, &m);
            }
            self.shard.borrow_mut().insert(name.to_string(), m);
            return (Some(Found::Known(known)), asked);
        }
        asked.depth = 1 + self.tiers.len();
        (None, asked)
    }

    /// `name` lives in `project`, as found at `now`: every tier learns it. When this core had it
    /// in another project, the tiers hear that it moved.
    pub fn learn(&self, name: &str, project: &str, now: Instant) {
        let m = Mapping {
            project: project.to_string(),
            learned_at: now,
        };
        let moved = self
            .shard
            .borrow()
            .get(name)
            .is_some_and(|old| old.project != project);
        for tier in &self.tiers {
            if moved {
                tier.moved(name, &m);
            } else {
                tier.learn(name, &m);
            }
        }
        self.shard.borrow_mut().insert(name.to_string(), m);
    }

    /// Another pod says `name` moved: this core's copy follows, if it has one (then `true`).
    pub fn heard(&self, name: &str, mapping: Mapping) -> bool {
        let mut shard = self.shard.borrow_mut();
        match shard.get_mut(name) {
            Some(mut old) => {
                *old = mapping;
                true
            }
            None => false,
        }
    }

    /// No project has the pull `key`: the tiers remember it for `ttl`.
    pub fn missed(&self, key: &str, detail: Option<&Bytes>, ttl: Duration) {
        for tier in &self.tiers {
            tier.missed(key, detail, ttl);
        }
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
            block_on(core_b.lookup("nginx", "", later)),
            (
                known("dockerhub", true).map(Found::Known),
                Asked {
                    depth: 1,
                    skipped: 0
                }
            ),
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
        assert_eq!(block_on(fresh.lookup("a", "", gone)).0, None);
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

    /// A tier that answers from a fixed list and records what it is told.
    #[derive(Default)]
    struct Recording {
        answer: RefCell<Option<TierAnswer>>,
        told: RefCell<Vec<String>>,
    }

    impl Tier for Recording {
        fn get<'a>(&'a self, _name: &'a str, _miss_key: &'a str) -> TierLookup<'a> {
            let a = self.answer.borrow().clone();
            Box::pin(std::future::ready(a))
        }
        fn learn(&self, name: &str, m: &Mapping) {
            self.told
                .borrow_mut()
                .push(format!("learn {name} {}", m.project));
        }
        fn moved(&self, name: &str, m: &Mapping) {
            self.told
                .borrow_mut()
                .push(format!("moved {name} {}", m.project));
        }
        fn forget(&self, _name: &str, _project: &str) {}
        fn missed(&self, key: &str, _detail: Option<&Bytes>, ttl: Duration) {
            self.told
                .borrow_mut()
                .push(format!("missed {key} {}", ttl.as_secs()));
        }
    }

    #[test]
    fn a_tier_can_know_a_miss_and_hears_learns_moves_and_misses() {
        let t0 = Instant::now();
        let tier = Rc::new(Recording::default());
        let m = Mappings::new(ttls(60), vec![tier.clone()]);
        let until = t0 + Duration::from_secs(5);
        *tier.answer.borrow_mut() = Some(TierAnswer::Missing {
            detail: None,
            until,
        });
        assert_eq!(
            block_on(m.lookup("x", "k", t0)),
            (
                Some(Found::Missing {
                    detail: None,
                    until
                }),
                Asked {
                    depth: 1,
                    skipped: 0
                }
            )
        );
        assert_eq!(
            block_on(m.lookup("x", "k", until)),
            (
                None,
                Asked {
                    depth: 2,
                    skipped: 0
                }
            ),
            "an expired miss is not one"
        );
        *tier.answer.borrow_mut() = Some(TierAnswer::NotAsked);
        assert_eq!(
            block_on(m.lookup("x", "k", until)).1,
            Asked {
                depth: 2,
                skipped: 0b10
            },
            "a tier that was not asked is marked"
        );
        m.learn("a", "p", t0);
        m.learn("a", "p", t0);
        m.learn("a", "q", t0);
        m.missed("k", None, Duration::from_secs(30));
        assert_eq!(
            *tier.told.borrow(),
            ["learn a p", "learn a p", "moved a q", "missed k 30"]
        );
        // Another pod moved `a`: this core's copy follows; a name it never had stays unknown.
        let later = Mapping {
            project: "r".into(),
            learned_at: t0,
        };
        m.heard("a", later.clone());
        m.heard("b", later);
        assert_eq!(m.local("a", t0), known("r", false));
        assert_eq!(m.local("b", t0), None);
    }
}
