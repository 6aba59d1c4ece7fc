//! TLS to clients (`TLS_CERT_FILE`, `TLS_KEY_FILE`): every connection of the client listener is
//! TLS (rustls), then HTTP/2 or HTTP/1.1 as ALPN chose (containerd and docker take `h2` when it is
//! offered).
//!
//! - **Rotation.** [`Certs`] serves the key it holds now to every new handshake; a thread of its own
//!   reads both files every `TLS_RELOAD_INTERVAL` and swaps in a new key when their content
//!   changed (content, not inode or mtime: cert-manager and kubelet swap a symlink) and read the
//!   same at two checks in a row (a writer may not be done; a chain cut short would still parse).
//!   A file that no longer parses, or a key that does not match its certificate, keeps the old key
//!   and is logged once. Open connections keep the session they have: nothing is dropped or
//!   restarted.
//! - **Bounds**, as plain HTTP/1.1 has them: the handshake must end within `HEADER_READ_TIMEOUT`
//!   (a client that connects and sends nothing holds a socket that long, as a plain one does), the
//!   connection limits apply before it starts, and responses stall out after
//!   `CLIENT_STALL_TIMEOUT` at the socket as plain ones do. HTTP/2: at most
//!   [`H2_MAX_STREAMS`] concurrent streams with [`H2_SEND_BUFFER`] queued each,
//!   [`H2_MAX_PENDING_RESETS`] streams reset before the router took them (the "rapid reset" flood)
//!   and [`H2_MAX_LOCAL_RESETS`] streams the router had to reset, before the connection is closed;
//!   a header list of at most the size a plain request head may have; pings every
//!   [`H2_PING_EVERY`] that a peer must answer within [`H2_PING_TIMEOUT`]; an idle connection (no
//!   request for a whole `HEADER_READ_TIMEOUT`, or none begun: a client silent after ALPN) is sent
//!   GOAWAY and dropped if it has not closed one `HEADER_READ_TIMEOUT` later; and a stream whose
//!   client makes no room for its bytes for `CLIENT_STALL_TIMEOUT` ends the connection.
//! - **No parking.** A TLS connection keeps its rustls state (about 30 KiB of buffers and keys)
//!   and hyper's for as long as it is open; a plain HTTP/1.1 connection hands its buffers back
//!   while idle ([`super::conn`]). The idle timeout bounds how long that memory is held.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper::server::conn::http2;
use monoio::io::IntoPollIo;
use monoio::net::TcpStream;
use monoio_compat::hyper::{MonoioIo, MonoioTimer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use tokio::sync::watch;

use super::conn::{Core, Flow, Service};
use super::linger::LingeringIo;
use super::{ConnGuard, Handler, Peer, Stats, MAX_REQUEST_HEAD};
use crate::config::TlsFiles;

/// Concurrent streams a client may open on one HTTP/2 connection (containerd and docker fetch
/// three layers at a time).
pub const H2_MAX_STREAMS: u32 = 32;
/// Bytes hyper queues for one stream ahead of the client's window.
pub const H2_SEND_BUFFER: usize = 256 << 10;
/// Streams a client may reset before the router accepted them, before the connection is closed.
pub const H2_MAX_PENDING_RESETS: usize = 20;
/// Streams the router may reset for a client's errors on one connection, before it is closed.
pub const H2_MAX_LOCAL_RESETS: usize = 1024;
/// How often an HTTP/2 connection is pinged.
pub const H2_PING_EVERY: Duration = Duration::from_secs(30);
/// How long a ping may go unanswered before the connection is closed.
pub const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);

const ALPN_H2: &[u8] = b"h2";
const ALPN_HTTP11: &[u8] = b"http/1.1";

/// The listener's certificate and key, swapped in place when the files change.
pub struct Certs {
    files: TlsFiles,
    current: ArcSwap<CertifiedKey>,
    seen: std::sync::Mutex<Seen>,
    reloads: AtomicU64,
    reload_failures: AtomicU64,
}

/// What the checks have read.
struct Seen {
    /// The files' bytes last acted on (the key in use, or a pair refused).
    applied: (Vec<u8>, Vec<u8>),
    /// New bytes read once: acted on when the next check reads them again (a writer may not be
    /// done with them; a chain cut short would still parse).
    pending: Option<(Vec<u8>, Vec<u8>)>,
    /// The files could not be read at the last check (said once).
    unreadable: bool,
}

impl std::fmt::Debug for Certs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certs").field("files", &self.files).finish()
    }
}

/// What a look at the files found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reload {
    Unchanged,
    /// Changed since the last look: acted on once the next look reads the same.
    Settling,
    Reloaded,
    /// Unusable or unreadable: the key in use stays.
    Kept,
}

impl Certs {
    /// Reads the files (a problem names its variable).
    pub fn load(files: &TlsFiles) -> Result<Arc<Certs>, crate::certs::Problem> {
        let (cert, key) = crate::certs::read(&files.cert, &files.key)?;
        let current = crate::certs::parse(&cert, &key)?;
        Ok(Arc::new(Certs {
            files: files.clone(),
            current: ArcSwap::new(current),
            seen: std::sync::Mutex::new(Seen {
                applied: (cert, key),
                pending: None,
                unreadable: false,
            }),
            reloads: AtomicU64::new(0),
            reload_failures: AtomicU64::new(0),
        }))
    }

    /// Reads the files again; new content read the same twice in a row replaces the key in use
    /// if it is usable.
    pub fn check(&self) -> Reload {
        let read = crate::certs::read(&self.files.cert, &self.files.key).map(|(cert, key)| {
            // The certificate read again after the key: a swap between the two reads shows.
            let again = std::fs::read(&self.files.cert).ok();
            (again.as_ref() == Some(&cert)).then_some((cert, key))
        });
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let bytes = match read {
            Ok(Some(bytes)) => bytes,
            Ok(None) => return Reload::Settling,
            Err(e) => {
                if !std::mem::replace(&mut seen.unreadable, true) {
                    tracing::warn!(problem = %e, "the TLS files cannot be read; keeping the certificate in use");
                    self.reload_failures.fetch_add(1, Ordering::Relaxed);
                }
                return Reload::Kept;
            }
        };
        seen.unreadable = false;
        if bytes == seen.applied {
            seen.pending = None;
            return Reload::Unchanged;
        }
        if seen.pending.as_ref() != Some(&bytes) {
            seen.pending = Some(bytes);
            return Reload::Settling;
        }
        seen.pending = None;
        let outcome = match crate::certs::parse(&bytes.0, &bytes.1) {
            Ok(k) => {
                self.current.store(k);
                self.reloads.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    cert = self.files.cert,
                    "TLS certificate reloaded: new connections get the new one"
                );
                Reload::Reloaded
            }
            Err(e) => {
                self.reload_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(problem = %e, "the changed TLS files are unusable; keeping the certificate in use");
                Reload::Kept
            }
        };
        seen.applied = bytes;
        outcome
    }

    /// Checks the files every `every`, on a thread of its own, for the life of the process.
    pub fn watch(self: &Arc<Self>, every: Duration) -> std::io::Result<()> {
        let certs = self.clone();
        std::thread::Builder::new()
            .name("hr-tls-reload".into())
            .spawn(move || loop {
                std::thread::sleep(every);
                certs.check();
            })
            .map(|_| ())
    }

    /// Reloads done and changed files refused, since start.
    pub fn reloads(&self) -> (u64, u64) {
        (
            self.reloads.load(Ordering::Relaxed),
            self.reload_failures.load(Ordering::Relaxed),
        )
    }

    /// The key served now.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current.load_full()
    }

    /// The rustls server configuration every core shares: TLS 1.2 and 1.3, no client
    /// certificates, ALPN `h2` then `http/1.1`.
    pub fn server_config(self: &Arc<Self>) -> Arc<ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports the default versions")
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP11.to_vec()];
        Arc::new(config)
    }
}

impl ResolvesServerCert for Certs {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// What a core needs to serve TLS: the acceptor and its HTTP/2 server settings.
pub struct Tls {
    acceptor: tokio_rustls::TlsAcceptor,
    h2: http2::Builder<crate::task::Executor>,
}

impl Tls {
    pub fn new(config: Arc<ServerConfig>) -> Tls {
        let mut h2 = http2::Builder::new(crate::task::Executor);
        h2.timer(MonoioTimer)
            .max_concurrent_streams(H2_MAX_STREAMS)
            .max_pending_accept_reset_streams(H2_MAX_PENDING_RESETS)
            .max_local_error_reset_streams(H2_MAX_LOCAL_RESETS)
            .max_header_list_size(MAX_REQUEST_HEAD as u32)
            .max_send_buf_size(H2_SEND_BUFFER)
            .keep_alive_interval(H2_PING_EVERY)
            .keep_alive_timeout(H2_PING_TIMEOUT);
        Tls {
            acceptor: tokio_rustls::TlsAcceptor::from(config),
            h2,
        }
    }
}

/// Serves one TLS connection until the client closes it, an error or the idle timeout ends it, or
/// shutdown has let its in-flight requests finish.
pub(super) async fn serve<H: Handler>(
    stream: TcpStream,
    peer: Peer,
    core: Rc<Core<H>>,
    tls: Rc<Tls>,
    mut shutdown: watch::Receiver<bool>,
    _guard: ConnGuard,
) {
    let stats = core.parking.stats.clone();
    let io = match stream.into_poll_io() {
        Ok(io) => io,
        Err(e) => {
            tracing::debug!(error = %e, "cannot switch the connection to poll io");
            return;
        }
    };
    let accepted = monoio::select! {
        r = tls.acceptor.accept(io) => Some(r),
        _ = monoio::time::sleep(core.idle_timeout) => None,
        _ = shutdown.changed() => return,
    };
    let stream = match accepted {
        Some(Ok(s)) => s,
        Some(Err(e)) => {
            stats.tls_failed.inc();
            tracing::debug!(worker = core.worker, error = %e, "TLS handshake failed");
            return;
        }
        None => {
            stats.tls_failed.inc();
            tracing::debug!(
                worker = core.worker,
                "TLS handshake not done within HEADER_READ_TIMEOUT"
            );
            return;
        }
    };
    let h2 = stream.get_ref().1.alpn_protocol() == Some(ALPN_H2);
    if h2 {
        stats.tls_h2.inc();
    } else {
        stats.tls_http1.inc();
    }
    let io = LingeringIo::new(
        Counted {
            inner: MonoioIo::new(stream),
            stats: stats.clone(),
        },
        core.client_stall_timeout,
    );
    let flow = Rc::new(Flow::default());
    let service = Service {
        handler: core.handler.clone(),
        peer,
        flow: flow.clone(),
    };
    if h2 {
        let streams = Rc::new(Streams::default());
        let service = Watching {
            inner: service,
            streams: streams.clone(),
        };
        let conn = tls.h2.serve_connection(io, service);
        let h2 = H2 {
            idle: core.idle_timeout,
            stall: core.client_stall_timeout,
            streams: &streams,
        };
        drive(
            conn,
            |c| c.graceful_shutdown(),
            &flow,
            Some(h2),
            &mut shutdown,
        )
        .await;
    } else {
        // hyper's header read timeout is the idle limit of a keep-alive HTTP/1.1 connection.
        let conn = core.http.serve_connection(io, service);
        drive(conn, |c| c.graceful_shutdown(), &flow, None, &mut shutdown).await;
    }
}

/// What an HTTP/2 connection is watched for: no stream for `idle`, a stream the client takes
/// nothing of for `stall`.
struct H2<'a> {
    idle: Duration,
    stall: Duration,
    streams: &'a Streams,
}

/// Checks per `CLIENT_STALL_TIMEOUT`: a stream is cut between one and one and a half of it after
/// the client last made room for a byte of it.
const STALL_CHECKS: u32 = 2;

/// Runs a hyper connection to its end: on shutdown (or, HTTP/2, after its idle time with no
/// request) it is told to finish what is in flight and close; an HTTP/2 stream the client took
/// nothing of for `CLIENT_STALL_TIMEOUT` ends the connection, as a stalled plain one ends.
async fn drive<C, E>(
    conn: C,
    close: impl Fn(Pin<&mut C>),
    flow: &Flow,
    h2: Option<H2<'_>>,
    shutdown: &mut watch::Receiver<bool>,
) where
    C: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let mut conn = std::pin::pin!(conn);
    let mut closing = *shutdown.borrow();
    if closing {
        close(conn.as_mut());
    }
    let (every, checks_idle, checks_stall) = match &h2 {
        Some(h) => {
            let every = (h.stall / STALL_CHECKS)
                .min(h.idle)
                .max(Duration::from_millis(1));
            let of = |d: Duration| (d.as_nanos() / every.as_nanos()).max(1) as u64;
            (every, of(h.idle), of(h.stall) + 1)
        }
        None => (Duration::from_secs(3600), u64::MAX, u64::MAX),
    };
    let mut served = flow.served.get();
    let mut quiet_checks = 0u64;
    // Checks since an idle connection was told to close: a client that does not let it close (it
    // never sent its preface, or never takes the last bytes) is dropped one idle time later.
    let mut closing_checks: Option<u64> = None;
    let result = loop {
        let give_up = monoio::select! {
            r = conn.as_mut() => break r,
            _ = shutdown.changed(), if !closing => {
                closing = true;
                close(conn.as_mut());
                false
            }
            _ = monoio::time::sleep(every) => {
                let quiet = flow.in_flight.get() == 0 && flow.served.get() == served;
                served = flow.served.get();
                quiet_checks = if quiet { quiet_checks + 1 } else { 0 };
                if !closing && quiet_checks >= checks_idle {
                    closing = true;
                    closing_checks = Some(0);
                    close(conn.as_mut());
                }
                let overdue = match &mut closing_checks {
                    Some(n) => {
                        *n += 1;
                        *n > checks_idle
                    }
                    None => false,
                };
                let stalled = h2.as_ref().is_some_and(|h| h.streams.stalled(checks_stall));
                if stalled {
                    tracing::debug!("an HTTP/2 stream took nothing for CLIENT_STALL_TIMEOUT: closing its connection");
                } else if overdue {
                    tracing::debug!("an idle HTTP/2 connection did not close within HEADER_READ_TIMEOUT of its GOAWAY: dropping it");
                }
                stalled || overdue
            }
        };
        if give_up {
            return;
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "TLS connection ended with an error");
    }
}

/// The response bodies of one HTTP/2 connection, each with the check at which it handed hyper a
/// frame the client has not made room for since (hyper asks a body for its next frame only when
/// the stream has window to send it).
#[derive(Default)]
struct Streams {
    check: Cell<u64>,
    handed: RefCell<Vec<Option<u64>>>,
    free: RefCell<Vec<usize>>,
}

impl Streams {
    fn open(&self) -> usize {
        let mut handed = self.handed.borrow_mut();
        match self.free.borrow_mut().pop() {
            Some(slot) => {
                handed[slot] = None;
                slot
            }
            None => {
                handed.push(None);
                handed.len() - 1
            }
        }
    }

    fn close(&self, slot: usize) {
        self.handed.borrow_mut()[slot] = None;
        self.free.borrow_mut().push(slot);
    }

    /// One more check; whether a stream has waited for the client through `checks` of them.
    fn stalled(&self, checks: u64) -> bool {
        let now = self.check.get() + 1;
        self.check.set(now);
        self.handed
            .borrow()
            .iter()
            .flatten()
            .any(|since| now - since >= checks)
    }
}

/// The connection's service, its response bodies watched for a client that stops taking them.
struct Watching<H> {
    inner: Service<H>,
    streams: Rc<Streams>,
}

impl<H: Handler> hyper::service::Service<http::Request<hyper::body::Incoming>> for Watching<H> {
    type Response = http::Response<Watched<super::conn::Tracked<H::Body>>>;
    type Error = std::convert::Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, std::convert::Infallible>>>>;

    fn call(&self, req: http::Request<hyper::body::Incoming>) -> Self::Future {
        let answer = hyper::service::Service::call(&self.inner, req);
        let streams = self.streams.clone();
        Box::pin(async move {
            let res = answer.await?;
            let slot = streams.open();
            Ok(res.map(|body| Watched {
                streams,
                slot,
                body,
            }))
        })
    }
}

/// A response body that records when it handed hyper a frame (and hyper did not come back).
struct Watched<B> {
    streams: Rc<Streams>,
    slot: usize,
    body: B,
}

impl<B> Drop for Watched<B> {
    fn drop(&mut self) {
        self.streams.close(self.slot);
    }
}

impl<B: http_body::Body + Unpin> http_body::Body for Watched<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        let handed = matches!(&polled, Poll::Ready(Some(Ok(f))) if f.is_data());
        this.streams.handed.borrow_mut()[this.slot] = handed.then(|| this.streams.check.get());
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Counts the bytes written to the client (the plaintext, as a plain connection counts them).
struct Counted<T> {
    inner: T,
    stats: Arc<Stats>,
}

impl<T: Read + Unpin> Read for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: Write + Unpin> Write for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.stats.bytes_sent.add(n as u64);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pair(dir: &std::path::Path, name: &str) -> Vec<u8> {
        let c = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
        std::fs::write(dir.join("tls.crt"), c.cert.pem()).unwrap();
        std::fs::write(dir.join("tls.key"), c.key_pair.serialize_pem()).unwrap();
        c.cert.der().to_vec()
    }

    #[test]
    fn a_changed_pair_is_served_once_settled_and_a_broken_one_keeps_the_key_in_use() {
        let dir = std::env::temp_dir().join(format!("hr-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let files = TlsFiles {
            cert: dir.join("tls.crt").display().to_string(),
            key: dir.join("tls.key").display().to_string(),
        };
        let first = write_pair(&dir, "a.test");
        let certs = Certs::load(&files).unwrap();
        let served = |c: &Certs| c.current().cert[0].to_vec();
        assert_eq!(served(&certs), first);
        assert_eq!(certs.check(), Reload::Unchanged);
        let second = write_pair(&dir, "b.test");
        assert_eq!(
            certs.check(),
            Reload::Settling,
            "read once: maybe still being written"
        );
        assert_eq!(served(&certs), first);
        assert_eq!(certs.check(), Reload::Reloaded);
        assert_eq!(served(&certs), second);
        // A key that does not match its certificate: the key in use stays, and it is said once.
        let third = rcgen::generate_simple_self_signed(vec!["c.test".into()]).unwrap();
        std::fs::write(dir.join("tls.crt"), third.cert.pem()).unwrap();
        assert_eq!(certs.check(), Reload::Settling);
        assert_eq!(certs.check(), Reload::Kept);
        assert_eq!(
            certs.check(),
            Reload::Unchanged,
            "refused once, not every time"
        );
        assert_eq!(served(&certs), second);
        std::fs::remove_file(dir.join("tls.crt")).unwrap();
        assert_eq!(certs.check(), Reload::Kept);
        assert_eq!(certs.check(), Reload::Kept);
        assert_eq!(served(&certs), second);
        assert_eq!(certs.reloads(), (1, 2), "the unreadable files counted once");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
