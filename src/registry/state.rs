//! The registry's per-core state, behind verbs: look a name up, learn it, forget it, admit a request
//! to a project (its breaker), remember a miss or an answer, join a fan-out, start a refresh. One
//! [`State`] per core, built on the core's thread from the process-wide [`ProcessState`]; `!Send`,
//! reached through `Rc`, never locked. What it shares with other cores is read-only (configuration,
//! the published snapshot) or a shared mapping tier, read on a local miss and written on a learn,
//! never touched by a hit.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::HeaderValue;

use crate::cache::{
    Answers, Asked, Confirmed, Kept, LastGood, LearnedMap, Lookup as Looked, Mappings, Resolved,
    Seen, Tier, Ttls, LAST_GOOD_BYTES_PER_CORE, LAST_GOOD_PER_CORE,
};
use crate::config::{AccessLog, Config};
use crate::error::Error;
use crate::flight::{Flights, Turn};
use crate::limit::{Limits, Rate};
use crate::metrics::labels::{Circuit, Found, Layer};
use crate::metrics::{CoreMetrics, Metrics, ProjectMetrics};
use crate::share::Shared;
use crate::snapshot::{Project, SharedSnapshot, Snapshot};
use crate::upstream::breaker::{Breakers, Lane, Ticket, Transition};
use crate::upstream::{self, Upstream};

/// How long a second-choice mapping is fresh (see [`State::learn_won`]).
pub const SECOND_CHOICE_LIFE: Duration = Duration::from_secs(30);

/// How often a core drops expired cache entries (off the request path).
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// What every core receives at start: read-only, or (the learned map) written only on a learn.
#[derive(Clone)]
pub struct ProcessState {
    pub config: Arc<Config>,
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
}

impl ProcessState {
    /// The process-wide parts for `config`: an empty learned map, the limits it asks for.
    pub fn new(
        config: Arc<Config>,
        harbor: Arc<upstream::Harbor>,
        snapshot: SharedSnapshot,
        learned: Arc<LearnedMap>,
        shared: Option<Shared>,
        metrics: Arc<Metrics>,
    ) -> ProcessState {
        let limits = Limits::new(
            // Bursts: a second's worth of requests; five seconds' worth of fan-outs (a node that
            // starts many new pods at once asks for many new images at once).
            Rate::new(config.rate_limit_per_ip, config.rate_limit_per_ip),
            Rate::new(
                config.fanout_budget_per_ip,
                config.fanout_budget_per_ip.saturating_mul(5),
            ),
        );
        ProcessState {
            config,
            harbor,
            snapshot,
            learned,
            limits: Arc::new(limits),
            shared,
            metrics,
        }
    }
}

/// What a lookup found for a pull.
#[derive(Debug)]
pub enum Lookup<'s> {
    /// Mapped to this project; the `bool` says the mapping is stale (use it, and refresh it).
    Mapped(&'s Project, bool),
    /// Another pod found that no project has it (with the registry's error body, if any).
    Missing(Option<Bytes>),
    Unknown,
}

/// What a fan-out leader tells the requests that waited for it.
#[derive(Debug, Clone)]
pub enum FanOutResult {
    Found(String),
    /// With the registry's error body when the projects agreed on more than "not found".
    NotFound(Option<Bytes>),
    /// Nobody won: how it ended, with the projects that answered (404, 401, …) rather than failed.
    Lost(super::tally::Ending, Vec<String>),
}

/// One core's registry state.
pub struct State {
    worker: usize,
    config: Arc<Config>,
    /// The routing view as published by discovery.
    snapshot: SharedSnapshot,
    /// This core's copy of the published view. Requests take an `Rc` of it: cloning the published
    /// `Arc` per request would write its reference count from every core.
    view: RefCell<Option<Rc<Snapshot>>>,
    /// This core's client to Harbor (own connection pool and token cache).
    upstream: Upstream,
    /// `name → project`: this core's shard, then the shared tiers.
    mappings: Mappings,
    /// Misses, manifests by digest and tag lists remembered by this core.
    answers: RefCell<Answers>,
    /// What tags last resolved to on this core (`STALE_IF_ERROR`).
    last_good: RefCell<LastGood>,
    /// Stale answers since the last log line about them, and when that line was written.
    stale_log: Cell<(u64, Option<Instant>)>,
    /// This core's circuit breakers, by project.
    breakers: Rc<Breakers>,
    /// Fan-outs in flight, for coalescing.
    flights: Rc<Flights<FanOutResult>>,
    /// Names whose stale mapping is being refreshed (one refresh per name at a time).
    refreshing: Rc<RefCell<HashSet<String>>>,
    /// Per-client-IP budgets, shared with the other cores.
    limits: Arc<Limits>,
    /// Redis, when configured (its status for the health answer).
    shared: Option<Shared>,
    /// This core's counters (read by the scrape thread).
    metrics: Arc<CoreMetrics>,
    /// This core's counters per project, by name (the scrape reads them through `metrics`).
    project_metrics: RefCell<HashMap<String, Arc<ProjectMetrics>>>,
    /// Requests this core has numbered (for request ids).
    requests: Cell<u64>,
    /// A mirror request found no project known to mirror its registry (logged once per core).
    mirror_gap_logged: Cell<bool>,
    /// Added to the system clock: zero in service; tests move it to drive expiry and breakers.
    skew: Cell<Duration>,
    /// Race attempts finishing after their race was decided (see `fanout::finish_in_background`).
    leftovers: Cell<usize>,
}

impl State {
    /// Builds worker `worker`'s state; call inside its runtime (it spawns the core's sweeper).
    pub fn new(worker: usize, process: ProcessState) -> Rc<State> {
        let mut tiers: Vec<Rc<dyn Tier>> = vec![Rc::new(process.learned.clone())];
        if let Some(shared) = &process.shared {
            tiers.push(Rc::new(shared.tier(process.snapshot.clone())));
        }
        let state = State::with_tiers(worker, process, tiers);
        if let Some(shared) = &state.shared {
            // Mappings other pods moved: this core's copies follow.
            let mut changes = shared.register_core();
            let weak = Rc::downgrade(&state);
            monoio::spawn(async move {
                while let Some((name, mapping)) = changes.recv().await {
                    let Some(state) = weak.upgrade() else { return };
                    let project = mapping.project.clone();
                    if state.mappings.heard(&name, mapping) {
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

    /// Like [`State::new`], with the shared mapping tiers given in lookup order.
    pub fn with_tiers(worker: usize, process: ProcessState, tiers: Vec<Rc<dyn Tier>>) -> Rc<State> {
        let ProcessState {
            config,
            harbor,
            snapshot,
            limits,
            shared,
            metrics: process_metrics,
            ..
        } = process;
        let ttls = Ttls {
            mapping: config.cache_ttl,
            stale: config.stale_while_revalidate,
            miss: config.negative_cache_ttl,
            manifest: config.manifest_cache_ttl,
        };
        let manifest_bytes = config.manifest_cache_bytes / config.workers.max(1) as u64;
        let upstream = Upstream::new(harbor);
        let metrics = Arc::new(CoreMetrics::new(worker, upstream.stats()));
        process_metrics.add_core(metrics.clone());
        let state = Rc::new(State {
            worker,
            mappings: Mappings::new(ttls, tiers),
            answers: RefCell::new(Answers::new(ttls, manifest_bytes)),
            last_good: RefCell::new(LastGood::new(
                config.stale_if_error,
                LAST_GOOD_PER_CORE,
                LAST_GOOD_BYTES_PER_CORE,
            )),
            stale_log: Cell::new((0, None)),
            breakers: Breakers::new(
                config.circuit_breaker_threshold,
                config.circuit_breaker_timeout,
            ),
            upstream,
            config,
            snapshot,
            view: RefCell::new(None),
            flights: Rc::default(),
            refreshing: Rc::default(),
            limits,
            shared,
            metrics,
            project_metrics: RefCell::default(),
            requests: Cell::new(0),
            mirror_gap_logged: Cell::new(false),
            skew: Cell::new(Duration::ZERO),
            leftovers: Cell::new(0),
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
        &self.config.proxy_project
    }

    /// The clock every decision of this state is made with.
    pub fn now(&self) -> Instant {
        Instant::now() + self.skew.get()
    }

    /// Moves this state's clock forward (tests drive mapping expiry and breaker timeouts with it).
    pub fn advance_clock(&self, by: Duration) {
        self.skew.set(self.skew.get() + by);
    }

    /// Who sent `req` (see [`super::client`]).
    pub fn client_ip(&self, req: &http::request::Parts) -> IpAddr {
        super::client::client_ip(req, &self.config.trusted_proxies)
    }

    /// One request from `client`, under `RATE_LIMIT_PER_IP` (free when the limit is off).
    pub fn admit_request(&self, client: IpAddr) -> Result<(), Error> {
        if !self.limits.limits_requests() {
            return Ok(());
        }
        self.limits
            .admit_request(client, self.now())
            .map_err(|r| Error::ClientRateLimited {
                retry_after_secs: r.seconds(),
                reason: "this client sent more requests than RATE_LIMIT_PER_IP allows",
            })
    }

    /// One fan-out for `client` (a request that asks every project), under `FANOUT_BUDGET_PER_IP`.
    pub fn admit_fan_out(&self, client: IpAddr) -> Result<(), Error> {
        self.limits
            .admit_fan_out(client, self.now())
            .map_err(|r| Error::ClientRateLimited {
                retry_after_secs: r.seconds(),
                reason:
                    "this client asked for more unknown images than FANOUT_BUDGET_PER_IP allows",
            })
    }

    /// Takes `n` more decided races' attempts to finish in the background, if that keeps them
    /// within `MAX_IDLE_CONNS_PER_HOST` (more would not be pooled anyway) and Harbor's connections
    /// are HTTP/1.1 (an HTTP/2 request dropped resets a stream; its connection stays).
    pub fn take_leftovers(&self, n: usize) -> bool {
        let total = self.leftovers.get() + n;
        if self.upstream.multiplexed() || total > self.config.max_idle_conns_per_host {
            return false;
        }
        self.leftovers.set(total);
        true
    }

    /// One attempt taken by [`State::take_leftovers`] has finished.
    pub fn leftover_done(&self) {
        self.leftovers.set(self.leftovers.get().saturating_sub(1));
    }

    /// Longest wait for one fan-out attempt.
    pub fn resolver_timeout(&self) -> Duration {
        self.config.resolver_timeout
    }

    /// How old the project list may get before the router reports itself not ready.
    pub fn readiness_max_age(&self) -> Duration {
        self.config.discovery_interval * 3
    }

    /// The current routing view for this request, without touching any shared counter: the published
    /// snapshot is only peeked at (`arc-swap` guard) and copied into this core when it changed.
    pub fn view(&self) -> Option<Rc<Snapshot>> {
        let published = self.snapshot.load();
        let published = published.as_ref()?;
        let mut view = self.view.borrow_mut();
        match view.as_ref() {
            Some(v) if v.generation == published.generation => Some(v.clone()),
            _ => {
                let fresh = Rc::new(Snapshot::clone(published));
                *view = Some(fresh.clone());
                Some(fresh)
            }
        }
    }

    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    /// Whether this core logged that a registry has no known project (see `mirror`).
    pub fn mirror_gap_logged(&self) -> &Cell<bool> {
        &self.mirror_gap_logged
    }

    pub fn access_log(&self) -> AccessLog {
        self.config.access_log
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

    /// This core's counters.
    pub fn metrics(&self) -> &CoreMetrics {
        &self.metrics
    }

    /// Runs `f` on this core's counters for `project` (created on the project's first use).
    pub fn project_metrics(&self, project: &str, f: impl FnOnce(&ProjectMetrics)) {
        if let Some(m) = self.project_metrics.borrow().get(project) {
            return f(m);
        }
        let m = self.metrics.add_project(project);
        f(&m);
        self.project_metrics
            .borrow_mut()
            .insert(project.to_string(), m);
    }

    /// The project `name` is mapped to, if it is still in `snapshot`, or a miss another pod found
    /// for the pull `miss_key` (remembered here for the rest of its life). A mapping to a project
    /// that is gone from Harbor (or from the fan-out cut) is useless: it is forgotten.
    pub async fn lookup<'s>(
        &self,
        snapshot: &'s Snapshot,
        name: &str,
        miss_key: &str,
        now: Instant,
    ) -> Lookup<'s> {
        let (found, asked) = self.mappings.lookup(name, miss_key, now).await;
        self.count_lookup(&found, asked);
        let known = match found {
            None => return Lookup::Unknown,
            Some(Looked::Missing { detail, until }) => {
                self.answers
                    .borrow_mut()
                    .remember_miss_until(miss_key, detail.clone(), until);
                return Lookup::Missing(detail);
            }
            Some(Looked::Known(known)) => known,
        };
        match snapshot.project(&known.project) {
            Some(p) => Lookup::Mapped(p, known.stale),
            None => {
                self.forget(name, &known.project);
                Lookup::Unknown
            }
        }
    }

    /// Counts a mapping lookup at each layer it asked: a miss at each layer before `asked.depth`
    /// (but those not asked), and what the layer at `depth` found (layers: the core's shard, the
    /// process map, Redis).
    fn count_lookup(&self, found: &Option<Looked>, asked: Asked) {
        const LAYERS: [Layer; 3] = [Layer::Core, Layer::Process, Layer::Redis];
        let m = &self.metrics;
        let depth = asked.depth;
        for (i, layer) in LAYERS.iter().enumerate().take(depth) {
            if asked.skipped & (1 << i) == 0 {
                m.lookup(*layer, Found::Miss);
            }
        }
        let result = match found {
            None => return,
            Some(Looked::Missing { .. }) => Found::Negative,
            Some(Looked::Known(k)) if k.stale => Found::Stale,
            Some(Looked::Known(_)) => Found::Hit,
        };
        if let Some(layer) = LAYERS.get(depth) {
            m.lookup(*layer, result);
        }
    }

    /// Redis's state for the health answer: `None` when Redis is not configured.
    pub fn redis_status(&self) -> Option<&'static str> {
        self.shared.as_ref().map(|s| s.status())
    }

    /// `name` lives in `project`.
    pub fn learn(&self, name: &str, project: &str) {
        self.mappings.learn(name, project, self.now());
    }

    /// `name` lives in `project`, found by a race. A second choice (`FANOUT_ORDER`'s preferred
    /// project failed) is learned for [`SECOND_CHOICE_LIFE`] only: it goes stale then, and the
    /// refresh lets the preferred project take over once it answers again.
    pub fn learn_won(&self, name: &str, project: &str, second_choice: bool) {
        if !second_choice {
            return self.learn(name, project);
        }
        let ttl = self.config.cache_ttl;
        let aged = ttl.saturating_sub(SECOND_CHOICE_LIFE.min(ttl));
        let learned_at = self.now().checked_sub(aged).unwrap_or_else(|| self.now());
        self.mappings.learn(name, project, learned_at);
    }

    /// `project`'s rank in `FANOUT_ORDER` (0 first), if it is listed.
    pub fn fanout_rank(&self, project: &str) -> Option<usize> {
        self.config.fanout_order.iter().position(|p| p == project)
    }

    /// Whether `FANOUT_ORDER` decides races (else the fastest answer wins).
    pub fn fanout_ordered(&self) -> bool {
        !self.config.fanout_order.is_empty()
    }

    pub fn forget(&self, name: &str, project: &str) {
        self.mappings.forget(name, project);
    }

    /// A ticket to send one request of `lane` to `project`, or `None` when that circuit is open.
    pub fn admit(&self, project: &str, lane: Lane) -> Option<Ticket> {
        self.breakers.admit(project, lane, self.now())
    }

    /// Records how an admitted request went.
    /// Circuits are per core: each transition is logged (and counted) by the core it happened on,
    /// with the core's id.
    pub fn record(&self, ticket: Ticket, failed: bool) {
        let (t, project, lane) = ticket.record(failed, self.now());
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
        self.project_metrics(&project, |m| m.circuit(lane, to));
    }

    /// `Some` when `key` is a remembered miss, with the registry's error body if it had one.
    pub fn miss(&self, key: &str, now: Instant) -> Option<Option<Bytes>> {
        self.answers.borrow().miss(key, now)
    }

    /// A fan-out found that no project has the pull `key`: this core and the shared tiers remember it.
    pub fn remember_miss(&self, key: &str, detail: Option<Bytes>) {
        let ttl = self.config.negative_cache_ttl;
        if !ttl.is_zero() {
            self.mappings.missed(key, detail.as_ref(), ttl);
        }
        self.answers
            .borrow_mut()
            .remember_miss(key, detail, self.now());
    }

    pub fn manifest(&self, key: &str, now: Instant) -> Option<Kept> {
        self.answers.borrow().manifest(key, now).cloned()
    }

    pub fn keep_manifest(&self, key: &str, kept: Kept) {
        self.answers
            .borrow_mut()
            .keep_manifest(key, kept, self.now());
    }

    pub fn tags(&self, key: &str, now: Instant) -> Option<Kept> {
        self.answers.borrow().tags(key, now).cloned()
    }

    pub fn keep_tags(&self, key: &str, kept: Kept) {
        self.answers.borrow_mut().keep_tags(key, kept, self.now());
    }

    /// Whether tags are remembered for `STALE_IF_ERROR`.
    pub fn stale_if_error(&self) -> bool {
        self.last_good.borrow().enabled()
    }

    /// `project` answered the tag pull `key` with `seen`: remembered, and shared through Redis when
    /// this core learned it, saw it change, or last shared it a while ago (never on every hit).
    pub fn confirm_tag(&self, key: &str, seen: Seen<'_>, project: &Project) {
        let now = self.now();
        let how = self.last_good.borrow_mut().confirm(key, seen, now);
        if how == Confirmed::Same {
            return;
        }
        if let Some(shared) = &self.shared {
            if let Some((resolved, _)) = self.last_good.borrow().get(key, now) {
                shared.share_tag(key, &resolved, project, Instant::now());
            }
        }
    }

    /// What the tag pull `key` last resolved to, and how long ago: this core's memory, else
    /// (with Redis) what another pod shared, remembered here from then on.
    pub async fn last_good(&self, key: &str, snapshot: &Snapshot) -> Option<(Resolved, Duration)> {
        let now = self.now();
        if let Some(found) = self.last_good.borrow().get(key, now) {
            return Some(found);
        }
        let shared = self.shared.as_ref().filter(|_| self.stale_if_error())?;
        let (resolved, at) = shared.tag(key, snapshot).await?;
        let age = Instant::now().saturating_duration_since(at);
        let at = now.checked_sub(age).unwrap_or(now);
        self.last_good.borrow_mut().heard(key, resolved.clone(), at);
        Some((resolved, age))
    }

    /// `project` said the tag pull `key` is not there: if that is where the tag last resolved, the
    /// tag is forgotten here and in Redis (a 404 is an answer; it is never masked by an older one).
    pub fn forget_tag(&self, key: &str, project: &str) {
        if self.last_good.borrow_mut().forget(key, project) {
            if let Some(shared) = &self.shared {
                shared.forget_tag(key);
            }
        }
    }

    /// No project has the tag pull `key` (every one said "not here"): forgotten here, and in Redis
    /// when `share` (the pod that found the miss says so; one that heard it need not repeat it).
    pub fn forget_tag_everywhere(&self, key: &str, share: bool) {
        self.last_good.borrow_mut().forget_any(key);
        if let (true, Some(shared)) = (share, &self.shared) {
            shared.forget_tag(key);
        }
    }

    /// Counts a stale answer; logs the first, then at most one line a minute with the count since.
    pub fn served_stale(&self, name: &str, project: &str, age: Duration, why: &str) {
        let (count, last) = self.stale_log.get();
        let now = self.now();
        if last.is_some_and(|t| now.saturating_duration_since(t) < Duration::from_secs(60)) {
            self.stale_log.set((count + 1, last));
            return;
        }
        tracing::warn!(
            worker = self.worker,
            name,
            project,
            age_s = age.as_secs(),
            why,
            since_last_line = count,
            "every project failed: answered a tag with its last-known-good digest (STALE_IF_ERROR)"
        );
        self.stale_log.set((0, Some(now)));
    }

    /// Leads the fan-out for `key`, or waits for the one in flight.
    pub fn join_fan_out(&self, key: &str) -> Turn<FanOutResult> {
        self.flights.join(key)
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

    fn sweep(&self) {
        let now = self.now();
        self.answers.borrow_mut().sweep(now);
        self.last_good.borrow_mut().sweep(now);
        // One core sweeps the shared tiers for everyone.
        self.mappings.sweep(now, self.worker == 0);
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
