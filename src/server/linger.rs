//! A lingering close for downstream connections (nginx's `lingering_close`). When hyper ends a
//! connection it flushes, then calls `shutdown`; closing the socket right after would make the kernel
//! answer any request bytes still unread (pipelined requests, a body the handler ignored) with a RST,
//! and a RST discards the response bytes still queued for the client. So after sending FIN, if input
//! is waiting, this wrapper reads and discards it until the client closes, an error, or
//! [`LINGER_LIMIT`]. A connection with nothing unread (the usual case) closes at once.
//!
//! It also cuts a client that stops reading: a write that can make no progress for
//! `CLIENT_STALL_TIMEOUT` fails, which ends the connection (and releases the upstream connection that
//! was feeding it). Every other call goes straight to the wrapped IO.

use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use hyper::rt::{Read, ReadBuf, ReadBufCursor, Write};

use crate::stall::StallTimer;

/// Longest time a closing connection keeps reading (and discarding) what the client still sends.
pub const LINGER_LIMIT: Duration = Duration::from_secs(5);
/// Reads per poll while lingering, so a client that keeps sending cannot hold the core's thread.
const LINGER_READS_PER_POLL: usize = 16;

/// Wraps a connection's IO with a lingering `poll_shutdown`.
pub struct LingeringIo<T> {
    inner: T,
    /// Set once FIN is sent: the lingering deadline.
    linger: Option<Pin<Box<monoio::time::Sleep>>>,
    /// Fails writes that cannot progress for `CLIENT_STALL_TIMEOUT`.
    write_stall: StallTimer,
}

impl<T> LingeringIo<T> {
    pub fn new(inner: T, write_stall_limit: Duration) -> Self {
        LingeringIo {
            inner,
            linger: None,
            write_stall: StallTimer::new(write_stall_limit),
        }
    }

    fn on_write(
        &mut self,
        cx: &mut Context<'_>,
        r: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        match r {
            Poll::Ready(Ok(n)) => {
                self.write_stall.progress();
                Poll::Ready(Ok(n))
            }
            Poll::Pending if self.write_stall.stalled(cx) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client accepted no data for CLIENT_STALL_TIMEOUT",
            ))),
            other => other,
        }
    }
}

impl<T: Read + Unpin> Read for LingeringIo<T> {
    #[inline]
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: Read + Write + Unpin> Write for LingeringIo<T> {
    #[inline]
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.on_write(cx, r)
    }

    #[inline]
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.on_write(cx, r)
    }

    #[inline]
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    #[inline]
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let mut scratch = [MaybeUninit::<u8>::uninit(); 4096];
        if this.linger.is_none() {
            ready!(Pin::new(&mut this.inner).poll_shutdown(cx))?;
            // Linger only when input is waiting right now (pipelined requests, an ignored body): an
            // idle keep-alive client has sent nothing, and closing it at once destroys nothing.
            let mut buf = ReadBuf::uninit(&mut scratch);
            match Pin::new(&mut this.inner).poll_read(cx, buf.unfilled()) {
                Poll::Ready(Ok(())) if !buf.filled().is_empty() => {
                    this.linger = Some(Box::pin(monoio::time::sleep(LINGER_LIMIT)));
                }
                _ => return Poll::Ready(Ok(())),
            }
        }
        let deadline = this.linger.as_mut().expect("set above");
        for _ in 0..LINGER_READS_PER_POLL {
            if deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ok(()));
            }
            let mut buf = ReadBuf::uninit(&mut scratch);
            match Pin::new(&mut this.inner).poll_read(cx, buf.unfilled()) {
                Poll::Ready(Ok(())) if buf.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => continue,
                // The client reset or the socket broke: nothing left to protect.
                Poll::Ready(Err(_)) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
        // Still reading: yield to the other connections of this core, then continue.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}
