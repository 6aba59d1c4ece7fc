//! Blob bodies as Harbor streams them: a blob it has not cached comes straight from the upstream
//! (`repoproxy/proxy.go`, `handleBlob` → `serveBlob`), and a break in the upstream shows in the
//! body, as Harbor ≤ 2.15 or main writes it ([`UncachedBlobs`]); the `ResetMidBody` fault.
//!
//! Go's `net/http` decides two headers Harbor does not set: `Content-Type`, sniffed from the first
//! 512 bytes (`DetectContentType`), and, for an answer the handler wrote in full without passing
//! the server's 2048-byte buffer, a `Content-Length`.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{header, HeaderValue, Response, StatusCode};
use http_body::{Body as HttpBody, Frame};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::standin::{harbor_error, Body, BoxError};
use crate::UncachedBlobs;

/// Harbor's 5xx body (`src/lib/http/error.go`, `SendError` prints it with a newline).
pub(crate) const INTERNAL_ERROR: &str =
    "{\"errors\":[{\"code\":\"UNKNOWN\",\"message\":\"internal server error\"}]}\n";

/// The size of Go's server buffer before it commits to chunking (`bufferBeforeChunkingSize`).
const GO_BUFFER: u64 = 2048;

/// How the body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ending {
    /// The whole blob.
    Whole,
    /// `n` bytes, then the connection is closed.
    AbortAfter(u64),
    /// `n` bytes, then Harbor's error JSON, then a clean end.
    ErrorAfter(u64),
}

/// A body that passes the upstream's bytes (after `head`, already read), stops as `ending` says,
/// and has no size hint (hyper chunks it unless the answer carries a `Content-Length`).
pub(crate) struct Stream {
    head: Option<Bytes>,
    inner: Option<Incoming>,
    /// Bytes still to pass before the ending (`u64::MAX`: all).
    remaining: u64,
    tail: Option<Bytes>,
    abort: bool,
    pause: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Stream {
    pub fn new(head: Bytes, inner: Incoming, ending: Ending) -> Stream {
        let (remaining, tail, abort) = match ending {
            Ending::Whole => (u64::MAX, None, false),
            Ending::AbortAfter(n) => (n, None, true),
            Ending::ErrorAfter(n) => (
                n,
                Some(Bytes::from_static(INTERNAL_ERROR.as_bytes())),
                false,
            ),
        };
        Stream {
            head: (!head.is_empty()).then_some(head),
            inner: Some(inner),
            remaining,
            tail,
            abort,
            pause: None,
        }
    }

    fn take(&mut self, mut data: Bytes) -> Bytes {
        if data.len() as u64 > self.remaining {
            data.truncate(self.remaining as usize);
        }
        self.remaining -= data.len() as u64;
        data
    }
}

impl HttpBody for Stream {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.remaining > 0 {
            if let Some(head) = self.head.take() {
                let data = self.take(head);
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
            if let Some(inner) = self.inner.as_mut() {
                match std::task::ready!(Pin::new(inner).poll_frame(cx)) {
                    Some(Ok(frame)) => match frame.into_data() {
                        Ok(data) => {
                            let data = self.take(data);
                            return Poll::Ready(Some(Ok(Frame::data(data))));
                        }
                        Err(frame) => return Poll::Ready(Some(Ok(frame))),
                    },
                    Some(Err(e)) => return Poll::Ready(Some(Err(Box::new(e)))),
                    None => {
                        self.inner = None;
                        return Poll::Ready(None);
                    }
                }
            }
            return Poll::Ready(None);
        }
        // The cut: drop the upstream, then end as told.
        self.inner = None;
        if let Some(tail) = self.tail.take() {
            return Poll::Ready(Some(Ok(Frame::data(tail))));
        }
        if self.abort {
            // Pause briefly so the bytes sent reach the client, then fail: hyper aborts the
            // connection.
            let pause = self
                .pause
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(Duration::from_millis(100))));
            std::task::ready!(pause.as_mut().poll(cx));
            return Poll::Ready(Some(Err("connection closed mid-body (injected)".into())));
        }
        Poll::Ready(None)
    }
}

/// Reads the first `want` bytes of `body` (fewer if it ends first).
pub(crate) async fn read_head(body: &mut Incoming, want: usize) -> Result<Bytes, hyper::Error> {
    let mut head = BytesMut::new();
    while head.len() < want {
        match body.frame().await {
            Some(frame) => {
                if let Ok(data) = frame?.into_data() {
                    head.extend_from_slice(&data);
                }
            }
            None => break,
        }
    }
    Ok(head.freeze())
}

/// Go's `http.DetectContentType`, for what blobs hold: gzip and zip archives, text, else binary.
pub(crate) fn sniff(data: &[u8]) -> &'static str {
    let data = &data[..data.len().min(512)];
    if data.starts_with(b"\x1f\x8b\x08") {
        return "application/x-gzip";
    }
    if data.starts_with(b"PK\x03\x04") {
        return "application/zip";
    }
    let binary = data.iter().any(|&b| {
        b <= 0x08 || b == 0x0b || (0x0e..=0x1a).contains(&b) || (0x1c..=0x1f).contains(&b)
    });
    if binary {
        "application/octet-stream"
    } else {
        "text/plain; charset=utf-8"
    }
}

/// What breaks a blob's body half-way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Break {
    None,
    /// The upstream breaks ([`crate::Fault::BreakUncached`]): as Harbor's version answers it.
    Upstream,
    /// The connection to the client is reset ([`crate::Fault::ResetMidBody`]).
    Reset,
}

/// Harbor's answer to a blob GET it serves from the upstream: the upstream's whole-blob answer
/// `upstream` (200, with its `Content-Length`), framed as `mode` says, broken as `brk` says.
pub(crate) async fn uncached(
    upstream: Response<Incoming>,
    digest: &str,
    mode: UncachedBlobs,
    brk: Break,
) -> Response<Body> {
    let len: u64 = upstream
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .unwrap_or(0);
    let mut body = upstream.into_body();
    let head = match read_head(&mut body, 512).await {
        Ok(h) => h,
        Err(_) => return internal_error(),
    };
    let half = len / 2;
    if brk == Break::Upstream && half == 0 {
        // Nothing written yet: Harbor drops the blob headers and answers its error.
        return internal_error();
    }
    let mut res = Response::builder().status(StatusCode::OK);
    let ending = match (mode, brk) {
        (_, Break::None) => Ending::Whole,
        (_, Break::Reset) | (UncachedBlobs::Framed, Break::Upstream) => Ending::AbortAfter(half),
        (UncachedBlobs::Chunked, Break::Upstream) => Ending::ErrorAfter(half),
    };
    // The headers Go writes when the first bytes go out.
    let sniffed = if ending == Ending::ErrorAfter(half) && (half as usize) < head.len() {
        let mut first = head[..half as usize].to_vec();
        first.extend_from_slice(INTERNAL_ERROR.as_bytes());
        sniff(&first)
    } else {
        sniff(&head)
    };
    res = res.header(header::CONTENT_TYPE, sniffed);
    match mode {
        UncachedBlobs::Chunked => {
            let total = match ending {
                Ending::ErrorAfter(n) => n + INTERNAL_ERROR.len() as u64,
                _ => len,
            };
            if total <= GO_BUFFER {
                res = res.header(header::CONTENT_LENGTH, total);
            }
        }
        UncachedBlobs::Framed => {
            let digest = HeaderValue::from_str(digest).unwrap_or(HeaderValue::from_static(""));
            res = res
                .header(header::CONTENT_LENGTH, len)
                .header("docker-content-digest", digest.clone())
                .header(header::ETAG, digest);
        }
    }
    res.body(Stream::new(head, body, ending).boxed())
        .expect("response")
}

/// A blob GET cut at half its length, then the connection closed (the `ResetMidBody` fault), with
/// the headers `res` carries.
pub(crate) fn reset_mid_body(res: Response<Incoming>) -> Response<Body> {
    let len: u64 = res
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .unwrap_or(0);
    res.map(|b| Stream::new(Bytes::new(), b, Ending::AbortAfter(len / 2)).boxed())
}

fn internal_error() -> Response<Body> {
    harbor_error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "UNKNOWN",
        "internal server error",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffs_as_go_does() {
        assert_eq!(sniff(b"\x1f\x8b\x08\x00rest"), "application/x-gzip");
        assert_eq!(
            sniff(br#"{"architecture":"amd64"}"#),
            "text/plain; charset=utf-8"
        );
        assert_eq!(sniff(b"\x00\x01\x02"), "application/octet-stream");
        assert_eq!(sniff(b""), "text/plain; charset=utf-8");
    }
}
