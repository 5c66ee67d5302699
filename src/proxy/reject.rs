//! Every answer sluice gives on its own behalf (400, 401, 404, 408, 429, 502, 503, 504) is built
//! here, with a JSON body that says why, so clients can tell a refusal from an endpoint's
//! answer.

use http::header::{self, HeaderValue};
use http::Response;
use serde::Serialize;

use super::body::ResponseBody;
use crate::reason::{retry_after_secs, Reason};

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
}
