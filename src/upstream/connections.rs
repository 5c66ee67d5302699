//! Connections to endpoints: HTTP/1.1 over TCP or TLS, kept alive in a small pool per
//! endpoint. A request is only handed over once a connection is ready, so a refused connect
//! never consumes it (it can go to another endpoint as it is), and a pooled connection that
//! turns out closed gives the request back (it is sent on a fresh one).
//!
//! Why not hyper-util's pooled client: it takes the request before connecting, which forced a
//! copy of every request head for the retry, and its pool bookkeeping was the largest single
//! cost in the request path's profile (BENCHMARKS.md).

use std::sync::Mutex;
use std::time::Duration;

use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tower::Service;

use super::body::UpstreamBody;
use super::error_chain;

/// Idle connections kept past this are closed rather than reused (endpoints commonly close
/// theirs after 60–75 s; reusing one at that moment races with its close).
const IDLE_FOR_AT_MOST: Duration = Duration::from_secs(50);
/// Idle connections kept per endpoint at most (in flight are bounded by the cap anyway).
const IDLE_AT_MOST: usize = 256;

/// A ready HTTP/1.1 connection to one endpoint.
pub struct Connection {
    sender: SendRequest<UpstreamBody>,
    /// The task driving the connection: aborting it drops the TCP connection at once.
    task: AbortHandle,
}

impl Connection {
    /// A handle that cuts the connection (used when the client's body breaks, so the
    /// endpoint never sees a truncated request as a complete one).
    pub fn abort_handle(&self) -> AbortHandle {
        self.task.clone()
    }
}

/// The idle connections of one endpoint.
#[derive(Default)]
pub struct IdleConnections(Mutex<Vec<(Connection, Instant)>>);

impl std::fmt::Debug for IdleConnections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IdleConnections({})", self.lock().len())
    }
}

impl IdleConnections {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(Connection, Instant)>> {
        // Pushing and popping senders cannot leave the list inconsistent.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The most recently used idle connection that is still open.
    fn take(&self) -> Option<Connection> {
        let mut idle = self.lock();
        while let Some((connection, since)) = idle.pop() {
            if !connection.sender.is_closed() && since.elapsed() < IDLE_FOR_AT_MOST {
                return Some(connection);
            }
        }
        None
    }

    /// Keep a connection whose exchange ended cleanly.
    pub fn put(&self, connection: Connection) {
        if connection.sender.is_closed() {
            return;
        }
        let mut idle = self.lock();
        if idle.len() < IDLE_AT_MOST {
            idle.push((connection, Instant::now()));
        }
    }
}

/// Why no connection could be made.
#[derive(Debug, thiserror::Error)]
#[error("cannot connect: {0}")]
pub struct ConnectError(String);

/// Why an exchange failed after the request was handed over.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No fresh connection for the retry.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The endpoint broke the exchange.
    #[error("{0}")]
    Exchange(hyper::Error),
}

/// Makes and reuses connections to endpoints.
#[derive(Clone)]
pub struct Upstream {
    connector: HttpsConnector<HttpConnector>,
}

impl Upstream {
    /// Connections made by `connector` (which carries the connect timeout).
    pub fn new(connector: HttpsConnector<HttpConnector>) -> Self {
        Self { connector }
    }

    /// A ready connection to the endpoint at `base_uri`: one of its `idle` ones if any, else a
    /// new one.
    pub async fn connection(
        &self,
        idle: &IdleConnections,
        base_uri: &Uri,
    ) -> Result<Connection, ConnectError> {
        while let Some(mut connection) = idle.take() {
            // Idle connections are ready at once unless they just closed.
            if connection.sender.ready().await.is_ok() {
                return Ok(connection);
            }
        }
        self.connect(base_uri).await
    }

    async fn connect(&self, base_uri: &Uri) -> Result<Connection, ConnectError> {
        let uri: Uri = base_uri.clone();
        let io = self
            .connector
            .clone()
            .call(uri)
            .await
            .map_err(|e| ConnectError(error_chain(&*e)))?;
        let (sender, connection) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|e| ConnectError(error_chain(&e)))?;
        let task = tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "endpoint connection ended with an error");
            }
        })
        .abort_handle();
        Ok(Connection { sender, task })
    }

    /// Send `request` on `connection`. If the connection closed before the request went out
    /// (a pooled connection the endpoint had just dropped), send it on a fresh one instead.
    pub async fn send(
        &self,
        base_uri: &Uri,
        mut connection: Connection,
        request: Request<UpstreamBody>,
    ) -> Result<(Response<Incoming>, Connection), SendError> {
        match connection.sender.try_send_request(request).await {
            Ok(response) => Ok((response, connection)),
            Err(mut failed) => match failed.take_message() {
                Some(request) => {
                    let mut fresh = self.connect(base_uri).await?;
                    let response = fresh
                        .sender
                        .send_request(request)
                        .await
                        .map_err(SendError::Exchange)?;
                    Ok((response, fresh))
                }
                None => Err(SendError::Exchange(failed.into_error())),
            },
        }
    }
}
