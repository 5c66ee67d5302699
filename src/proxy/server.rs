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

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;

use super::{connection, Proxy};
use crate::config::{Limits, HYPER_DEFAULT_MAX_HEADERS};

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
        tokio::spawn(connection::serve(
            stream,
            peer,
            Arc::clone(&proxy),
            settings.serving(),
            open_guard,
            stop.subscribe(),
        ));
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

/// The connection builders for the limits in force, rebuilt when a reload changes them.
struct Settings {
    client_header: Duration,
    limits: Limits,
    max_connections: usize,
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
}

impl Settings {
    fn from_proxy(proxy: &Proxy) -> Self {
        let policy = proxy.policy();
        Self::new(policy.timeouts.client_header, &policy.config.limits)
    }

    fn new(client_header: Duration, limits: &Limits) -> Self {
        // hyper's HTTP/1 buffer bound is the head bound: a head that does not fit gets 431.
        let head_bytes = usize::try_from(limits.max_header_bytes).unwrap_or(usize::MAX);
        let mut http1 = http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            // Also bounds the wait for the next request on a keep-alive connection hyper
            // keeps (a parked one waits as long: see connection.rs).
            .header_read_timeout(client_header)
            .keep_alive(true)
            .max_buf_size(head_bytes);
        if limits.max_headers != HYPER_DEFAULT_MAX_HEADERS {
            // Any value but hyper's default moves the header array to the heap: only pay for
            // it when asked to.
            http1.max_headers(limits.max_headers as usize);
        }
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2
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
            http1,
            http2,
        }
    }

    /// How a connection accepted now is served.
    fn serving(&self) -> connection::Serving {
        connection::Serving {
            http1: self.http1.clone(),
            http2: self.http2.clone(),
            client_header: self.client_header,
            idle_timeout: self.limits.idle_timeout,
            linger: self.limits.lingering_close,
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
pub(super) struct OpenGuard(Arc<AtomicUsize>);

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
