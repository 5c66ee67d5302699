//! Every answer sluice gives on its own behalf (400, 401, 404, 408, 429, 502, 503, 504) is built
//! here, with a JSON body that says why, so clients can tell a refusal from an endpoint's
//! answer.

use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use serde::Serialize;

use super::body::ResponseBody;

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
}

impl Reason {
    /// Every reason, in declaration order.
    pub const ALL: [Reason; 16] = [
        Self::NoRoute,
        Self::MissingKey,
        Self::UnknownKey,
        Self::RateLimited,
        Self::EndpointsFull,
        Self::QueueTimeout,
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
            Self::StoreUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::ClientBodyError | Self::ConflictingFraming | Self::InvalidHost => {
                StatusCode::BAD_REQUEST
            }
            Self::ClientBodyTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::UnsupportedTransferCoding => StatusCode::NOT_IMPLEMENTED,
            // nginx's "client closed request": never sent, only logged and counted.
            Self::ClientGone => StatusCode::from_u16(499).expect("499 is a valid status code"),
        }
    }

    fn error(self) -> &'static str {
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

/// A refusal or failure, with the numbers its response needs.
#[derive(Debug, Clone, Serialize)]
pub struct Rejection<'a> {
    error: &'static str,
    /// Why.
    pub reason: Reason,
    /// The service the request was routed to, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<&'a str>,
    /// The caller's resource, for a rate refusal (only ever the caller's own).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource: Option<&'a str>,
    /// The caller's limit in force, for a rate refusal.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit_tps: Option<u32>,
    /// How long the client should wait before trying again (429 only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

impl<'a> Rejection<'a> {
    /// A rejection for `reason`, routed to `service` if known.
    pub fn new(reason: Reason, service: Option<&'a str>) -> Self {
        Self {
            error: reason.error(),
            reason,
            service,
            resource: None,
            limit_tps: None,
            retry_after_ms: None,
        }
    }

    /// Name the caller's resource and its limit (rate refusals).
    pub fn resource(mut self, name: &'a str, limit_tps: u32) -> Self {
        self.resource = Some(name);
        self.limit_tps = Some(limit_tps);
        self
    }

    /// Ask the client to come back after `ms` milliseconds.
    pub fn retry_after(mut self, ms: u64) -> Self {
        self.retry_after_ms = Some(ms);
        self
    }

    /// The response: status, `content-type: application/json`, `Retry-After` in whole seconds
    /// (rounded up, at least 1) when a retry time is known, and the JSON body.
    pub fn into_response(self) -> Response<ResponseBody> {
        let body = serde_json::to_vec(&self).unwrap_or_else(|_| b"{}".to_vec());
        let mut response = Response::new(ResponseBody::full(body));
        *response.status_mut() = self.reason.status();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(ms) = self.retry_after_ms {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs(ms)));
        }
        response
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
    fn body_and_headers() {
        let r = Rejection::new(Reason::EndpointsFull, Some("scoring"))
            .retry_after(1500)
            .into_response();
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()["retry-after"], "2");
        assert_eq!(r.headers()["content-type"], "application/json");
        let ResponseBody::Full(Some(body)) = r.into_body() else {
            panic!("full body expected")
        };
        assert_eq!(
            &body[..],
            br#"{"error":"too_many_requests","reason":"endpoints_full","service":"scoring","retry_after_ms":1500}"#
        );
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_secs(0), 1);
        assert_eq!(retry_after_secs(1000), 1);
        assert_eq!(retry_after_secs(1001), 2);
    }
}
