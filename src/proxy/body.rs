//! Body types: the request body sent upstream (replayable until its first byte is read, so a
//! refused connection can be retried elsewhere) and the response body sent to the client (an
//! endpoint's streamed body holding its slot, or a small JSON answer built by sluice).

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use std::time::Duration;

use tokio::time::Instant;

use crate::balance::Slot;

/// The client's request body, kept so that it can be sent to a second endpoint if the first
/// refused the connection before any byte was read from it.
pub struct BodySource {
    shared: Option<Arc<Shared>>,
}

/// The body while it can still be replayed, and when a byte of it last moved.
pub struct Shared {
    body: Mutex<Option<Incoming>>,
    /// When the body was wrapped; `progress_ns` counts from here.
    start: Instant,
    /// When the last frame was read from the client (ns after `start`).
    progress_ns: AtomicU64,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Incoming>> {
        // The lock guards a plain Option move; a poisoned one holds a valid value.
        self.body.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn mark_progress(&self) {
        let ns = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.progress_ns.fetch_max(ns, Ordering::AcqRel);
    }

    fn last_progress(&self) -> Instant {
        self.start + Duration::from_nanos(self.progress_ns.load(Ordering::Acquire))
    }
}

impl BodySource {
    /// Wrap the client's body. Empty bodies need no sharing.
    pub fn new(body: Incoming) -> Self {
        let shared = (!body.is_end_stream()).then(|| {
            Arc::new(Shared {
                body: Mutex::new(Some(body)),
                start: Instant::now(),
                progress_ns: AtomicU64::new(0),
            })
        });
        Self { shared }
    }

    /// True while no attempt has read any of the body.
    pub fn is_untouched(&self) -> bool {
        self.shared
            .as_ref()
            .is_none_or(|shared| shared.lock().is_some())
    }

    /// A body for one attempt, or `None` if an earlier attempt started reading it.
    pub fn attempt(&self) -> Option<UpstreamBody> {
        match &self.shared {
            None => Some(UpstreamBody::Empty),
            Some(shared) => {
                let untouched = shared.lock().is_some();
                untouched.then(|| UpstreamBody::Shared(Arc::clone(shared)))
            }
        }
    }

    /// Resolves once `limit` has passed without any of the body moving (from now when there
    /// is no body): the endpoint has had the whole request, or stopped reading it, for that
    /// long. A client's slow but steady upload keeps pushing the deadline back.
    pub async fn idle_for(&self, limit: Duration) {
        let Some(shared) = &self.shared else {
            return tokio::time::sleep(limit).await;
        };
        shared.mark_progress();
        loop {
            let last = shared.last_progress();
            tokio::time::sleep_until(last + limit).await;
            if shared.last_progress() <= last {
                return;
            }
        }
    }
}

/// The request body as the upstream client sees it.
pub enum UpstreamBody {
    /// No body.
    Empty,
    /// Not read yet: still in the shared source.
    Shared(Arc<Shared>),
    /// Being read: taken out of the source, so it cannot be replayed any more.
    Reading(Incoming, Arc<Shared>),
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        if let Self::Shared(shared) = this {
            let taken = shared.lock().take();
            *this = match taken {
                Some(body) => Self::Reading(body, Arc::clone(shared)),
                None => Self::Empty,
            };
        }
        match this {
            Self::Reading(body, shared) => {
                let polled = Pin::new(body).poll_frame(cx);
                if polled.is_ready() {
                    shared.mark_progress();
                }
                polled
            }
            _ => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Empty => true,
            Self::Shared(shared) => shared.lock().as_ref().is_none_or(Body::is_end_stream),
            Self::Reading(body, _) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Empty => SizeHint::with_exact(0),
            Self::Shared(shared) => shared
                .lock()
                .as_ref()
                .map_or_else(|| SizeHint::with_exact(0), Body::size_hint),
            Self::Reading(body, _) => body.size_hint(),
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
    },
    /// A complete body built by sluice (`None` once sent).
    Full(Option<Bytes>),
}

impl ResponseBody {
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
            Self::Upstream { body, .. } => Pin::new(body).poll_frame(cx),
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
