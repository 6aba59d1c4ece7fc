//! The listening sockets, bound by the main thread before any worker starts: one SO_REUSEPORT socket
//! per worker on one address, so the kernel spreads connections over the workers.

use std::net::SocketAddr;

use anyhow::Context;
use socket2::{Domain, Protocol, Socket, Type};

/// Pending connections the kernel queues per listener (capped by `net.core.somaxconn`).
const LISTEN_BACKLOG: i32 = 4096;

/// Binds `count` SO_REUSEPORT listeners on `addr`. With port 0 the first socket picks the port and the
/// others join it, so every worker serves the same address.
pub fn bind(addr: SocketAddr, count: usize) -> anyhow::Result<Vec<std::net::TcpListener>> {
    let first = bind_one(addr).with_context(|| format!("cannot listen on {addr}"))?;
    let local = first.local_addr()?;
    let mut listeners = vec![first];
    for _ in 1..count {
        listeners
            .push(bind_one(local).with_context(|| format!("cannot add a listener on {local}"))?);
    }
    Ok(listeners)
}

fn bind_one(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}
