//! The body of a response to a client: an endpoint's streamed body holding its slot and
//! connection, or a small JSON answer built by sluice.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::Sleep;

use crate::balance::{Endpoint, Slot};
use crate::upstream::Connection;

/// How long an endpoint body's error is held back, so that what hyper has not written out
/// yet (the head) reaches the client first. A yield to the runtime was not enough: an HTTP/2
/// connection task on the other worker of a busy machine still lost the race now and then.
/// It stays best effort: hyper does not say when an HTTP/2 head has left, and on a machine
/// busy enough the reset still overtakes it (docs/limits-and-threat-model.md says what the
/// client sees then).
const HOLD_ERROR: Duration = Duration::from_millis(10);

/// The body of a response to a client.
pub enum ResponseBody {
    /// An endpoint's body, streamed; the slot is released when the body is dropped, i.e. when
    /// it has been sent or the exchange ended otherwise.
    Upstream {
        /// The endpoint's body.
        body: Incoming,
        /// Held for the body's lifetime.
        slot: Slot,
        /// The connection, back to the pool once the body was read to its end.
        reuse: Reuse,
        /// The endpoint's body broke: its error, held back for [`HOLD_ERROR`] (see
        /// `poll_frame`).
        failed: Option<(hyper::Error, Pin<Box<Sleep>>)>,
    },
    /// A complete body built by sluice (`None` once sent).
    Full(Option<Bytes>),
}

impl ResponseBody {
    /// An endpoint's body, holding its slot and connection.
    pub fn upstream(body: Incoming, slot: Slot, mut reuse: Reuse) -> Self {
        // A body that is empty from the start may never be polled.
        reuse.finished = body.is_end_stream();
        Self::Upstream {
            body,
            slot,
            reuse,
            failed: None,
        }
    }

    /// A complete body.
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        Self::Full(Some(bytes.into()))
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            Self::Upstream {
                body,
                reuse,
                failed,
                ..
            } => {
                if let Some((_, pause)) = failed {
                    if pause.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    let (error, _) = failed.take().expect("checked above");
                    return Poll::Ready(Some(Err(error)));
                }
                let polled = Pin::new(&mut *body).poll_frame(cx);
                if let Poll::Ready(Some(Err(error))) = polled {
                    // The endpoint broke its body. hyper ends the client's exchange at this
                    // error and drops what it has not written out yet: when the error comes at
                    // once (an endpoint that died right after its response head), that is the
                    // head, and the client gets no answer at all (HTTP/2: the stream's reset
                    // discards its queued HEADERS frame). Hold the error back a moment: hyper's
                    // HTTP/1 connection flushes while this body is pending, and the HTTP/2
                    // connection task gets to write the head out. The client then sees the
                    // head and a body that ends broken, as for an endpoint that dies mid-body.
                    let mut pause = Box::pin(tokio::time::sleep(HOLD_ERROR));
                    if pause.as_mut().poll(cx).is_pending() {
                        *failed = Some((error, pause));
                        return Poll::Pending;
                    }
                    return Poll::Ready(Some(Err(error)));
                }
                // hyper stops polling once the body says it is at its end.
                if matches!(polled, Poll::Ready(None))
                    || (matches!(polled, Poll::Ready(Some(Ok(_)))) && body.is_end_stream())
                {
                    reuse.finished = true;
                }
                polled
            }
            Self::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Upstream { body, .. } => body.is_end_stream(),
            Self::Full(bytes) => bytes.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Upstream { body, .. } => body.size_hint(),
            Self::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
}

/// Gives a connection back to its endpoint's pool when the response body it carried was read
/// to its end; an exchange cut short closes it instead.
pub struct Reuse {
    connection: Option<Connection>,
    endpoint: Arc<Endpoint>,
    /// Set when the body's last frame has been read.
    pub finished: bool,
}

impl Reuse {
    /// Track `connection` of `endpoint`.
    pub fn new(connection: Connection, endpoint: Arc<Endpoint>) -> Self {
        Self {
            connection: Some(connection),
            endpoint,
            finished: false,
        }
    }
}

impl Drop for Reuse {
    fn drop(&mut self) {
        if let (true, Some(connection)) = (self.finished, self.connection.take()) {
            self.endpoint.idle.put(connection);
        }
    }
}
