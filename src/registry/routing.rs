//! Where names live, on one core: the `name → project` mappings (the core's shard, then the shared
//! tiers: [`Mappings`]), the fan-outs in flight (coalescing), the background refreshes running, and
//! the race attempts still finishing after their race. Lookups are counted at each layer they ask.
//! Decisions are made with the core's clock.

use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::cache::{Asked, Found as Tiered, Mapping, Mappings, Tier, Ttls};
use crate::clock::Clock;
use crate::flight::{Flights, Turn};
use crate::metrics::labels::{Layer, LookupResult};
use crate::snapshot::{Project, Snapshot};

use super::counters::Counters;
use super::tally::Ending;

/// How long a second-choice mapping is fresh (see [`Routing::learn_won`]).
pub const SECOND_CHOICE_LIFE: Duration = Duration::from_secs(30);

/// Whether a mapping is past `CACHE_TTL` (used, and refreshed in the background).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    Fresh,
    Stale,
}

/// Where a lookup found a pull's name.
#[derive(Debug)]
pub enum Located<'s> {
    Mapped {
        project: &'s Project,
        freshness: Freshness,
    },
    /// Another pod found that no project has the pull (with the registry's error body, if any),
    /// until `until`.
    Missing {
        detail: Option<Bytes>,
        until: Instant,
    },
    Unknown,
}

/// Whether a race's winner was the best choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    First,
    /// A project preferred to it (`FANOUT_ORDER`) could not answer.
    Second,
}

/// What a fan-out leader tells the requests that waited for it.
#[derive(Debug, Clone)]
pub enum FanOutResult {
    Found(String),
    /// With the registry's error body when the projects agreed on more than "not found".
    NotFound(Option<Bytes>),
    /// Nobody won: how it ended, with the projects that answered (404, 401, …) rather than failed.
    Lost(Ending, Vec<String>),
}

pub struct Routing {
    mappings: Mappings,
    /// Fan-outs in flight, for coalescing.
    flights: Rc<Flights<FanOutResult>>,
    /// Names whose stale mapping is being refreshed (one refresh per name at a time).
    refreshing: Rc<RefCell<HashSet<String>>>,
    /// Race attempts finishing after their race was decided (see `fanout::finish_in_background`).
    leftovers: Cell<usize>,
    /// Most of them at once (`MAX_IDLE_CONNS_PER_HOST`: more could not be pooled anyway).
    max_leftovers: usize,
    /// `FANOUT_ORDER`.
    order: Vec<String>,
    cache_ttl: Duration,
    clock: Clock,
    counters: Rc<Counters>,
}

impl Routing {
    pub fn new(
        ttls: Ttls,
        tiers: Vec<Rc<dyn Tier>>,
        order: Vec<String>,
        max_leftovers: usize,
        clock: Clock,
        counters: Rc<Counters>,
    ) -> Routing {
        Routing {
            mappings: Mappings::new(ttls, tiers),
            flights: Rc::default(),
            refreshing: Rc::default(),
            leftovers: Cell::new(0),
            max_leftovers,
            order,
            cache_ttl: ttls.mapping,
            clock,
            counters,
        }
    }

    /// The project `name` is mapped to, if it is still in `snapshot`, or a miss another pod found
    /// for the pull `miss_key`. A mapping to a project that is gone from Harbor (or from the
    /// fan-out cut) is useless: it is forgotten.
    pub async fn lookup<'s>(
        &self,
        snapshot: &'s Snapshot,
        name: &str,
        miss_key: &str,
    ) -> Located<'s> {
        let (found, asked) = self.mappings.lookup(name, miss_key, self.clock.now()).await;
        self.count_lookup(&found, asked);
        let known = match found {
            None => return Located::Unknown,
            Some(Tiered::Missing { detail, until }) => return Located::Missing { detail, until },
            Some(Tiered::Known(known)) => known,
        };
        match snapshot.project(&known.project) {
            Some(project) => Located::Mapped {
                project,
                freshness: if known.stale {
                    Freshness::Stale
                } else {
                    Freshness::Fresh
                },
            },
            None => {
                self.forget(name, &known.project);
                Located::Unknown
            }
        }
    }

    /// Counts a mapping lookup at each layer it asked: a miss at each layer before `asked.depth`
    /// (but those not asked), and what the layer at `depth` found (layers: the core's shard, the
    /// process map, Redis).
    fn count_lookup(&self, found: &Option<Tiered>, asked: Asked) {
        const LAYERS: [Layer; 3] = [Layer::Core, Layer::Process, Layer::Redis];
        let m = self.counters.core();
        let depth = asked.depth;
        for (i, layer) in LAYERS.iter().enumerate().take(depth) {
            if asked.skipped & (1 << i) == 0 {
                m.lookup(*layer, LookupResult::Miss);
            }
        }
        let result = match found {
            None => return,
            Some(Tiered::Missing { .. }) => LookupResult::Negative,
            Some(Tiered::Known(k)) if k.stale => LookupResult::Stale,
            Some(Tiered::Known(_)) => LookupResult::Hit,
        };
        if let Some(layer) = LAYERS.get(depth) {
            m.lookup(*layer, result);
        }
    }

    /// `name` lives in `project`.
    pub fn learn(&self, name: &str, project: &str) {
        self.mappings.learn(name, project, self.clock.now());
    }

    /// `name` lives in `project`, found by a race. A second choice is learned for
    /// [`SECOND_CHOICE_LIFE`] only: it goes stale then, and the refresh lets the preferred project
    /// take over once it answers again.
    pub fn learn_won(&self, name: &str, project: &str, choice: Choice) {
        let now = self.clock.now();
        let learned_at = match choice {
            Choice::First => now,
            Choice::Second => {
                let ttl = self.cache_ttl;
                let aged = ttl.saturating_sub(SECOND_CHOICE_LIFE.min(ttl));
                now.checked_sub(aged).unwrap_or(now)
            }
        };
        self.mappings.learn(name, project, learned_at);
    }

    /// Another pod moved `name` (heard through Redis): this core's copy follows. Whether it did.
    pub fn heard(&self, name: &str, mapping: Mapping) -> bool {
        self.mappings.heard(name, mapping)
    }

    pub fn forget(&self, name: &str, project: &str) {
        self.mappings.forget(name, project);
    }

    /// No project has the pull `key`: the shared tiers remember it for `ttl`.
    pub fn missed(&self, key: &str, detail: Option<&Bytes>, ttl: Duration) {
        if !ttl.is_zero() {
            self.mappings.missed(key, detail, ttl);
        }
    }

    /// `project`'s rank in `FANOUT_ORDER` (0 first), if it is listed.
    pub fn rank(&self, project: &str) -> Option<usize> {
        self.order.iter().position(|p| p == project)
    }

    /// Whether `FANOUT_ORDER` decides races (else the fastest answer wins).
    pub fn ordered(&self) -> bool {
        !self.order.is_empty()
    }

    /// Leads the fan-out for `key`, or waits for the one in flight.
    pub fn join_fan_out(&self, key: &str) -> Turn<FanOutResult> {
        self.flights.join(key)
    }

    /// The fan-out for `key` in flight on this core, to wait for; never leads one.
    pub fn fan_out_in_flight(
        &self,
        key: &str,
    ) -> Option<tokio::sync::oneshot::Receiver<FanOutResult>> {
        self.flights.follow(key)
    }

    /// Claims the background refresh of `name`: `None` when one is already running. The refresh
    /// holds the claim until it ends.
    pub fn claim_refresh(&self, name: &str) -> Option<RefreshClaim> {
        self.refreshing
            .borrow_mut()
            .insert(name.to_string())
            .then(|| RefreshClaim {
                refreshing: self.refreshing.clone(),
                name: name.to_string(),
            })
    }

    /// Takes `n` more decided races' attempts to finish in the background, if that keeps them
    /// within `MAX_IDLE_CONNS_PER_HOST` (more would not be pooled anyway) and Harbor's connections
    /// are not `multiplexed` (an HTTP/2 request dropped resets a stream; its connection stays).
    pub fn take_leftovers(&self, n: usize, multiplexed: bool) -> bool {
        let total = self.leftovers.get() + n;
        if multiplexed || total > self.max_leftovers {
            return false;
        }
        self.leftovers.set(total);
        true
    }

    /// One attempt taken by [`Routing::take_leftovers`] has finished.
    pub fn leftover_done(&self) {
        self.leftovers.set(self.leftovers.get().saturating_sub(1));
    }

    /// Drops expired mappings (off the request path); `shared`: the shared tiers too (one core
    /// sweeps them for everyone).
    pub fn sweep(&self, shared: bool) {
        self.mappings.sweep(self.clock.now(), shared);
    }
}

/// Held by a running refresh of a name; dropped when it ends (or is cancelled).
pub struct RefreshClaim {
    refreshing: Rc<RefCell<HashSet<String>>>,
    name: String,
}

impl Drop for RefreshClaim {
    fn drop(&mut self) {
        self.refreshing.borrow_mut().remove(&self.name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::TestClock;
    use crate::metrics::CoreMetrics;
    use crate::snapshot::UpstreamKind;
    use std::sync::Arc;

    fn routing(clock: &TestClock, order: &[&str]) -> Routing {
        let ttls = Ttls {
            mapping: Duration::from_secs(300),
            stale: Duration::from_secs(60),
            miss: Duration::from_secs(30),
            manifest: Duration::from_secs(3600),
        };
        let counters = Rc::new(Counters::new(Arc::new(CoreMetrics::new(0, Arc::default()))));
        let order = order.iter().map(|s| s.to_string()).collect();
        Routing::new(ttls, Vec::new(), order, 2, clock.clock(), counters)
    }

    fn snapshot(names: &[&str]) -> Snapshot {
        Snapshot {
            projects: names
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    Project::new(n.to_string(), i as i64 + 1, 1, UpstreamKind::Unknown, None)
                })
                .collect(),
            built_at: Instant::now(),
            generation: 1,
            harbor: Default::default(),
            provisional: false,
        }
    }

    fn run<F: std::future::Future>(f: F) -> F::Output {
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn a_mapping_is_fresh_then_stale_then_gone_and_a_second_choice_ages_sooner() {
        let clock = TestClock::new();
        let r = routing(&clock, &["quay", "ghcr"]);
        let snap = snapshot(&["ghcr", "quay"]);
        run(async {
            r.learn("org/app", "ghcr");
            r.learn_won("org/tool", "ghcr", Choice::Second);
            let freshness = |name: &'static str| {
                let (r, snap) = (&r, &snap);
                async move {
                    match r.lookup(snap, name, "k").await {
                        Located::Mapped { freshness, .. } => Some(freshness),
                        _ => None,
                    }
                }
            };
            assert_eq!(freshness("org/app").await, Some(Freshness::Fresh));
            assert_eq!(freshness("org/tool").await, Some(Freshness::Fresh));
            clock.advance(SECOND_CHOICE_LIFE);
            assert_eq!(
                freshness("org/tool").await,
                Some(Freshness::Stale),
                "30 s for a second choice"
            );
            assert_eq!(freshness("org/app").await, Some(Freshness::Fresh));
            clock.advance(Duration::from_secs(300));
            assert_eq!(freshness("org/app").await, Some(Freshness::Stale));
            clock.advance(Duration::from_secs(60));
            assert_eq!(freshness("org/app").await, None, "past the stale window");
            // A mapping to a project gone from the snapshot is forgotten.
            r.learn("org/x", "gone");
            assert_eq!(freshness("org/x").await, None);
        });
        assert_eq!(
            (r.rank("quay"), r.rank("ghcr"), r.rank("k8s")),
            (Some(0), Some(1), None)
        );
        assert!(r.ordered());
    }

    #[test]
    fn refreshes_are_claimed_once_and_leftovers_are_bounded() {
        let r = routing(&TestClock::new(), &[]);
        let claim = r.claim_refresh("a").expect("first");
        assert!(r.claim_refresh("a").is_none());
        drop(claim);
        assert!(r.claim_refresh("a").is_some());
        assert!(r.take_leftovers(2, false));
        assert!(!r.take_leftovers(1, false), "past MAX_IDLE_CONNS_PER_HOST");
        r.leftover_done();
        assert!(r.take_leftovers(1, false));
        assert!(!r.take_leftovers(0, true), "never over HTTP/2");
    }
}
