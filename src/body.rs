//! The response body type the router hands to hyper: one concrete type (no boxing, no `Send` bound)
//! for every handler. Bodies the router makes itself are small and whole ([`Body::full`]); bodies from
//! Harbor stream through ([`Body::Upstream`]) frame by frame, so hyper's backpressure reaches Harbor's
//! socket and memory stays flat whatever the size of a blob or the speed of the client. An upstream
//! error mid-body surfaces as a body error, which makes hyper cut the client connection instead of
//! ending a short body as if it were complete.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};

use crate::transfer::{Read, Reader};
use crate::upstream::pool::UpstreamBody;

/// How a reader a shared transfer left behind continues: a request of its own for the blob from
/// an offset, whose body starts at that offset.
pub type Continue = Box<dyn FnOnce(u64) -> Pin<Box<dyn Future<Output = std::io::Result<Body>>>>>;

/// What watches a streamed body go by ([`Body::Checked`]): it sees every data frame before it goes
/// out, and at the end says whether the body may end cleanly. An error from either ends the body
/// with a body error instead (the frame is not sent), so the client sees a broken transfer, never a
/// wrong body that looks complete. hyper stops polling a body once its `Content-Length` went by, so
/// a check of a framed body decides on its last frame, not at the end.
pub trait Check {
    fn data(&mut self, data: &[u8]) -> std::io::Result<()>;
    fn end(&mut self) -> std::io::Result<()>;
}

/// A response body.
#[derive(Default)]
pub enum Body {
    /// No body at all (`Content-Length: 0`).
    #[default]
    Empty,
    /// A body known in full; taken out when sent.
    Full(Option<Bytes>),
    /// Harbor's body, streamed.
    Upstream(UpstreamBody),
    /// Harbor's body, streamed, ended with an error once it passes `left` more bytes: a body that
    /// must not be endless (a manifest) is cut, and the client sees a truncated transfer.
    Capped { body: UpstreamBody, left: u64 },
    /// A body watched as it streams (a blob hashed against its digest, a manifest kept).
    Checked {
        body: Box<Body>,
        check: Box<dyn Check>,
    },
    /// A blob read from a transfer shared with identical pulls (see [`crate::transfer`]),
    /// continued on a request of its own if it falls out of the transfer's window.
    Shared(Box<SharedBody>),
    /// `body` less its first `left` bytes (Harbor answered a continuation's `Range` with the whole
    /// blob from byte 0).
    Skip { body: Box<Body>, left: u64 },
    /// The first `left` bytes of `body`, then its end (a range read from a shared transfer).
    Take { body: Box<Body>, left: u64 },
}

/// A reader of a shared blob transfer, then, if it falls out, its own request's body.
pub struct SharedBody {
    stage: Stage,
    /// The blob's length, when known.
    length: Option<u64>,
    /// Told the length of each frame read from the transfer (a follower's metrics).
    on_shared: Option<Box<dyn FnMut(usize)>>,
}

enum Stage {
    Reading(Reader, Option<Continue>),
    Continuing(Pin<Box<dyn Future<Output = std::io::Result<Body>>>>),
    Alone(Box<Body>),
}

impl SharedBody {
    pub fn new(
        reader: Reader,
        length: Option<u64>,
        fall_out: Continue,
        on_shared: Option<Box<dyn FnMut(usize)>>,
    ) -> SharedBody {
        SharedBody {
            stage: Stage::Reading(reader, Some(fall_out)),
            length,
            on_shared,
        }
    }

    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<std::io::Result<Frame<Bytes>>>> {
        loop {
            match &mut self.stage {
                Stage::Reading(reader, fall_out) => match reader.poll_read(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Read::Data(d)) => {
                        if let Some(f) = &mut self.on_shared {
                            f(d.len());
                        }
                        return Poll::Ready(Some(Ok(Frame::data(d))));
                    }
                    Poll::Ready(Read::End) => return Poll::Ready(None),
                    Poll::Ready(Read::Failed) => {
                        return Poll::Ready(Some(Err(std::io::Error::other(
                            "Harbor's blob transfer failed",
                        ))))
                    }
                    Poll::Ready(Read::FellOut(offset)) => {
                        let Some(f) = fall_out.take() else {
                            return Poll::Ready(Some(Err(std::io::Error::other(
                                "a shared blob transfer left this reader behind twice",
                            ))));
                        };
                        self.stage = Stage::Continuing(f(offset));
                    }
                },
                Stage::Continuing(f) => match f.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(body)) => self.stage = Stage::Alone(Box::new(body)),
                    Poll::Ready(Err(e)) => return Poll::Ready(Some(Err(e))),
                },
                Stage::Alone(body) => {
                    return http_body::Body::poll_frame(Pin::new(body.as_mut()), cx)
                }
            }
        }
    }
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Body::Empty => f.write_str("Empty"),
            Body::Full(b) => f.debug_tuple("Full").field(b).finish(),
            Body::Upstream(b) => f.debug_tuple("Upstream").field(b).finish(),
            Body::Capped { body, left } => f
                .debug_struct("Capped")
                .field("body", body)
                .field("left", left)
                .finish(),
            Body::Checked { body, .. } => f.debug_struct("Checked").field("body", body).finish(),
            Body::Shared(s) => f.debug_struct("Shared").field("length", &s.length).finish(),
            Body::Take { body, left } => f
                .debug_struct("Take")
                .field("body", body)
                .field("left", left)
                .finish(),
            Body::Skip { body, left } => f
                .debug_struct("Skip")
                .field("body", body)
                .field("left", left)
                .finish(),
        }
    }
}

impl Body {
    pub fn full(bytes: impl Into<Bytes>) -> Body {
        Body::Full(Some(bytes.into()))
    }

    /// This body, watched by `check` as it streams.
    pub fn checked(self, check: impl Check + 'static) -> Body {
        Body::Checked {
            body: Box::new(self),
            check: Box::new(check),
        }
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            Body::Empty => Poll::Ready(None),
            Body::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Body::Upstream(body) => Pin::new(body).poll_frame(cx),
            Body::Capped { body, left } => {
                let polled = Pin::new(body).poll_frame(cx);
                if let Poll::Ready(Some(Ok(frame))) = &polled {
                    let len = frame.data_ref().map_or(0, |d| d.len() as u64);
                    if len > *left {
                        return Poll::Ready(Some(Err(std::io::Error::other(
                            "Harbor's body is larger than its limit",
                        ))));
                    }
                    *left -= len;
                }
                polled
            }
            Body::Shared(shared) => shared.poll_frame(cx),
            Body::Skip { body, left } => loop {
                match Pin::new(body.as_mut()).poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) if *left > 0 => {
                        let Ok(data) = frame.into_data() else {
                            continue;
                        };
                        let len = data.len() as u64;
                        if len <= *left {
                            *left -= len;
                            continue;
                        }
                        let rest = data.slice(*left as usize..);
                        *left = 0;
                        return Poll::Ready(Some(Ok(Frame::data(rest))));
                    }
                    // Ended before the offset: a short body, never a clean end.
                    Poll::Ready(None) if *left > 0 => {
                        return Poll::Ready(Some(Err(std::io::Error::other(
                            "Harbor's blob ended before the offset it was asked from",
                        ))))
                    }
                    other => return other,
                }
            },
            Body::Take { body, left } => {
                if *left == 0 {
                    return Poll::Ready(None);
                }
                match Pin::new(body.as_mut()).poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => {
                        let Ok(mut data) = frame.into_data() else {
                            return Poll::Ready(Some(Ok(Frame::data(Bytes::new()))));
                        };
                        if data.len() as u64 > *left {
                            data.truncate(*left as usize);
                        }
                        *left -= data.len() as u64;
                        Poll::Ready(Some(Ok(Frame::data(data))))
                    }
                    // Ended before the range did: a short body, never a clean end.
                    Poll::Ready(None) => Poll::Ready(Some(Err(std::io::Error::other(
                        "the blob ended before the range it was asked for",
                    )))),
                    other => other,
                }
            }
            Body::Checked { body, check } => match Pin::new(body.as_mut()).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.data_ref().map(|d| check.data(d)) {
                    Some(Err(e)) => Poll::Ready(Some(Err(e))),
                    _ => Poll::Ready(Some(Ok(frame))),
                },
                Poll::Ready(None) => match check.end() {
                    Ok(()) => Poll::Ready(None),
                    Err(e) => Poll::Ready(Some(Err(e))),
                },
                other => other,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Empty => true,
            Body::Full(bytes) => bytes.is_none(),
            Body::Upstream(body) | Body::Capped { body, .. } => body.is_end_stream(),
            // The check has its say at the end: hyper must poll for it.
            Body::Checked { .. } | Body::Shared(_) | Body::Skip { .. } => false,
            Body::Take { left, .. } => *left == 0,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Empty => SizeHint::with_exact(0),
            Body::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Body::Upstream(body) | Body::Capped { body, .. } => body.size_hint(),
            Body::Checked { body, .. } => body.size_hint(),
            Body::Shared(shared) => shared
                .length
                .map_or_else(SizeHint::new, SizeHint::with_exact),
            Body::Skip { .. } => SizeHint::new(),
            Body::Take { left, .. } => SizeHint::with_exact(*left),
        }
    }
}
