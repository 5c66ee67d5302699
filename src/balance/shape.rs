//! A service's capacity settings as one value: its endpoints and their caps, the service-wide
//! cap, this replica's share, the queue, the choice, the slow start; and what it can take now.

use std::sync::Arc;
use std::time::Duration;

use super::adaptive::Bounds;
use super::hold::Overload;
use super::members::{members, Discovered, Member};
use super::{Endpoint, InvalidEndpointUrl, Share};
use crate::config::{Balance, Cap, ServiceConfig};

/// The capacity settings of a service, swapped as one value so a request never sees half of
/// a change.
#[derive(Debug)]
pub struct Shape {
    /// Endpoints and their caps (fleet-wide when replicas share a store): fixed, or learned
    /// by the endpoint (see [`Shape::cap`]).
    pub endpoints: Vec<(Arc<Endpoint>, Cap)>,
    /// What a learned cap stays within.
    pub adaptive: Bounds,
    /// Cap on the service's total in flight (`u32::MAX` when not set).
    pub cluster_cap: u32,
    /// This replica's part of each cap (the whole when it runs alone).
    pub share: Share,
    /// Requests allowed to wait for a slot.
    pub queue_size: u32,
    /// How long a request may wait.
    pub queue_timeout: Duration,
    /// Endpoint choice.
    pub balance: Balance,
    /// What each endpoint is: its entry's own cap, if it sets one (else it follows the
    /// service's), and where it came from.
    pub members: Vec<Member>,
    /// The ramp of an endpoint that (re)enters service, if the service has one.
    pub slow_start: Option<Duration>,
    /// What overload answers and failures in a row do.
    pub overload: Overload,
}

impl Shape {
    /// Build from config and what DNS found for its names, reusing the endpoints of
    /// `previous` that keep their URL so their in-flight counters carry over; `share` is this
    /// replica's part of each cap.
    pub fn from_config(
        config: &ServiceConfig,
        discovered: &Discovered,
        previous: Option<&Shape>,
        share: Share,
    ) -> Result<Self, InvalidEndpointUrl> {
        let members = members(config, discovered);
        let adaptive = Bounds {
            min: config.adaptive_min,
            max: config.adaptive_max,
            start: Cap::Auto.initial(config.adaptive_bounds()),
        };
        let endpoints = members
            .iter()
            .map(|m| {
                let reused = previous.and_then(|p| {
                    p.endpoints
                        .iter()
                        .find(|(old, _)| old.url() == m.url)
                        .map(|(old, _)| Arc::clone(old))
                });
                let endpoint = match reused {
                    Some(endpoint) => endpoint,
                    None => {
                        let endpoint = Endpoint::new(&m.url, m.host.as_deref())?;
                        // One that joins a running service starts slowly; those it starts
                        // with were serving before.
                        if previous.is_some() {
                            endpoint.enter_service();
                        }
                        // With health checks, a new endpoint waits for its first passes.
                        if config.health.is_some() {
                            endpoint.set_ready(false);
                        }
                        Arc::new(endpoint)
                    }
                };
                if config.health.is_none() {
                    // Checks turned off: nothing keeps an endpoint out any more.
                    endpoint.set_ready(true);
                }
                let cap = m.own_cap.unwrap_or(config.max_concurrent);
                Ok((learning(endpoint, cap, adaptive), cap))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            endpoints,
            adaptive,
            cluster_cap: config.cluster_max_concurrent.unwrap_or(u32::MAX),
            share,
            queue_size: config.queue_size,
            queue_timeout: config.queue_timeout,
            balance: config.balance,
            slow_start: config.slow_start,
            overload: Overload::from_config(&config.overload, &config.outlier),
            members,
        })
    }

    /// The same shape with the service's per-endpoint cap set to `cap` (endpoints with a cap
    /// of their own keep it).
    pub fn with_default_cap(&self, cap: u32) -> Self {
        let endpoints = self
            .endpoints
            .iter()
            .zip(&self.members)
            .map(|((endpoint, _), m)| {
                let cap = m.own_cap.unwrap_or(Cap::Fixed(cap));
                (learning(Arc::clone(endpoint), cap, self.adaptive), cap)
            })
            .collect();
        Self {
            endpoints,
            members: self.members.clone(),
            ..*self
        }
    }

    /// The same shape with this replica's part set to `share`.
    pub fn with_share(&self, share: Share) -> Self {
        Self {
            endpoints: self.endpoints.clone(),
            members: self.members.clone(),
            share,
            ..*self
        }
    }

    /// Endpoint `i`'s cap (fleet-wide): the configured number, or what it learned.
    pub fn cap(&self, i: usize) -> u32 {
        let (endpoint, cap) = &self.endpoints[i];
        match cap {
            Cap::Fixed(n) => *n,
            Cap::Auto => endpoint.adaptive.cap(),
        }
    }

    /// What endpoint `i`'s cap stays within, while it is learned.
    pub fn learns(&self, i: usize) -> Option<Bounds> {
        (self.endpoints[i].1 == Cap::Auto).then_some(self.adaptive)
    }

    /// The slots this replica may use at endpoint `i`.
    pub fn local_cap(&self, i: usize) -> u32 {
        self.share.of(self.cap(i), i)
    }

    /// Endpoint `i`'s cap (fleet-wide) as far as it can take traffic now: 0 while it fails its
    /// health check, ramped during its slow start. What capacity and its projection count.
    pub fn serving_cap(&self, i: usize) -> u32 {
        self.now(i, self.cap(i))
    }

    /// The service's capacity now: `min(cluster_max_concurrent, Σ serving caps)`.
    pub fn capacity(&self) -> u64 {
        let slots: u64 = (0..self.endpoints.len())
            .map(|i| u64::from(self.serving_cap(i)))
            .sum();
        slots.min(u64::from(self.cluster_cap))
    }

    /// The slots this replica may use at endpoint `i` now: its part of the cap, 0 while it
    /// fails its health check, ramped during its slow start.
    pub fn effective_cap(&self, i: usize) -> u32 {
        self.now(i, self.local_cap(i))
    }

    /// `cap` of endpoint `i` as far as it can take traffic now: none while it fails its health
    /// check or is held (cooled down, ejected), one request at a time while it is probed after
    /// a hold, ramped during its slow start.
    fn now(&self, i: usize, cap: u32) -> u32 {
        let endpoint = &self.endpoints[i].0;
        if !endpoint.is_ready() || endpoint.held().is_some() {
            return 0;
        }
        let cap = match self.slow_start {
            Some(ramp) => endpoint.ramped_cap(cap, ramp),
            None => cap,
        };
        match endpoint.hold.probing() {
            true => cap.min(1),
            false => cap,
        }
    }

    /// How many of its endpoints are ejected now.
    pub fn ejected(&self) -> usize {
        self.endpoints
            .iter()
            .filter(|(e, _)| matches!(e.held(), Some((super::HoldKind::Ejected, _))))
            .count()
    }

    /// When every endpoint is held (cooled down or ejected): how long until the first takes
    /// traffic again.
    pub fn all_held_for(&self) -> Option<Duration> {
        let mut soonest: Option<Duration> = None;
        for (endpoint, _) in &self.endpoints {
            let (_, left) = endpoint.held()?;
            soonest = Some(soonest.map_or(left, |s| s.min(left)));
        }
        soonest
    }

    /// The service-wide cap this replica enforces (`u32::MAX` when none is set).
    pub fn local_cluster_cap(&self) -> u32 {
        match self.cluster_cap {
            u32::MAX => u32::MAX,
            cap => self.share.of(cap, 0),
        }
    }
}

/// `endpoint`, learning its cap (within `bounds`) exactly while `cap` is `"auto"`.
fn learning(endpoint: Arc<Endpoint>, cap: Cap, bounds: Bounds) -> Arc<Endpoint> {
    endpoint
        .adaptive
        .follow((cap == Cap::Auto).then_some(bounds));
    endpoint
}
