//! The request path: fixed phases over one per-request context, the `Outcome` (when the
//! request arrived, its service, resource and endpoint, why sluice answered itself):
//!
//! 1. **route** ([`Proxy::handle`]): what a request must be before it is routed (`inbound`),
//!    then the service whose path prefix matches;
//! 2. **admit rate** (`Proxy::admit_rate`): the caller's key against its resource's limit
//!    (`limit`: its own bucket, or its lease on the fleet's bucket); a refusal is the answer
//!    (401, 429 with `Retry-After`, 503) and takes no slot;
//! 3. **take a slot** (`Proxy::take_slot`): a slot at one of the service's endpoints
//!    (`balance`), waiting in its queue if it has one; none free is a 429, and the rate cell
//!    goes back, so it costs the caller nothing;
//! 4. **forward** (`Proxy::forward`, `forward.rs`): a connection (`upstream`; refused → once
//!    elsewhere), the request, the response head; an endpoint that answers it is full is
//!    cooled down and the request retried elsewhere when it can be; the response body streams
//!    back holding the slot;
//! 5. **finish** (`Outcome::finish`): counted and logged once — also when the client left
//!    before the answer (499).
//!
//! Answers sluice gives itself are built in [`reject`].

pub mod body;
mod connection;
mod forward;
mod framing;
pub mod headers;
mod inbound;
mod outcome;
pub mod reject;
mod server;
mod watched;

use std::net::SocketAddr;
use std::sync::Arc;

use http::{request, Request, Response};
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::balance::{NoSlot, Slot};
use crate::limit::{Admission, Cell, KeyProblem, RateLimiter, Resource, Status};
use crate::policy::{Live, Policy, Service};
use crate::reason::Reason;
use crate::store::Fleet;
use crate::upstream::body::{self as upload, BodyWatch};
use crate::upstream::{connector, Upstream};
use body::ResponseBody;
use outcome::Outcome;
use reject::Rejection;
pub use server::serve;

/// Largest HTTP/1 request body (known length) read and discarded when sluice answers without
/// forwarding it, rather than closing the connection.
const DISCARD_SMALL_BODY: u64 = 64 * 1024;

/// The proxy: the live state it reads and the connections it makes.
pub struct Proxy {
    live: Arc<Live>,
    upstream: Upstream,
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
        Self::serving(Live::new(policy, fleet), connect)
    }

    /// A proxy serving `live`, which the control plane changes.
    pub fn serving(live: Arc<Live>, connect: impl Into<connector::Connect>) -> Arc<Self> {
        Arc::new(Self {
            live,
            upstream: Upstream::new(connector::build(connect)),
        })
    }

    /// The live state it serves.
    pub fn live(&self) -> &Arc<Live> {
        &self.live
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<Policy> {
        self.live.policy()
    }

    /// Serve one client request.
    pub async fn handle(
        &self,
        req: Request<Incoming>,
        client: SocketAddr,
    ) -> Response<ResponseBody> {
        let started = Instant::now();
        let policy = self.live.policy();
        let http1_body =
            !http_body::Body::is_end_stream(req.body()) && req.version() <= http::Version::HTTP_11;
        let small = http_body::Body::size_hint(req.body())
            .exact()
            .is_some_and(|n| n <= DISCARD_SMALL_BODY);
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
        // hyper closes an HTTP/1 connection whose request body was not read to its end.
        let closes = match body {
            // Taken: forwarded (or held whole); closes when it was not read to its end.
            None => http1_body && !outcome.upload.as_ref().is_some_and(BodyWatch::finished),
            // Unread, sluice answered itself. HTTP/2, or a small HTTP/1 body of known length:
            // read and discarded (as nginx does), so a refused client keeps its connection
            // instead of making a new one for its next request (see `upstream::body::drain`).
            Some(body) if !http1_body || small => {
                upload::drain(body, policy.config.limits.lingering_close);
                false
            }
            // A larger HTTP/1 body: the connection closes (after a lingering read, see
            // `watched.rs`).
            Some(_) => true,
        };
        if closes {
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

    /// Phases 2–4 for a routed request: admit rate, take a slot, forward. The rate comes
    /// first, so a request refused for rate never takes a slot.
    async fn serve(
        &self,
        policy: &Policy,
        service: &Service,
        head: request::Parts,
        body: &mut Option<Incoming>,
        outcome: &mut Outcome<'_>,
    ) -> Response<ResponseBody> {
        let mut admitted = match self.admit_rate(service, &head, outcome).await {
            Ok(admitted) => admitted,
            Err(refused) => return refused,
        };
        let mut response = match self.take_slot(service, outcome).await {
            Ok(slot) => {
                if let Some(admitted) = &mut admitted {
                    admitted.keep(outcome.arrived);
                }
                self.forward(policy, service, slot, head, body, outcome)
                    .await
            }
            Err(refused) => {
                if let Some(admitted) = &mut admitted {
                    admitted.give_back();
                }
                refused
            }
        };
        if let Some(admitted) = admitted {
            admitted.tell(&mut response, outcome.reason.is_none());
        }
        response
    }

    /// Phase 2, admit rate: when the service has rate limits, the request's key decides, from
    /// the resource's bucket or (when its lease is empty) from the fleet's store. A refusal is
    /// the answer. `Ok(None)`: the service has no rate limits.
    async fn admit_rate<'s>(
        &self,
        service: &'s Service,
        head: &request::Parts,
        outcome: &mut Outcome<'_>,
    ) -> Result<Option<RateAdmitted<'s>>, Response<ResponseBody>> {
        let Some(rate) = &service.rate else {
            return Ok(None);
        };
        let admission = match rate.check(&head.headers, outcome.arrived) {
            Admission::Ask { resource } => rate.ask(resource).await,
            decided => decided,
        };
        match admission {
            // `ask` never answers `Ask`; a store that cannot be asked is unavailable.
            Admission::Ask { resource } | Admission::Unavailable { resource } => {
                outcome.note_resource(resource);
                Err(outcome.reject(Reason::StoreUnavailable, Some(service)))
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
                    .insert(http::header::WWW_AUTHENTICATE, rate.challenge());
                Err(response)
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
                rate.insert_headers(response.headers_mut(), &status);
                Err(response)
            }
            Admission::Admitted {
                resource,
                status,
                cell,
            } => {
                outcome.note_resource(resource);
                Ok(Some(RateAdmitted {
                    rate,
                    resource,
                    cell: Some(cell),
                    status,
                }))
            }
        }
    }

    /// Phase 3, take a slot: a slot on one of the service's endpoints (waiting in its queue if
    /// it has one), or the 429 that says none is free.
    async fn take_slot(
        &self,
        service: &Service,
        outcome: &mut Outcome<'_>,
    ) -> Result<Slot, Response<ResponseBody>> {
        service.pool.acquire().await.map_err(|refused| {
            let reason = match refused {
                // Every endpoint said it is full: 503 and when the first takes traffic again.
                NoSlot::EndpointsFull | NoSlot::QueueTimeout
                    if service.pool.shape().all_held_for().is_some() =>
                {
                    return self.overloaded(service, outcome);
                }
                NoSlot::EndpointsFull => Reason::EndpointsFull,
                NoSlot::NoEndpoints => Reason::NoEndpoints,
                NoSlot::QueueTimeout => Reason::QueueTimeout,
            };
            outcome.reject(reason, Some(service))
        })
    }
}

/// A request admitted for rate. Until it has a slot, its cell is only lent: a 429 for
/// capacity, or a client that leaves while it waits in the queue (dropping this), gives it back.
struct RateAdmitted<'a> {
    rate: &'a RateLimiter,
    resource: &'a Resource,
    /// `None` once the request took a slot (the cell is its for good) or gave it back.
    cell: Option<Cell>,
    /// What the RateLimit headers say.
    status: Status,
}

impl RateAdmitted<'_> {
    /// The request took a slot: the cell is spent, and the request counts as admitted.
    fn keep(&mut self, at: Instant) {
        self.cell = None;
        self.rate.confirm(self.resource, at);
    }

    /// The request took no slot: give the cell back now (the headers then show it).
    fn give_back(&mut self) {
        if self.give_back_cell() {
            self.status = self.status.with_cell_back();
        }
    }

    fn give_back_cell(&mut self) -> bool {
        self.cell
            .take()
            .is_some_and(|cell| self.rate.give_back(self.resource, cell))
    }

    /// Add the RateLimit headers to the answer; an endpoint's success counts as the caller's.
    fn tell(self, response: &mut Response<ResponseBody>, from_endpoint: bool) {
        self.rate
            .insert_headers(response.headers_mut(), &self.status);
        if from_endpoint && response.status().is_success() {
            self.resource.counters.succeeded.add();
        }
    }
}

impl Drop for RateAdmitted<'_> {
    fn drop(&mut self) {
        self.give_back_cell();
    }
}
