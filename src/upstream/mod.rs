//! The connection side of the request path: how sluice reaches an endpoint. The connector
//! (TCP or TLS, with the connect timeout), ready HTTP/1.1 connections and each endpoint's idle
//! pool, and the request body on its way upstream. It knows nothing of services, limits or
//! slots: the proxy says which endpoint, by its idle pool and base URI.

pub mod body;
pub mod connections;
pub mod connector;

pub use body::{BodyWatch, UpstreamBody};
pub use connections::{ConnectError, Connection, IdleConnections, SendError, Upstream};
pub use connector::Connect;

/// An error with its causes, for logs ("client error (Connect): tcp connect error: ...").
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
