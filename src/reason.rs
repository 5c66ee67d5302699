//! Why sluice answers a request itself instead of an endpoint: each reason with its status
//! code and the names its JSON body and logs use, and the `Retry-After` rounding. Shared by
//! the request path, the limits and the metrics.

use http::StatusCode;
use serde::Serialize;

/// Why sluice answered instead of an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// No service's path prefix matches the request path.
    NoRoute,
    /// The request carries no key and the service requires one.
    MissingKey,
    /// The key matches no resource and the service rejects unknown keys.
    UnknownKey,
    /// The caller's resource is over its TPS limit.
    RateLimited,
    /// Every endpoint with room is full and the queue is full or disabled.
    EndpointsFull,
    /// The request waited `queue_timeout` for a slot.
    QueueTimeout,
    /// The service has no endpoint at all (scaled to zero, or none added yet), and none came
    /// while the request waited in the queue (if it has one).
    NoEndpoints,
    /// No endpoint accepted the connection.
    UpstreamUnreachable,
    /// The endpoint sent no response headers within `timeouts.response`.
    UpstreamTimeout,
    /// The endpoint broke the exchange (reset, invalid response).
    UpstreamError,
    /// The shared store is unreachable and `store.on_error = "deny"`.
    StoreUnavailable,
    /// The client's request body broke (malformed chunked framing, or the connection lost
    /// mid-body): the endpoint's connection was cut, so it never took it for a whole request.
    ClientBodyError,
    /// The request head carried both `Content-Length` and `Transfer-Encoding` (a
    /// request-smuggling shape): refused before routing, the connection closed.
    ConflictingFraming,
    /// No byte of the request body came for `timeouts.client_body`: the endpoint's connection
    /// was cut, so it never took the part it got for a whole request.
    ClientBodyTimeout,
    /// An HTTP/1.1 request without `Host`, with more than one, or with a value that is not a
    /// valid `host[:port]` (RFC 9112 §3.2): refused before routing, never forwarded.
    InvalidHost,
    /// A `Transfer-Encoding` other than `chunked` alone (`gzip, chunked`, `chunked, chunked`):
    /// a coding sluice does not implement (RFC 9112 §6.1, as nginx answers it).
    UnsupportedTransferCoding,
    /// The client closed its connection (or reset its stream) before sluice answered; never
    /// sent, logged and counted as nginx's 499.
    ClientGone,
    /// The endpoint answered that it is full (an overload status) and no other endpoint could
    /// take the request; `Retry-After` says when the first will take traffic again.
    EndpointsOverloaded,
}

impl Reason {
    /// Every reason, in declaration order.
    pub const ALL: [Reason; 18] = [
        Self::NoRoute,
        Self::MissingKey,
        Self::UnknownKey,
        Self::RateLimited,
        Self::EndpointsFull,
        Self::QueueTimeout,
        Self::NoEndpoints,
        Self::UpstreamUnreachable,
        Self::UpstreamTimeout,
        Self::UpstreamError,
        Self::StoreUnavailable,
        Self::ClientBodyError,
        Self::ConflictingFraming,
        Self::ClientBodyTimeout,
        Self::InvalidHost,
        Self::UnsupportedTransferCoding,
        Self::ClientGone,
        Self::EndpointsOverloaded,
    ];

    /// Position in [`Reason::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The reason as it appears in bodies and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoRoute => "no_route",
            Self::MissingKey => "missing_key",
            Self::UnknownKey => "unknown_key",
            Self::RateLimited => "rate_limited",
            Self::EndpointsFull => "endpoints_full",
            Self::QueueTimeout => "queue_timeout",
            Self::NoEndpoints => "no_endpoints",
            Self::UpstreamUnreachable => "upstream_unreachable",
            Self::UpstreamTimeout => "upstream_timeout",
            Self::UpstreamError => "upstream_error",
            Self::StoreUnavailable => "store_unavailable",
            Self::ClientBodyError => "client_body_error",
            Self::ConflictingFraming => "conflicting_framing",
            Self::ClientBodyTimeout => "client_body_timeout",
            Self::InvalidHost => "invalid_host",
            Self::UnsupportedTransferCoding => "unsupported_transfer_coding",
            Self::ClientGone => "client_gone",
            Self::EndpointsOverloaded => "endpoints_overloaded",
        }
    }

    /// The status code answered for this reason.
    pub fn status(self) -> StatusCode {
        match self {
            Self::NoRoute => StatusCode::NOT_FOUND,
            Self::MissingKey | Self::UnknownKey => StatusCode::UNAUTHORIZED,
            Self::RateLimited | Self::EndpointsFull | Self::QueueTimeout => {
                StatusCode::TOO_MANY_REQUESTS
            }
            Self::UpstreamUnreachable | Self::UpstreamError => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Self::StoreUnavailable | Self::NoEndpoints | Self::EndpointsOverloaded => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::ClientBodyError | Self::ConflictingFraming | Self::InvalidHost => {
                StatusCode::BAD_REQUEST
            }
            Self::ClientBodyTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::UnsupportedTransferCoding => StatusCode::NOT_IMPLEMENTED,
            // nginx's "client closed request": never sent, only logged and counted.
            Self::ClientGone => StatusCode::from_u16(499).expect("499 is a valid status code"),
        }
    }

    /// The `error` field of sluice's JSON answer: the status code's name.
    pub fn error(self) -> &'static str {
        if self == Self::ClientGone {
            return "client_closed_request";
        }
        match self.status() {
            StatusCode::NOT_FOUND => "not_found",
            StatusCode::UNAUTHORIZED => "unauthorized",
            StatusCode::TOO_MANY_REQUESTS => "too_many_requests",
            StatusCode::GATEWAY_TIMEOUT => "gateway_timeout",
            StatusCode::SERVICE_UNAVAILABLE => "service_unavailable",
            StatusCode::BAD_REQUEST => "bad_request",
            StatusCode::REQUEST_TIMEOUT => "request_timeout",
            StatusCode::NOT_IMPLEMENTED => "not_implemented",
            _ => "bad_gateway",
        }
    }
}

/// Whole seconds for `Retry-After`: rounded up so it never points earlier than `ms`, at least 1.
pub fn retry_after_secs(ms: u64) -> u64 {
    ms.div_ceil(1000).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_secs(0), 1);
        assert_eq!(retry_after_secs(1000), 1);
        assert_eq!(retry_after_secs(1001), 2);
    }
}
