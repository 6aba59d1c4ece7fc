//! Prometheus metrics, counted without cross-core writes and served off the data-plane cores.
//!
//! - Each core owns a [`CoreMetrics`] (and its client's `upstream::Stats`, its server's
//!   `server::Stats`): single-writer counters (`crate::counter`), a plain add on the core that owns
//!   them. Control threads own theirs (discovery here, Redis in `share`).
//! - The scrape ([`Metrics::render`], on the metrics thread of [`serve`]) reads every core's counters
//!   and sums them: `core` is never a label (only `harbor_router_worker_info` and the heartbeat's
//!   age name each worker).
//! - Every name is in this file, with the `harbor_router_` prefix and its unit; labels are the
//!   bounded enums of [`labels`]. docs/observability.md lists them all.

pub mod encode;
pub mod health;
pub mod labels;
pub mod serve;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use crate::counter::{Counter, Gauge, Histogram, COUNT_BOUNDS, DURATION_BOUNDS_MICROS};
use crate::share::Shared;
use crate::snapshot::SharedSnapshot;

use encode::{Encoder, HistogramValue};
use labels::*;

/// One core's registry counters. Written by its core only.
pub struct CoreMetrics {
    pub worker: usize,
    /// `[endpoint][method][status]`
    requests: Vec<Counter>,
    /// Time to the response head of pulls, by how they were answered.
    pull_duration: Vec<Histogram>,
    /// Time to the response head of blob pulls (what a client waits before the first byte).
    blob_first_byte: Histogram,
    /// `[layer][found]`
    lookups: Vec<Counter>,
    /// `[kind][outcome]`
    races: Vec<Counter>,
    /// Projects asked by each race.
    race_width: Histogram,
    /// Requests that waited for another request's fan-out instead of leading one.
    pub coalesced: Counter,
    rejected: Vec<Counter>,
    /// `[reason]` of tags answered with their last-known-good digest.
    stale: Vec<Counter>,
    /// `[kind]` of requests answered with another request's answer from Harbor.
    shared: Vec<Counter>,
    /// Body bytes of those answers.
    shared_bytes: Counter,
    /// Readers of a shared blob transfer that fell out of its window and continued on their own.
    pub shared_fallouts: Counter,
    /// This core's per-project counters, appended (rarely: a project's first request) by the core.
    projects: Mutex<Vec<(String, Arc<ProjectMetrics>)>>,
    upstream: Arc<crate::upstream::Stats>,
}

/// One core's counters for one project.
pub struct ProjectMetrics {
    /// `[status]` of the answers to requests sent to the project.
    answers: Vec<Counter>,
    /// `[kind]` of requests that got no usable answer.
    errors: Vec<Counter>,
    /// Time to the answer's head.
    duration: Histogram,
    /// `[lane][to]`
    transitions: Vec<Counter>,
    /// `[lane]`: 1 while this core's circuit for the project is open (or half-open).
    circuit_open: [Gauge; Lane::COUNT],
    /// Harbor's unsure 404s: its local store answering for an upstream it did not ask.
    unsure: Counter,
}

impl Default for ProjectMetrics {
    fn default() -> Self {
        ProjectMetrics {
            answers: counters(StatusClass::COUNT),
            errors: counters(ErrorKind::COUNT),
            duration: Histogram::durations(),
            transitions: counters(Lane::COUNT * Circuit::COUNT),
            circuit_open: Default::default(),
            unsure: Counter::default(),
        }
    }
}

impl ProjectMetrics {
    pub fn answered(&self, status: http::StatusCode, took: std::time::Duration) {
        self.answers[StatusClass::of(status).index()].inc();
        if status.is_server_error() {
            self.errors[ErrorKind::ServerError.index()].inc();
        }
        self.duration.observe_duration(took);
    }

    pub fn failed(&self, kind: ErrorKind) {
        self.errors[kind.index()].inc();
    }

    /// The project's 404 was Harbor's local store's (absent, or its upstream not asked).
    pub fn unsure(&self) {
        self.unsure.inc();
    }

    pub fn circuit(&self, lane: Lane, to: Circuit) {
        self.transitions[lane.index() * Circuit::COUNT + to.index()].inc();
        self.circuit_open[lane.index()].set(i64::from(to == Circuit::Open));
    }
}

/// A family's samples, one per value of the label `name`.
fn by_label<L: Label>(name: &'static str, value: impl Fn(L) -> u64) -> Vec<(encode::Labels, u64)> {
    L::ALL
        .iter()
        .map(|&l| (vec![(name, l.as_str().to_string())], value(l)))
        .collect()
}

/// A family's samples, one per pair of values of the labels `a` and `b`.
fn by_labels<A: Label, B: Label>(
    a: &'static str,
    b: &'static str,
    value: impl Fn(A, B) -> u64,
) -> Vec<(encode::Labels, u64)> {
    let mut samples = Vec::with_capacity(A::ALL.len() * B::ALL.len());
    for &x in A::ALL {
        for &y in B::ALL {
            let labels = vec![(a, x.as_str().to_string()), (b, y.as_str().to_string())];
            samples.push((labels, value(x, y)));
        }
    }
    samples
}

fn counters(n: usize) -> Vec<Counter> {
    (0..n).map(|_| Counter::default()).collect()
}

impl CoreMetrics {
    pub fn new(worker: usize, upstream: Arc<crate::upstream::Stats>) -> CoreMetrics {
        CoreMetrics {
            worker,
            requests: counters(Requested::COUNT * Verb::COUNT * StatusClass::COUNT),
            pull_duration: (0..Answered::COUNT)
                .map(|_| Histogram::durations())
                .collect(),
            blob_first_byte: Histogram::durations(),
            lookups: counters(Layer::COUNT * LookupResult::COUNT),
            races: counters(RaceKind::COUNT * RaceOutcome::COUNT),
            race_width: Histogram::new(COUNT_BOUNDS),
            coalesced: Counter::default(),
            rejected: counters(Rejected::COUNT),
            stale: counters(StaleReason::COUNT),
            shared: counters(SharedKind::COUNT),
            shared_bytes: Counter::default(),
            shared_fallouts: Counter::default(),
            projects: Mutex::new(Vec::new()),
            upstream,
        }
    }

    #[inline]
    pub fn request(&self, endpoint: Requested, method: Verb, status: http::StatusCode) {
        let i = (endpoint.index() * Verb::COUNT + method.index()) * StatusClass::COUNT
            + StatusClass::of(status).index();
        self.requests[i].inc();
    }

    #[inline]
    pub fn pull(&self, route: Answered, blob: bool, took: std::time::Duration) {
        self.pull_duration[route.index()].observe_duration(took);
        if blob {
            self.blob_first_byte.observe_duration(took);
        }
    }

    #[inline]
    pub fn lookup(&self, layer: Layer, found: LookupResult) {
        self.lookups[layer.index() * LookupResult::COUNT + found.index()].inc();
    }

    pub fn race(&self, kind: RaceKind, outcome: RaceOutcome) {
        self.races[kind.index() * RaceOutcome::COUNT + outcome.index()].inc();
    }

    pub fn race_width(&self, projects: usize) {
        self.race_width.observe(projects as u64);
    }

    pub fn rejected(&self, why: Rejected) {
        self.rejected[why.index()].inc();
    }

    pub fn stale(&self, why: StaleReason) {
        self.stale[why.index()].inc();
    }

    /// A request answered with another's answer from Harbor, `bytes` of body.
    pub fn shared(&self, kind: SharedKind, bytes: usize) {
        self.shared[kind.index()].inc();
        self.shared_bytes(bytes);
    }

    /// Body bytes a shared answer gave a request that joined it.
    pub fn shared_bytes(&self, bytes: usize) {
        self.shared_bytes.add(bytes as u64);
    }

    /// Registers a new project's counters (the core keeps its own map for lookups).
    pub fn add_project(&self, name: &str) -> Arc<ProjectMetrics> {
        let m = Arc::new(ProjectMetrics::default());
        if let Ok(mut p) = self.projects.lock() {
            p.push((name.to_string(), m.clone()));
        }
        m
    }
}

/// Discovery's counters, written by the discovery thread.
pub struct DiscoveryMetrics {
    /// `[ok, failed]`
    runs: [Counter; 2],
    duration: Histogram,
    /// Unix time (s) of the last round that published a list.
    pub last_success: Gauge,
}

impl DiscoveryMetrics {
    pub fn round(&self, ok: bool, took: std::time::Duration) {
        self.runs[usize::from(!ok)].inc();
        self.duration.observe_duration(took);
        if ok {
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            self.last_success.set(now as i64);
        }
    }
}

/// A worker's place in the metrics: its connection counters, and its registry counters once its
/// state exists.
struct Worker {
    id: usize,
    driver: &'static str,
    server: Arc<crate::server::Stats>,
    core: Option<Arc<CoreMetrics>>,
    /// Whether a worker loop beats `server`'s heartbeat (a core registered without one, as in
    /// in-process tests, is never called stuck).
    beats: bool,
}

/// Every metric of the process.
pub struct Metrics {
    workers: Mutex<Vec<Worker>>,
    /// Every worker's heartbeat, fixed once every worker is registered: the health answers read it
    /// without the lock (a probe on the registry port must not contend with the scrape).
    heartbeats: std::sync::OnceLock<Vec<(usize, Arc<crate::server::Stats>)>>,
    /// The blob transfers shared by the cores.
    transfers: std::sync::OnceLock<Arc<crate::transfer::Transfers>>,
    /// The client listener's certificate, with `TLS_CERT_FILE`.
    certs: std::sync::OnceLock<Arc<crate::server::tls::Certs>>,
    pub discovery: DiscoveryMetrics,
    snapshot: SharedSnapshot,
    redis: Option<Shared>,
}

impl Metrics {
    pub fn new(snapshot: SharedSnapshot, redis: Option<Shared>) -> Arc<Metrics> {
        Arc::new(Metrics {
            workers: Mutex::new(Vec::new()),
            heartbeats: std::sync::OnceLock::new(),
            transfers: std::sync::OnceLock::new(),
            certs: std::sync::OnceLock::new(),
            discovery: DiscoveryMetrics {
                runs: [Counter::default(), Counter::default()],
                duration: Histogram::durations(),
                last_success: Gauge::default(),
            },
            snapshot,
            redis,
        })
    }

    /// Worker `id`'s connection counters (called by the starter, before the worker runs).
    pub fn add_worker(&self, id: usize, server: Arc<crate::server::Stats>) {
        if let Ok(mut w) = self.workers.lock() {
            w.push(Worker {
                id,
                driver: "starting",
                server,
                core: None,
                beats: true,
            });
        }
    }

    /// The process's shared blob transfers, shown by the scrape.
    pub fn watch_transfers(&self, transfers: Arc<crate::transfer::Transfers>) {
        let _ = self.transfers.set(transfers);
    }

    /// The client listener's certificate, whose reloads the scrape shows.
    pub fn watch_certs(&self, certs: Arc<crate::server::tls::Certs>) {
        let _ = self.certs.set(certs);
    }

    /// Every worker is registered: their heartbeats are what liveness reads from now on.
    pub fn workers_registered(&self) {
        if let Ok(w) = self.workers.lock() {
            let beating = w
                .iter()
                .filter(|w| w.beats)
                .map(|w| (w.id, w.server.clone()))
                .collect();
            let _ = self.heartbeats.set(beating);
        }
    }

    /// Worker `id`'s io driver, once it runs.
    pub fn set_driver(&self, id: usize, driver: &'static str) {
        if let Ok(mut w) = self.workers.lock() {
            if let Some(w) = w.iter_mut().find(|w| w.id == id) {
                w.driver = driver;
            }
        }
    }

    /// Worker `id`'s registry counters (called by the worker when it builds its state).
    pub fn add_core(&self, core: Arc<CoreMetrics>) {
        if let Ok(mut w) = self.workers.lock() {
            if let Some(w) = w.iter_mut().find(|w| w.id == core.worker) {
                w.core = Some(core);
            } else {
                w.push(Worker {
                    id: core.worker,
                    driver: "unknown",
                    server: Arc::default(),
                    core: Some(core),
                    beats: false,
                });
            }
        }
    }

    /// One scrape: every family, summed over the cores.
    pub fn render(&self, open_metrics: bool) -> String {
        let mut e = Encoder::new(open_metrics);
        let workers = match self.workers.lock() {
            Ok(w) => w
                .iter()
                .map(|w| (w.id, w.driver, w.server.clone(), w.core.clone(), w.beats))
                .collect::<Vec<_>>(),
            Err(_) => Vec::new(),
        };
        let cores: Vec<&Arc<CoreMetrics>> = workers.iter().filter_map(|w| w.3.as_ref()).collect();
        let sum = |f: &dyn Fn(&CoreMetrics) -> u64| cores.iter().map(|c| f(c)).sum::<u64>();

        e.gauge(
            "harbor_router_build_info",
            "The router's version (value 1).",
            [(
                vec![("version", env!("CARGO_PKG_VERSION").to_string())],
                1.0,
            )],
        );
        e.gauge(
            "harbor_router_worker_info",
            "One per data-plane worker, with its io driver (value 1).",
            workers.iter().map(|w| {
                (
                    vec![("worker", w.0.to_string()), ("io_driver", w.1.to_string())],
                    1.0,
                )
            }),
        );

        // Requests.
        let mut requests = Vec::new();
        for ep in Requested::ALL {
            for m in Verb::ALL {
                for st in StatusClass::ALL {
                    let i =
                        (ep.index() * Verb::COUNT + m.index()) * StatusClass::COUNT + st.index();
                    let v = sum(&|c| c.requests[i].get());
                    if v > 0 {
                        requests.push((
                            vec![
                                ("endpoint", ep.as_str().to_string()),
                                ("method", m.as_str().to_string()),
                                ("status", st.as_str().to_string()),
                            ],
                            v,
                        ));
                    }
                }
            }
        }
        e.counter(
            "harbor_router_requests_total",
            "Requests answered, by endpoint, method and status class.",
            requests,
        );
        e.histogram(
            "harbor_router_pull_duration_seconds",
            "Time from a pull's arrival to its response head, by how it was answered: memory (this core's memory), negative (a remembered miss), mapped (one request to the known project), fanout (the projects raced), refused (answered by the router without Harbor).",
            1e6,
            Answered::ALL.iter().map(|r| {
                let mut h = HistogramValue::new(DURATION_BOUNDS_MICROS);
                for c in &cores {
                    h.merge(&c.pull_duration[r.index()]);
                }
                (vec![("route", r.as_str().to_string())], h)
            }),
        );
        let mut blob = HistogramValue::new(DURATION_BOUNDS_MICROS);
        for c in &cores {
            blob.merge(&c.blob_first_byte);
        }
        e.histogram(
            "harbor_router_blob_first_byte_seconds",
            "Time from a blob pull's arrival to its response head: what a client waits for the first byte.",
            1e6,
            [(vec![], blob)],
        );
        e.counter(
            "harbor_router_cache_lookups_total",
            "Cache lookups by layer (core: the core's mapping shard; memory: manifests by digest and tag lists; process: the process-wide mapping map; redis) and result (hit, stale, negative, miss).",
            by_labels("layer", "result", |l: Layer, f: LookupResult| {
                sum(&|c| c.lookups[l.index() * LookupResult::COUNT + f.index()].get())
            }),
        );
        e.counter(
            "harbor_router_fanouts_total",
            "Races of the candidate projects: for a client's request (a fan-out) or a background refresh, by outcome.",
            by_labels("kind", "outcome", |k: RaceKind, o: RaceOutcome| {
                sum(&|c| c.races[k.index() * RaceOutcome::COUNT + o.index()].get())
            }),
        );
        let mut width = HistogramValue::new(COUNT_BOUNDS);
        for c in &cores {
            width.merge(&c.race_width);
        }
        e.histogram(
            "harbor_router_fanout_width_projects",
            "Projects asked by each race.",
            1.0,
            [(vec![], width)],
        );
        e.counter(
            "harbor_router_fanout_coalesced_total",
            "Requests that waited for another request's fan-out on their core instead of leading one.",
            [(vec![], sum(&|c| c.coalesced.get()))],
        );
        e.counter(
            "harbor_router_shared_requests_total",
            "Requests that joined an identical request's flight to Harbor (COALESCE_PULLS) instead of sending their own, by kind: manifest (by tag or digest) and tag_list on their core, blob (a transfer shared by every core).",
            by_label("kind", |k: SharedKind| sum(&|c| c.shared[k.index()].get())),
        );
        e.counter(
            "harbor_router_shared_bytes_total",
            "Body bytes served from answers shared with another request (harbor_router_shared_requests_total; for a blob, the bytes its followers read from the shared transfer): what Harbor did not send again.",
            [(vec![], sum(&|c| c.shared_bytes.get()))],
        );
        let (transfers, readers, reserved) = self.transfers.get().map_or((0, 0, 0), |t| {
            let (n, r) = t.in_progress();
            (n, r, t.reserved())
        });
        e.gauge(
            "harbor_router_shared_transfers",
            "Blob transfers from Harbor that identical pulls on every core may join (COALESCE_PULLS): in progress, or finished and lingering with their whole blob (COALESCE_LINGER).",
            [(vec![], transfers as f64)],
        );
        e.gauge(
            "harbor_router_shared_transfer_readers",
            "Pulls reading those transfers now (the leaders' own included).",
            [(vec![], readers as f64)],
        );
        e.gauge(
            "harbor_router_shared_transfer_reserved_bytes",
            "Memory those transfers reserve of SHARED_BLOB_BUDGET: two SHARED_BLOB_WINDOWs for one in progress, its blob's size for one lingering.",
            [(vec![], reserved as f64)],
        );
        e.counter(
            "harbor_router_shared_fallouts_total",
            "Readers of a shared blob transfer that fell behind its window (SHARED_BLOB_WINDOW: a slow client) and continued on a request of their own from where they were.",
            [(vec![], sum(&|c| c.shared_fallouts.get()))],
        );
        e.counter(
            "harbor_router_rejected_requests_total",
            "Requests the router refused itself: rate_limit (RATE_LIMIT_PER_IP), fanout_budget (FANOUT_BUDGET_PER_IP), invalid (malformed or not a registry request).",
            by_label("reason", |r: Rejected| sum(&|c| c.rejected[r.index()].get())),
        );
        e.counter(
            "harbor_router_stale_answers_total",
            "Tags answered with their last-known-good digest (STALE_IF_ERROR) because every project that could confirm them failed: rate_limited (429), unavailable (503, or circuits open), failed (no answer, a timeout, 502, 504).",
            by_label("reason", |r: StaleReason| sum(&|c| c.stale[r.index()].get())),
        );

        // Client connections.
        let server = |f: &dyn Fn(&crate::server::Stats) -> u64| -> u64 {
            workers.iter().map(|w| f(&w.2)).sum()
        };
        let open: i64 = workers.iter().map(|w| w.2.open.get()).sum();
        e.gauge(
            "harbor_router_client_connections",
            "Client connections open (idle keep-alive ones included).",
            [(vec![], open as f64)],
        );
        e.counter(
            "harbor_router_client_connections_accepted_total",
            "Client connections accepted.",
            [(vec![], server(&|s| s.accepted.get()))],
        );
        e.counter(
            "harbor_router_client_connections_refused_total",
            "Client connections closed at once: max_connections (MAX_CONNECTIONS were open), per_client (the client address held its share of MAX_CONNECTIONS_PER_CLIENT).",
            [
                (
                    vec![("reason", "max_connections".to_string())],
                    server(&|s| s.refused.get()),
                ),
                (
                    vec![("reason", "per_client".to_string())],
                    server(&|s| s.refused_per_client.get()),
                ),
            ],
        );
        let now = Instant::now();
        e.gauge(
            "harbor_router_worker_heartbeat_age_seconds",
            "Seconds since each data-plane worker last beat its heartbeat (every second; /healthz fails once one is 10 s old: a stuck core).",
            workers.iter().filter(|w| w.4).map(|w| {
                (
                    vec![("worker", w.0.to_string())],
                    w.2.heartbeat.age(now).as_secs_f64(),
                )
            }),
        );
        e.counter(
            "harbor_router_response_bytes_total",
            "Bytes written to clients (response heads and bodies).",
            [(vec![], server(&|s| s.bytes_sent.get()))],
        );
        e.counter(
            "harbor_router_tls_connections_total",
            "Client connections that completed a TLS handshake (TLS_CERT_FILE), by the protocol ALPN chose: h2 or http/1.1.",
            [
                (
                    vec![("protocol", "h2".to_string())],
                    server(&|s| s.tls_h2.get()),
                ),
                (
                    vec![("protocol", "http/1.1".to_string())],
                    server(&|s| s.tls_http1.get()),
                ),
            ],
        );
        e.counter(
            "harbor_router_tls_handshake_failures_total",
            "Client TLS handshakes that failed or did not finish within HEADER_READ_TIMEOUT.",
            [(vec![], server(&|s| s.tls_failed.get()))],
        );
        let (reloaded, refused) = self.certs.get().map_or((0, 0), |c| c.reloads());
        e.counter(
            "harbor_router_tls_certificate_reloads_total",
            "Changes of TLS_CERT_FILE or TLS_KEY_FILE seen: reloaded (new connections get the new certificate), refused (unusable or unreadable: the certificate in use stays).",
            [
                (vec![("result", "reloaded".to_string())], reloaded),
                (vec![("result", "refused".to_string())], refused),
            ],
        );

        self.render_upstream(&mut e, &cores);
        self.render_discovery(&mut e);
        self.render_redis(&mut e);
        e.finish()
    }

    fn render_upstream(&self, e: &mut Encoder, cores: &[&Arc<CoreMetrics>]) {
        let up = |f: &dyn Fn(&crate::upstream::Stats) -> u64| -> u64 {
            cores.iter().map(|c| f(&c.upstream)).sum()
        };
        let gauge = |f: &dyn Fn(&crate::upstream::Stats) -> i64| -> f64 {
            cores.iter().map(|c| f(&c.upstream)).sum::<i64>() as f64
        };
        e.gauge(
            "harbor_router_upstream_connections",
            "Connections to Harbor: open (all), idle (HTTP/1.1 ones waiting in the pool).",
            [
                (
                    vec![("state", "open".to_string())],
                    gauge(&|s| s.open.get()),
                ),
                (
                    vec![("state", "idle".to_string())],
                    gauge(&|s| s.idle.get()),
                ),
            ],
        );
        e.counter(
            "harbor_router_upstream_connections_opened_total",
            "Connections to Harbor opened.",
            [(vec![], up(&|s| s.connections_opened.get()))],
        );
        e.counter(
            "harbor_router_upstream_requests_reused_total",
            "Requests to Harbor sent on a pooled connection.",
            [(vec![], up(&|s| s.reused.get()))],
        );
        e.counter(
            "harbor_router_upstream_requests_retried_total",
            "Requests to Harbor sent again because a pooled connection failed before any answer.",
            [(vec![], up(&|s| s.retried.get()))],
        );
        e.counter(
            "harbor_router_token_fetches_total",
            "Requests to Harbor's token service.",
            [(vec![], up(&|s| s.token_fetches.get()))],
        );
        e.counter(
            "harbor_router_token_cache_hits_total",
            "Requests that found a fresh registry token in their core's cache.",
            [(vec![], up(&|s| s.token_hits.get()))],
        );
        e.counter(
            "harbor_router_tokens_refused_total",
            "Cached registry tokens Harbor refused before they expired (a signing key rotated, tokens revoked, the robot changed); each was dropped and fetched again.",
            [(vec![], up(&|s| s.tokens_refused.get()))],
        );
        e.counter(
            "harbor_router_upstream_h2c_refused_total",
            "Times HTTP2_PRIOR_KNOWLEDGE met a Harbor that does not speak HTTP/2 without TLS; the core then uses HTTP/1.1.",
            [(vec![], up(&|s| s.h2c_refused.get()))],
        );

        // Per project, summed over the cores: the projects of the current list only (one removed
        // from Harbor, or past MAX_FANOUT_PROJECTS, leaves the scrape; its counters resume if it
        // comes back).
        struct Sum {
            answers: Vec<u64>,
            errors: Vec<u64>,
            duration: HistogramValue,
            transitions: Vec<u64>,
            open: [i64; Lane::COUNT],
            unsure: u64,
        }
        let current = self.snapshot.load();
        let listed = |name: &str| current.as_ref().is_some_and(|s| s.project(name).is_some());
        let mut projects: BTreeMap<String, Sum> = BTreeMap::new();
        for c in cores {
            let Ok(list) = c.projects.lock() else {
                continue;
            };
            for (name, m) in list.iter().filter(|(n, _)| listed(n)) {
                let s = projects.entry(name.clone()).or_insert_with(|| Sum {
                    answers: Vec::new(),
                    errors: Vec::new(),
                    duration: HistogramValue::new(DURATION_BOUNDS_MICROS),
                    transitions: Vec::new(),
                    open: [0; Lane::COUNT],
                    unsure: 0,
                });
                s.unsure += m.unsure.get();
                add_into(&mut s.answers, &m.answers);
                add_into(&mut s.errors, &m.errors);
                add_into(&mut s.transitions, &m.transitions);
                s.duration.merge(&m.duration);
                for (sum, g) in s.open.iter_mut().zip(&m.circuit_open) {
                    *sum += g.get();
                }
            }
        }
        let project = |p: &str| ("project", p.to_string());
        e.counter(
            "harbor_router_upstream_responses_total",
            "Answers from Harbor to pull requests, by project and status class.",
            projects.iter().flat_map(|(p, s)| {
                StatusClass::ALL.iter().filter_map(move |st| {
                    let v = s.answers[st.index()];
                    (v > 0).then(|| (vec![project(p), ("status", st.as_str().to_string())], v))
                })
            }),
        );
        e.counter(
            "harbor_router_upstream_errors_total",
            "Requests to a project that got no usable answer, by kind: connect, timeout, 5xx, protocol, token.",
            projects.iter().flat_map(|(p, s)| {
                ErrorKind::ALL.iter().map(move |k| {
                    (
                        vec![project(p), ("kind", k.as_str().to_string())],
                        s.errors[k.index()],
                    )
                })
            }),
        );
        e.counter(
            "harbor_router_upstream_unsure_not_found_total",
            "404s that were Harbor's local store answering (\"artifact … not found\", \"repository … not found\", a manifest HEAD's 404): the image is absent, or Harbor could not ask the project's upstream registry.",
            projects
                .iter()
                .map(|(p, s)| (vec![project(p)], s.unsure)),
        );
        e.histogram(
            "harbor_router_upstream_duration_seconds",
            "Time from sending a pull request to a project to its answer's head.",
            1e6,
            projects
                .iter()
                .map(|(p, s)| (vec![project(p)], s.duration.clone())),
        );
        let lane = |l: &Lane| ("lane", l.as_str().to_string());
        e.gauge(
            "harbor_router_circuit_open_cores",
            "Cores whose circuit for the project's lane (tags, content) is open (or half-open, letting one probe through).",
            projects.iter().flat_map(|(p, s)| {
                Lane::ALL
                    .iter()
                    .map(move |l| (vec![project(p), lane(l)], s.open[l.index()] as f64))
            }),
        );
        e.counter(
            "harbor_router_circuit_transitions_total",
            "Circuit transitions of a project's lane on a core: to open (opened, or a probe failed), to closed (a probe succeeded).",
            projects.iter().flat_map(|(p, s)| {
                Lane::ALL.iter().flat_map(move |l| {
                    Circuit::ALL.iter().map(move |t| {
                        (
                            vec![project(p), lane(l), ("to", t.as_str().to_string())],
                            s.transitions[l.index() * Circuit::COUNT + t.index()],
                        )
                    })
                })
            }),
        );
    }

    fn render_discovery(&self, e: &mut Encoder) {
        let d = &self.discovery;
        e.counter(
            "harbor_router_discovery_runs_total",
            "Discovery rounds, by result (ok: a list was published; failed: the last list was kept).",
            [
                (vec![("result", "ok".to_string())], d.runs[0].get()),
                (vec![("result", "failed".to_string())], d.runs[1].get()),
            ],
        );
        let mut h = HistogramValue::new(DURATION_BOUNDS_MICROS);
        h.merge(&d.duration);
        e.histogram(
            "harbor_router_discovery_duration_seconds",
            "Time one discovery round took.",
            1e6,
            [(vec![], h)],
        );
        let snapshot = self.snapshot.load();
        let (projects, age, provisional) = match snapshot.as_ref() {
            Some(s) => (
                s.projects.len() as f64,
                s.age(Instant::now()).as_secs_f64(),
                f64::from(u8::from(s.provisional)),
            ),
            None => (0.0, 0.0, 0.0),
        };
        e.gauge(
            "harbor_router_projects",
            "Proxy-cache projects in the routing list.",
            [(vec![], projects)],
        );
        e.gauge(
            "harbor_router_project_list_age_seconds",
            "Age of the routing list (since discovery read it); 0 before the first list.",
            [(vec![], age)],
        );
        e.gauge(
            "harbor_router_project_list_provisional",
            "1 while the routing list is the one loaded from Redis at start, before the first discovery.",
            [(vec![], provisional)],
        );
        let harbor = snapshot
            .as_ref()
            .map(|s| s.harbor.clone())
            .unwrap_or_default();
        e.gauge(
            "harbor_router_harbor_info",
            "Harbor's version as its systeminfo names it (value 1); absent until discovery read it.",
            harbor.version.map(|v| (vec![("version", v)], 1.0)),
        );
        e.gauge(
            "harbor_router_harbor_credentials_refused",
            "1 while Harbor does not accept the router's credentials (it treats the router as anonymous); the routing list is then the last one read with them.",
            [(vec![], f64::from(u8::from(harbor.refused_user.is_some())))],
        );
        e.gauge(
            "harbor_router_discovery_last_success_timestamp_seconds",
            "Unix time of the last discovery round that published a list; 0 before the first.",
            [(vec![], d.last_success.get() as f64)],
        );
    }

    /// Rendered whether Redis is configured or not (state `off`, counters 0), so dashboards and
    /// alerts work on every pod.
    fn render_redis(&self, e: &mut Encoder) {
        let stats = self.redis.as_ref().map(|r| r.stats()).unwrap_or_default();
        let state = RedisState::of(self.redis.as_ref());
        e.gauge(
            "harbor_router_redis_state",
            "The Redis link's state: 1 for the current one of off (neither REDIS_SENTINELS nor REDIS_URL set), connecting, up, down.",
            RedisState::ALL.iter().map(|s| {
                (
                    vec![("state", s.as_str().to_string())],
                    f64::from(u8::from(*s == state)),
                )
            }),
        );
        e.gauge(
            "harbor_router_redis_cluster_mode",
            "1 when the Redis endpoint the link reached is a Redis Cluster node, which it cannot use (mappings then stay in memory; point it at a non-cluster Redis).",
            [(vec![], f64::from(u8::from(stats.cluster)))],
        );
        e.counter(
            "harbor_router_redis_operations_total",
            "Redis operations: read (a core's read on a miss), write (a mapping, miss or list written).",
            [
                (vec![("op", "read".to_string())], stats.reads),
                (vec![("op", "write".to_string())], stats.writes),
            ],
        );
        e.counter(
            "harbor_router_redis_errors_total",
            "Times the Redis link left the master (connection lost, READONLY, no answer, switch) or could not reach one.",
            [(vec![], stats.errors)],
        );
        e.counter(
            "harbor_router_redis_shed_writes_total",
            "Writes dropped because the Redis write queue was full.",
            [(vec![], stats.shed)],
        );
        e.counter(
            "harbor_router_redis_read_timeouts_total",
            "Misses that waited REDIS_READ_TIMEOUT for Redis and fanned out without it.",
            [(vec![], stats.read_timeouts)],
        );
    }
}

fn add_into(into: &mut Vec<u64>, from: &[Counter]) {
    if into.is_empty() {
        into.resize(from.len(), 0);
    }
    for (a, c) in into.iter_mut().zip(from) {
        *a += c.get();
    }
}
