//! The request body sent upstream: watched, so the response timeout counts from when it
//! stopped moving, and cut when the client stops sending it for `timeouts.client_body`.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use std::time::Duration;

use tokio::task::AbortHandle;
use tokio::time::{Instant, Sleep};

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
    /// Set while the endpoint connection waits for the client's next frame (its last poll of
    /// the body found nothing): the upload is held up by the client, not by the endpoint.
    /// hyper's connection only asks for the body while its write buffer has room, and the
    /// buffer only drains while it waits, so once woken by the client it reads the body again
    /// and the flag clears.
    waiting_for_client: AtomicBool,
    /// Set when no byte of the body came for `timeouts.client_body` while it was waited for.
    stalled: AtomicBool,
    /// `timeouts.client_body`.
    client_body: Duration,
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

/// Read and discard, for at most `for_at_most`, what is left of an HTTP/2 request body that
/// sluice answered without reading (a 401, 429, 503...). Dropped unread, the stream would be
/// reset, and the DATA frames the client already had in flight would arrive for a stream h2
/// has forgotten (it remembers 50 resets for 1 s): h2 answers each with a reset of its own and
/// counts it against `limits.http2_max_local_error_reset_streams` for the connection's whole
/// life, so a client whose uploads are refused often enough loses its connection (GOAWAY) and
/// every stream on it. Drained, the stream ends when the client's upload does. HTTP/1's
/// counterpart is the lingering close (`src/proxy/watched.rs`), bounded by the same setting.
pub fn drain(mut body: Incoming, for_at_most: Duration) {
    if body.is_end_stream() || for_at_most.is_zero() {
        return;
    }
    tokio::spawn(async move {
        let _ = tokio::time::timeout(for_at_most, async {
            while let Some(Ok(_)) = body.frame().await {}
        })
        .await;
    });
}

/// Wrap the client's body for the endpoint connection that `cut` aborts, and get the handle
/// that watches it move. `client_body` (`timeouts.client_body`) bounds how long the client may
/// leave the connection waiting for the next byte.
pub fn track(body: Incoming, cut: AbortHandle, client_body: Duration) -> (UpstreamBody, BodyWatch) {
    let stall = Stall::new(client_body);
    if body.is_end_stream() {
        return (
            UpstreamBody {
                state: Upload::Empty,
                cut,
                stall,
            },
            BodyWatch(None),
        );
    }
    let progress = Arc::new(Progress {
        start: Instant::now(),
        latest_ns: AtomicU64::new(0),
        broken: AtomicBool::new(false),
        ended: AtomicBool::new(false),
        waiting_for_client: AtomicBool::new(false),
        stalled: AtomicBool::new(false),
        client_body,
    });
    let upstream = UpstreamBody {
        state: Upload::Streaming(body, Arc::clone(&progress)),
        cut,
        stall,
    };
    (upstream, BodyWatch(Some(progress)))
}

/// A clock of quiet: runs while something waits for the client, reset by everything the client
/// does. One upload's `timeouts.client_body` (the endpoint connection waiting for the client's
/// next frame), and the wait before an idle client connection is parked (`proxy::watched`).
#[derive(Debug)]
pub struct Stall {
    limit: Duration,
    /// Allocated the first time the upload waits for the client.
    timer: Option<Pin<Box<Sleep>>>,
    /// Whether the timer counts the current wait.
    armed: bool,
}

impl Stall {
    /// A clock that says so after `limit` of quiet.
    pub fn new(limit: Duration) -> Self {
        Self {
            limit,
            timer: None,
            armed: false,
        }
    }

    /// The client has nothing for us yet: true once it has kept us waiting for the limit.
    pub fn waiting(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.armed {
            let deadline = Instant::now() + self.limit;
            match &mut self.timer {
                Some(timer) => timer.as_mut().reset(deadline),
                None => self.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
            self.armed = true;
        }
        self.timer
            .as_mut()
            .is_some_and(|timer| timer.as_mut().poll(cx).is_ready())
    }

    /// The client did something: the next wait starts a new count.
    pub fn moved(&mut self) {
        self.armed = false;
    }
}

/// The error the endpoint connection gets when the client stopped sending its body.
#[derive(Debug, thiserror::Error)]
#[error("no byte of the request body for {0:?} (timeouts.client_body)")]
pub struct ClientBodyTimeout(Duration);

/// Watches a request body on its way to the endpoint.
#[derive(Clone)]
pub struct BodyWatch(Option<Arc<Progress>>);

impl BodyWatch {
    /// Resolves once `limit` has passed without any of the body moving (from now when there
    /// is no body): the endpoint has had the whole request, or stopped reading it, for that
    /// long. A client's slow but steady upload keeps pushing the deadline back, and time spent
    /// waiting for a client that stopped sending is not counted (`timeouts.client_body` judges
    /// that): the endpoint is not to blame for it.
    pub async fn idle_for(&self, limit: Duration) {
        let Some(progress) = &self.0 else {
            return tokio::time::sleep(limit).await;
        };
        progress.mark();
        let mut deadline = progress.latest() + limit;
        loop {
            tokio::time::sleep_until(deadline).await;
            let mut next = progress.latest() + limit;
            if progress.waiting_for_client.load(Ordering::Acquire) {
                // The client holds the upload up: `client_body` gives its verdict first. Should
                // none come, the wait still ends, later by `client_body`.
                next += progress.client_body;
            }
            if next <= Instant::now() {
                return;
            }
            deadline = next;
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

    /// True once the client sent no byte of its body for `timeouts.client_body` while the
    /// endpoint connection waited for one (the connection was cut).
    pub fn client_stalled(&self) -> bool {
        self.0
            .as_ref()
            .is_some_and(|p| p.stalled.load(Ordering::Acquire))
    }
}

/// Why a body could not be read whole to be held for a retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadError {
    /// The client's body broke (malformed framing, the connection lost).
    Broke,
    /// No byte of it came for `timeouts.client_body`.
    Stalled,
}

/// The whole of a body whose length is known and small (the caller checked its size hint),
/// so it can be sent again: read here, each frame within `client_body` of the one before.
/// Trailers are not kept.
pub async fn read_whole(mut body: Incoming, client_body: Duration) -> Result<Bytes, ReadError> {
    let mut whole = bytes::BytesMut::new();
    while !body.is_end_stream() {
        match tokio::time::timeout(client_body, body.frame()).await {
            Err(_) => return Err(ReadError::Stalled),
            Ok(None) => break,
            Ok(Some(Err(_))) => return Err(ReadError::Broke),
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    whole.extend_from_slice(&data);
                }
            }
        }
    }
    Ok(whole.freeze())
}

/// A body read whole ([`read_whole`]), for one attempt: it sends a copy, and its watch says
/// it is finished from the start (`client_body` as for [`track`]; a held body never waits).
pub fn held(body: Bytes, cut: AbortHandle, client_body: Duration) -> (UpstreamBody, BodyWatch) {
    let stall = Stall::new(client_body);
    let state = match body.is_empty() {
        true => Upload::Empty,
        false => Upload::Held(Some(body)),
    };
    (UpstreamBody { state, cut, stall }, BodyWatch(None))
}

/// Where the upload stands.
enum Upload {
    /// No body at all.
    Empty,
    /// A body held whole, not yet sent (`None` once sent).
    Held(Option<Bytes>),
    /// Frames still come from the client.
    Streaming(Incoming, Arc<Progress>),
    /// The client's body broke or stalled: nothing more is ever yielded, not even its end.
    Broken,
}

/// The request body as the endpoint connection reads it.
pub struct UpstreamBody {
    state: Upload,
    /// Aborts the endpoint connection.
    cut: AbortHandle,
    stall: Stall,
}

/// Why an upload did not reach its end: the client's body broke, or stalled.
pub type UploadError = Box<dyn std::error::Error + Send + Sync>;

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = UploadError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, UploadError>>> {
        let this = self.get_mut();
        let (body, progress) = match &mut this.state {
            Upload::Empty => return Poll::Ready(None),
            Upload::Held(held) => return Poll::Ready(held.take().map(|b| Ok(Frame::data(b)))),
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
                progress.waiting_for_client.store(false, Ordering::Release);
                progress.mark();
                this.state = Upload::Broken;
                this.cut.abort();
            }
            Poll::Ready(frame) => {
                progress.mark();
                progress.waiting_for_client.store(false, Ordering::Release);
                this.stall.moved();
                // A trailers frame is the body's last (hyper's `Incoming` only says it is at
                // its end when polled once more, which the endpoint connection never does).
                let last = match frame {
                    None => true,
                    Some(Ok(frame)) if frame.is_trailers() => true,
                    _ => body.is_end_stream(),
                };
                if last {
                    progress.ended.store(true, Ordering::Release);
                }
            }
            Poll::Pending => {
                progress.waiting_for_client.store(true, Ordering::Release);
                if this.stall.waiting(cx) {
                    // Decided here, where the frames are read, so no late frame can reach the
                    // endpoint after the verdict: the upload is latched like a broken one, the
                    // connection gets the error (hyper closes it without ending the body) and
                    // its task is aborted as well.
                    let limit = this.stall.limit;
                    tracing::debug!(
                        ?limit,
                        "client body stalled: cutting the endpoint connection"
                    );
                    progress.stalled.store(true, Ordering::Release);
                    progress.waiting_for_client.store(false, Ordering::Release);
                    this.state = Upload::Broken;
                    this.cut.abort();
                    return Poll::Ready(Some(Err(Box::new(ClientBodyTimeout(limit)))));
                }
            }
        }
        polled.map(|frame| frame.map(|result| result.map_err(UploadError::from)))
    }

    fn is_end_stream(&self) -> bool {
        match &self.state {
            Upload::Empty => true,
            Upload::Held(held) => held.is_none(),
            Upload::Streaming(body, _) => body.is_end_stream(),
            Upload::Broken => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.state {
            Upload::Empty => SizeHint::with_exact(0),
            Upload::Held(held) => SizeHint::with_exact(held.as_ref().map_or(0, |b| b.len() as u64)),
            Upload::Streaming(body, _) => body.size_hint(),
            Upload::Broken => SizeHint::default(),
        }
    }
}
