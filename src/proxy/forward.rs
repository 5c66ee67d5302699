//! Phase 4, forward: a connection to the slot's endpoint (refused → once elsewhere), the
//! request, the response head. What the endpoint answers is judged here:
//!
//! - an **overload answer** (a status in `[service.overload] status`, by default 429 and 503:
//!   the endpoint did not process the request) cools the endpoint down for its `Retry-After`
//!   and, when the body could be held whole (known in advance to be at most `retry_buffer`),
//!   retries the request on another endpoint with a free slot, at most `retries` times and
//!   within the service's retry budget. When no other endpoint can take it, sluice answers
//!   `503 endpoints_overloaded` with a `Retry-After` for when the first endpoint takes traffic
//!   again; when retrying is not allowed, the endpoint's answer goes to the client as is;
//! - a **failure** (another 5xx, no answer within `timeouts.response`, a broken exchange)
//!   counts towards the endpoint's ejection (`[service.outlier]`);
//! - any other answer says the endpoint is fine: one that was probed after a hold is back.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use chrono::Utc;
use http::{request, HeaderMap, Request, Response};
use hyper::body::Incoming;
use tokio::time::Instant;

use super::body::{ResponseBody, Reuse};
use super::outcome::Outcome;
use super::reject::Rejection;
use super::{headers, Proxy};
use crate::autoscale::{Event, EventKind, ScaleTarget};
use crate::balance::{Endpoint, HoldKind, Slot, Verdict};
use crate::policy::{Policy, Service};
use crate::reason::Reason;
use crate::upstream::body::{self as upload, ReadError, UpstreamBody};
use crate::upstream::{error_chain, Connection, SendError};

impl Proxy {
    /// Phase 4, forward: the request to the slot's endpoint, and to others as the module
    /// says. `body` is taken once the request is on its way (or held whole first).
    pub(super) async fn forward(
        &self,
        policy: &Policy,
        service: &Service,
        mut slot: Slot,
        mut head: request::Parts,
        body: &mut Option<Incoming>,
        outcome: &mut Outcome<'_>,
    ) -> Response<ResponseBody> {
        headers::to_upstream(&mut head, outcome.client.ip());
        let (overload, alone) = {
            let shape = service.pool.shape();
            (shape.overload, shape.endpoints.len() < 2)
        };
        service.pool.retry_budget.request();
        // A body known to be small is held whole, so that it can be sent again.
        let replayable = overload.retries > 0
            && body.as_ref().is_some_and(|b| {
                http_body::Body::size_hint(b)
                    .exact()
                    .is_some_and(|n| n <= overload.retry_buffer)
            });
        let held = match replayable {
            false => None,
            true => {
                let whole = body.take().expect("the body is there until forwarded");
                match upload::read_whole(whole, policy.timeouts.client_body).await {
                    Ok(bytes) => Some(bytes),
                    Err(ReadError::Broke) => {
                        return outcome.reject(Reason::ClientBodyError, Some(service))
                    }
                    Err(ReadError::Stalled) => {
                        return outcome.reject(Reason::ClientBodyTimeout, Some(service))
                    }
                }
            }
        };
        let mut retries_left = if held.is_some() { overload.retries } else { 0 };
        loop {
            // A connection first, the request only then: a refused connect leaves the request
            // untouched, so it can go to another endpoint with a free slot (once).
            let Some(connection) = self.connect_or_elsewhere(service, &mut slot, outcome).await
            else {
                return outcome.reject(Reason::UpstreamUnreachable, Some(service));
            };
            let endpoint = Arc::clone(slot.endpoint());
            outcome.endpoint = Some(Arc::clone(&endpoint));
            let (upstream_body, watch) = match &held {
                Some(bytes) => upload::held(
                    bytes.clone(),
                    connection.abort_handle(),
                    policy.timeouts.client_body,
                ),
                None => {
                    let streamed = body.take().expect("a streamed body is sent once, here");
                    let cut = connection.abort_handle();
                    upload::track(streamed, cut, policy.timeouts.client_body)
                }
            };
            outcome.upload = Some(watch.clone());
            // A copy of the headers is kept only while another attempt may follow, on another
            // endpoint (a service with one has none to retry on). The original goes upstream:
            // hyper reads the answer's head into its room, which then has space for ours.
            let headers = match retries_left == 0 || alone {
                true => std::mem::take(&mut head.headers),
                false => {
                    let copy = head.headers.clone();
                    std::mem::replace(&mut head.headers, copy)
                }
            };
            let Ok(request) = upstream_request(&head, headers, &endpoint, upstream_body) else {
                return outcome.reject(Reason::UpstreamError, Some(service));
            };
            let started = Instant::now();
            // `timeouts.response` bounds the wait for response headers once the endpoint has
            // the whole request (or has stopped reading it), not a client's slow upload.
            let response_deadline = watch.idle_for(policy.timeouts.response);
            let exchange = tokio::select! {
                result = self.upstream.send(endpoint.base_uri(), connection, request) => result,
                () = response_deadline => {
                    learned(service, &endpoint, slot.learn_overload(started));
                    self.failed(service, &endpoint, "no answer within timeouts.response");
                    return outcome.reject(Reason::UpstreamTimeout, Some(service));
                }
            };
            let (response, connection) = match exchange {
                Ok(answer) => answer,
                Err(SendError::Connect(e)) => {
                    endpoint.mark_unreachable();
                    tracing::warn!(endpoint = endpoint.url(), error = %e, "endpoint unreachable");
                    return outcome.reject(Reason::UpstreamUnreachable, Some(service));
                }
                Err(SendError::Exchange(_)) if watch.client_stalled() => {
                    // The client stopped sending its body (the endpoint's connection was cut).
                    return outcome.reject(Reason::ClientBodyTimeout, Some(service));
                }
                Err(SendError::Exchange(_)) if watch.client_broke() => {
                    // The client's fault, not the endpoint's (whose connection was cut).
                    return outcome.reject(Reason::ClientBodyError, Some(service));
                }
                Err(SendError::Exchange(e)) => {
                    let why = error_chain(&e);
                    tracing::warn!(endpoint = endpoint.url(), error = %why, "upstream error");
                    self.failed(service, &endpoint, &why);
                    return outcome.reject(Reason::UpstreamError, Some(service));
                }
            };
            endpoint.mark_reachable();
            if headers::has_ambiguous_framing(response.headers()) {
                // Its connection is dropped with it: the bytes after this head cannot be
                // framed with certainty, so it is never used again.
                tracing::warn!(
                    endpoint = endpoint.url(),
                    "endpoint answered with both Content-Length and Transfer-Encoding, or a \
                     transfer coding other than chunked: 502"
                );
                self.failed(service, &endpoint, "ambiguous framing");
                return outcome.reject(Reason::UpstreamError, Some(service));
            }
            let status = response.status().as_u16();
            let latency = started.elapsed();
            endpoint.stats.duration.observe(latency);
            let full = overload.statuses.contains(status);
            if full {
                let said = retry_after(response.headers());
                let verdict = endpoint.overloaded(&overload, said);
                self.note(service, &endpoint, verdict, &format!("answered {status}"));
                learned(service, &endpoint, slot.learn_overload(started));
                if retries_left > 0 {
                    // Another endpoint with a free slot, if the budget allows one more attempt.
                    // (One that joined since the request came has no copy of its headers.)
                    let Some(other) = service.pool.try_acquire_other(&endpoint).filter(|_| !alone)
                    else {
                        return self.overloaded(service, outcome);
                    };
                    if service.pool.retry_budget.allow_retry() {
                        retries_left -= 1;
                        slot = other;
                        continue;
                    }
                }
                // Retrying is not allowed: the endpoint's answer as is.
            } else if status >= 500 {
                self.failed(service, &endpoint, &format!("answered {status}"));
            } else {
                endpoint.answered();
            }
            // What capacity and autoscaling learn latency from: answers the endpoint worked
            // on, not the quick "I am full" ones.
            if !full {
                endpoint.latency.record(latency);
                learned(service, &endpoint, slot.learn_answer(started, latency));
                if let Some(autoscale) = &service.autoscale {
                    autoscale.record_latency(&service.pool, &endpoint, latency);
                }
            }
            let (mut head, body) = response.into_parts();
            headers::to_client(&mut head);
            let reuse = Reuse::new(connection, Arc::clone(&endpoint));
            return Response::from_parts(head, ResponseBody::upstream(body, slot, reuse));
        }
    }

    /// A ready connection to the slot's endpoint; if it refuses, one to another endpoint with
    /// a free slot (once, within the retry budget), which then becomes the slot.
    async fn connect_or_elsewhere(
        &self,
        service: &Service,
        slot: &mut Slot,
        outcome: &mut Outcome<'_>,
    ) -> Option<Connection> {
        if let Some(connection) = self.connect(slot, outcome).await {
            return Some(connection);
        }
        let other = service.pool.try_acquire_other(slot.endpoint())?;
        if !service.pool.retry_budget.allow_retry() {
            return None;
        }
        *slot = other;
        self.connect(slot, outcome).await
    }

    /// A ready connection to the slot's endpoint; on failure the endpoint goes into its
    /// back-off.
    async fn connect(&self, slot: &Slot, outcome: &mut Outcome<'_>) -> Option<Connection> {
        let endpoint = slot.endpoint();
        outcome.endpoint = Some(Arc::clone(endpoint));
        match self
            .upstream
            .connection(&endpoint.idle, endpoint.base_uri())
            .await
        {
            Ok(connection) => Some(connection),
            Err(e) => {
                endpoint.mark_unreachable();
                tracing::warn!(endpoint = endpoint.url(), error = %e, "endpoint unreachable");
                None
            }
        }
    }

    /// No other endpoint could take a request its endpoint said it is too full for:
    /// `503 endpoints_overloaded`, back when the first endpoint takes traffic again (1 s when
    /// some are merely busy).
    pub(super) fn overloaded(
        &self,
        service: &Service,
        outcome: &mut Outcome<'_>,
    ) -> Response<ResponseBody> {
        let wait = service
            .pool
            .shape()
            .all_held_for()
            .unwrap_or(Duration::from_secs(1));
        outcome.reason = Some(Reason::EndpointsOverloaded);
        Rejection::new(Reason::EndpointsOverloaded, Some(&service.name))
            .retry_after(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX))
            .into_response()
    }

    /// `endpoint` failed: ejected after enough in a row, while the service's share of ejected
    /// endpoints allows it.
    fn failed(&self, service: &Service, endpoint: &Arc<Endpoint>, why: &str) {
        let shape = service.pool.shape();
        let may_eject = shape.ejected() < shape.overload.max_ejected(shape.endpoints.len());
        let verdict = endpoint.failed(&shape.overload, may_eject);
        self.note(service, endpoint, verdict, why);
    }

    /// An endpoint held out of traffic is an event and a log line.
    fn note(&self, service: &Service, endpoint: &Arc<Endpoint>, verdict: Verdict, why: &str) {
        let Verdict::Held(kind, length) = verdict else {
            return;
        };
        let (kind, what) = match kind {
            HoldKind::Cooldown => (EventKind::EndpointCooledDown, "cooled down"),
            HoldKind::Ejected => (EventKind::EndpointEjected, "ejected"),
        };
        let shape = service.pool.shape();
        let cap = (0..shape.endpoints.len())
            .find(|&i| Arc::ptr_eq(&shape.endpoints[i].0, endpoint))
            .map_or(0, |i| shape.cap(i));
        let reason = format!(
            "{} {why}: {what} for {:?}, then probed with one request",
            endpoint.url(),
            length
        );
        let target = ScaleTarget::Endpoint {
            endpoint: endpoint.url().to_owned(),
        };
        let event = Event::change(Utc::now(), &*service.name, target, kind, (cap, 0), reason);
        self.live.record(event);
        // When the hold ends the endpoint can take its probe: requests waiting in the queue
        // are not left waiting for a slot to be released elsewhere (there may be none).
        let pool = Arc::clone(&service.pool);
        tokio::spawn(async move {
            tokio::time::sleep(length).await;
            pool.wake();
        });
    }
}

/// A learned cap that moved is a debug line (often: every round trip or so while it
/// settles); `sluice_endpoint_max_concurrent` shows it, `sluice_endpoint_cap_changes_total`
/// counts the moves.
fn learned(service: &Service, endpoint: &Endpoint, change: Option<(u32, u32)>) {
    if let Some((from, to)) = change {
        tracing::debug!(service = %service.name, endpoint = endpoint.url(), from, to, "learned cap moved");
    }
}

/// What `Retry-After` says (RFC 9110 §10.2.3: seconds, or an HTTP-date); `None` when absent
/// or not one of those.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// The request for `endpoint`: the client's (already cleaned) head and `headers`, addressed
/// to it.
fn upstream_request(
    head: &request::Parts,
    headers: HeaderMap,
    endpoint: &Endpoint,
    body: UpstreamBody,
) -> Result<Request<UpstreamBody>, http::Error> {
    let uri = endpoint.upstream_target(head.uri.path_and_query())?;
    let mut request = Request::new(body);
    *request.method_mut() = head.method.clone();
    *request.uri_mut() = uri;
    *request.version_mut() = http::Version::HTTP_11;
    *request.headers_mut() = headers;
    request
        .headers_mut()
        .insert(http::header::HOST, endpoint.host_header().clone());
    Ok(request)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_seconds_or_a_date_and_nothing_else() {
        let of = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(http::header::RETRY_AFTER, v.parse().unwrap());
            retry_after(&h)
        };
        assert_eq!(of("10"), Some(Duration::from_secs(10)));
        assert_eq!(of(" 3 "), Some(Duration::from_secs(3)));
        assert_eq!(of("Wed, 21 Oct 2015 07:28:00 GMT"), Some(Duration::ZERO));
        let soon = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(30));
        let parsed = of(&soon).unwrap();
        assert!(parsed > Duration::from_secs(28) && parsed <= Duration::from_secs(30));
        assert_eq!(of("soon"), None);
        assert_eq!(of("-1"), None);
        assert_eq!(retry_after(&HeaderMap::new()), None);
    }
}
