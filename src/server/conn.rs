//! One downstream connection: HTTP/1.1 with keep-alive through hyper on monoio, each request handed to
//! the core's [`Handler`]. Hyper enforces the request-head limits (size, header count, read
//! timeout); this module adds the graceful close on shutdown and, through [`LingeringIo`], a close
//! that never turns unread input into a RST that would destroy the response in flight.

use std::convert::Infallible;
use std::rc::Rc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
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
}

/// Serves one connection until the client closes it, an error ends it, or shutdown has let its
/// in-flight request finish.
pub(super) async fn serve<H: Handler>(
    stream: TcpStream,
    peer: Peer,
    core: Rc<Core<H>>,
    mut shutdown: watch::Receiver<bool>,
    _guard: ConnGuard,
) {
    let io = match stream.into_poll_io() {
        Ok(io) => LingeringIo::new(MonoioIo::new(io), core.client_stall_timeout),
        Err(e) => {
            tracing::debug!(error = %e, "cannot switch the connection to poll io");
            return;
        }
    };
    let handler = core.handler.clone();
    let service = service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(peer);
        let handler = handler.clone();
        // hyper keeps room for one request's future per connection for the connection's whole
        // life; boxed here, the (large) handler future exists only while a request is in flight.
        async move { Ok::<_, Infallible>(Box::pin(handler.handle(req)).await) }
    });
    let conn = core.http.serve_connection(io, service);
    let mut conn = std::pin::pin!(conn);
    let result = if *shutdown.borrow() {
        conn.as_mut().graceful_shutdown();
        conn.await
    } else {
        monoio::select! {
            r = conn.as_mut() => r,
            _ = shutdown.changed() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(worker = core.worker, error = %e, "connection ended with an error");
    }
}
