//! The request path: route → slot → forward → stream the response back → release the slot.
//! Answers sluice gives itself are built in [`reject`].

pub mod body;
mod framing;
pub mod headers;
mod inbound;
pub mod reject;
mod server;

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::{request, Request, Response};
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::autoscale::{EventHistory, DEFAULT_HISTORY};
use crate::balance::{Endpoint, NoSlot, Slot};
use crate::limit::{Admission, Cell, KeyProblem, RateLimiter, Resource};
use crate::policy::{Policy, Service};
use crate::reason::Reason;
use crate::recorders::UnroutedStats;
use crate::store::Fleet;
use crate::upstream::body::{self as upload, BodyWatch, UpstreamBody};
use crate::upstream::{connector, error_chain, Connection, SendError, Upstream};
use body::{ResponseBody, Reuse};
use reject::Rejection;
pub use server::serve;

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
        let unread_body_closes =
            !http_body::Body::is_end_stream(req.body()) && req.version() <= http::Version::HTTP_11;
        let (mut head, body) = req.into_parts();
        let checked = inbound::check(&head);
        if let Some(target) = inbound::normalized(&head.uri) {
            head.uri = target;
        }
        // The access line needs the method and path after the request is gone; copy them only
        // when it will be written.
        let logged = tracing::enabled!(target: "sluice::access", tracing::Level::INFO)
            .then(|| (head.method.clone(), head.uri.path().to_owned()));
        // Dropped unfinished when the client leaves before the answer: then it counts and logs
        // the request as 499 `client_gone`.
        let mut outcome = Outcome::new(started, client, logged, &policy.unrouted);
        // Taken when the request is forwarded; still here when sluice answered on its own.
        let mut body = Some(body);
        let mut response = match checked {
            Err(reason) => outcome.reject(reason, None),
            Ok(()) => match policy.route(head.uri.path()) {
                None => outcome.reject(Reason::NoRoute, None),
                Some(service) => {
                    outcome.service = Some(service);
                    self.serve(&policy, service, head, &mut body, &mut outcome)
                        .await
                }
            },
        };
        if let Some(body) = body.filter(|_| !unread_body_closes) {
            // HTTP/2 (HTTP/1 closes the connection instead, above): see `upstream::body::drain`.
            upload::drain(body, policy.config.limits.lingering_close);
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
        outcome.finish(response.status().as_u16());
        response
    }

    /// Rate check (when the service has limits), then a slot, then forward. The rate check
    /// comes first, so a request refused for rate never takes a slot; a request that finds no
    /// slot gives its rate cell back, so it costs its caller nothing.
    async fn serve(
        &self,
        policy: &Policy,
        service: &Service,
        head: request::Parts,
        body: &mut Option<Incoming>,
        outcome: &mut Outcome<'_>,
    ) -> Response<ResponseBody> {
        let Some(limits) = &service.limits else {
            return match self.take_slot(service, outcome).await {
                Ok(slot) => {
                    self.forward(policy, service, slot, head, body, outcome)
                        .await
                }
                Err(refused) => refused,
            };
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
            Admission::Admitted {
                resource,
                mut status,
                cell,
            } => {
                outcome.note_resource(resource);
                // Until a slot is taken the cell is only lent: a 429 for capacity, or a client
                // that leaves while it waits in the queue, gives it back.
                let mut lent = LentCell {
                    limits,
                    resource,
                    cell: Some(cell),
                };
                let mut response = match self.take_slot(service, outcome).await {
                    Ok(slot) => {
                        lent.cell = None;
                        limits.confirm(resource, outcome.arrived);
                        self.forward(policy, service, slot, head, body, outcome)
                            .await
                    }
                    Err(refused) => {
                        if lent.give_back() {
                            status = status.with_cell_back();
                        }
                        refused
                    }
                };
                limits.insert_headers(response.headers_mut(), &status);
                if outcome.reason.is_none() && response.status().is_success() {
                    resource.counters.succeeded.add();
                }
                response
            }
        }
    }

    /// A slot on one of the service's endpoints (waiting in its queue if it has one), or the
    /// 429 that says none is free.
    async fn take_slot(
        &self,
        service: &Service,
        outcome: &mut Outcome<'_>,
    ) -> Result<Slot, Response<ResponseBody>> {
        service.pool.acquire().await.map_err(|refused| {
            let reason = match refused {
                NoSlot::EndpointsFull => Reason::EndpointsFull,
                NoSlot::QueueTimeout => Reason::QueueTimeout,
            };
            outcome.reject(reason, Some(service))
        })
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

    /// Forward the request to the slot's endpoint, retrying once elsewhere if the connection
    /// is refused. `body` is taken once the request is on its way.
    async fn forward(
        &self,
        policy: &Policy,
        service: &Service,
        mut slot: Slot,
        mut head: request::Parts,
        body: &mut Option<Incoming>,
        outcome: &mut Outcome<'_>,
    ) -> Response<ResponseBody> {
        headers::to_upstream(&mut head, outcome.client.ip());
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
            upload::track(body, connection.abort_handle(), policy.timeouts.client_body);
        outcome.upload = Some(watch.clone());
        let Ok(request) = upstream_request(head, &endpoint, body) else {
            return outcome.reject(Reason::UpstreamError, Some(service));
        };
        let started = Instant::now();
        // `timeouts.response` bounds the wait for response headers once the endpoint has the
        // whole request (or has stopped reading it), not a client's slow upload.
        let response_deadline = watch.idle_for(policy.timeouts.response);
        let exchange = tokio::select! {
            result = self.upstream.send(endpoint.base_uri(), connection, request) => result,
            () = response_deadline => return outcome.reject(Reason::UpstreamTimeout, Some(service)),
        };
        match exchange {
            Ok((response, _connection)) if headers::has_ambiguous_framing(response.headers()) => {
                // Its connection is dropped with it: the bytes after this head cannot be
                // framed with certainty, so it is never used again.
                endpoint.mark_reachable();
                tracing::warn!(
                    endpoint = endpoint.url(),
                    "endpoint answered with both Content-Length and Transfer-Encoding, or a \
                     transfer coding other than chunked: 502"
                );
                outcome.reject(Reason::UpstreamError, Some(service))
            }
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

/// A rate cell spent on a request that has no slot yet; given back when dropped unconfirmed.
struct LentCell<'a> {
    limits: &'a RateLimiter,
    resource: &'a Resource,
    /// `None` once the request took a slot (the cell is its for good).
    cell: Option<Cell>,
}

impl LentCell<'_> {
    /// Give the cell back now; true when one was spent.
    fn give_back(&mut self) -> bool {
        self.cell
            .take()
            .is_some_and(|cell| self.limits.give_back(self.resource, cell))
    }
}

impl Drop for LentCell<'_> {
    fn drop(&mut self) {
        self.give_back();
    }
}

/// One exchange as it goes: when it arrived, where it was routed, and what the access log
/// and the counters tell about it besides its status. Finished once with the answer's status;
/// dropped unfinished (the client left before the answer, so hyper dropped the request's
/// future), it finishes as nginx's 499 `client_gone`, so an abandoned request is still logged
/// and counted.
struct Outcome<'p> {
    arrived: Instant,
    client: SocketAddr,
    /// Method and path for the access line, when it will be written (else `resource` stays
    /// unset).
    logged: Option<(http::Method, String)>,
    service: Option<&'p Service>,
    /// Where an answer given before there was a service is counted.
    unrouted: &'p UnroutedStats,
    resource: Option<Arc<str>>,
    endpoint: Option<Arc<Endpoint>>,
    reason: Option<Reason>,
    /// The request body on its way to the endpoint, once forwarded.
    upload: Option<BodyWatch>,
    finished: bool,
}

impl<'p> Outcome<'p> {
    fn new(
        arrived: Instant,
        client: SocketAddr,
        logged: Option<(http::Method, String)>,
        unrouted: &'p UnroutedStats,
    ) -> Self {
        Self {
            arrived,
            client,
            logged,
            service: None,
            unrouted,
            resource: None,
            endpoint: None,
            reason: None,
            upload: None,
            finished: false,
        }
    }

    /// Remember whose limit the request counted against, for the access line. Only then: with
    /// many resources, the name's reference count is one more far memory write per request.
    fn note_resource(&mut self, resource: &Resource) {
        if self.logged.is_some() {
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

    /// Count the exchange and write its access line, once.
    fn finish(&mut self, status: u16) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        let elapsed = self.arrived.elapsed();
        if let Some(service) = self.service {
            service.stats.duration.observe(elapsed);
            match (self.reason, &self.endpoint) {
                (Some(reason), _) => service.stats.count_own(reason),
                (None, Some(endpoint)) => endpoint.stats.count_answer(status),
                (None, None) => {}
            }
        } else if let Some(reason) = self.reason {
            self.unrouted.count_own(reason);
        }
        let Some((method, path)) = &self.logged else {
            return;
        };
        tracing::info!(
            target: "sluice::access",
            method = %method,
            path = %path,
            service = self.service.map(|s| &*s.name),
            resource = self.resource.as_deref(),
            endpoint = self.endpoint.as_ref().map(|e| e.url()),
            status,
            latency_ms = elapsed.as_secs_f64() * 1000.0,
            reason = self.reason.map(Reason::as_str),
        );
    }
}

impl Drop for Outcome<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.reason = Some(Reason::ClientGone);
            self.finish(Reason::ClientGone.status().as_u16());
        }
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
