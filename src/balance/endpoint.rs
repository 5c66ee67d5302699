//! One upstream endpoint: where it is, how many requests it has in flight, whether it is
//! skipped for a while after failing to connect (passive health), and whether it passes its
//! service's active health check.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use http::header::HeaderValue;
use http::uri::PathAndQuery;
use http::Uri;
use tokio::time::Instant;

use super::adaptive::Adaptive;
use super::hold::{Hold, HoldKind, Overload, Verdict};
use crate::recorders::EndpointStats;
use crate::stats::LatencyWindow;
use crate::upstream::IdleConnections;

/// First back-off after a connect failure; doubles per consecutive failure.
const BACKOFF_BASE: Duration = Duration::from_millis(500);
/// Longest back-off: an endpoint that came back is tried again within this time.
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// An upstream endpoint and its live counters. Shared (`Arc`) by every policy that lists its
/// URL, so in-flight counts survive a policy change.
#[derive(Debug)]
pub struct Endpoint {
    url: String,
    host_header: HeaderValue,
    /// Path of the endpoint URL without the trailing '/', prepended to request paths.
    base_path: String,
    in_flight: AtomicU32,
    /// Milliseconds since `epoch` until which the endpoint is skipped; 0 = healthy.
    down_until_ms: AtomicU64,
    consecutive_failures: AtomicU32,
    /// Passes its service's active health check; always, for a service without one.
    ready: AtomicBool,
    /// When it (re)entered service, on the clock of `now_ms`; 0: from the start (no ramp).
    entered_ms: AtomicU64,
    epoch: Instant,
    /// Time to response headers over the last minute.
    pub latency: LatencyWindow,
    /// Answers and latency since start, for /metrics.
    pub stats: EndpointStats,
    /// Keep-alive connections not in use.
    pub idle: IdleConnections,
    /// Held out of traffic after saying it is full, or failing in a row.
    pub hold: Hold,
    /// Its cap as learned from its latency, when it is not fixed.
    pub adaptive: Adaptive,
    /// `scheme://authority`, what connections are made to.
    base_uri: Uri,
}

/// The endpoint URL could not be used (validation normally catches this first).
#[derive(Debug, thiserror::Error)]
#[error("invalid endpoint URL {0:?}: expected http(s)://host[:port][/path]")]
pub struct InvalidEndpointUrl(pub String);

impl Endpoint {
    /// Parse an `http(s)://host:port[/base]` URL; `host` is the `Host` of requests to it
    /// when that is not the URL's authority (an endpoint DNS found: its address in the URL,
    /// the name in `Host`).
    pub fn new(url: &str, host: Option<&str>) -> Result<Self, InvalidEndpointUrl> {
        let invalid = || InvalidEndpointUrl(url.to_owned());
        let uri: Uri = url.parse().map_err(|_| invalid())?;
        let parts = uri.into_parts();
        let scheme = parts.scheme.ok_or_else(invalid)?;
        let authority = parts.authority.ok_or_else(invalid)?;
        let base_path = parts
            .path_and_query
            .map(|p| p.path().trim_end_matches('/').to_owned())
            .unwrap_or_default();
        let host_header =
            HeaderValue::from_str(host.unwrap_or(authority.as_str())).map_err(|_| invalid())?;
        let base_uri = Uri::builder()
            .scheme(scheme)
            .authority(authority)
            .path_and_query("/")
            .build()
            .map_err(|_| invalid())?;
        Ok(Self {
            host_header,
            url: url.to_owned(),
            base_path,
            in_flight: AtomicU32::new(0),
            down_until_ms: AtomicU64::new(0),
            consecutive_failures: AtomicU32::new(0),
            ready: AtomicBool::new(true),
            entered_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            latency: LatencyWindow::default(),
            stats: EndpointStats::default(),
            idle: IdleConnections::default(),
            hold: Hold::default(),
            adaptive: Adaptive::default(),
            base_uri,
        })
    }

    /// The URL as configured.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// `scheme://host:port/`, where connections go.
    pub fn base_uri(&self) -> &Uri {
        &self.base_uri
    }

    /// `host:port` as the `Host` header of requests sent to this endpoint.
    pub fn host_header(&self) -> &HeaderValue {
        &self.host_header
    }

    /// Requests in flight at this endpoint now.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Acquire)
    }

    /// The request-target sent to the endpoint: endpoint base path + request path and query,
    /// in origin form (`/v1/score?x=1`). Origin form is what an origin server expects from a
    /// proxy (RFC 9112 §3.2.1); the endpoint's authority goes in `Host`.
    pub fn upstream_target(
        &self,
        path_and_query: Option<&PathAndQuery>,
    ) -> Result<Uri, http::Error> {
        match (self.base_path.is_empty(), path_and_query) {
            (true, Some(pq)) => Ok(Uri::from(pq.clone())),
            (true, None) => Ok(Uri::from_static("/")),
            (false, pq) => {
                let pq = pq.map_or("/", PathAndQuery::as_str);
                Ok(Uri::try_from(format!("{}{pq}", self.base_path))?)
            }
        }
    }

    /// Take one slot if fewer than `cap` are in flight: how many are then.
    pub(super) fn try_take(&self, cap: u32) -> Option<u32> {
        self.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < cap).then_some(n + 1)
            })
            .ok()
            .map(|before| before + 1)
    }

    /// Give back a slot taken with `try_take`.
    pub(super) fn give_back(&self) {
        let before = self.in_flight.fetch_sub(1, Ordering::AcqRel);
        debug_assert!(before > 0, "endpoint slot released twice");
    }

    fn now_ms(&self) -> u64 {
        // +1 so that 0 always means "healthy", even in the first millisecond.
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1
    }

    /// False while the endpoint is in its back-off after a connect failure.
    pub fn is_healthy(&self) -> bool {
        let until = self.down_until_ms.load(Ordering::Relaxed);
        until == 0 || self.now_ms() >= until
    }

    /// Record a connect failure: skip the endpoint for a back-off that doubles each time.
    pub fn mark_unreachable(&self) {
        let failures = self.consecutive_failures.fetch_add(1, Ordering::Relaxed);
        let backoff = super::doubled(BACKOFF_BASE, failures).min(BACKOFF_MAX);
        let until = self.now_ms() + u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX / 2);
        self.down_until_ms.store(until, Ordering::Relaxed);
    }

    /// Whether it passes its service's active health check (always, without one). One that
    /// does not takes no request.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// Say whether it passes its active health check; true when that changed. Passing again
    /// (re)enters it into service (see [`Endpoint::ramped_cap`]).
    pub fn set_ready(&self, ready: bool) -> bool {
        let changed = self.ready.swap(ready, Ordering::Relaxed) != ready;
        if changed && ready {
            self.enter_service();
        }
        changed
    }

    /// It joins a running service (or comes back): a slow start counts from now.
    pub fn enter_service(&self) {
        self.entered_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// `cap` ramped linearly from 1 to `cap` over `ramp` since it (re)entered service; the whole
    /// `cap` for an endpoint that was there from the start or entered `ramp` ago.
    pub fn ramped_cap(&self, cap: u32, ramp: Duration) -> u32 {
        let entered = self.entered_ms.load(Ordering::Relaxed);
        let ramp_ms = u64::try_from(ramp.as_millis()).unwrap_or(u64::MAX);
        if entered == 0 || cap == 0 || ramp_ms == 0 {
            return cap;
        }
        let elapsed = self.now_ms().saturating_sub(entered);
        if elapsed >= ramp_ms {
            return cap;
        }
        let ramped = (u64::from(cap) * elapsed).div_ceil(ramp_ms);
        u32::try_from(ramped).unwrap_or(cap).clamp(1, cap)
    }

    /// Held out of traffic now (cooled down or ejected): why, and for how much longer.
    pub fn held(&self) -> Option<(HoldKind, Duration)> {
        self.hold.held(|| self.now_ms())
    }

    /// It answered that it is full (with `retry_after`, if it said): cooled down.
    pub fn overloaded(&self, overload: &Overload, retry_after: Option<Duration>) -> Verdict {
        self.hold.overloaded(overload, retry_after, self.now_ms())
    }

    /// It failed (5xx, timeout, broken exchange): ejected after enough in a row, if
    /// `may_eject`.
    pub fn failed(&self, overload: &Overload, may_eject: bool) -> Verdict {
        self.hold.failed(overload, may_eject, self.now_ms())
    }

    /// It answered, neither full nor failing: back in full service after a hold.
    pub fn answered(&self) {
        self.hold.answered(|| self.now_ms());
    }

    /// Record a successful exchange: the endpoint is healthy again. One that comes back from
    /// its back-off (re)enters service: a slow start ramps it again, as after a failed health
    /// check (a server that refused connections may have restarted cold).
    pub fn mark_reachable(&self) {
        if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
            self.consecutive_failures.store(0, Ordering::Relaxed);
            self.down_until_ms.store(0, Ordering::Relaxed);
            self.enter_service();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn an_endpoint_back_from_its_back_off_ramps_again() {
        let endpoint = Endpoint::new("http://127.0.0.1:9", None).unwrap();
        let ramp = Duration::from_secs(10);
        assert_eq!(
            endpoint.ramped_cap(20, ramp),
            20,
            "there from the start: full"
        );
        endpoint.mark_unreachable();
        tokio::time::advance(Duration::from_secs(1)).await;
        endpoint.mark_reachable();
        assert_eq!(endpoint.ramped_cap(20, ramp), 1);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(endpoint.ramped_cap(20, ramp), 10);
        // A success without a failure before it changes nothing.
        endpoint.mark_reachable();
        assert_eq!(endpoint.ramped_cap(20, ramp), 10);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(endpoint.ramped_cap(20, ramp), 20);
    }
}
