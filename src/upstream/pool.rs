//! One core's connections to Harbor: a keep-alive pool over hyper's `client::conn` on monoio, plain or
//! TLS, HTTP/1.1 or HTTP/2 (prior knowledge on plain TCP, ALPN on TLS).
//!
//! HTTP/1.1: a connection serves one request at a time and returns to the pool only when its response
//! body was read to the end without error ([`UpstreamBody`] does that); a body dropped early takes its
//! connection with it. At most `MAX_IDLE_CONNS_PER_HOST` idle connections are kept, each for at most
//! `IDLE_CONN_TIMEOUT`. HTTP/2: one multiplexed connection per core, replaced when it closes.
//!
//! A request that fails before any response on a *reused* connection (the server closed it while it was
//! idle, or sent GOAWAY) is sent once more on a new connection: the pool only carries GET and HEAD, so
//! that is always safe. A failure on a new connection is returned as it is.
//!
//! HTTP/2 with prior knowledge on plain TCP (h2c) is checked at first contact: Harbor's own nginx and
//! core speak no h2c, and answer the HTTP/2 preface with HTTP/1.1. When a request on an h2c
//! connection nothing was answered on yet fails, and either its error says the reply was no HTTP/2
//! or a probe of the preface is answered `HTTP/…`, the request is sent again over HTTP/1.1; if that
//! is answered, the pool uses HTTP/1.1 from then on and says so once per process, naming
//! `HTTP2_PRIOR_KNOWLEDGE`, rather than failing every request.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use monoio::io::IntoPollIo;
use monoio_compat::hyper::{MonoioIo, MonoioTimer};
use rustls::pki_types::ServerName;

use super::{tls, Stats, UpstreamError};
use crate::stall::StallTimer;

/// Request bodies: the router only sends GET and HEAD upstream.
pub type ReqBody = Empty<Bytes>;

/// HTTP/2 flow control for a connection shared by many streams: a small per-stream window keeps a few
/// stalled blob readers from starving the others; a large connection window keeps throughput up.
const H2_STREAM_WINDOW: u32 = 256 * 1024;
/// Largest read buffer of an HTTP/1.1 connection to Harbor (hyper's default grows to ~400 KiB). A
/// streamed body is read ahead into it while the client takes the previous frame, so under slow
/// clients it is memory held per stream. 128 KiB: 16 slow readers cost a third of the memory, at the
/// same blob throughput (bench/run.sh slow-readers and blob).
const UPSTREAM_READ_BUFFER: usize = 128 * 1024;
const H2_CONNECTION_WINDOW: u32 = 64 * 1024 * 1024;
/// Clients cancel blob downloads often; the default reset budget ends in GOAWAY after ~80 cancels.
const H2_MAX_RESET_STREAMS: usize = 4096;

/// Where and how to connect; shared read-only by every core's pool.
pub struct Target {
    /// Resolved addresses of Harbor's host, refreshed by the control plane (DNS never runs on a core).
    pub addrs: Arc<ArcSwap<Vec<SocketAddr>>>,
    /// `Some` for https: the TLS config and the name to verify.
    pub tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
    /// HTTP/2 with prior knowledge on plain TCP (on TLS, ALPN decides).
    pub http2: bool,
    pub connect_timeout: Duration,
    /// Longest pause in a response body before it is abandoned (`UPSTREAM_RESPONSE_TIMEOUT`).
    pub body_stall_timeout: Duration,
    pub max_idle: usize,
    pub idle_timeout: Duration,
}

enum Sender {
    H1(http1::SendRequest<ReqBody>),
    H2(http2::SendRequest<ReqBody>),
}

struct Idle {
    sender: http1::SendRequest<ReqBody>,
    since: Instant,
}

/// A snapshot of a pool's counters (tests read it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    pub connections_opened: u64,
    pub requests: u64,
    pub reused: u64,
    pub retried: u64,
}

/// One core's pool. `!Send`: it lives in an `Rc` on its core.
pub struct Pool {
    target: Arc<Target>,
    idle: RefCell<VecDeque<Idle>>,
    h2: RefCell<Option<http2::SendRequest<ReqBody>>>,
    /// An HTTP/2-capable connection is being opened: the others wait for it instead of opening their
    /// own, so a burst of first requests shares one connection.
    h2_connecting: Cell<bool>,
    h2_connected: tokio::sync::Notify,
    /// HTTP/2 was offered and Harbor chose HTTP/1.1 (by ALPN), or h2c was refused: stop serializing
    /// connects, and on plain TCP connect with HTTP/1.1.
    h2_declined: Cell<bool>,
    /// An h2c request was answered: the first-contact check is over.
    h2c_confirmed: Cell<bool>,
    /// Which of Harbor's addresses the next connection tries first (spreads connections).
    next_addr: Cell<usize>,
    /// Written by this core, read by the metrics scrape.
    stats: Arc<Stats>,
}

impl Pool {
    pub fn new(target: Arc<Target>, stats: Arc<Stats>) -> Rc<Pool> {
        let pool = Rc::new(Pool {
            target,
            idle: RefCell::new(VecDeque::new()),
            h2: RefCell::new(None),
            h2_connecting: Cell::new(false),
            h2_connected: tokio::sync::Notify::new(),
            h2_declined: Cell::new(false),
            h2c_confirmed: Cell::new(false),
            next_addr: Cell::new(0),
            stats,
        });
        let every = (pool.target.idle_timeout / 2).max(Duration::from_millis(100));
        crate::tick::every(every, Rc::downgrade(&pool), Pool::sweep);
        pool
    }

    pub fn stats(&self) -> PoolStats {
        let s = &self.stats;
        PoolStats {
            connections_opened: s.connections_opened.get(),
            requests: s.requests.get(),
            reused: s.reused.get(),
            retried: s.retried.get(),
        }
    }

    /// Whether requests share an HTTP/2 connection: offered, and Harbor has not chosen HTTP/1.1.
    pub fn multiplexed(&self) -> bool {
        self.target.http2 && !self.h2_declined.get()
    }

    /// Idle HTTP/1.1 connections right now.
    pub fn idle_count(&self) -> usize {
        self.idle.borrow().len()
    }

    /// Sends one request and returns the response with its body still streaming.
    pub async fn send(
        self: &Rc<Self>,
        req: Request<ReqBody>,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        self.stats.requests.inc();
        let (sender, reused) = self.acquire().await?;
        // h2c not answered yet on plain TCP: every request on it may meet Harbor's HTTP/1.1 refusal
        // (concurrent first requests share the connection).
        let unproven_h2c = self.target.tls.is_none()
            && matches!(sender, Sender::H2(_))
            && !self.h2c_confirmed.get();
        if !reused && !unproven_h2c {
            return self.send_on(sender, req).await;
        }
        if reused {
            self.stats.reused.inc();
        }
        let retry = clone_request(&req);
        match self.send_on(sender, req).await {
            Err(e @ UpstreamError::Request(_)) if unproven_h2c && !self.h2c_confirmed.get() => {
                self.h2c_refused(retry, e).await
            }
            Err(e) if reused && e.before_response() => {
                tracing::debug!(error = %e, "reused upstream connection failed; retrying on a new one");
                self.stats.retried.inc();
                let (sender, _) = self.acquire().await?;
                self.send_on(sender, retry).await
            }
            other => other,
        }
    }

    /// A request on an h2c connection nothing was answered on yet failed with `error`. If Harbor
    /// speaks no h2c (the error says so, or a probe finds Harbor answering the HTTP/2 preface with
    /// HTTP/1.1), `retry` is sent over HTTP/1.1, and if that is answered the pool keeps to
    /// HTTP/1.1. Otherwise `error` stands.
    async fn h2c_refused(
        self: &Rc<Self>,
        retry: Request<ReqBody>,
        error: UpstreamError,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        if !self.h2_declined.get()
            && !speaks_no_h2c(&error)
            && !self.answers_preface_with_http1().await
        {
            return Err(error);
        }
        // Requests that shared the refused connection come here too: the first one counts.
        let first = !self.h2_declined.replace(true);
        *self.h2.borrow_mut() = None;
        let answered = match self.acquire().await {
            Ok((sender, _)) => self.send_on(sender, retry).await,
            Err(e) => Err(e),
        };
        match &answered {
            Ok(_) if !first => {}
            Ok(_) => {
                self.stats.h2c_refused.inc();
                static SAID: std::sync::atomic::AtomicBool =
                    std::sync::atomic::AtomicBool::new(false);
                if !SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    tracing::error!(
                        harbor = ?self.target.addrs.load().first(),
                        error = %error,
                        "HTTP2_PRIOR_KNOWLEDGE=true, but Harbor does not speak HTTP/2 without TLS (h2c; Harbor's own nginx and core do not): using HTTP/1.1. Unset HTTP2_PRIOR_KNOWLEDGE, or use an https:// HARBOR_URL whose front offers h2 by ALPN"
                    );
                }
            }
            // HTTP/1.1 fails too: Harbor is failing, not refusing h2c. Try h2c again next time.
            Err(_) if first => self.h2_declined.set(false),
            Err(_) => {}
        }
        answered
    }

    /// Sends HTTP/2's preface on a connection of its own and reads what comes back: `true` when it
    /// is an HTTP/1.1 answer (`HTTP/…`), as from nginx without `http2` or Go's net/http. Anything
    /// else (HTTP/2 frames, nothing, an error) is not taken as a refusal.
    async fn answers_preface_with_http1(&self) -> bool {
        use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
        let Some(addr) = self.target.addrs.load().first().copied() else {
            return false;
        };
        let probe = async move {
            let mut stream = monoio::net::TcpStream::connect_addr(addr).await.ok()?;
            // The preface and an empty SETTINGS frame.
            let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
            hello.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
            let (written, _) = stream.write_all(hello).await;
            written.ok()?;
            let (read, buf) = stream.read(Vec::with_capacity(16)).await;
            read.ok()?;
            Some(buf.starts_with(b"HTTP/"))
        };
        monoio::time::timeout(self.target.connect_timeout, probe)
            .await
            .ok()
            .flatten()
            .unwrap_or(false)
    }

    async fn send_on(
        self: &Rc<Self>,
        sender: Sender,
        req: Request<ReqBody>,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        match sender {
            Sender::H2(mut s) => {
                // HTTP/2 carries the authority in the URI (`:authority`), not in a Host header.
                let mut req = req;
                req.headers_mut().remove(http::header::HOST);
                let res = s.send_request(req).await.map_err(UpstreamError::Request)?;
                // An answer over h2c: Harbor speaks it, whatever fails later.
                self.h2c_confirmed.set(true);
                let stall = self.target.body_stall_timeout;
                Ok(res.map(|body| UpstreamBody::new(body, None, stall)))
            }
            Sender::H1(mut s) => {
                // HTTP/1.1 sends the origin form (`GET /path?query`) with a Host header.
                let mut req = req;
                let origin_form = req
                    .uri()
                    .path_and_query()
                    .map(|p| p.as_str().to_string())
                    .unwrap_or_else(|| "/".to_string());
                *req.uri_mut() = origin_form
                    .parse()
                    .expect("a path and query is a valid URI");
                s.ready().await.map_err(UpstreamError::Request)?;
                let res = s.send_request(req).await.map_err(UpstreamError::Request)?;
                let (parts, body) = res.into_parts();
                let mut body = UpstreamBody::new(
                    body,
                    Some((Rc::downgrade(self), s)),
                    self.target.body_stall_timeout,
                );
                body.release_if_done();
                Ok(Response::from_parts(parts, body))
            }
        }
    }

    /// A pooled connection (`true`) or a new one (`false`).
    async fn acquire(&self) -> Result<(Sender, bool), UpstreamError> {
        loop {
            if let Some(s) = self.checkout() {
                return Ok((s, true));
            }
            // Only a pool that may speak HTTP/2 serializes its connects: HTTP/1.1 needs one
            // connection per request in flight anyway.
            if !self.target.http2 || self.h2_declined.get() {
                return Ok((self.connect().await?, false));
            }
            let connected = self.h2_connected.notified();
            if self.h2_connecting.get() {
                connected.await;
                continue;
            }
            self.h2_connecting.set(true);
            let _done = ConnectingGuard(self);
            return Ok((self.connect().await?, false));
        }
    }

    /// A live pooled connection, if any: the shared HTTP/2 one, else the most recent idle HTTP/1.1 one.
    fn checkout(&self) -> Option<Sender> {
        {
            let mut h2 = self.h2.borrow_mut();
            match h2.as_ref() {
                Some(s) if !s.is_closed() => return Some(Sender::H2(s.clone())),
                Some(_) => *h2 = None,
                None => {}
            }
        }
        let now = Instant::now();
        let mut idle = self.idle.borrow_mut();
        let mut found = None;
        while let Some(c) = idle.pop_back() {
            if !c.sender.is_closed() && now.duration_since(c.since) < self.target.idle_timeout {
                found = Some(Sender::H1(c.sender));
                break;
            }
        }
        self.stats.idle.set(idle.len() as i64);
        found
    }

    /// Takes back an HTTP/1.1 connection whose response was read to the end.
    fn checkin(&self, sender: http1::SendRequest<ReqBody>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.borrow_mut();
        if idle.len() >= self.target.max_idle {
            return; // dropping the sender closes the connection
        }
        idle.push_back(Idle {
            sender,
            since: Instant::now(),
        });
        self.stats.idle.set(idle.len() as i64);
    }

    /// Drops idle connections past `IDLE_CONN_TIMEOUT` (or closed by the server).
    pub fn sweep(&self) {
        let now = Instant::now();
        let timeout = self.target.idle_timeout;
        let mut idle = self.idle.borrow_mut();
        idle.retain(|c| !c.sender.is_closed() && now.duration_since(c.since) < timeout);
        self.stats.idle.set(idle.len() as i64);
    }

    async fn connect(&self) -> Result<Sender, UpstreamError> {
        let timeout = self.target.connect_timeout;
        let sender = monoio::time::timeout(timeout, self.connect_inner())
            .await
            .map_err(|_| UpstreamError::ConnectTimeout(timeout))??;
        self.stats.connections_opened.inc();
        match &sender {
            Sender::H2(s) => *self.h2.borrow_mut() = Some(s.clone()),
            Sender::H1(_) if self.target.http2 => self.h2_declined.set(true),
            Sender::H1(_) => {}
        }
        Ok(sender)
    }

    async fn connect_inner(&self) -> Result<Sender, UpstreamError> {
        let addrs = self.target.addrs.load_full();
        if addrs.is_empty() {
            return Err(UpstreamError::NoAddress);
        }
        let mut last = None;
        let mut stream = None;
        let first = self.next_addr.get() % addrs.len();
        self.next_addr.set(first + 1);
        for addr in addrs.iter().cycle().skip(first).take(addrs.len()) {
            match monoio::net::TcpStream::connect_addr(*addr).await {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let stream = match stream {
            Some(s) => s,
            None => return Err(UpstreamError::Connect(last.expect("at least one address"))),
        };
        let _ = stream.set_nodelay(true);
        let io = stream.into_poll_io().map_err(UpstreamError::Connect)?;
        match &self.target.tls {
            None => {
                let h2c = self.target.http2 && !self.h2_declined.get();
                handshake(MonoioIo::new(io), h2c, &self.stats).await
            }
            Some((config, name)) => {
                let connector = tokio_rustls::TlsConnector::from(config.clone());
                let tls = connector
                    .connect(name.clone(), io)
                    .await
                    .map_err(UpstreamError::Tls)?;
                let h2 = tls.get_ref().1.alpn_protocol() == Some(tls::ALPN_H2);
                handshake(MonoioIo::new(tls), h2, &self.stats).await
            }
        }
    }
}

async fn handshake<I>(io: I, h2: bool, stats: &Arc<Stats>) -> Result<Sender, UpstreamError>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + 'static,
{
    if h2 {
        let (sender, conn) = http2::Builder::new(crate::task::Executor)
            .timer(MonoioTimer)
            .initial_stream_window_size(H2_STREAM_WINDOW)
            .initial_connection_window_size(H2_CONNECTION_WINDOW)
            .max_concurrent_reset_streams(H2_MAX_RESET_STREAMS)
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true)
            .handshake(io)
            .await
            .map_err(UpstreamError::Handshake)?;
        let open = OpenGuard::new(stats);
        crate::task::spawn(async move {
            let _open = open;
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream h2 connection ended");
            }
        });
        Ok(Sender::H2(sender))
    } else {
        let (sender, conn) = http1::Builder::new()
            .max_buf_size(UPSTREAM_READ_BUFFER)
            .handshake(io)
            .await
            .map_err(UpstreamError::Handshake)?;
        let open = OpenGuard::new(stats);
        crate::task::spawn(async move {
            let _open = open;
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection ended");
            }
        });
        Ok(Sender::H1(sender))
    }
}

/// Whether `e` is what an HTTP/1.1 server's answer to the HTTP/2 preface makes of a first request:
/// a connection-level HTTP/2 error raised here (the bytes that came back were not HTTP/2 frames:
/// `HTTP/1.1 400 …` read as a frame header is a frame size error, and the client goes away), not a
/// reset, a GOAWAY or an I/O error the server sent or caused. nginx without `http2` and Go's
/// net/http (harbor-core) both answer the preface with an HTTP/1.1 error.
fn speaks_no_h2c(e: &UpstreamError) -> bool {
    let UpstreamError::Request(e) = e else {
        return false;
    };
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(h2) = s.downcast_ref::<h2::Error>() {
            let garbled = matches!(
                h2.reason(),
                Some(h2::Reason::FRAME_SIZE_ERROR | h2::Reason::PROTOCOL_ERROR)
            );
            return garbled && !h2.is_remote() && !h2.is_io();
        }
        source = s.source();
    }
    false
}

/// Counts a connection open for as long as its task runs.
struct OpenGuard(Arc<Stats>);

impl OpenGuard {
    fn new(stats: &Arc<Stats>) -> OpenGuard {
        stats.open.add(1);
        OpenGuard(stats.clone())
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.add(-1);
    }
}

/// Ends an HTTP/2 connect (done, failed or cancelled) and wakes the requests that waited for it.
struct ConnectingGuard<'a>(&'a Pool);

impl Drop for ConnectingGuard<'_> {
    fn drop(&mut self) {
        self.0.h2_connecting.set(false);
        self.0.h2_connected.notify_waiters();
    }
}

fn clone_request(req: &Request<ReqBody>) -> Request<ReqBody> {
    let mut r = Request::new(Empty::new());
    *r.method_mut() = req.method().clone();
    *r.uri_mut() = req.uri().clone();
    *r.version_mut() = req.version();
    *r.headers_mut() = req.headers().clone();
    r
}

/// An upstream response body. For HTTP/1.1 it carries its connection and gives it back to the pool
/// when the body has been read to the end without error; dropped early, it closes the connection.
/// It may also hold a body already read whole (a tag list that had to be inspected).
pub struct UpstreamBody {
    inner: Inner,
    release: Option<(Weak<Pool>, http1::SendRequest<ReqBody>)>,
    /// Ends the body with an error when Harbor sends nothing for `UPSTREAM_RESPONSE_TIMEOUT`.
    stall: Option<StallTimer>,
}

enum Inner {
    Streaming(Incoming),
    Whole(Option<Bytes>),
}

impl UpstreamBody {
    fn new(
        inner: Incoming,
        release: Option<(Weak<Pool>, http1::SendRequest<ReqBody>)>,
        stall_limit: Duration,
    ) -> Self {
        UpstreamBody {
            inner: Inner::Streaming(inner),
            release,
            stall: Some(StallTimer::new(stall_limit)),
        }
    }

    /// A body already read to the end.
    pub fn whole(bytes: Bytes) -> Self {
        UpstreamBody {
            inner: Inner::Whole(Some(bytes)),
            release: None,
            stall: None,
        }
    }

    /// A body that is already complete (HEAD, 204, `Content-Length: 0`) frees its connection at once.
    fn release_if_done(&mut self) {
        if self.is_end_stream() {
            self.release();
        }
    }

    fn release(&mut self) {
        if let Some((pool, sender)) = self.release.take() {
            if let Some(pool) = pool.upgrade() {
                pool.checkin(sender);
            }
        }
    }
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody")
            .field("pooled", &self.release.is_some())
            .finish()
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = &mut *self;
        let incoming = match &mut this.inner {
            Inner::Whole(bytes) => return Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Inner::Streaming(i) => i,
        };
        let polled = Pin::new(&mut *incoming).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.release(),
            Poll::Ready(Some(Err(_))) => this.release = None,
            Poll::Ready(Some(Ok(_))) => {
                if let Some(s) = &mut this.stall {
                    s.progress();
                }
                if incoming.is_end_stream() {
                    this.release();
                }
            }
            Poll::Pending => {
                if this.stall.as_mut().is_some_and(|s| s.stalled(cx)) {
                    this.release = None;
                    return Poll::Ready(Some(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "Harbor stopped sending the body",
                    ))));
                }
            }
        }
        polled.map(|o| o.map(|r| r.map_err(std::io::Error::other)))
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Streaming(i) => i.is_end_stream(),
            Inner::Whole(b) => b.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Streaming(i) => i.size_hint(),
            Inner::Whole(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
}
