//! The capacity gate on increases: a resource's limit only grows into capacity the service's
//! endpoints can actually serve, projected with Little's law (slots × 1000 / latency ms:
//! 20 slots at 50 ms serve 400 TPS).

use std::time::{Duration, Instant};

use super::metrics::ServiceMetrics;

/// One endpoint as the projection sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EndpointCapacity {
    /// Its concurrency cap (slots).
    pub max_concurrent: u32,
    /// Mean latency observed over the capacity window; `None` when nothing was observed.
    pub latency: Option<Duration>,
}

/// What the gate needs to know about a service, gathered by the caller each interval.
#[derive(Debug, Clone, PartialEq)]
pub struct CapacityInput {
    /// The service's endpoints.
    pub endpoints: Vec<EndpointCapacity>,
    /// The service-wide cap on in-flight requests, if any.
    pub cluster_max_concurrent: Option<u32>,
    /// Latency assumed for an endpoint with no observation (`expected_latency`).
    pub expected_latency: Duration,
    /// TPS admitted over the window, summed over every resource of the service.
    pub admitted_tps: f64,
}

impl CapacityInput {
    /// Gather the input from a service's metric windows: endpoint `i` has cap `caps[i]`, and
    /// latencies and admitted TPS are taken over the complete grains of the last `window`
    /// (the engine uses the autoscale `interval`).
    pub fn from_metrics(
        metrics: &ServiceMetrics,
        caps: &[u32],
        cluster_max_concurrent: Option<u32>,
        expected_latency: Duration,
        now: Instant,
        window: Duration,
    ) -> Self {
        Self {
            endpoints: caps
                .iter()
                .enumerate()
                .map(|(i, &cap)| EndpointCapacity {
                    max_concurrent: cap,
                    latency: metrics.endpoint_latency(i, now, window),
                })
                .collect(),
            cluster_max_concurrent,
            expected_latency,
            admitted_tps: metrics.admitted_tps(now, window),
        }
    }

    /// Projected TPS: Σ cap × 1000 / latency ms over endpoints, scaled down by
    /// `cluster_max_concurrent / Σ caps` when the service-wide cap is the tighter one (the
    /// cluster cap's slots are spread over endpoints like the endpoints' own).
    pub fn projected_tps(&self) -> f64 {
        // A sub-millisecond latency would project absurd capacity; a millisecond is already
        // optimistic for a scoring call.
        let floor = Duration::from_millis(1);
        let mut slots = 0u64;
        let mut tps = 0.0;
        for e in &self.endpoints {
            let latency = e.latency.unwrap_or(self.expected_latency).max(floor);
            slots += u64::from(e.max_concurrent);
            tps += f64::from(e.max_concurrent) / latency.as_secs_f64();
        }
        match self.cluster_max_concurrent {
            Some(cluster) if slots > 0 && u64::from(cluster) < slots => {
                tps * f64::from(cluster) / slots as f64
            }
            _ => tps,
        }
    }

    /// Projected minus admitted TPS, never negative.
    pub fn available_tps(&self) -> f64 {
        (self.projected_tps() - self.admitted_tps).max(0.0)
    }
}

/// What the gate lets an increase do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// The whole step fits: go to the proposed value.
    Full(u32),
    /// Only part fits: go this far instead.
    Partial(u32),
    /// Nothing is available: stay, and look again next interval.
    Deferred,
}

/// Gate a raise from `current` to `proposed` (> `current`) against `available` TPS.
/// Whole TPS only: a fraction of a request per second is not worth a scale action.
pub fn gate(current: u32, proposed: u32, available: f64) -> Gate {
    let step = proposed.saturating_sub(current);
    // `as` saturates for floats; a negative or NaN availability counts as none.
    let room = if available.is_finite() && available > 0.0 {
        available.floor() as u64
    } else {
        0
    };
    if room >= u64::from(step) {
        Gate::Full(proposed)
    } else if room >= 1 {
        // room < step <= u32::MAX here
        Gate::Partial(current.saturating_add(room as u32))
    } else {
        Gate::Deferred
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(
        caps: &[u32],
        latency: Option<u64>,
        cluster: Option<u32>,
        admitted: f64,
    ) -> CapacityInput {
        CapacityInput {
            endpoints: caps
                .iter()
                .map(|&c| EndpointCapacity {
                    max_concurrent: c,
                    latency: latency.map(Duration::from_millis),
                })
                .collect(),
            cluster_max_concurrent: cluster,
            expected_latency: Duration::from_millis(50),
            admitted_tps: admitted,
        }
    }

    #[test]
    fn littles_law_projection() {
        assert_eq!(service(&[20], None, None, 0.0).projected_tps(), 400.0);
        assert_eq!(service(&[20, 20], None, None, 0.0).projected_tps(), 800.0);
        assert_eq!(
            service(&[20, 20], Some(100), None, 0.0).projected_tps(),
            400.0
        );
        // Cluster cap of 10 slots over 40: a quarter of the endpoints' capacity.
        assert_eq!(
            service(&[20, 20], None, Some(10), 0.0).projected_tps(),
            200.0
        );
        // A looser cluster cap changes nothing.
        assert_eq!(
            service(&[20, 20], None, Some(100), 0.0).projected_tps(),
            800.0
        );
        assert_eq!(service(&[20, 20], None, None, 700.0).available_tps(), 100.0);
        assert_eq!(service(&[20], None, None, 700.0).available_tps(), 0.0);
    }

    #[test]
    fn gate_full_partial_deferred() {
        assert_eq!(gate(10, 20, 90.0), Gate::Full(20));
        assert_eq!(gate(80, 160, 20.5), Gate::Partial(100));
        assert_eq!(gate(100, 200, 0.9), Gate::Deferred);
        assert_eq!(gate(100, 200, -5.0), Gate::Deferred);
        assert_eq!(gate(100, 200, f64::NAN), Gate::Deferred);
    }
}
