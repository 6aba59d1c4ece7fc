//! harbor-router: a thread-per-core Docker Registry v2 router in front of Harbor. Clients pull
//! `/v2/<PROXY_PROJECT>/<name>/…` from one endpoint; the router finds the Harbor proxy-cache project
//! that holds `<name>` and serves the pull from it.
//!
//! # Layout
//! Dependencies run one way, down this list: a module uses only modules below it.
//! - [`Server`] (this file): binds the listeners, starts the workers and the control plane, and
//!   hands back a [`Running`] that can be told to drain. `main.rs` adds signals and the exit code.
//! - `fuzz_targets` (hidden): the fuzz targets' bodies, replayed by the tests (they drive the
//!   parsers of the modules below).
//! - [`control`]: control-plane threads; [`control::discovery`] reads Harbor's projects and
//!   publishes the [`snapshot`] (and, with Redis, shares it through [`share`]).
//! - [`registry`]: the registry protocol as the server's handler: routes, the pull path (one
//!   context per pull through named phases, the race decided by a pure tally, typed outcomes), the
//!   per-core [`registry::State`] as handles (routing, circuits, remembered, tags, budgets, view).
//! - [`metrics`]: every metric, counted per core and summed by the `/metrics` thread.
//! - [`server`]: the data-plane runtime, generic over its handler: pinned per-core monoio loops,
//!   SO_REUSEPORT listeners, connections, lingering close, drain. Names no registry type.
//! - [`body`]: the one response body type handed to hyper.
//! - [`share`]: mappings, misses and the project list shared between pods through Redis
//!   (Sentinel), on a thread of its own; the last mapping tier.
//! - [`limit`]: per-client-IP budgets (request rate, fan-outs), shared by the cores.
//! - [`cache`]: the mapping tiers (core shard → process-wide map → …) and remembered answers.
//! - [`upstream`]: the client to Harbor: per-core keep-alive [`upstream::pool`] (HTTP/1.1, HTTP/2,
//!   TLS), the token flow [`upstream::auth`], TLS roots [`upstream::tls`], circuit breakers per
//!   project and lane [`upstream::breaker`].
//! - [`transfer`]: blob transfers shared by identical pulls on every core (the one cross-core
//!   data-plane state, on the slow path only).
//! - [`flight`]: per-core coalescing (one leader does the work, the others wait for its result).
//! - [`counter`]: counters, gauges and histograms with one writer, read by the scrape.
//! - [`stall`]: detects streams that stopped moving (clients that stop reading, bodies that stop).
//! - [`tick`]: periodic per-core work on a value, for as long as it lives.
//! - [`task`]: spawning on a core, every task polled with a waker of one identity (monoio's can
//!   fail `will_wake` against itself, which turns a parked future into a task that wakes itself).
//! - [`logging`]: pretty or JSON logs through `tracing`.
//! - [`clock`]: the clock a core decides with (a test's moves forward; production's cannot).
//! - [`snapshot`]: the immutable list of proxy-cache projects, published by discovery, read by cores.
//! - [`config`]: every environment variable, parsed and validated in one place.
//! - [`certs`]: the client listener's certificate and key, read from PEM files (at start and when
//!   they change).
//! - [`names`]: the distribution grammar of names, tags and digests.
//! - [`error`]: the registry errors the router answers itself (code, status, JSON body).

pub(crate) mod body;
pub(crate) mod cache;
pub mod certs;
pub mod clock;
pub mod config;
pub mod control;
pub(crate) mod counter;
pub(crate) mod error;
pub(crate) mod flight;
#[doc(hidden)]
pub mod fuzz_targets;
pub(crate) mod limit;
pub mod logging;
pub mod metrics;
pub(crate) mod names;
pub mod registry;
pub mod server;
pub(crate) mod share;
pub mod snapshot;
pub(crate) mod stall;
pub mod task;
pub(crate) mod tick;
pub(crate) mod transfer;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use anyhow::{bail, Context};
use tokio::sync::watch;

use crate::config::Config;
use crate::registry::{ProcessState, State};
use crate::server::Driver;
use crate::snapshot::SharedSnapshot;

/// Longest wait for one worker to report its runtime (a worker that dies before reporting would
/// otherwise hold the start forever).
const WORKER_START_LIMIT: std::time::Duration = std::time::Duration::from_secs(30);

/// A router whose listeners are bound but whose workers have not started.
pub struct Server {
    config: Arc<Config>,
    listeners: Vec<std::net::TcpListener>,
    local_addr: SocketAddr,
    metrics_listener: std::net::TcpListener,
    harbor: Arc<upstream::Harbor>,
    snapshot: SharedSnapshot,
    /// The client listener's certificate, with `TLS_CERT_FILE`.
    certs: Option<Arc<server::tls::Certs>>,
}

impl Server {
    /// Binds `WORKERS` SO_REUSEPORT listeners on `LISTEN_ADDR`. With port 0 the first socket picks the
    /// port and the others join it, so every worker serves the same address.
    pub fn bind(config: Config) -> anyhow::Result<Server> {
        let harbor = upstream::Harbor::new(&upstream::Settings::from_config(&config))?;
        let certs = match &config.tls {
            Some(files) => {
                Some(server::tls::Certs::load(files).map_err(|e| anyhow::anyhow!("{e}"))?)
            }
            None => None,
        };
        let listeners = server::listener::bind(config.listen_addr, config.workers)?;
        let local_addr = listeners[0].local_addr()?;
        let metrics_listener = std::net::TcpListener::bind(config.metrics_addr)
            .with_context(|| format!("cannot listen on METRICS_ADDR {}", config.metrics_addr))?;
        Ok(Server {
            config: Arc::new(config),
            listeners,
            local_addr,
            metrics_listener,
            harbor,
            snapshot: snapshot::shared(),
            certs,
        })
    }

    /// The address clients connect to (with the real port when `LISTEN_ADDR` asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The snapshot the workers read (tests inspect it; discovery writes it).
    pub fn snapshot(&self) -> SharedSnapshot {
        self.snapshot.clone()
    }

    /// Starts discovery and one pinned thread per listener and waits until each has its runtime. Fails (after
    /// stopping the ones that did start) when a worker cannot build its runtime, e.g. `IO_DRIVER=io_uring`
    /// on a kernel without it.
    pub fn start(self) -> anyhow::Result<Running> {
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let (report_tx, report_rx) = mpsc::channel();
        let allowed = core_affinity::get_core_ids().unwrap_or_default();
        let online = online_cpus();
        let pinned = should_pin(self.config.cpu_pinning, allowed.len(), online);
        tracing::info!(
            cpu_pinning = self.config.cpu_pinning.as_str(),
            allowed_cpus = allowed.len(),
            online_cpus = online,
            pinned,
            "{}",
            if pinned {
                "workers pin themselves to the allowed CPUs"
            } else {
                "workers run unpinned (the process does not own its CPUs; CPU_PINNING=on pins anyway)"
            }
        );
        let cores = if pinned { allowed } else { Vec::new() };
        let learned = Arc::new(cache::LearnedMap::default());
        let redis = share::Shared::start(
            &self.config,
            self.snapshot.clone(),
            learned.clone(),
            shutdown_rx.clone(),
        )?;
        let (shared, redis_thread) = redis.unzip();
        let metrics = metrics::Metrics::new(self.snapshot.clone(), shared.clone());
        let process = ProcessState::new(
            Arc::new(registry::settings::Settings::from_config(&self.config)),
            self.harbor.clone(),
            self.snapshot.clone(),
            learned,
            shared.clone(),
            metrics.clone(),
        );
        metrics.watch_transfers(process.transfers.clone());
        let mut settings = server::Settings::from_config(&self.config);
        if let Some(certs) = &self.certs {
            settings.tls = Some(certs.server_config());
            certs
                .watch(self.config.tls_reload_interval)
                .context("cannot spawn the TLS reload thread")?;
            metrics.watch_certs(certs.clone());
        }
        if pinned && self.config.workers > cores.len() && !cores.is_empty() {
            tracing::warn!(
                workers = self.config.workers,
                cores = cores.len(),
                "more workers than cores: some cores run several workers"
            );
        }
        let mut workers = Vec::with_capacity(self.listeners.len());
        for (id, listener) in self.listeners.into_iter().enumerate() {
            let core = cores.get(id % cores.len().max(1)).copied();
            let (process, shutdown, report, settings) = (
                process.clone(),
                shutdown_rx.clone(),
                report_tx.clone(),
                settings.clone(),
            );
            let stats = Arc::new(server::Stats::default());
            metrics.add_worker(id, stats.clone());
            let handle = std::thread::Builder::new()
                .name(format!("hr-worker-{id}"))
                .spawn(move || {
                    if pinned {
                        pin(id, core);
                    }
                    let make = move || State::new(id, process);
                    server::run_worker(id, listener, settings, make, shutdown, report, stats)
                })
                .context("cannot spawn a worker thread")?;
            workers.push(handle);
        }
        drop(report_tx);
        metrics.workers_registered();
        let discovery = control::discovery::spawn(
            self.config.clone(),
            self.harbor.clone(),
            self.snapshot.clone(),
            shared,
            metrics.clone(),
            shutdown_rx.clone(),
        )
        .context("cannot spawn the discovery thread")?;
        let metrics_addr = self.metrics_listener.local_addr()?;
        let admin =
            metrics::serve::spawn(self.metrics_listener, metrics.clone(), shutdown_rx.clone())
                .context("cannot spawn the metrics thread")?;
        let worker_count = workers.len();
        workers.push(discovery);
        workers.push(admin);
        workers.extend(redis_thread);
        let running = Running {
            shutdown: shutdown_tx,
            workers,
            local_addr: self.local_addr,
        };
        let drivers = match started(worker_count, &report_rx) {
            Ok(d) => d,
            Err(e) => {
                running.shutdown();
                return Err(e);
            }
        };
        for (id, d) in &drivers {
            metrics.set_driver(*id, d.as_str());
        }
        let uring = drivers
            .iter()
            .filter(|(_, d)| *d == Driver::IoUring)
            .count();
        tracing::info!(
            addr = %running.local_addr,
            metrics_addr = %metrics_addr,
            workers = drivers.len(),
            io_uring = uring,
            epoll = drivers.len() - uring,
            "listening"
        );
        Ok(running)
    }
}

/// Pins the calling worker thread to `core`, or says why it runs unpinned.
/// Whether workers pin themselves: `auto` only when the process owns its CPUs, i.e. its allowed
/// set is smaller than the machine's online CPUs (the kubelet's static CPU manager gives a
/// Guaranteed pod with whole CPUs exclusive ones; under the default manager the set is the whole
/// node, shared with interrupts and other pods, where pinning N workers to CPUs 0..N-1 only piles
/// them onto the CPUs everything else also uses).
fn should_pin(mode: config::CpuPinning, allowed: usize, online: Option<usize>) -> bool {
    match mode {
        config::CpuPinning::On => true,
        config::CpuPinning::Off => false,
        config::CpuPinning::Auto => online.is_some_and(|n| allowed > 0 && allowed < n),
    }
}

/// The machine's online CPUs, if the system says.
fn online_cpus() -> Option<usize> {
    // SAFETY: sysconf reads a system value and has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    usize::try_from(n).ok().filter(|n| *n > 0)
}

fn pin(worker: usize, core: Option<core_affinity::CoreId>) {
    match core {
        Some(c) if core_affinity::set_for_current(c) => {}
        _ => tracing::warn!(worker, "cannot pin the worker to a core; running unpinned"),
    }
}

/// Waits for `count` workers to report their runtime: (worker, driver) in the order they started.
fn started(
    count: usize,
    reports: &mpsc::Receiver<server::StartReport>,
) -> anyhow::Result<Vec<(usize, Driver)>> {
    let mut drivers = Vec::with_capacity(count);
    for _ in 0..count {
        match reports.recv_timeout(WORKER_START_LIMIT) {
            Ok(Ok(driver)) => drivers.push(driver),
            Ok(Err(why)) => bail!(why),
            Err(_) => {
                bail!("a worker thread did not start (it exited or hung before its runtime was up)")
            }
        }
    }
    Ok(drivers)
}

/// A started router.
pub struct Running {
    shutdown: watch::Sender<bool>,
    workers: Vec<JoinHandle<()>>,
    local_addr: SocketAddr,
}

impl Running {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Asks every worker to stop accepting and drain; returns at once.
    pub fn shutdown(&self) {
        let _ = self.shutdown.send(true);
    }

    /// Waits for every worker to finish draining (each bounded by `SHUTDOWN_TIMEOUT`).
    pub fn join(self) {
        for w in self.workers {
            if w.join().is_err() {
                tracing::error!("a worker thread panicked");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use config::CpuPinning::*;

    #[test]
    fn workers_pin_only_when_the_process_owns_its_cpus_or_is_told_to() {
        assert!(!should_pin(Auto, 64, Some(64)), "the whole node: shared");
        assert!(should_pin(Auto, 4, Some(64)), "a cpuset of its own");
        assert!(
            !should_pin(Auto, 4, None),
            "unknown machine size: do not guess"
        );
        assert!(!should_pin(Auto, 0, Some(64)), "no allowed set read");
        assert!(should_pin(On, 64, Some(64)));
        assert!(!should_pin(Off, 4, Some(64)));
    }
}
