//! The registry's per-core state: one [`State`] per core, built on the core's thread from the
//! process-wide [`ProcessState`], made of handles, one per concern, each owning its data and its
//! counters: [`Routing`] (mappings, fan-outs in flight, refreshes), [`Circuits`], [`Remembered`]
//! answers, last-known-good [`Tags`], [`Budgets`], the [`View`] of the routing list, the core's
//! [`Upstream`] and [`Counters`], all deciding with one [`Clock`]. A phase takes the handles it uses.
//! `!Send`, reached through `Rc`, never locked. What it shares with other cores is read-only
//! (settings, the published snapshot) or a shared mapping tier, read on a local miss and written on
//! a learn, never touched by a hit.

use std::cell::{Cell, RefCell};
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;

use crate::cache::{LearnedMap, Tier};
use crate::clock::Clock;
use crate::limit::{Limits, Rate};
use crate::metrics::{CoreMetrics, Metrics};
use crate::share::Shared;
use crate::snapshot::{SharedSnapshot, Snapshot};
use crate::transfer::{Transfer, Transfers};
use crate::upstream::{self, Upstream};

use super::budgets::Budgets;
use super::circuits::Circuits;
use super::counters::Counters;
use super::remembered::Remembered;
use super::routing::Routing;
use super::settings::Settings;
use super::sharing::Sharing;
use super::tags::Tags;
use super::view::View;

/// How often a core drops expired cache entries (off the request path).
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// What every core receives at start: read-only, or (the learned map) written only on a learn.
#[derive(Clone)]
pub struct ProcessState {
    pub settings: Arc<Settings>,
    pub harbor: Arc<upstream::Harbor>,
    pub snapshot: SharedSnapshot,
    /// The process-wide mapping tier.
    pub learned: Arc<LearnedMap>,
    /// Per-client-IP budgets, the same for every core.
    pub limits: Arc<Limits>,
    /// The mappings shared between pods through Redis, when `REDIS_SENTINELS` is set.
    pub shared: Option<Shared>,
    /// Where each core registers its counters for the scrape.
    pub metrics: Arc<Metrics>,
    /// Blob transfers shared by identical pulls on every core.
    pub transfers: Arc<Transfers>,
}

impl ProcessState {
    /// The process-wide parts for `settings`: an empty learned map, the limits they ask for.
    pub fn new(
        settings: Arc<Settings>,
        harbor: Arc<upstream::Harbor>,
        snapshot: SharedSnapshot,
        learned: Arc<LearnedMap>,
        shared: Option<Shared>,
        metrics: Arc<Metrics>,
    ) -> ProcessState {
        let limits = Limits::new(
            // Bursts: a second's worth of requests; five seconds' worth of fan-outs (a node that
            // starts many new pods at once asks for many new images at once).
            Rate::new(settings.rate_limit_per_ip, settings.rate_limit_per_ip),
            Rate::new(
                settings.fanout_budget_per_ip,
                settings.fanout_budget_per_ip.saturating_mul(5),
            ),
        );
        let transfers = Transfers::new(
            settings.shared_blob_window,
            settings.shared_blob_budget,
            settings.coalesce_linger,
        );
        ProcessState {
            settings,
            harbor,
            snapshot,
            learned,
            limits: Arc::new(limits),
            shared,
            metrics,
            transfers,
        }
    }
}

/// One core's registry state: the handles its phases take, each owning its data and its counters.
pub struct State {
    pub(crate) worker: usize,
    pub(crate) settings: Arc<Settings>,
    /// Every decision of this core is made with it.
    pub(crate) clock: Clock,
    /// The routing list discovery publishes, as this core sees it.
    pub(crate) view: View,
    /// This core's client to Harbor (own connection pool and token cache).
    pub(crate) upstream: Upstream,
    /// This core's counters (read by the scrape thread).
    pub(crate) counters: Rc<Counters>,
    /// `name → project`, fan-outs in flight, refreshes, race leftovers.
    pub(crate) routing: Routing,
    /// A breaker per project and lane.
    pub(crate) circuits: Circuits,
    /// Misses, manifests by digest and tag lists remembered by this core.
    pub(crate) remembered: Remembered,
    /// What tags last resolved to (`STALE_IF_ERROR`).
    pub(crate) tags: Tags,
    /// Per-client-IP budgets, shared with the other cores.
    pub(crate) budgets: Budgets,
    /// Mapped pulls in the air, joined by identical ones (`COALESCE_PULLS`).
    pub(crate) sharing: Sharing,
    /// Blob transfers shared with the other cores.
    pub(crate) transfers: Arc<Transfers>,
    /// The transfers this core pumps (stopped when the core drains, see [`State::drained`]).
    pumps: RefCell<Vec<std::sync::Weak<Transfer>>>,
    /// Redis, when configured (its status for the health answer).
    shared: Option<Shared>,
    /// The process's metrics (every worker's heartbeat, for the health answer).
    process_metrics: Arc<Metrics>,
    /// Requests this core has numbered (for request ids).
    requests: Cell<u64>,
    /// A mirror request found no project known to mirror its registry (logged once per core).
    mirror_gap_logged: Cell<bool>,
}

impl State {
    /// Builds worker `worker`'s state; call inside its runtime (it spawns the core's sweeper).
    pub fn new(worker: usize, process: ProcessState) -> Rc<State> {
        let mut tiers: Vec<Rc<dyn Tier>> = vec![Rc::new(process.learned.clone())];
        if let Some(shared) = &process.shared {
            tiers.push(Rc::new(shared.tier(process.snapshot.clone())));
        }
        let state = State::with_tiers(worker, process, tiers, Clock::system());
        if let Some(shared) = &state.shared {
            // Mappings other pods moved: this core's copies follow.
            let mut changes = shared.register_core();
            let weak = Rc::downgrade(&state);
            crate::task::spawn(async move {
                while let Some((name, mapping)) = changes.recv().await {
                    let Some(state) = weak.upgrade() else { return };
                    let project = mapping.project.clone();
                    if state.routing.heard(&name, mapping) {
                        tracing::debug!(
                            worker = state.worker,
                            name,
                            project,
                            "this core follows a mapping another pod moved"
                        );
                    }
                }
            });
        }
        state
    }

    /// Like [`State::new`], with the shared mapping tiers given in lookup order and the clock.
    pub(crate) fn with_tiers(
        worker: usize,
        process: ProcessState,
        tiers: Vec<Rc<dyn Tier>>,
        clock: Clock,
    ) -> Rc<State> {
        let ProcessState {
            settings,
            harbor,
            snapshot,
            limits,
            shared,
            metrics: process_metrics,
            transfers,
            ..
        } = process;
        let upstream = Upstream::new(harbor, clock.clone());
        let core = Arc::new(CoreMetrics::new(worker, upstream.stats()));
        process_metrics.add_core(core.clone());
        let counters = Rc::new(Counters::new(core));
        let state = Rc::new(State {
            worker,
            routing: Routing::new(
                settings.ttls,
                tiers,
                settings.fanout_order.clone(),
                settings.max_idle_conns_per_host,
                clock.clone(),
                counters.clone(),
            ),
            circuits: Circuits::new(
                settings.circuit_breaker_threshold,
                settings.circuit_breaker_timeout,
                clock.clone(),
                counters.clone(),
                worker,
            ),
            remembered: Remembered::new(settings.ttls, settings.manifest_bytes, clock.clone()),
            tags: Tags::new(
                settings.stale_if_error,
                shared.clone(),
                clock.clone(),
                worker,
            ),
            budgets: Budgets::new(limits, clock.clone()),
            sharing: Sharing::new(settings.coalesce_linger, clock.clone()),
            transfers,
            pumps: RefCell::default(),
            view: View::new(snapshot),
            upstream,
            counters,
            settings,
            clock,
            shared,
            process_metrics,
            requests: Cell::new(0),
            mirror_gap_logged: Cell::new(false),
        });
        // Expired cache entries are dropped off the request path.
        crate::tick::every(SWEEP_EVERY, Rc::downgrade(&state), State::sweep);
        state
    }

    /// The worker index, `0..WORKERS`.
    pub fn worker(&self) -> usize {
        self.worker
    }

    pub fn proxy_project(&self) -> &str {
        &self.settings.proxy_project
    }

    /// Who sent `req` (see [`super::client`]).
    pub fn client_ip(&self, req: &http::request::Parts) -> IpAddr {
        super::client::client_ip(req, &self.settings.trusted_proxies)
    }

    /// The current routing view for this request (see [`View`]).
    pub fn view(&self) -> Option<Rc<Snapshot>> {
        self.view.get()
    }

    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    /// This core's counters.
    pub fn metrics(&self) -> &CoreMetrics {
        self.counters.core()
    }

    /// Whether this core logged that a registry has no known project (see `mirror`).
    pub fn mirror_gap_logged(&self) -> &Cell<bool> {
        &self.mirror_gap_logged
    }

    /// The workers whose heartbeat stopped (for the health answer; off the pull path).
    pub fn stuck_workers(&self) -> Vec<usize> {
        self.process_metrics
            .stuck_workers(std::time::Instant::now())
    }

    /// `t` is pumped by this core.
    pub fn pumping(&self, t: &Arc<Transfer>) {
        let mut pumps = self.pumps.borrow_mut();
        pumps.retain(|w| w.strong_count() > 0);
        pumps.push(Arc::downgrade(t));
    }

    /// The core drained: the transfers it pumps stop (their readers on other cores continue on
    /// their own requests), so no pump outlives its runtime, and no other core's waker can reach a
    /// pump whose core is gone.
    pub fn drained(&self) {
        for t in self
            .pumps
            .take()
            .iter()
            .filter_map(std::sync::Weak::upgrade)
        {
            t.abandon();
        }
    }

    /// Redis's state for the health answer: `None` when Redis is not configured.
    pub fn redis_status(&self) -> Option<&'static str> {
        self.shared.as_ref().map(|s| s.status().as_str())
    }

    /// A new request id: this process's prefix, the worker, and the core's request count (unique
    /// within the process; across pods, the prefix makes a clash unlikely).
    pub fn request_id(&self) -> HeaderValue {
        let n = self.requests.get() + 1;
        self.requests.set(n);
        // 8 hex digits of the process, 2 of the worker, 10 of the count: written in place.
        let mut id = [0u8; 20];
        let digits = (u128::from(process_prefix()) << 48)
            | (((self.worker & 0xff) as u128) << 40)
            | u128::from(n & 0xff_ffff_ffff);
        for (i, b) in id.iter_mut().enumerate() {
            let nibble = (digits >> (4 * (19 - i))) & 0xf;
            *b = b"0123456789abcdef"[nibble as usize];
        }
        HeaderValue::from_bytes(&id).expect("hex digits")
    }

    fn sweep(&self) {
        self.remembered.sweep();
        self.tags.sweep();
        // One core sweeps the shared tiers for everyone.
        self.routing.sweep(self.worker == 0);
    }
}

/// Random per process (the process id through a randomly keyed hash), so request ids of two pods
/// differ.
fn process_prefix() -> u32 {
    static PREFIX: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *PREFIX.get_or_init(|| {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        h.finish() as u32
    })
}
