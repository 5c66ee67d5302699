//! Body types: the request body sent upstream (watched, so the response timeout counts from
//! when it stopped moving) and the response body sent to the client (an endpoint's streamed
//! body holding its slot and connection, or a small JSON answer built by sluice).

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use std::time::Duration;

use tokio::task::AbortHandle;
use tokio::time::Instant;

use super::upstream::Reuse;
use crate::balance::Slot;

/// When a byte of the request body last moved, shared between the body (which notes it) and
/// the wait for the response (which times out only when nothing moved for long enough).
pub struct Progress {
    start: Instant,
    /// When the last frame was read from the client (ns after `start`).
    latest_ns: AtomicU64,
    /// Set when the client's body ended in an error rather than cleanly.
    broken: AtomicBool,
    /// Set when the client's body was read to its end.
    ended: AtomicBool,
}

impl Progress {
    fn mark(&self) {
        let ns = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.latest_ns.fetch_max(ns, Ordering::AcqRel);
    }

    fn latest(&self) -> Instant {
        self.start + Duration::from_nanos(self.latest_ns.load(Ordering::Acquire))
    }
}

/// Wrap the client's body for the endpoint connection that `cut` aborts, and get the handle
/// that watches it move.
pub fn track(body: Incoming, cut: AbortHandle) -> (UpstreamBody, BodyWatch) {
    if body.is_end_stream() {
        return (
            UpstreamBody {
                state: Upload::Empty,
                cut,
            },
            BodyWatch(None),
        );
    }
    let progress = Arc::new(Progress {
        start: Instant::now(),
        latest_ns: AtomicU64::new(0),
        broken: AtomicBool::new(false),
        ended: AtomicBool::new(false),
    });
    let upstream = UpstreamBody {
        state: Upload::Streaming(body, Arc::clone(&progress)),
        cut,
    };
    (upstream, BodyWatch(Some(progress)))
}

/// Watches a request body on its way to the endpoint.
#[derive(Clone)]
pub struct BodyWatch(Option<Arc<Progress>>);

impl BodyWatch {
    /// Resolves once `limit` has passed without any of the body moving (from now when there
    /// is no body): the endpoint has had the whole request, or stopped reading it, for that
    /// long. A client's slow but steady upload keeps pushing the deadline back.
    pub async fn idle_for(&self, limit: Duration) {
        let Some(progress) = &self.0 else {
            return tokio::time::sleep(limit).await;
        };
        progress.mark();
        loop {
            let latest = progress.latest();
            tokio::time::sleep_until(latest + limit).await;
            if progress.latest() <= latest {
                return;
            }
        }
    }

    /// True when there was no body, or it was read to its end.
    pub fn finished(&self) -> bool {
        self.0
            .as_ref()
            .is_none_or(|p| p.ended.load(Ordering::Acquire))
    }

    /// True once the client's body ended in an error (malformed chunked framing, a
    /// connection lost mid-body): the exchange failed because of the client, not the endpoint.
    pub fn client_broke(&self) -> bool {
        self.0
            .as_ref()
            .is_some_and(|p| p.broken.load(Ordering::Acquire))
    }
}

/// Where the upload stands.
enum Upload {
    /// No body at all.
    Empty,
    /// Frames still come from the client.
    Streaming(Incoming, Arc<Progress>),
    /// The client's body broke: nothing more is ever yielded, not even its end.
    Broken,
}

/// The request body as the endpoint connection reads it.
pub struct UpstreamBody {
    state: Upload,
    /// Aborts the endpoint connection.
    cut: AbortHandle,
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let (body, progress) = match &mut this.state {
            Upload::Empty => return Poll::Ready(None),
            // hyper's client polls the body again within the same task poll (its write loop
            // runs several rounds), and a client `Incoming` that yielded an error answers
            // `None` after it: were that passed on, the connection would write the last
            // chunk of a chunked upload and flush it before the abort below takes effect
            // (an abort only stops a task once its current poll returns).
            Upload::Broken => return Poll::Pending,
            Upload::Streaming(body, progress) => (body, progress),
        };
        let polled = Pin::new(&mut *body).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Err(e))) => {
                // The client's body broke. The endpoint must not take what it got for a whole
                // request: the error goes to the connection (hyper then closes it without
                // ending the body), and the connection's task is aborted as well.
                tracing::debug!(error = %e, "client body broke: cutting the endpoint connection");
                progress.broken.store(true, Ordering::Release);
                progress.mark();
                this.state = Upload::Broken;
                this.cut.abort();
            }
            Poll::Ready(frame) => {
                progress.mark();
                if frame.is_none() || body.is_end_stream() {
                    progress.ended.store(true, Ordering::Release);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.state {
            Upload::Empty => true,
            Upload::Streaming(body, _) => body.is_end_stream(),
            Upload::Broken => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.state {
            Upload::Empty => SizeHint::with_exact(0),
            Upload::Streaming(body, _) => body.size_hint(),
            Upload::Broken => SizeHint::default(),
        }
    }
}

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
    },
    /// A complete body built by sluice (`None` once sent).
    Full(Option<Bytes>),
}

impl ResponseBody {
    /// An endpoint's body, holding its slot and connection.
    pub fn upstream(body: Incoming, slot: Slot, mut reuse: Reuse) -> Self {
        // A body that is empty from the start may never be polled.
        reuse.finished = body.is_end_stream();
        Self::Upstream { body, slot, reuse }
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
            Self::Upstream { body, reuse, .. } => {
                let polled = Pin::new(&mut *body).poll_frame(cx);
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
