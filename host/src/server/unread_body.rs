//! What a handler leaves of an HTTP/1.1 request body.
//!
//! A refusal (no credentials, an unknown route, a body over the limit) is
//! answered without reading the request's body. hyper then keeps the
//! connection only if the rest of the body has already arrived; if not,
//! it closes the connection after an answer that said nothing of it. A
//! client that sends its head and body in two writes (Python's
//! `http.client` does), and is descheduled between them, then writes its
//! body, or its next request, into a closed connection.
//!
//! So the body is handed to the application through [`track`], which
//! gets back whatever the application drops unread. Then
//! [`Unread::settle`]:
//!
//! - reads and discards the rest in the background, up to
//!   [`DRAIN_LIMIT`] bytes and within the header timeout (the time a
//!   client has to send a request), so the connection serves the next
//!   request once the body is in;
//! - marks the answer `connection: close` when the rest may be larger
//!   than that (a larger or unknown length), or when the client waits for
//!   `100 Continue` before sending it (it then sends nothing more), so
//!   the client knows the connection ends after the answer. The
//!   discarding still runs, so a client that writes part of its body
//!   meanwhile is not reset before it reads the answer.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::{HeaderValue, Request, Response, header};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use tokio::sync::oneshot;

/// The most of an unread body that is read and discarded to keep the
/// connection (as Go's `net/http` does, 256 KiB): far above any of the
/// API's requests, and little to read for a refused one.
pub const DRAIN_LIMIT: u64 = 256 * 1024;

/// The application's view of a request body; whatever it drops unread
/// goes back to [`Unread`].
struct TrackedBody {
    inner: Option<Incoming>,
    unread: Option<oneshot::Sender<Incoming>>,
}

impl hyper::body::Body for TrackedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.inner.as_mut() {
            Some(inner) => Pin::new(inner).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |b| b.size_hint())
    }
}

impl Drop for TrackedBody {
    fn drop(&mut self) {
        if let (Some(inner), Some(unread)) = (self.inner.take(), self.unread.take())
            && !inner.is_end_stream()
        {
            // The receiver is gone only if the request was abandoned.
            let _ = unread.send(inner);
        }
    }
}

/// Where the unread rest of a request body comes back.
pub struct Unread {
    rest: oneshot::Receiver<Incoming>,
    /// The client waits for `100 Continue` before it sends the body.
    expects_continue: bool,
}

/// Hand `request`'s body to the application, keeping hold of what it
/// leaves unread.
pub fn track(request: Request<Incoming>) -> (Request<Body>, Unread) {
    let (tx, rx) = oneshot::channel();
    let expects_continue = request
        .headers()
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let request = request.map(|body| {
        Body::new(TrackedBody {
            inner: Some(body),
            unread: Some(tx),
        })
    });
    (
        request,
        Unread {
            rest: rx,
            expects_continue,
        },
    )
}

impl Unread {
    /// Once the application has answered with `response`: if it left
    /// part of the body unread, discard the rest in the background
    /// (within `patience`), and tell the client the connection closes
    /// if that rest may not fit in [`DRAIN_LIMIT`]. A body the
    /// application still holds (it answered before reading on) is left
    /// to it.
    pub fn settle(mut self, response: &mut Response<Body>, patience: Duration) {
        let Ok(rest) = self.rest.try_recv() else {
            return;
        };
        if self.expects_continue {
            // Asking for the body only to discard it would cost the
            // client the upload: it is told the connection ends instead,
            // and sends nothing more.
            close_after(response);
            return;
        }
        if rest.size_hint().upper().is_none_or(|n| n > DRAIN_LIMIT) {
            close_after(response);
        }
        tokio::spawn(async move {
            let _ = tokio::time::timeout(patience, discard(rest)).await;
        });
    }
}

fn close_after(response: &mut Response<Body>) {
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
}

/// Read and drop `body` to its end, or until [`DRAIN_LIMIT`] bytes have
/// been read (dropping the body then makes hyper close the connection).
async fn discard(mut body: Incoming) {
    let mut read = 0u64;
    while let Some(Ok(frame)) = body.frame().await {
        if let Some(data) = frame.data_ref() {
            read += data.len() as u64;
            if read > DRAIN_LIMIT {
                return;
            }
        }
    }
}
