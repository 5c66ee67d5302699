//! `sluice healthcheck`: ask `/readyz` on the admin listener the config names, as Traefik's
//! `traefik healthcheck` does, so a container image without curl can have a HEALTHCHECK.
//! Ready (200, `ready` or `degraded`) or not, with the reason; bounded by a timeout, so a
//! sluice that accepts but never answers is "not ready", never a hung check.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, StatusCode};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::config::Config;

/// The most of a `/readyz` body read (it is a one-line JSON object).
const MAX_BODY: usize = 16 * 1024;

/// Why sluice is not ready, as the check saw it.
#[derive(Debug, thiserror::Error)]
pub enum NotReady {
    /// The config disables the admin listener.
    #[error("the admin listener is disabled ([listen] admin = \"\"): no /readyz to ask")]
    NoAdmin,
    /// `[listen] admin` is not an address (the config was not validated).
    #[error("[listen] admin = {0:?} is not IP:PORT")]
    BadAddress(String),
    /// Nothing accepted the connection.
    #[error("cannot connect to the admin listener at {addr}: {source}")]
    Connect {
        /// Where the check connected.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The connection broke, or the answer was not HTTP.
    #[error("no HTTP answer from {addr}/readyz: {why}")]
    Http {
        /// Where the check connected.
        addr: SocketAddr,
        /// What went wrong.
        why: String,
    },
    /// `/readyz` answered something other than 200.
    #[error("{addr}/readyz answered {status}: {reason}")]
    Status {
        /// Where the check connected.
        addr: SocketAddr,
        /// The status.
        status: StatusCode,
        /// The `reason` sluice gave, or the body.
        reason: String,
    },
    /// No complete answer in time.
    #[error("no answer from {addr}/readyz within {}", humantime::format_duration(*.after))]
    Timeout {
        /// Where the check connected.
        addr: SocketAddr,
        /// The timeout.
        after: Duration,
    },
}

/// Where to ask: the configured admin address, with an unspecified IP (`0.0.0.0`, `[::]`)
/// replaced by 127.0.0.1, where a listener on "every address" answers too: `[::]` is bound
/// dual-stack, or falls back to 0.0.0.0 on a host without IPv6, where `::1` would not answer.
pub fn admin_target(config: &Config) -> Result<SocketAddr, NotReady> {
    let admin = config.listen.admin.as_str();
    if admin.is_empty() {
        return Err(NotReady::NoAdmin);
    }
    let mut addr: SocketAddr = admin
        .parse()
        .map_err(|_| NotReady::BadAddress(admin.to_owned()))?;
    if addr.ip().is_unspecified() {
        addr.set_ip(Ipv4Addr::LOCALHOST.into());
    }
    Ok(addr)
}

/// Ask `/readyz` at `addr`; `Ok` holds what it said (`ready`, or `degraded: <reason>`).
pub async fn check(addr: SocketAddr, timeout: Duration) -> Result<String, NotReady> {
    tokio::time::timeout(timeout, ask(addr))
        .await
        .unwrap_or(Err(NotReady::Timeout {
            addr,
            after: timeout,
        }))
}

async fn ask(addr: SocketAddr) -> Result<String, NotReady> {
    let http = |why: String| NotReady::Http { addr, why };
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|source| NotReady::Connect { addr, source })?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| http(e.to_string()))?;
    let connection = tokio::spawn(connection);
    let request = Request::get("/readyz")
        .header(header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())
        .map_err(|e| http(e.to_string()))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| http(e.to_string()))?;
    let status = response.status();
    let body = Limited::new(response.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| http(e.to_string()))?
        .to_bytes();
    connection.abort();
    let json: Option<serde_json::Value> = serde_json::from_slice(&body).ok();
    let field = |name: &str| {
        json.as_ref()
            .and_then(|j| j[name].as_str())
            .map(str::to_owned)
    };
    if status != StatusCode::OK {
        let reason = field("reason").unwrap_or_else(|| String::from_utf8_lossy(&body).into());
        return Err(NotReady::Status {
            addr,
            status,
            reason,
        });
    }
    Ok(match (field("status"), field("reason")) {
        (Some(status), Some(reason)) => format!("{status}: {reason}"),
        (Some(status), None) => status,
        _ => "ready".into(),
    })
}
