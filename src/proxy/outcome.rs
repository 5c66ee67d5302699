//! The per-request context of the request path: what happened to one exchange, finished once
//! (counted and logged) with the answer's status, or as 499 when its client left first.

use std::net::SocketAddr;
use std::sync::Arc;

use http::Response;
use tokio::time::Instant;

use super::body::ResponseBody;
use super::reject::Rejection;
use crate::balance::Endpoint;
use crate::limit::Resource;
use crate::policy::Service;
use crate::reason::Reason;
use crate::recorders::UnroutedStats;
use crate::upstream::BodyWatch;

/// How long a client is asked to wait after a 429 for full endpoints.
const FULL_RETRY_AFTER_MS: u64 = 1000;

/// One exchange as it goes: when it arrived, where it was routed, and what the access log
/// and the counters tell about it besides its status. Finished once with the answer's status;
/// dropped unfinished (the client left before the answer, so hyper dropped the request's
/// future), it finishes as nginx's 499 `client_gone`, so an abandoned request is still logged
/// and counted.
pub(super) struct Outcome<'p> {
    pub(super) arrived: Instant,
    pub(super) client: SocketAddr,
    /// Method and path for the access line, when it will be written (else `resource` stays
    /// unset).
    pub(super) logged: Option<(http::Method, String)>,
    pub(super) service: Option<&'p Service>,
    /// Where an answer given before there was a service is counted.
    pub(super) unrouted: &'p UnroutedStats,
    pub(super) resource: Option<Arc<str>>,
    pub(super) endpoint: Option<Arc<Endpoint>>,
    pub(super) reason: Option<Reason>,
    /// The request body on its way to the endpoint, once forwarded.
    pub(super) upload: Option<BodyWatch>,
    pub(super) finished: bool,
}

impl<'p> Outcome<'p> {
    pub(super) fn new(
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
    pub(super) fn note_resource(&mut self, resource: &Resource) {
        if self.logged.is_some() {
            self.resource = Some(Arc::clone(&resource.name));
        }
    }

    /// Answer on sluice's behalf and remember why.
    pub(super) fn reject(
        &mut self,
        reason: Reason,
        service: Option<&Service>,
    ) -> Response<ResponseBody> {
        self.reason = Some(reason);
        let rejection = Rejection::new(reason, service.map(|s| &*s.name));
        let rejection = match reason {
            Reason::EndpointsFull | Reason::QueueTimeout | Reason::NoEndpoints => {
                rejection.retry_after(FULL_RETRY_AFTER_MS)
            }
            _ => rejection,
        };
        rejection.into_response()
    }

    /// Count the exchange and write its access line, once.
    pub(super) fn finish(&mut self, status: u16) {
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
