//! The accept loop: HTTP/1.1 and HTTP/2 (prior knowledge) on one listener, the `[limits]`
//! every client connection is held to (head size, header count, HTTP/2 streams and resets,
//! open connections, idle time), a header timeout, and a graceful drain on shutdown.
//!
//! What hyper enforces for us (see docs/limits-and-threat-model.md, "Limits", for the answers a
//! client gets): the request head size and header count (431), the URI length (414), invalid
//! request framing (differing or malformed `Content-Length`, a `Transfer-Encoding` other than
//! chunked: 400 and close), the header timeout (connection closed), HTTP/2 stream and reset bounds
//! (REFUSED_STREAM, GOAWAY). What this module adds: the bound on open connections, the idle
//! timeout, and a 400 for a head with both `Content-Length` and `Transfer-Encoding`, which hyper
//! would forward framed by chunked (see [`super::framing`]).

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderValue, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;

use super::body::ResponseBody;
use super::framing::Framing;
use super::reject::Rejection;
use super::Proxy;
use crate::config::{Limits, HYPER_DEFAULT_MAX_HEADERS};
use crate::reason::Reason;

/// How often refused connections are logged at most (a flood must not flood the log).
const REFUSED_LOG_EVERY: Duration = Duration::from_secs(1);

/// Accept connections on `listener` until `shutdown` resolves, then stop accepting and give
/// in-flight exchanges up to `grace` to finish. Returns once drained or the grace ran out.
///
/// Limits and the header timeout are read from the live policy at each accept, so a reload
/// applies them to new connections; connections already open keep the ones they started with.
pub async fn serve(listener: TcpListener, proxy: Arc<Proxy>, shutdown: impl Future<Output = ()>) {
    let mut settings = Settings::from_proxy(&proxy);
    let open = Arc::new(AtomicUsize::new(0));
    let mut refused: u64 = 0;
    let mut refused_logged: Option<Instant> = None;
    // Dropped receivers tell the drain below that every connection has ended.
    let (stop, _) = watch::channel(());
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: wait a moment instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // On the dual-stack `[::]` listener an IPv4 client is `::ffff:a.b.c.d`: log and
        // forward it as the IPv4 address it is.
        let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
        settings.refresh(&proxy);
        if open.load(Ordering::Acquire) >= settings.max_connections {
            // Accept-and-close rather than stop accepting: the client learns at once, and the
            // listen backlog never fills with connections nobody will serve.
            drop(stream);
            refused += 1;
            if refused_logged.is_none_or(|at| at.elapsed() >= REFUSED_LOG_EVERY) {
                tracing::warn!(
                    max_connections = settings.max_connections,
                    refused,
                    "connection limit reached: closing new connections"
                );
                refused_logged = Some(Instant::now());
            }
            continue;
        }
        let open_guard = OpenGuard::new(&open);
        // Small request/response exchanges: send them without Nagle's delay.
        let _ = stream.set_nodelay(true);
        let activity = Arc::new(Activity::default());
        let io = Watched {
            stream: Some(stream),
            activity: Arc::clone(&activity),
            framing: Framing::default(),
            linger: settings.limits.lingering_close,
            _open: Some(open_guard),
        };
        let connection_proxy = Arc::clone(&proxy);
        let service_activity = Arc::clone(&activity);
        let service = service_fn(move |req| {
            let proxy = Arc::clone(&connection_proxy);
            // Counted from here until the response body is dropped (sent or abandoned).
            let guard = InFlightGuard::new(&service_activity);
            let conflicting = service_activity.is_conflicting();
            async move {
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
            }
        });
        let connection = settings
            .builder
            .serve_connection(TokioIo::new(io), service)
            .into_owned();
        let mut stopped = stop.subscribe();
        let idle_timeout = settings.idle_timeout;
        tokio::spawn(async move {
            tokio::pin!(connection);
            let idle = idle(&activity, idle_timeout);
            let ended = tokio::select! {
                result = connection.as_mut() => Some(result),
                _ = stopped.changed() => {
                    // Shutdown: finish what is in flight (serve bounds the wait by the grace).
                    connection.as_mut().graceful_shutdown();
                    Some(connection.as_mut().await)
                }
                () = idle => {
                    tracing::debug!(?idle_timeout, "closing an idle client connection");
                    connection.as_mut().graceful_shutdown();
                    // An HTTP/2 client that never acknowledges the GOAWAY's PING would keep
                    // the connection: after one more idle period, drop it.
                    tokio::time::timeout(idle_timeout, connection.as_mut())
                        .await
                        .ok()
                }
            };
            if let Some(Err(e)) = ended {
                tracing::debug!(error = %e, "client connection ended with an error");
            }
            // Held until the connection ended: the drain waits for every receiver to go.
            drop(stopped);
        });
    }
    drop(listener);
    // The grace in force now: a reload may have changed it.
    let grace = proxy.policy().timeouts.shutdown_grace;
    tracing::info!(?grace, "shutting down: draining in-flight requests");
    let _ = stop.send(());
    if tokio::time::timeout(grace, stop.closed()).await.is_err() {
        tracing::warn!("shutdown grace elapsed with requests still in flight");
    }
}

/// The connection builder for the limits in force, rebuilt when a reload changes them.
struct Settings {
    client_header: Duration,
    limits: Limits,
    max_connections: usize,
    idle_timeout: Duration,
    builder: auto::Builder<TokioExecutor>,
}

impl Settings {
    fn from_proxy(proxy: &Proxy) -> Self {
        let policy = proxy.policy();
        Self::new(policy.timeouts.client_header, &policy.config.limits)
    }

    fn new(client_header: Duration, limits: &Limits) -> Self {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        // hyper's HTTP/1 buffer bound is the head bound: a head that does not fit gets 431.
        let head_bytes = usize::try_from(limits.max_header_bytes).unwrap_or(usize::MAX);
        let mut http1 = builder.http1();
        http1
            .timer(TokioTimer::new())
            // Also bounds the wait for the next request on a keep-alive connection.
            .header_read_timeout(client_header)
            .keep_alive(true)
            .max_buf_size(head_bytes);
        if limits.max_headers != HYPER_DEFAULT_MAX_HEADERS {
            // Any value but hyper's default moves the header array to the heap: only pay for
            // it when asked to.
            http1.max_headers(limits.max_headers as usize);
        }
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(limits.max_header_bytes)
            .max_concurrent_streams(limits.http2_max_concurrent_streams)
            .max_pending_accept_reset_streams(
                limits.http2_max_pending_accept_reset_streams as usize,
            )
            .max_local_error_reset_streams(limits.http2_max_local_error_reset_streams as usize);
        Self {
            client_header,
            limits: limits.clone(),
            max_connections: limits.max_connections as usize,
            idle_timeout: limits.idle_timeout,
            builder,
        }
    }

    /// Rebuild if the live policy's limits differ from these.
    fn refresh(&mut self, proxy: &Proxy) {
        let policy = proxy.policy();
        if policy.timeouts.client_header != self.client_header
            || policy.config.limits != self.limits
        {
            *self = Self::new(policy.timeouts.client_header, &policy.config.limits);
        }
    }
}

/// Counts one open connection until dropped.
struct OpenGuard(Arc<AtomicUsize>);

impl OpenGuard {
    fn new(open: &Arc<AtomicUsize>) -> Self {
        open.fetch_add(1, Ordering::AcqRel);
        Self(Arc::clone(open))
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What the idle check looks at (bytes moved either way, requests in flight), and what the
/// service needs from the framing watch.
struct Activity {
    bytes: AtomicU64,
    in_flight: AtomicUsize,
    /// Requests handed to the service so far on this connection.
    requests: AtomicU64,
    /// Position of the first request whose head had both `Content-Length` and
    /// `Transfer-Encoding` (`u64::MAX`: none).
    conflicting: AtomicU64,
}

impl Default for Activity {
    fn default() -> Self {
        Self {
            bytes: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
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

/// The client's TCP stream, counting the bytes it moves for the idle check and watching the
/// framing of the requests read from it.
struct Watched {
    /// Taken only when dropped.
    stream: Option<TcpStream>,
    activity: Arc<Activity>,
    framing: Framing,
    /// `limits.lingering_close`: how long a connection closed in the middle of a request body
    /// goes on reading (and discarding) what the client still sends. Closing a socket with
    /// unread data sends a TCP reset, and a client that is still uploading then loses the
    /// answer it was just given (a 429 before the body was read, say). Zero: close at once.
    linger: Duration,
    /// Counted as open until the stream is closed, lingering included.
    _open: Option<OpenGuard>,
}

impl Watched {
    fn moved(&self, n: usize) {
        if n > 0 {
            self.activity.bytes.fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    fn stream(&mut self) -> Pin<&mut TcpStream> {
        Pin::new(
            self.stream
                .as_mut()
                .expect("the stream is only taken on drop"),
        )
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        // hyper closes a connection whose request body it did not read to its end (an early
        // answer): keep reading for a while so that the answer reaches the client.
        if !self.framing.mid_body() || self.linger.is_zero() {
            return;
        }
        if let (Some(stream), Ok(runtime)) =
            (self.stream.take(), tokio::runtime::Handle::try_current())
        {
            runtime.spawn(linger(stream, self.linger, self._open.take()));
        }
    }
}

/// Send FIN (if hyper did not), then discard what the client sends until it closes too or
/// `how_long` passed.
async fn linger(mut stream: TcpStream, how_long: Duration, _open: Option<OpenGuard>) {
    let _ = stream.shutdown().await;
    let mut sink = vec![0u8; 16 * 1024];
    let _ = tokio::time::timeout(how_long, async {
        while let Ok(1..) = stream.read(&mut sink).await {}
    })
    .await;
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = this.stream().poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = result {
            let read = &buf.filled()[before..];
            this.moved(read.len());
            if this.framing.conflicting().is_none() {
                this.framing.feed(read);
                if let Some(position) = this.framing.conflicting() {
                    this.activity.conflicting.store(position, Ordering::Release);
                }
            }
        }
        result
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = this.stream().poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = result {
            this.moved(n);
        }
        result
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = this.stream().poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = result {
            this.moved(n);
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.stream
            .as_ref()
            .is_some_and(TcpStream::is_write_vectored)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().stream().poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().stream().poll_shutdown(cx)
    }
}
