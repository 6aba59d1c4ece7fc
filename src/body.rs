//! The response body type the router hands to hyper: one concrete type (no boxing, no `Send` bound)
//! for every handler. Bodies the router makes itself are small and whole ([`Body::full`]); bodies from
//! Harbor stream through ([`Body::Upstream`]) frame by frame, so hyper's backpressure reaches Harbor's
//! socket and memory stays flat whatever the size of a blob or the speed of the client. An upstream
//! error mid-body surfaces as a body error, which makes hyper cut the client connection instead of
//! ending a short body as if it were complete.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};

use crate::upstream::pool::UpstreamBody;

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
            Body::Checked { .. } => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Empty => SizeHint::with_exact(0),
            Body::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Body::Upstream(body) | Body::Capped { body, .. } => body.size_hint(),
            Body::Checked { body, .. } => body.size_hint(),
        }
    }
}
