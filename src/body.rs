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

/// A response body.
#[derive(Debug, Default)]
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
}

impl Body {
    pub fn full(bytes: impl Into<Bytes>) -> Body {
        Body::Full(Some(bytes.into()))
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
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Empty => true,
            Body::Full(bytes) => bytes.is_none(),
            Body::Upstream(body) | Body::Capped { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Empty => SizeHint::with_exact(0),
            Body::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Body::Upstream(body) | Body::Capped { body, .. } => body.size_hint(),
        }
    }
}
