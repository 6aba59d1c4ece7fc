//! One data-plane core: a pinned thread running its own monoio event loop (io_uring, or epoll when
//! io_uring is unavailable), its own SO_REUSEPORT listener and its own per-core state. Nothing here is
//! shared with another core: the only cross-thread traffic is the shutdown signal and the start-up
//! report.
//!
//! Shutdown: when the signal flips, the accept loop stops (the listener is closed), every open
//! connection is told to finish its in-flight request and close, and the loop waits for them until
//! `SHUTDOWN_TIMEOUT`; whatever is still open then is dropped with the runtime.

pub mod conn;
pub mod linger;

use std::cell::Cell;
use std::rc::Rc;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use monoio::{IoUringDriver, LegacyDriver, RuntimeBuilder};
use monoio_compat::hyper::MonoioTimer;
use tokio::sync::{watch, Notify};

use std::cell::RefCell;
use std::collections::HashSet;

use crate::cache::{LearnedMap, RouteCache, Ttls};
use crate::config::{Config, IoDriver};
use crate::registry::resolve::Flights;
use crate::snapshot::{SharedSnapshot, Snapshot};
use crate::upstream::breaker::Breakers;
use crate::upstream::{self, Upstream};

/// Largest request head accepted (request line plus headers). Registry requests are small; a bearer
/// token is a few KiB. Larger heads get 431 from hyper.
const MAX_REQUEST_HEAD: usize = 64 * 1024;
/// Most header lines accepted in one request.
const MAX_HEADERS: usize = 100;
/// Pause after a failed accept (EMFILE and friends) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// What every core receives at start: read-only, shared across cores.
#[derive(Clone)]
pub struct Shared {
    pub config: Arc<Config>,
    pub upstream: Arc<upstream::Shared>,
    pub snapshot: SharedSnapshot,
    /// Mappings learned by any core; read on a local miss only.
    pub learned: Arc<LearnedMap>,
}

/// The state one core owns. Reached through `Rc`; never sent to another thread.
pub struct Core {
    id: usize,
    config: Arc<Config>,
    /// The routing view as published by discovery.
    snapshot: SharedSnapshot,
    /// This core's copy of the published view. Requests take an `Rc` of it: cloning the published
    /// `Arc` per request would write its reference count from every core.
    view: RefCell<Option<Rc<Snapshot>>>,
    /// This core's client to Harbor (own connection pool and token cache).
    upstream: Upstream,
    /// This core's mappings, misses, manifests and tag lists.
    cache: RefCell<RouteCache>,
    learned: Arc<LearnedMap>,
    /// This core's circuit breakers, by project.
    breakers: RefCell<Breakers>,
    /// Fan-outs in flight, for coalescing.
    flights: Rc<Flights>,
    /// Names whose stale mapping is being refreshed.
    refreshing: RefCell<HashSet<String>>,
    /// One server builder, reused for every connection of this core.
    http: http1::Builder,
}

impl Core {
    fn new(id: usize, shared: Shared) -> Core {
        let Shared {
            config,
            upstream,
            snapshot,
            learned,
        } = shared;
        let ttls = Ttls {
            mapping: config.cache_ttl,
            stale: config.stale_while_revalidate,
            miss: config.negative_cache_ttl,
            manifest: config.manifest_cache_ttl,
        };
        let cache = RouteCache::new(
            ttls,
            config.manifest_cache_bytes / config.workers.max(1) as u64,
        );
        let breakers = Breakers::new(
            config.circuit_breaker_threshold,
            config.circuit_breaker_timeout,
        );
        let mut http = http1::Builder::new();
        http.timer(MonoioTimer)
            .keep_alive(true)
            .header_read_timeout(config.header_read_timeout)
            .max_header_size(MAX_REQUEST_HEAD)
            .max_headers(MAX_HEADERS);
        Core {
            id,
            config,
            snapshot,
            view: RefCell::new(None),
            upstream: Upstream::new(upstream),
            cache: RefCell::new(cache),
            learned,
            breakers: RefCell::new(breakers),
            flights: Rc::new(Flights::default()),
            refreshing: RefCell::new(HashSet::new()),
            http,
        }
    }

    /// The worker index, `0..WORKERS`.
    pub fn id(&self) -> usize {
        self.id
    }

    pub fn proxy_project(&self) -> &str {
        &self.config.proxy_project
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn snapshot(&self) -> &SharedSnapshot {
        &self.snapshot
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

    pub fn cache(&self) -> &RefCell<RouteCache> {
        &self.cache
    }

    pub fn learned(&self) -> &LearnedMap {
        &self.learned
    }

    pub fn breakers(&self) -> &RefCell<Breakers> {
        &self.breakers
    }

    pub fn flights(&self) -> &Rc<Flights> {
        &self.flights
    }

    pub fn refreshing(&self) -> &RefCell<HashSet<String>> {
        &self.refreshing
    }
}

/// Which driver a core ended up on, reported back to the starter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    IoUring,
    Epoll,
}

impl Driver {
    pub fn as_str(self) -> &'static str {
        match self {
            Driver::IoUring => "io_uring",
            Driver::Epoll => "epoll",
        }
    }
}

/// What a worker thread tells the starter once its runtime is built (or failed to build).
pub type StartReport = Result<Driver, String>;

/// Runs worker `id` on the current thread until shutdown has drained. Reports the driver (or why no
/// runtime could be built) on `report` before serving.
pub fn run_worker(
    id: usize,
    listener: std::net::TcpListener,
    shared: Shared,
    shutdown: watch::Receiver<bool>,
    report: mpsc::Sender<StartReport>,
) {
    let driver = shared.config.io_driver;
    let report_err = report.clone();
    let serve = move |driver: Driver| {
        tracing::info!(worker = id, driver = driver.as_str(), "worker started");
        let _ = report.send(Ok(driver));
        accept_loop(id, listener, shared, shutdown)
    };
    let uring = || {
        RuntimeBuilder::<IoUringDriver>::new()
            .enable_timer()
            .build()
    };
    let epoll = || RuntimeBuilder::<LegacyDriver>::new().enable_timer().build();
    let failed = |what: &str, e: std::io::Error| {
        let _ = report_err.send(Err(format!("cannot start the {what} runtime: {e}")));
    };
    match driver {
        IoDriver::IoUring => match uring() {
            Ok(mut rt) => rt.block_on(serve(Driver::IoUring)),
            Err(e) => failed("io_uring", e),
        },
        IoDriver::Epoll => match epoll() {
            Ok(mut rt) => rt.block_on(serve(Driver::Epoll)),
            Err(e) => failed("epoll", e),
        },
        IoDriver::Auto => match uring() {
            Ok(mut rt) => rt.block_on(serve(Driver::IoUring)),
            Err(uring_err) => {
                tracing::warn!(worker = id, error = %uring_err,
                    "io_uring is unavailable (kernel too old, or blocked by seccomp); falling back to epoll");
                match epoll() {
                    Ok(mut rt) => rt.block_on(serve(Driver::Epoll)),
                    Err(e) => failed("epoll", e),
                }
            }
        },
    }
}

async fn accept_loop(
    id: usize,
    listener: std::net::TcpListener,
    shared: Shared,
    mut shutdown: watch::Receiver<bool>,
) {
    let shutdown_timeout = shared.config.shutdown_timeout;
    let listener = match monoio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(worker = id, error = %e, "cannot register the listener");
            return;
        }
    };
    let core = Rc::new(Core::new(id, shared));
    spawn_cache_sweeper(Rc::downgrade(&core));
    let open = Rc::new(OpenConns::default());
    loop {
        if *shutdown.borrow() {
            break;
        }
        monoio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    let _ = stream.set_nodelay(true);
                    let guard = open.enter();
                    monoio::spawn(conn::serve(stream, core.clone(), shutdown.clone(), guard));
                }
                Err(e) => {
                    tracing::warn!(worker = id, error = %e, "accept failed");
                    monoio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            changed = shutdown.changed() => {
                if changed.is_err() {
                    break; // the starter is gone: nobody can ask for a drain any more
                }
            }
        }
    }
    drop(listener);
    let in_flight = open.count();
    tracing::info!(worker = id, connections = in_flight, "draining");
    monoio::select! {
        _ = open.all_closed() => tracing::info!(worker = id, "drained"),
        _ = monoio::time::sleep(shutdown_timeout) => tracing::warn!(
            worker = id, connections = open.count(),
            "SHUTDOWN_TIMEOUT reached; closing the remaining connections"),
    }
}

/// Drops expired cache entries every minute, off the request path.
fn spawn_cache_sweeper(core: std::rc::Weak<Core>) {
    monoio::spawn(async move {
        loop {
            monoio::time::sleep(Duration::from_secs(60)).await;
            match core.upgrade() {
                Some(c) => {
                    let now = std::time::Instant::now();
                    c.cache.borrow_mut().sweep(now);
                    if c.id == 0 {
                        // One core sweeps the shared map for everyone.
                        let life = c.config.cache_ttl + c.config.stale_while_revalidate;
                        c.learned.sweep(now, life);
                    }
                }
                None => return,
            }
        }
    });
}

/// Counts this core's open connections so the drain knows when it is done.
#[derive(Default)]
struct OpenConns {
    count: Cell<usize>,
    closed: Notify,
}

impl OpenConns {
    fn enter(self: &Rc<Self>) -> ConnGuard {
        self.count.set(self.count.get() + 1);
        ConnGuard(self.clone())
    }

    fn count(&self) -> usize {
        self.count.get()
    }

    async fn all_closed(&self) {
        loop {
            let notified = self.closed.notified();
            if self.count.get() == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// Held by a connection task; dropping it marks the connection closed.
pub struct ConnGuard(Rc<OpenConns>);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let n = self.0.count.get() - 1;
        self.0.count.set(n);
        if n == 0 {
            self.0.closed.notify_waiters();
        }
    }
}
