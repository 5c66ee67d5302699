//! The JSON the admin API shows: live capacity per service, endpoint and resource, and the
//! live policy in the shape of the config file (without key material).

use serde::Serialize;
use serde_json::Value;

use crate::autoscale::{CapacityInput, EndpointCapacity, Event, EventHistory, EventQuery};
use crate::policy::{Policy, Service};
use crate::stats::LatencySummary;

/// `GET /admin/capacity`.
#[derive(Debug, Serialize)]
pub struct Capacity {
    /// Milliseconds since sluice started (monotonic), so clients can compute rates between
    /// two polls on the server's clock.
    pub uptime_ms: u64,
    /// This replica in its fleet, when limits are shared through a store (`null` otherwise).
    pub store: Option<crate::store::FleetView>,
    /// One entry per service.
    pub services: Vec<ServiceCapacity>,
}

/// One service's capacity and use.
#[derive(Debug, Serialize)]
pub struct ServiceCapacity {
    /// Service name.
    pub name: String,
    /// min(cluster_max_concurrent, Σ caps of the endpoints as far as they can take traffic
    /// now: 0 for one that fails its health check, ramped during a slow start).
    pub capacity: u64,
    /// Requests in flight now.
    pub in_flight: u32,
    /// Requests waiting for a slot.
    pub queue_length: usize,
    /// Age of the oldest waiting request.
    pub queue_oldest_age_ms: u64,
    /// Little's-law projection: Σ cap × 1000 / mean latency ms (expected latency where none
    /// was observed), scaled by the service cap.
    pub projected_tps: f64,
    /// TPS admitted over the last minute, all resources together.
    pub admitted_tps: f64,
    /// projected − admitted, never negative.
    pub headroom_tps: f64,
    /// Answers since start, whoever gave them (poll and difference for a rate).
    pub requests_total: u64,
    /// 429 answers since start, any reason.
    pub throttled_total: u64,
    /// The service's endpoints.
    pub endpoints: Vec<EndpointView>,
    /// The service's resources (none when rate limiting is off).
    pub resources: Vec<ResourceView>,
}

/// One endpoint.
#[derive(Debug, Serialize)]
pub struct EndpointView {
    /// URL as configured; for an endpoint DNS found, its address in place of the name.
    pub url: String,
    /// Where it came from: `config`, `admin` or `dns:<name>`.
    pub source: String,
    /// The `Host` its requests carry.
    pub host: String,
    /// Its concurrency cap (for the whole fleet when replicas share a store): configured, or
    /// as learned so far.
    pub max_concurrent: u32,
    /// Whether the cap is learned (`max_concurrent = "auto"`).
    pub adaptive: bool,
    /// The part of the cap this replica enforces (the whole cap without a store).
    pub local_max_concurrent: u32,
    /// What it may take now: its local part, ramped during a slow start, 0 while not `ready`.
    pub effective_max_concurrent: u32,
    /// In flight now, through this replica.
    pub in_flight: u32,
    /// False while in its back-off after a refused connection.
    pub healthy: bool,
    /// `serving`; `cooled_down` (it answered that it is full) or `ejected` (it failed in a
    /// row) until `back_in_ms`, then `probing` (one request at a time until an answer says it
    /// is back); `backing_off` (refused a connection); `not_ready` (fails its health check).
    pub state: &'static str,
    /// While cooled down or ejected: milliseconds until it takes traffic again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub back_in_ms: Option<u64>,
    /// False while it fails its service's health check, or has not passed it yet (always
    /// true for a service without `[service.health]`); it then takes no request.
    pub ready: bool,
    /// Time to response headers over the last minute (`null` before any response).
    pub latency: Option<LatencySummary>,
    /// cap × 1000 / mean latency ms.
    pub projected_tps: f64,
}

/// One resource.
#[derive(Debug, Serialize)]
pub struct ResourceView {
    /// Resource name (never its key).
    pub name: String,
    /// Configured limit.
    pub base_tps: u32,
    /// Limit in force now.
    pub limit_tps: u32,
    /// Burst in force now.
    pub burst: u32,
    /// Whether autoscale may change the limit.
    pub autoscale: bool,
    /// Admitted in the last minute.
    pub admitted_last_minute: u64,
    /// Throttled (429 for rate) in the last minute.
    pub throttled_last_minute: u64,
    /// Answered 2xx by the endpoint in the last minute (what the caller is billed for).
    pub succeeded_last_minute: u64,
    /// Its latest event, if any.
    pub last_event: Option<Event>,
}

/// The expected latency of a service without autoscale settings (the autoscale default).
const EXPECTED_LATENCY: std::time::Duration = std::time::Duration::from_millis(50);

/// Build the capacity view of `policy`, with `fleet`'s standing when there is one.
pub fn capacity(
    policy: &Policy,
    history: &EventHistory,
    fleet: Option<&crate::store::Fleet>,
) -> Capacity {
    Capacity {
        uptime_ms: u64::try_from(crate::stats::uptime().as_millis()).unwrap_or(u64::MAX),
        store: fleet.map(crate::store::Fleet::view),
        services: policy
            .services
            .iter()
            .map(|s| service_capacity(s, history))
            .collect(),
    }
}

/// What an endpoint is doing, as [`EndpointView::state`] names it.
fn endpoint_state(endpoint: &crate::balance::Endpoint) -> &'static str {
    use crate::balance::HoldKind;
    match endpoint.held() {
        Some((HoldKind::Cooldown, _)) => "cooled_down",
        Some((HoldKind::Ejected, _)) => "ejected",
        None if !endpoint.is_ready() => "not_ready",
        None if !endpoint.is_healthy() => "backing_off",
        None if endpoint.hold.probing() => "probing",
        None => "serving",
    }
}

fn service_capacity(service: &Service, history: &EventHistory) -> ServiceCapacity {
    let shape = service.pool.shape();
    let expected = service
        .autoscale
        .as_ref()
        .map_or(EXPECTED_LATENCY, |a| a.settings().expected_latency);
    let endpoints: Vec<EndpointView> = shape
        .endpoints
        .iter()
        .enumerate()
        .map(|(i, (endpoint, cap))| {
            let latency = endpoint.latency.last_minute();
            let mean_ms = latency.map_or(expected.as_secs_f64() * 1000.0, |l| l.mean_ms);
            EndpointView {
                url: endpoint.url().to_owned(),
                source: shape.members[i].source.to_string(),
                host: String::from_utf8_lossy(endpoint.host_header().as_bytes()).into_owned(),
                max_concurrent: shape.cap(i),
                adaptive: *cap == crate::config::Cap::Auto,
                local_max_concurrent: shape.local_cap(i),
                effective_max_concurrent: shape.effective_cap(i),
                in_flight: endpoint.in_flight(),
                healthy: endpoint.is_healthy(),
                state: endpoint_state(endpoint),
                back_in_ms: endpoint
                    .held()
                    .map(|(_, left)| u64::try_from(left.as_millis()).unwrap_or(u64::MAX)),
                ready: endpoint.is_ready(),
                latency,
                projected_tps: f64::from(shape.cap(i)) * 1000.0 / mean_ms.max(1.0),
            }
        })
        .collect();
    let resources: Vec<ResourceView> = service
        .rate
        .iter()
        .flat_map(|rate| rate.all_resources())
        .map(|r| {
            let (base, limit) = (r.base(), r.limit());
            let query = EventQuery {
                service: Some(service.name.to_string()),
                resource: Some(r.name.to_string()),
                limit: Some(1),
                ..EventQuery::default()
            };
            ResourceView {
                name: r.name.to_string(),
                base_tps: base.tps.get(),
                limit_tps: limit.tps.get(),
                burst: limit.burst.get(),
                autoscale: r.autoscale(),
                admitted_last_minute: r.counters.admitted.last_minute(),
                throttled_last_minute: r.counters.throttled.last_minute(),
                succeeded_last_minute: r.counters.succeeded.last_minute(),
                last_event: history.query(&query).pop(),
            }
        })
        .collect();
    let admitted: u64 = resources.iter().map(|r| r.admitted_last_minute).sum();
    let admitted_tps = admitted as f64 / crate::stats::WINDOW_SECS as f64;
    let projection = CapacityInput {
        endpoints: endpoints
            .iter()
            .enumerate()
            .map(|(i, e)| EndpointCapacity {
                max_concurrent: shape.serving_cap(i),
                latency: e
                    .latency
                    .map(|l| std::time::Duration::from_secs_f64(l.mean_ms / 1000.0)),
            })
            .collect(),
        cluster_max_concurrent: (shape.cluster_cap != u32::MAX).then_some(shape.cluster_cap),
        expected_latency: expected,
        admitted_tps,
    };

    ServiceCapacity {
        name: service.name.to_string(),
        capacity: shape.capacity(),
        in_flight: service.pool.in_flight(),
        queue_length: service.pool.queue_len(),
        queue_oldest_age_ms: service
            .pool
            .queue_oldest_age()
            .map_or(0, |a| a.as_millis() as u64),
        projected_tps: projection.projected_tps(),
        admitted_tps,
        headroom_tps: projection.available_tps(),
        requests_total: service
            .stats
            .answers_total(shape.endpoints.iter().map(|(e, _)| &e.stats)),
        throttled_total: service.stats.too_many_requests_total(),
        endpoints,
        resources,
    }
}

/// `GET /admin/policy`: the live config as JSON, without key material.
pub fn policy(policy: &Policy) -> Value {
    let mut value = serde_json::to_value(&*policy.config).unwrap_or(Value::Null);
    if let Some(services) = value.get_mut("service").and_then(Value::as_array_mut) {
        for service in services {
            if let Some(resources) = service.get_mut("resource").and_then(Value::as_array_mut) {
                for resource in resources {
                    if let Some(resource) = resource.as_object_mut() {
                        resource.remove("key");
                        resource.remove("key_sha256");
                    }
                }
            }
        }
    }
    value
}
