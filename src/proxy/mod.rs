//! The request path: route → slot → forward → stream the response back → release the slot.
//! Answers sluice gives itself are built in [`reject`].

pub mod body;
pub mod connector;
mod framing;
pub mod headers;
pub mod reject;
mod server;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::{request, Request, Response};
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::autoscale::{EventHistory, DEFAULT_HISTORY};
use crate::balance::{Endpoint, NoSlot, Slot};
use crate::limit::{Admission, KeyProblem, Resource};
use crate::policy::{Policy, Service};
use crate::store::Fleet;
use body::{BodyWatch, ResponseBody, UpstreamBody};
use reject::{Reason, Rejection};
pub use server::serve;
use upstream::{Connection, Reuse, SendError, Upstream};

/// How long a client is asked to wait after a 429 for full endpoints.
const FULL_RETRY_AFTER_MS: u64 = 1000;

/// The proxy: the live policy and the upstream connection pools.
pub struct Proxy {
    policy: ArcSwap<Policy>,
    upstream: Upstream,
    events: Arc<EventHistory>,
    fleet: Option<Arc<Fleet>>,
}

impl Proxy {
    /// A proxy serving `policy`; `connect` bounds each upstream TCP connect (and says which
    /// roots TLS trusts: a bare timeout means the system's); `fleet` is the shared store the
    /// policy's limits use, if any.
    pub fn new(
        policy: Policy,
        connect: impl Into<connector::Connect>,
        fleet: Option<Arc<Fleet>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            policy: ArcSwap::from_pointee(policy),
            upstream: Upstream::new(connector::build(connect)),
            events: Arc::new(EventHistory::new(DEFAULT_HISTORY)),
            fleet,
        })
    }

    /// The shared store, when replicas share limits.
    pub fn fleet(&self) -> Option<&Arc<Fleet>> {
        self.fleet.as_ref()
    }

    /// The autoscale event history.
    pub fn events(&self) -> &Arc<EventHistory> {
        &self.events
    }

    /// The live policy.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy.load_full()
    }

    /// Replace the live policy; requests already admitted finish under the one they saw.
    pub fn set_policy(&self, policy: Policy) {
        self.policy.store(Arc::new(policy));
    }

    /// Serve one client request.
    pub async fn handle(
        &self,
        req: Request<Incoming>,
        client: SocketAddr,
    ) -> Response<ResponseBody> {
        let started = Instant::now();
        let policy = self.policy.load_full();
        // The access line needs the method and path after the request is gone; copy them only
        // when it will be written.
        let logged = tracing::enabled!(target: "sluice::access", tracing::Level::INFO)
            .then(|| (req.method().clone(), req.uri().path().to_owned()));
        let mut outcome = Outcome::new(started, logged.is_some());
        let unread_body_closes =
            !http_body::Body::is_end_stream(req.body()) && req.version() <= http::Version::HTTP_11;
        let service = policy.route(req.uri().path());
        let (head, body) = req.into_parts();
        // Taken when the request is forwarded; still here when sluice answered on its own.
        let mut body = Some(body);
        let mut response = match service {
            None => outcome.reject(Reason::NoRoute, None),
            Some(service) => {
                self.serve(&policy, service, head, &mut body, client, &mut outcome)
                    .await
            }
        };
        if let Some(body) = body.filter(|_| !unread_body_closes) {
            // HTTP/2 (HTTP/1 closes the connection instead, above): see `body::drain`.
            body::drain(body, policy.config.limits.lingering_close);
        }
        if unread_body_closes && !outcome.upload.as_ref().is_some_and(BodyWatch::finished) {
            // hyper closes an HTTP/1 connection whose request body was not read to its end,
            // after the answer; say so in it, or the client would send its next request on a
            // connection about to close (and lose it).
            response.headers_mut().insert(
                http::header::CONNECTION,
                http::HeaderValue::from_static("close"),
            );
        }
        let elapsed = started.elapsed();
        if let Some(service) = service {
            service.stats.duration.observe(elapsed);
            match (outcome.reason, &outcome.endpoint) {
                (Some(reason), _) => service.stats.count_own(reason),
                (None, Some(endpoint)) => endpoint.stats.count_answer(response.status().as_u16()),
                (None, None) => {}
            }
        }
        let Some((method, path)) = logged else {
            return response;
        };
        tracing::info!(
            target: "sluice::access",
            method = %method,
            path = %path,
            service = service.map(|s| &*s.name),
            resource = outcome.resource.as_deref(),
            endpoint = outcome.endpoint.as_ref().map(|e| e.url()),
            status = response.status().as_u16(),
            latency_ms = elapsed.as_secs_f64() * 1000.0,
            reason = outcome.reason.map(Reason::as_str),
        );
        response
    }

    /// Rate check (when the service has limits), then forward. The rate check comes first, so
    /// a request refused for rate never takes a slot.
    async fn serve(
        &self,
        policy: &Policy,
        service: &Service,
        head: request::Parts,
        body: &mut Option<Incoming>,
        client: SocketAddr,
        outcome: &mut Outcome,
    ) -> Response<ResponseBody> {
        let Some(limits) = &service.limits else {
            return self
                .forward(policy, service, head, body, client, outcome)
                .await;
        };
        let admission = match limits.check(&head.headers, outcome.arrived) {
            Admission::Ask { resource } => limits.ask(resource).await,
            decided => decided,
        };
        match admission {
            // `ask` never answers `Ask`; a store that cannot be asked is unavailable.
            Admission::Ask { resource } | Admission::Unavailable { resource } => {
                outcome.note_resource(resource);
                outcome.reject(Reason::StoreUnavailable, Some(service))
            }
            Admission::Refused(problem) => {
                let reason = match problem {
                    KeyProblem::Missing => Reason::MissingKey,
                    KeyProblem::Unknown => Reason::UnknownKey,
                };
                let mut response = outcome.reject(reason, Some(service));
                // RFC 9110 §11.6.1: a 401 names how to authenticate.
                response
                    .headers_mut()
                    .insert(http::header::WWW_AUTHENTICATE, limits.challenge());
                response
            }
            Admission::Limited {
                resource,
                status,
                retry_after_ms,
            } => {
                outcome.note_resource(resource);
                outcome.reason = Some(Reason::RateLimited);
                let mut response = Rejection::new(Reason::RateLimited, Some(&service.name))
                    .resource(&resource.name, status.quota.tps.get())
                    .retry_after(retry_after_ms)
                    .into_response();
                limits.insert_headers(response.headers_mut(), &status);
                response
            }
            Admission::Admitted { resource, status } => {
                outcome.note_resource(resource);
                let mut response = self
                    .forward(policy, service, head, body, client, outcome)
                    .await;
                limits.insert_headers(response.headers_mut(), &status);
                if outcome.reason.is_none() && response.status().is_success() {
                    resource.counters.succeeded.add();
                }
                response
            }
        }
    }

    /// A ready connection to the slot's endpoint; on failure the endpoint goes into its
    /// back-off.
    async fn connect(&self, slot: &Slot, outcome: &mut Outcome) -> Option<Connection> {
        let endpoint = slot.endpoint();
        outcome.endpoint = Some(Arc::clone(endpoint));
        match self.upstream.connection(endpoint).await {
            Ok(connection) => Some(connection),
            Err(e) => {
                endpoint.mark_unreachable();
                tracing::warn!(endpoint = endpoint.url(), error = %e, "endpoint unreachable");
                None
            }
        }
    }

    /// Take a slot and forward the request to its endpoint, retrying once elsewhere if the
    /// connection is refused. `body` is taken once the request is on its way.
    async fn forward(
        &self,
        policy: &Policy,
        service: &Service,
        mut head: request::Parts,
        body: &mut Option<Incoming>,
        client: SocketAddr,
        outcome: &mut Outcome,
    ) -> Response<ResponseBody> {
        let mut slot = match service.pool.acquire().await {
            Ok(slot) => slot,
            Err(NoSlot::EndpointsFull) => {
                return outcome.reject(Reason::EndpointsFull, Some(service))
            }
            Err(NoSlot::QueueTimeout) => {
                return outcome.reject(Reason::QueueTimeout, Some(service))
            }
        };
        headers::to_upstream(&mut head, client.ip());
        // A connection first, the request only then: a refused connect leaves the request
        // untouched, so it can go to another endpoint with a free slot (once).
        let connection = match self.connect(&slot, outcome).await {
            Some(connection) => connection,
            None => {
                let Some(other) = service.pool.try_acquire_other(slot.endpoint()) else {
                    return outcome.reject(Reason::UpstreamUnreachable, Some(service));
                };
                slot = other;
                match self.connect(&slot, outcome).await {
                    Some(connection) => connection,
                    None => return outcome.reject(Reason::UpstreamUnreachable, Some(service)),
                }
            }
        };
        let endpoint = Arc::clone(slot.endpoint());
        outcome.endpoint = Some(Arc::clone(&endpoint));
        let body = body.take().expect("a request's body is taken once, here");
        let (body, watch) =
            body::track(body, connection.abort_handle(), policy.timeouts.client_body);
        outcome.upload = Some(watch.clone());
        let Ok(request) = upstream_request(head, &endpoint, body) else {
            return outcome.reject(Reason::UpstreamError, Some(service));
        };
        let started = Instant::now();
        // `timeouts.response` bounds the wait for response headers once the endpoint has the
        // whole request (or has stopped reading it), not a client's slow upload.
        let response_deadline = watch.idle_for(policy.timeouts.response);
        let exchange = tokio::select! {
            result = self.upstream.send(&endpoint, connection, request) => result,
            () = response_deadline => return outcome.reject(Reason::UpstreamTimeout, Some(service)),
        };
        match exchange {
            Ok((response, connection)) => {
                endpoint.mark_reachable();
                let latency = started.elapsed();
                endpoint.latency.record(latency);
                endpoint.stats.duration.observe(latency);
                if let Some(autoscale) = &service.autoscale {
                    autoscale.record_latency(&service.pool, &endpoint, latency);
                }
                let (mut head, body) = response.into_parts();
                headers::to_client(&mut head);
                let reuse = Reuse::new(connection, Arc::clone(&endpoint));
                Response::from_parts(head, ResponseBody::upstream(body, slot, reuse))
            }
            Err(SendError::Connect(e)) => {
                endpoint.mark_unreachable();
                tracing::warn!(endpoint = endpoint.url(), error = %e, "endpoint unreachable");
                outcome.reject(Reason::UpstreamUnreachable, Some(service))
            }
            Err(SendError::Exchange(_)) if watch.client_stalled() => {
                // The client stopped sending its body (the endpoint's connection was cut).
                outcome.reject(Reason::ClientBodyTimeout, Some(service))
            }
            Err(SendError::Exchange(_)) if watch.client_broke() => {
                // The client's fault, not the endpoint's (whose connection was cut).
                outcome.reject(Reason::ClientBodyError, Some(service))
            }
            Err(SendError::Exchange(e)) => {
                tracing::warn!(endpoint = endpoint.url(), error = %error_chain(&e), "upstream error");
                outcome.reject(Reason::UpstreamError, Some(service))
            }
        }
    }
}

/// One exchange as it goes: when it arrived, and what the access log tells about it besides
/// its status.
struct Outcome {
    arrived: Instant,
    /// Whether the access line will be written (else `resource` stays unset).
    logged: bool,
    resource: Option<Arc<str>>,
    endpoint: Option<Arc<Endpoint>>,
    reason: Option<Reason>,
    /// The request body on its way to the endpoint, once forwarded.
    upload: Option<BodyWatch>,
}

impl Outcome {
    fn new(arrived: Instant, logged: bool) -> Self {
        Self {
            arrived,
            logged,
            resource: None,
            endpoint: None,
            reason: None,
            upload: None,
        }
    }

    /// Remember whose limit the request counted against, for the access line. Only then: with
    /// many resources, the name's reference count is one more far memory write per request.
    fn note_resource(&mut self, resource: &Resource) {
        if self.logged {
            self.resource = Some(Arc::clone(&resource.name));
        }
    }

    /// Answer on sluice's behalf and remember why.
    fn reject(&mut self, reason: Reason, service: Option<&Service>) -> Response<ResponseBody> {
        self.reason = Some(reason);
        let rejection = Rejection::new(reason, service.map(|s| &*s.name));
        let rejection = match reason {
            Reason::EndpointsFull | Reason::QueueTimeout => {
                rejection.retry_after(FULL_RETRY_AFTER_MS)
            }
            _ => rejection,
        };
        rejection.into_response()
    }
}

/// The request for `endpoint`: the client's (already cleaned) head, addressed to it.
fn upstream_request(
    head: http::request::Parts,
    endpoint: &Endpoint,
    body: UpstreamBody,
) -> Result<Request<UpstreamBody>, http::Error> {
    let uri = endpoint.upstream_target(head.uri.path_and_query())?;
    let mut request = Request::new(body);
    *request.method_mut() = head.method;
    *request.uri_mut() = uri;
    *request.version_mut() = http::Version::HTTP_11;
    *request.headers_mut() = head.headers;
    request
        .headers_mut()
        .insert(http::header::HOST, endpoint.host_header().clone());
    Ok(request)
}

/// An error with its causes, for logs ("client error (Connect): tcp connect error: ...").
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
