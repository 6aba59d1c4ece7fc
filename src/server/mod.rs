//! The data-plane runtime, generic over what answers requests: one pinned thread per core running its
//! own monoio event loop (io_uring, or epoll when io_uring is unavailable), its own SO_REUSEPORT
//! listener ([`listener`]), its accept loop, one task per downstream connection ([`conn`], with the
//! lingering close of [`linger`]) and the drain on shutdown. It names no registry type: the worker
//! builds its [`Handler`] on its own thread, so the handler's state may be `!Send`.
//!
//! Shutdown: when the signal flips, the accept loop stops (the listener is closed), every open
//! connection is told to finish its in-flight request and close, and the loop waits for them until
//! `SHUTDOWN_TIMEOUT`; whatever is still open then is dropped with the runtime.

pub mod conn;
pub mod linger;
pub mod listener;
pub mod tls;

use std::cell::Cell;
use std::future::Future;
use std::rc::Rc;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use monoio::{IoUringDriver, LegacyDriver, RuntimeBuilder};
use monoio_compat::hyper::MonoioTimer;
use tokio::sync::{watch, Notify};

use crate::config::{Cidr, Config, IoDriver};
use crate::counter::{Counter, Gauge};

pub use heartbeat::Heartbeat;

mod heartbeat;

/// Largest request head accepted (request line plus headers). Registry requests are small; a bearer
/// token is a few KiB. Larger heads get 431 from hyper.
const MAX_REQUEST_HEAD: usize = 64 * 1024;
/// Most header lines accepted in one request.
const MAX_HEADERS: usize = 100;
/// At most one warning this often while connections are refused for `MAX_CONNECTIONS` (and as
/// often for `MAX_CONNECTIONS_PER_CLIENT`).
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);
/// Pause after a failed accept (EMFILE and friends) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Answers the requests of one core. Built on the worker's thread, reached through `Rc`, never sent
/// to another thread.
pub trait Handler: 'static {
    /// The response body (streamed by hyper frame by frame).
    type Body: http_body::Body<Data = Bytes, Error = std::io::Error> + Unpin + 'static;

    /// Answers one request; never fails (every problem is an answer).
    fn handle(self: Rc<Self>, req: Request<Incoming>)
        -> impl Future<Output = Response<Self::Body>>;

    /// The worker drained (or gave up at `SHUTDOWN_TIMEOUT`) and its runtime is about to end:
    /// work the handler spawned on this core that other cores wait on stops here.
    fn drained(&self) {}
}

/// The client's address, in every request's extensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer(pub std::net::SocketAddr);

/// The settings the runtime itself needs, from the configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Connections one worker keeps open at once (its share of `MAX_CONNECTIONS`); past it, a new
    /// connection is closed as soon as it is accepted.
    pub max_connections: usize,
    /// Connections one worker keeps open at once from one client address (its share of
    /// `MAX_CONNECTIONS_PER_CLIENT`); 0: no cap.
    pub max_connections_per_client: usize,
    /// Addresses the per-client cap never applies to (`TRUSTED_PROXIES`: an ingress or load
    /// balancer puts many clients behind one address).
    pub exempt: Arc<[Cidr]>,
    pub io_driver: IoDriver,
    /// Longest wait for a request head (and so the idle time of a keep-alive connection).
    pub header_read_timeout: Duration,
    /// Longest time a response write may make no progress before the connection is cut.
    pub client_stall_timeout: Duration,
    /// Longest drain.
    pub shutdown_timeout: Duration,
    /// With `TLS_CERT_FILE`: the TLS configuration every core's listener serves.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl Settings {
    pub fn from_config(config: &Config) -> Settings {
        Settings {
            max_connections: config.max_connections.div_ceil(config.workers.max(1)),
            max_connections_per_client: config
                .max_connections_per_client
                .div_ceil(config.workers.max(1)),
            exempt: config.trusted_proxies.clone().into(),
            io_driver: config.io_driver,
            header_read_timeout: config.header_read_timeout,
            client_stall_timeout: config.client_stall_timeout,
            shutdown_timeout: config.shutdown_timeout,
            tls: None,
        }
    }

    /// One server builder per core, reused for every connection.
    fn http1(&self) -> http1::Builder {
        let mut http = http1::Builder::new();
        http.timer(MonoioTimer)
            .keep_alive(true)
            .header_read_timeout(self.header_read_timeout)
            .max_header_size(MAX_REQUEST_HEAD)
            .max_headers(MAX_HEADERS);
        http
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

/// One worker's connection counters: written by the worker, read by the metrics scrape.
#[derive(Debug, Default)]
pub struct Stats {
    /// Client connections accepted.
    pub accepted: Counter,
    /// Client connections closed at once because the worker's share of `MAX_CONNECTIONS` was open.
    pub refused: Counter,
    /// Client connections closed at once because their address held the worker's share of
    /// `MAX_CONNECTIONS_PER_CLIENT`.
    pub refused_per_client: Counter,
    /// When the worker's loop last ran its heartbeat tick (a stuck core stops it).
    pub heartbeat: Heartbeat,
    /// Client connections open now (parked ones included).
    pub open: Gauge,
    /// Bytes written to clients (heads and bodies).
    pub bytes_sent: Counter,
    /// TLS handshakes that failed or did not finish in time.
    pub tls_failed: Counter,
    /// TLS connections that chose HTTP/2 by ALPN.
    pub tls_h2: Counter,
    /// TLS connections on HTTP/1.1.
    pub tls_http1: Counter,
}

/// What a worker thread tells the starter once its runtime is built (its id and driver), or why it
/// could not be.
pub type StartReport = Result<(usize, Driver), String>;

/// Runs worker `id` on the current thread until shutdown has drained. Reports the driver (or why no
/// runtime could be built) on `report` before serving. `make` builds the core's handler inside the
/// worker's runtime (so it may spawn tasks there).
pub fn run_worker<H, F>(
    id: usize,
    listener: std::net::TcpListener,
    settings: Settings,
    make: F,
    shutdown: watch::Receiver<bool>,
    report: mpsc::Sender<StartReport>,
    stats: Arc<Stats>,
) where
    H: Handler,
    F: FnOnce() -> Rc<H>,
{
    let report_err = report.clone();
    let io_driver = settings.io_driver;
    let serve = move |driver: Driver| {
        stats.heartbeat.beat();
        tracing::info!(worker = id, driver = driver.as_str(), "worker started");
        let _ = report.send(Ok((id, driver)));
        // One waker identity for the main future too (see `crate::task`).
        // One waker identity for the main future too (see `crate::task`).
        crate::task::Stable::new(accept_loop(id, listener, settings, make, shutdown, stats))
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
    match io_driver {
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

async fn accept_loop<H, F>(
    id: usize,
    listener: std::net::TcpListener,
    settings: Settings,
    make: F,
    mut shutdown: watch::Receiver<bool>,
    stats: Arc<Stats>,
) where
    H: Handler,
    F: FnOnce() -> Rc<H>,
{
    let listener = match monoio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(worker = id, error = %e, "cannot register the listener");
            return;
        }
    };
    let parking = Rc::new(conn::Parking::new(stats.clone()));
    // Advances this core's parking epoch (see `conn`).
    crate::tick::every(
        conn::PARK_AFTER,
        Rc::downgrade(&parking),
        conn::Parking::sweep,
    );
    let core = Rc::new(conn::Core {
        worker: id,
        handler: make(),
        http: settings.http1(),
        client_stall_timeout: settings.client_stall_timeout,
        idle_timeout: settings.header_read_timeout,
        parking,
    });
    // With `TLS_CERT_FILE`: every connection is TLS, HTTP/2 or HTTP/1.1 by ALPN.
    let tls = settings.tls.clone().map(|c| Rc::new(tls::Tls::new(c)));
    let open = Rc::new(OpenConns {
        stats: stats.clone(),
        ..Default::default()
    });
    spawn_memory_return(Rc::downgrade(&open), Rc::downgrade(&core.parking));
    // The core's heartbeat, for liveness: it stops when this loop cannot run.
    crate::tick::every(heartbeat::EVERY, Rc::downgrade(&open), |open| {
        open.stats.heartbeat.beat();
    });
    let mut last_refusal_logged: Option<std::time::Instant> = None;
    let mut last_client_refusal_logged: Option<std::time::Instant> = None;
    loop {
        if *shutdown.borrow() {
            break;
        }
        monoio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    if open.count() >= settings.max_connections {
                        // Closed at once: the client sees its connection end, the loop moves on.
                        drop(stream);
                        stats.refused.inc();
                        let now = std::time::Instant::now();
                        if last_refusal_logged.is_none_or(|t| now - t >= REFUSAL_LOG_EVERY) {
                            last_refusal_logged = Some(now);
                            tracing::warn!(worker = id, open = open.count(),
                                "MAX_CONNECTIONS reached: closing new connections");
                        }
                        continue;
                    }
                    let client = peer.ip().to_canonical();
                    let capped = settings.max_connections_per_client > 0
                        && !settings.exempt.iter().any(|c| c.contains(client));
                    if capped && open.of(client) >= settings.max_connections_per_client {
                        drop(stream);
                        stats.refused_per_client.inc();
                        let now = std::time::Instant::now();
                        if last_client_refusal_logged.is_none_or(|t| now - t >= REFUSAL_LOG_EVERY) {
                            last_client_refusal_logged = Some(now);
                            tracing::warn!(worker = id, client = %client, open = open.of(client),
                                "MAX_CONNECTIONS_PER_CLIENT reached for a client address: closing its new connections");
                        }
                        continue;
                    }
                    let _ = stream.set_nodelay(true);
                    stats.accepted.inc();
                    let guard = open.enter(capped.then_some(client));
                    if let Some(tls) = &tls {
                        crate::task::spawn(tls::serve(stream, Peer(peer), core.clone(), tls.clone(), shutdown.clone(), guard));
                    } else {
                        crate::task::spawn(conn::serve(stream, Peer(peer), core.clone(), shutdown.clone(), guard));
                    }
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
        _ = monoio::time::sleep(settings.shutdown_timeout) => tracing::warn!(
            worker = id, connections = open.count(),
            "SHUTDOWN_TIMEOUT reached; closing the remaining connections"),
    }
    core.handler.drained();
}

/// How often a worker checks whether a burst of connections is over.
const MEMORY_CHECK_EVERY: Duration = Duration::from_secs(5);

/// Gives the memory of closed and parked connections back to the system once a burst is over (the
/// open count fell below half of its peak, or many connections parked): the allocator keeps freed
/// pages for reuse until told otherwise, and an idle worker would never tell it.
fn spawn_memory_return(open: std::rc::Weak<OpenConns>, parking: std::rc::Weak<conn::Parking>) {
    crate::tick::every(MEMORY_CHECK_EVERY, open, move |open| {
        let (now, peak) = (open.count(), open.peak.get());
        let burst_over = peak >= 64 && now < peak / 2;
        if burst_over || parking.upgrade().is_some_and(|p| p.parked.take() >= 64) {
            // SAFETY: mi_collect only walks this thread's own heap.
            unsafe { libmimalloc_sys::mi_collect(true) };
            open.peak.set(now);
        }
    });
}

/// Counts this core's open connections so the drain knows when it is done, and those of each
/// capped client address.
#[derive(Default)]
struct OpenConns {
    count: Cell<usize>,
    /// Open connections by client address (only addresses the per-client cap applies to; an
    /// address leaves the map with its last connection).
    by_client: std::cell::RefCell<std::collections::HashMap<std::net::IpAddr, usize>>,
    /// The most connections open at once since memory was last given back.
    peak: Cell<usize>,
    closed: Notify,
    /// The open count, for the metrics.
    stats: Arc<Stats>,
}

impl OpenConns {
    fn enter(self: &Rc<Self>, client: Option<std::net::IpAddr>) -> ConnGuard {
        self.count.set(self.count.get() + 1);
        self.stats.open.set(self.count.get() as i64);
        self.peak.set(self.peak.get().max(self.count.get()));
        if let Some(ip) = client {
            *self.by_client.borrow_mut().entry(ip).or_default() += 1;
        }
        ConnGuard(self.clone(), client)
    }

    fn count(&self) -> usize {
        self.count.get()
    }

    /// Connections open from `client` (counted only when the cap applies to it).
    fn of(&self, client: std::net::IpAddr) -> usize {
        self.by_client.borrow().get(&client).copied().unwrap_or(0)
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

/// Held by a connection task; dropping it marks the connection closed (and, for a capped client
/// address, one fewer of its connections).
pub struct ConnGuard(Rc<OpenConns>, Option<std::net::IpAddr>);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        if let Some(ip) = self.1 {
            let mut by_client = self.0.by_client.borrow_mut();
            if let std::collections::hash_map::Entry::Occupied(mut e) = by_client.entry(ip) {
                *e.get_mut() -= 1;
                if *e.get() == 0 {
                    e.remove();
                }
            }
        }
        let n = self.0.count.get() - 1;
        self.0.count.set(n);
        self.0.stats.open.set(n as i64);
        if n == 0 {
            self.0.closed.notify_waiters();
        }
    }
}
