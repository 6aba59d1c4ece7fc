//! One downstream connection: HTTP/1.1 with keep-alive through hyper on monoio, each request handed to
//! [`crate::registry::handle`]. Hyper enforces the request-head limits (size, header count, read
//! timeout); this module adds the graceful close on shutdown and, through [`LingeringIo`], a close
//! that never turns unread input into a RST that would destroy the response in flight.

use std::convert::Infallible;
use std::rc::Rc;

use hyper::service::service_fn;
use monoio::io::IntoPollIo;
use monoio::net::TcpStream;
use monoio_compat::hyper::MonoioIo;
use tokio::sync::watch;

use super::linger::LingeringIo;
use super::{ConnGuard, Core};
use crate::registry::handle::handle;

/// Serves one connection until the client closes it, an error ends it, or shutdown has let its
/// in-flight request finish.
pub async fn serve(
    stream: TcpStream,
    core: Rc<Core>,
    mut shutdown: watch::Receiver<bool>,
    _guard: ConnGuard,
) {
    let io = match stream.into_poll_io() {
        Ok(io) => LingeringIo::new(MonoioIo::new(io), core.config().client_stall_timeout),
        Err(e) => {
            tracing::debug!(error = %e, "cannot switch the connection to poll io");
            return;
        }
    };
    let service_core = core.clone();
    let service = service_fn(move |req| {
        let core = service_core.clone();
        async move { Ok::<_, Infallible>(handle(&core, req).await) }
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
        tracing::debug!(worker = core.id(), error = %e, "connection ended with an error");
    }
}
