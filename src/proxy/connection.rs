//! One client connection, from accept to close: HTTP/2 with prior knowledge or HTTP/1.1, the
//! bytes it moves (for the idle check), the framing watch on its requests, the lingering
//! close, and — for HTTP/1.1 — **parking** between requests.
//!
//! A keep-alive connection spends most of its life waiting for its next request, and hyper
//! keeps its whole per-connection state meanwhile: an 8 KiB read buffer, a write buffer and
//! the connection future, about 15 KiB. A parked connection holds none of it: once an answer
//! is sent and nothing else has been pending for `PARK_AFTER` (100 ms: a client sending
//! request after request keeps its state, as a fresh one per request costs CPU), the socket
//! reports end-of-stream to hyper (which ends
//! its connection cleanly, at a message boundary, without closing the socket), and the task
//! waits for the socket to become readable, holding only the socket and this module's
//! counters; then a new hyper connection serves the next request. The fake end-of-stream is
//! given only when all of these hold, each found necessary by a spike (BENCHMARKS.md,
//! "Idle connections"):
//! - no request is in the service (counted from the service call until its response body is
//!   dropped: hyper reads once while a response is written, and an end-of-stream then loses
//!   the response);
//! - the last response was flushed and nothing was written since (the body is dropped once
//!   its last frame is queued, before hyper has written it);
//! - the request stream is at a message boundary, by the framing watch (a head split over
//!   two packets would otherwise be cut);
//! - the socket has nothing to read right now, and has had nothing for `PARK_AFTER`.

use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;

use super::body::ResponseBody;
use super::framing::Framing;
use super::reject::Rejection;
use super::server::OpenGuard;
use super::watched::{Park, Watched};
use super::Proxy;
use crate::reason::Reason;

/// What an HTTP/2 client sends first (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How one connection is served: the builders and bounds in force when it was accepted.
pub(super) struct Serving {
    pub http1: http1::Builder,
    pub http2: http2::Builder<TokioExecutor>,
    /// `timeouts.client_header`: also how long a parked connection waits for its next request
    /// (as hyper's header timer bounds that wait on a connection it keeps).
    pub client_header: Duration,
    /// `limits.idle_timeout`.
    pub idle_timeout: Duration,
    /// `limits.lingering_close`.
    pub linger: Duration,
}

/// Serve `stream` from `peer` until it closes, `stopped` says the server is shutting down
/// (what is in flight finishes), or it stays idle too long.
pub(super) async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    proxy: Arc<Proxy>,
    serving: Serving,
    open: OpenGuard,
    mut stopped: watch::Receiver<()>,
) {
    let activity = Arc::new(Activity::default());
    let mut io = Watched {
        stream: Some(stream),
        activity: Arc::clone(&activity),
        framing: Framing::default(),
        linger: serving.linger,
        park: Park::never(),
        _open: Some(open),
    };
    let service = {
        let activity = Arc::clone(&activity);
        service_fn(move |req: Request<Incoming>| {
            let proxy = Arc::clone(&proxy);
            // Counted from here until the response body is dropped (sent or abandoned).
            let guard = InFlightGuard::new(&activity);
            let conflicting = activity.is_conflicting();
            // Boxed: hyper hands a connection back (to park it) only with an `Unpin` future.
            Box::pin(async move {
                let response = if conflicting {
                    proxy
                        .policy()
                        .unrouted
                        .count_own(Reason::ConflictingFraming);
                    refuse_conflicting_framing(peer)
                } else {
                    proxy.handle(req, peer).await
                };
                Ok::<_, Infallible>(response.map(|body| InFlight {
                    body,
                    _guard: guard,
                }))
            }) as Pin<Box<dyn Future<Output = _> + Send>>
        })
    };
    let ended = match prior_knowledge_h2(&io, serving.client_header).await {
        None => return,
        Some(true) => {
            let connection = serving.http2.serve_connection(TokioIo::new(io), service);
            tokio::pin!(connection);
            let idle = idle(&activity, serving.idle_timeout);
            tokio::select! {
                result = connection.as_mut() => Some(result),
                _ = stopped.changed() => {
                    // Shutdown: finish what is in flight (serve bounds the wait by the grace).
                    connection.as_mut().graceful_shutdown();
                    Some(connection.as_mut().await)
                }
                () = idle => {
                    tracing::debug!(idle_timeout = ?serving.idle_timeout, "closing an idle client connection");
                    connection.as_mut().graceful_shutdown();
                    // A client that never acknowledges the GOAWAY's PING would keep the
                    // connection: after one more idle period, drop it.
                    tokio::time::timeout(serving.idle_timeout, connection.as_mut())
                        .await
                        .ok()
                }
            }
        }
        Some(false) => loop {
            io.park = Park::round(&activity, std::mem::take(&mut io.park.unread));
            let mut connection = Box::new(
                serving
                    .http1
                    .serve_connection(TokioIo::new(io), service.clone()),
            );
            let idle = idle(&activity, serving.idle_timeout);
            tokio::pin!(idle);
            let round = tokio::select! {
                result = poll_fn(|cx| connection.poll_without_shutdown(cx)) => result,
                _ = stopped.changed() => {
                    Pin::new(&mut *connection).graceful_shutdown();
                    break Some(poll_fn(|cx| connection.poll_without_shutdown(cx)).await);
                }
                () = &mut idle => {
                    tracing::debug!(idle_timeout = ?serving.idle_timeout, "closing an idle client connection");
                    Pin::new(&mut *connection).graceful_shutdown();
                    break tokio::time::timeout(serving.idle_timeout, poll_fn(|cx| connection.poll_without_shutdown(cx)))
                        .await
                        .ok();
                }
            };
            if let Err(e) = round {
                break Some(Err(e));
            }
            let parts = connection.into_parts();
            io = parts.io.into_inner();
            if !io.park.faked || io.park.client_closed {
                // hyper ended the connection itself (`Connection: close`, HTTP/1.0, an
                // upgrade, a refused head), or the client closed it.
                break None;
            }
            // Rarely, bytes hyper read but did not use: they come first next time. A copy,
            // so hyper's buffer is not kept alive by them.
            io.park.unread = Bytes::copy_from_slice(&parts.read_buf);
            drop(parts.read_buf);
            if io.park.unread.is_empty() {
                let readable = io.stream_ref().readable();
                tokio::select! {
                    result = tokio::time::timeout(serving.client_header, readable) => {
                        if !matches!(result, Ok(Ok(()))) {
                            // No next request in time, as hyper's header timer would close it.
                            break None;
                        }
                    }
                    _ = stopped.changed() => break None,
                }
            }
        },
    };
    if let Some(Err(e)) = ended {
        tracing::debug!(error = %e, "client connection ended with an error");
    }
    // Held until the connection ended: the drain waits for every receiver to go.
    drop(stopped);
}

/// Whether the client speaks HTTP/2 with prior knowledge: its first bytes are the preface.
/// Waits (without reading: the bytes stay for hyper) until they tell, at most `within`;
/// `None` when the client sent nothing in time or closed.
async fn prior_knowledge_h2(io: &Watched, within: Duration) -> Option<bool> {
    let deadline = Instant::now() + within;
    let mut first = [0u8; H2_PREFACE.len()];
    loop {
        let peeked = tokio::time::timeout_at(deadline, io.stream_ref().peek(&mut first));
        match peeked.await.ok()? {
            Ok(0) | Err(_) => return None,
            Ok(n) if first[..n] != H2_PREFACE[..n] => return Some(false),
            Ok(n) if n == H2_PREFACE.len() => return Some(true),
            // A prefix of the preface so far (peek sees the same bytes again): wait for more.
            Ok(_) => tokio::time::sleep(Duration::from_millis(1)).await,
        }
    }
}

/// What the idle check looks at (bytes moved either way, requests in flight), and what the
/// service needs from the framing watch.
pub(super) struct Activity {
    pub(super) bytes: AtomicU64,
    pub(super) in_flight: AtomicUsize,
    /// Response bodies dropped (sent or abandoned) so far.
    pub(super) answered: AtomicU64,
    /// Requests handed to the service so far on this connection.
    pub(super) requests: AtomicU64,
    /// Position of the first request whose head had both `Content-Length` and
    /// `Transfer-Encoding` (`u64::MAX`: none).
    pub(super) conflicting: AtomicU64,
}

impl Default for Activity {
    fn default() -> Self {
        Self {
            bytes: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            answered: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            conflicting: AtomicU64::new(u64::MAX),
        }
    }
}

impl Activity {
    /// Count the request just handed to the service; true when its head had both framing
    /// headers. HTTP/1 hands requests over one at a time and in order, and its head was read
    /// (and watched) before hyper parsed it. HTTP/2 connections are never flagged.
    fn is_conflicting(&self) -> bool {
        let position = self.requests.fetch_add(1, Ordering::AcqRel);
        position == self.conflicting.load(Ordering::Acquire)
    }
}

/// hyper frames a request with both `Content-Length` and `Transfer-Encoding` by chunked and
/// closes the connection after the answer; sluice refuses it instead of forwarding it.
fn refuse_conflicting_framing(peer: SocketAddr) -> Response<ResponseBody> {
    tracing::debug!(
        client = %peer.ip(),
        "request with both Content-Length and Transfer-Encoding: 400, connection closed"
    );
    let mut response = Rejection::new(Reason::ConflictingFraming, None).into_response();
    response
        .headers_mut()
        .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// Resolves once the connection has had no request in flight and moved no byte for
/// `timeout` (checked every quarter of it, so it closes within 1.25 × `timeout`).
async fn idle(activity: &Activity, timeout: Duration) {
    let tick = (timeout / 4).max(Duration::from_millis(1));
    let mut quiet_since = Instant::now();
    let mut last_bytes = activity.bytes.load(Ordering::Relaxed);
    loop {
        tokio::time::sleep(tick).await;
        let bytes = activity.bytes.load(Ordering::Relaxed);
        let now = Instant::now();
        if bytes != last_bytes || activity.in_flight.load(Ordering::Acquire) > 0 {
            last_bytes = bytes;
            quiet_since = now;
        } else if now.duration_since(quiet_since) >= timeout {
            return;
        }
    }
}

/// Counts one request in flight on its connection until dropped.
struct InFlightGuard(Arc<Activity>);

impl InFlightGuard {
    fn new(activity: &Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        Self(Arc::clone(activity))
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.answered.fetch_add(1, Ordering::AcqRel);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its request counted as in flight while it is being sent.
struct InFlight<B> {
    body: B,
    _guard: InFlightGuard,
}

impl<B: Body + Unpin> Body for InFlight<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
