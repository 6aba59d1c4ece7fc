//! One downstream connection: HTTP/1.1 with keep-alive through hyper on monoio, each request handed to
//! the core's [`Handler`]. Hyper enforces the request-head limits (size, header count, read
//! timeout); this module adds the graceful close on shutdown, the lingering close of
//! [`LingeringIo`], and parking.
//!
//! **Parking.** hyper keeps a read and a write buffer (8 KiB each, and more once grown) for as long
//! as it serves a connection, whether a request is in flight or not, so ten thousand idle keep-alive
//! clients would hold hundreds of MiB. So hyper serves a connection only while it is busy: once no
//! request has been in flight for a whole `PARK_AFTER` period (checked by a per-core sweep, so
//! a busy connection pays nothing per request), every response byte is flushed, everything read so
//! far ends on a request head's boundary and the socket has nothing more to read, `Parkable` tells
//! hyper the stream ended; hyper finishes cleanly without closing the socket, drops its buffers, and
//! hands the socket back. The parked connection is then the socket and this small task, waiting for the
//! client's next bytes (for `HEADER_READ_TIMEOUT`, hyper's own idle limit), which go to a new hyper
//! connection, ahead of whatever follows (`Rewind`). A head that stops mid-way never parks: hyper's
//! header timeout keeps cutting slow clients.

use std::cell::Cell;
use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::{Request, Response};
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper::rt::{Read, ReadBuf, ReadBufCursor, Write};
use hyper::server::conn::http1;
use monoio::io::IntoPollIo;
use monoio::net::TcpStream;
use monoio_compat::hyper::MonoioIo;
use tokio::sync::watch;

use super::linger::LingeringIo;
use super::{ConnGuard, Handler, Peer};

/// What every connection of one core shares.
pub(super) struct Core<H> {
    pub worker: usize,
    pub handler: Rc<H>,
    /// One server builder, reused for every connection of this core.
    pub http: http1::Builder,
    pub client_stall_timeout: Duration,
    /// How long a parked connection waits for the client's next request.
    pub idle_timeout: Duration,
    pub parking: Rc<Parking>,
}

/// How long a connection stays idle in hyper before it parks: one to two of these.
pub(super) const PARK_AFTER: Duration = Duration::from_secs(1);

/// The per-core clock of parking: a sweep every [`PARK_AFTER`] advances the epoch and wakes the
/// connections that went idle, so they can look again.
#[derive(Default)]
pub(super) struct Parking {
    epoch: Cell<u64>,
    /// Connections parked since the allocator was last asked to give memory back.
    pub(super) parked: Cell<usize>,
    idle: std::cell::RefCell<Vec<(std::task::Waker, Rc<Flow>)>>,
    /// The worker's counters (bytes sent are counted as they are written).
    pub(super) stats: std::sync::Arc<super::Stats>,
}

impl Parking {
    pub(super) fn new(stats: std::sync::Arc<super::Stats>) -> Parking {
        Parking {
            stats,
            ..Default::default()
        }
    }

    /// One sweep: a new epoch, and every idle connection woken to check it.
    pub(super) fn sweep(&self) {
        self.epoch.set(self.epoch.get() + 1);
        let idle = std::mem::take(&mut *self.idle.borrow_mut());
        for (waker, flow) in idle {
            flow.registered.set(false);
            waker.wake();
        }
    }
}

/// The socket as every layer above sees it.
type Socket = LingeringIo<MonoioIo<monoio::net::tcp::stream_poll::TcpStreamPoll>>;

/// Bytes read while parked, at most, before hyper takes over.
const PARKED_READ: usize = 512;

/// Serves one connection until the client closes it, an error ends it, or shutdown has let its
/// in-flight request finish.
pub(super) async fn serve<H: Handler>(
    stream: TcpStream,
    peer: Peer,
    core: Rc<Core<H>>,
    mut shutdown: watch::Receiver<bool>,
    _guard: ConnGuard,
) {
    let mut socket: Socket = match stream.into_poll_io() {
        Ok(io) => LingeringIo::new(MonoioIo::new(io), core.client_stall_timeout),
        Err(e) => {
            tracing::debug!(error = %e, "cannot switch the connection to poll io");
            return;
        }
    };
    let mut ahead = Bytes::new();
    loop {
        if ahead.is_empty() {
            match park(&mut socket, core.idle_timeout, &mut shutdown).await {
                Some(bytes) => ahead = bytes,
                None => break,
            }
        }
        let flow = Rc::new(Flow::default());
        let io = Parkable {
            inner: Rewind {
                ahead: std::mem::take(&mut ahead),
                inner: socket,
            },
            flow: flow.clone(),
            parking: core.parking.clone(),
            tail: *b"\r\n\r\n",
        };
        let service = Service {
            handler: core.handler.clone(),
            peer,
            flow: flow.clone(),
        };
        let conn = Box::new(core.http.serve_connection(io, service));
        let (result, parts) = drive(conn, &mut shutdown).await;
        let rewind = parts.io.inner;
        socket = rewind.inner;
        // What hyper had read comes first, then what it had not read yet.
        ahead = [parts.read_buf, rewind.ahead].concat().into();
        if let Err(e) = result {
            tracing::debug!(worker = core.worker, error = %e, "connection ended with an error");
            if e.is_parse() || e.is_parse_too_large() {
                break; // hyper answered 400/431: the lingering close keeps that answer from a reset
            }
            return; // an I/O failure or a client that stopped reading: nothing left to protect
        }
        if !flow.parked.get() || *shutdown.borrow() {
            break; // the client closed, or asked to (`Connection: close`), or a drain ended it
        }
    }
    let _ = poll_fn(|cx| Pin::new(&mut socket).poll_shutdown(cx)).await;
}

/// Waits for the client's next bytes on an idle connection: `None` when it closed, sent nothing
/// for `idle`, or shutdown began.
async fn park(
    socket: &mut Socket,
    idle: Duration,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<Bytes> {
    if *shutdown.borrow() {
        return None;
    }
    let mut buf = [0u8; PARKED_READ];
    let read = poll_fn(|cx| {
        let mut rb = ReadBuf::new(&mut buf);
        match Pin::new(&mut *socket).poll_read(cx, rb.unfilled()) {
            Poll::Ready(Ok(())) => Poll::Ready(rb.filled().len()),
            Poll::Ready(Err(_)) => Poll::Ready(0),
            Poll::Pending => Poll::Pending,
        }
    });
    let n = monoio::select! {
        n = read => n,
        _ = monoio::time::sleep(idle) => 0,
        _ = shutdown.changed() => 0,
    };
    (n > 0).then(|| Bytes::copy_from_slice(&buf[..n]))
}

type Conn<H> = http1::Connection<Parkable, Service<H>>;

/// Runs hyper until it is done (the client closed, the connection parked, or a drain let the
/// in-flight request finish), without closing the socket, and hands the socket back.
async fn drive<H: Handler>(
    mut conn: Box<Conn<H>>,
    shutdown: &mut watch::Receiver<bool>,
) -> (hyper::Result<()>, http1::Parts<Parkable, Service<H>>) {
    let mut draining = *shutdown.borrow();
    if draining {
        Pin::new(&mut *conn).graceful_shutdown();
    }
    let result = loop {
        if draining {
            break poll_fn(|cx| conn.poll_without_shutdown(cx)).await;
        }
        let done = monoio::select! {
            r = poll_fn(|cx| conn.poll_without_shutdown(cx)) => Some(r),
            _ = shutdown.changed() => None,
        };
        match done {
            Some(r) => break r,
            None => {
                Pin::new(&mut *conn).graceful_shutdown();
                draining = true;
            }
        }
    };
    (result, conn.into_parts())
}

/// The per-connection service: the handler's future boxed per request (hyper keeps room for one
/// service future per connection for its whole life, and the registry's is large), its response
/// body counted in flight until hyper is done with it.
pub(super) struct Service<H> {
    pub(super) handler: Rc<H>,
    pub(super) peer: Peer,
    pub(super) flow: Rc<Flow>,
}

type ResponseFuture<B> = Pin<Box<dyn Future<Output = Result<Response<Tracked<B>>, Infallible>>>>;

impl<H: Handler> hyper::service::Service<Request<Incoming>> for Service<H> {
    type Response = Response<Tracked<H::Body>>;
    type Error = Infallible;
    type Future = ResponseFuture<H::Body>;

    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
        req.extensions_mut().insert(self.peer);
        // Counted until hyper drops the response body, or the request if it is dropped unanswered
        // (an HTTP/2 stream the client reset).
        self.flow.in_flight.set(self.flow.in_flight.get() + 1);
        self.flow.served.set(self.flow.served.get() + 1);
        let (handler, counted) = (self.handler.clone(), InFlight(self.flow.clone()));
        Box::pin(async move {
            let res = handler.handle(req).await;
            Ok(res.map(|body| Tracked(counted, body)))
        })
    }
}

/// What the parking decision needs to know about one hyper connection.
#[derive(Default)]
pub(super) struct Flow {
    /// Requests this hyper connection was given: one at least before it may park (a client that
    /// sends only blank lines gets no fresh idle timer by parking).
    pub(super) served: Cell<usize>,
    /// Requests whose response body hyper has not finished with.
    pub(super) in_flight: Cell<usize>,
    /// Bytes were written and not flushed since, or a write could not take them all (hyper still
    /// holds some).
    unflushed: Cell<bool>,
    /// The stream was ended on hyper to park the connection (not by the client).
    parked: Cell<bool>,
    /// The parking epoch in which the connection was last seen idle; `None` while busy.
    idle_since: Cell<Option<u64>>,
    /// Waiting in the core's list for the next sweep.
    registered: Cell<bool>,
}

/// One request counted in flight, until what holds it drops: its handler's future, then its
/// response body.
pub struct InFlight(Rc<Flow>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0
            .in_flight
            .set(self.0.in_flight.get().saturating_sub(1));
    }
}

/// A response body, counted in flight until hyper drops it (written to the end, or abandoned).
pub struct Tracked<B>(
    // Held for its drop.
    #[allow(dead_code)] InFlight,
    B,
);

impl<B: http_body::Body + Unpin> http_body::Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.1).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.1.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.1.size_hint()
    }
}

/// The socket with bytes read ahead of hyper put back in front.
struct Rewind {
    ahead: Bytes,
    inner: Socket,
}

impl Read for Rewind {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.ahead.is_empty() {
            let n = self.ahead.len().min(buf.remaining());
            buf.put_slice(&self.ahead[..n]);
            self.ahead.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

/// The stream hyper reads and writes: ends itself when the connection should park (see the module
/// documentation).
struct Parkable {
    inner: Rewind,
    flow: Rc<Flow>,
    parking: Rc<Parking>,
    /// The last four bytes read: `\r\n\r\n` when everything read ends on a request head's end.
    tail: [u8; 4],
}

impl Parkable {
    fn idle(&self) -> bool {
        let f = &self.flow;
        f.served.get() > 0
            && f.in_flight.get() == 0
            && !f.unflushed.get()
            && &self.tail == b"\r\n\r\n"
    }

    /// Notes a write: bytes went out, or some could not (hyper still holds them); either way the
    /// connection has something unflushed.
    fn wrote(&self, r: Poll<std::io::Result<usize>>) -> Poll<std::io::Result<usize>> {
        match r {
            Poll::Ready(Ok(n @ 1..)) => {
                self.flow.unflushed.set(true);
                self.parking.stats.bytes_sent.add(n as u64);
            }
            Poll::Pending => self.flow.unflushed.set(true),
            _ => {}
        }
        r
    }

    /// Called when hyper waits for data on an idle connection: whether it has been idle for a whole
    /// sweep period. Otherwise it asks the next sweep to wake it.
    fn idle_long_enough(&self, cx: &Context<'_>) -> bool {
        let epoch = self.parking.epoch.get();
        let since = *self.flow.idle_since.get().get_or_insert(epoch);
        self.flow.idle_since.set(Some(since));
        if epoch >= since + 2 {
            return true;
        }
        if !self.flow.registered.replace(true) {
            let entry = (cx.waker().clone(), self.flow.clone());
            self.parking.idle.borrow_mut().push(entry);
        }
        false
    }
}

impl Read for Parkable {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        // Read through a ReadBuf over the cursor's unfilled part, so the bytes can be seen.
        // SAFETY: written only through the ReadBuf, which never de-initializes bytes.
        let window = unsafe { buf.as_mut() };
        let mut rb = ReadBuf::uninit(window);
        let n = match Pin::new(&mut self.inner).poll_read(cx, rb.unfilled()) {
            Poll::Ready(Ok(())) => {
                let filled = rb.filled();
                let (n, k) = (filled.len(), filled.len().min(4));
                // The last four bytes of the stream so far: the old tail shifted, then the new ones.
                self.tail.rotate_left(k);
                self.tail[4 - k..].copy_from_slice(&filled[n - k..]);
                n
            }
            Poll::Pending if self.idle() && self.idle_long_enough(cx) => {
                self.flow.parked.set(true);
                self.parking.parked.set(self.parking.parked.get() + 1);
                return Poll::Ready(Ok(())); // end of stream, as hyper sees it
            }
            other => return other,
        };
        if n > 0 {
            self.flow.idle_since.set(None);
            // SAFETY: the first n bytes of the cursor's unfilled part were just written.
            unsafe { buf.advance(n) };
        }
        Poll::Ready(Ok(()))
    }
}

impl Write for Parkable {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner.inner).poll_write(cx, buf);
        self.wrote(r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner.inner).poll_write_vectored(cx, bufs);
        self.wrote(r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.inner.inner).poll_flush(cx);
        if matches!(r, Poll::Ready(Ok(()))) {
            self.flow.unflushed.set(false);
        }
        r
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner.inner).poll_shutdown(cx)
    }
}
