//! Active health checks: every `[service.health] interval`, a GET of its `path` on each
//! endpoint of a service that has the table. `healthy_after` 2xx answers in a row let an
//! endpoint take traffic (a new one waits for them), `unhealthy_after` failures in a row (an
//! other status, no answer within `timeout`, no connection) take it out until it recovers.
//! Each change is an event (`endpoint_healthy`, `endpoint_unhealthy`) and a log line. Probes run
//! off the request path, one at a time per endpoint.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::Utc;
use http::{header, Method, Request};
use http_body_util::Empty;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::autoscale::{Event, EventKind, ScaleTarget};
use crate::balance::Endpoint;
use crate::config::HealthConfig;
use crate::policy::Live;
use crate::upstream::connector::{self, Connect};

/// How often the loop looks for probes that are due (the shortest `interval` allowed).
const TICK: Duration = Duration::from_millis(100);

/// One endpoint's run of results.
#[derive(Debug)]
struct Record {
    endpoint: Arc<Endpoint>,
    /// Its cap in the service (what its health adds to or takes from the capacity).
    cap: u32,
    last_probe: Option<Instant>,
    probing: bool,
    passes: u32,
    failures: u32,
}

/// A probe's outcome, sent back to the loop.
struct Outcome {
    service: Arc<str>,
    url: String,
    passed: bool,
    why: String,
}

/// Probe the endpoints of every service with `[service.health]` in the live policy (services
/// and endpoints a change adds included) until aborted, over connections made as `connect`
/// says (the roots endpoints are trusted with).
pub async fn run(live: Arc<Live>, connect: Connect) {
    let client: Client<HttpsConnector<HttpConnector>, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build(connector::build(connect));
    let (done, mut outcomes) = mpsc::unbounded_channel::<Outcome>();
    let mut records: HashMap<(Arc<str>, String), Record> = HashMap::new();
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                let policy = live.policy();
                let mut present = HashSet::new();
                for (service, config) in policy.services.iter().zip(&policy.config.services) {
                    let Some(health) = &config.health else { continue };
                    let shape = service.pool.shape();
                    for (i, (endpoint, _)) in shape.endpoints.iter().enumerate() {
                        let cap = shape.cap(i);
                        let key = (Arc::clone(&service.name), endpoint.url().to_owned());
                        present.insert(key.clone());
                        let record = records.entry(key).or_insert_with(|| Record {
                            endpoint: Arc::clone(endpoint),
                            cap,
                            last_probe: None,
                            probing: false,
                            passes: 0,
                            failures: 0,
                        });
                        // A reload may have replaced the endpoint of this URL, or its cap.
                        record.endpoint = Arc::clone(endpoint);
                        record.cap = cap;
                        let due = record
                            .last_probe
                            .is_none_or(|at| at.elapsed() >= health.interval);
                        if due && !record.probing {
                            record.probing = true;
                            record.last_probe = Some(Instant::now());
                            tokio::spawn(probe(
                                client.clone(),
                                Arc::clone(endpoint),
                                health.clone(),
                                Arc::clone(&service.name),
                                done.clone(),
                            ));
                        }
                    }
                }
                records.retain(|key, _| present.contains(key));
            }
            Some(outcome) = outcomes.recv() => {
                let key = (Arc::clone(&outcome.service), outcome.url.clone());
                let Some(record) = records.get_mut(&key) else { continue };
                record.probing = false;
                let policy = live.policy();
                let Some(health) = policy
                    .config
                    .services
                    .iter()
                    .find(|s| *s.name == *outcome.service)
                    .and_then(|s| s.health.as_ref())
                else {
                    continue;
                };
                if let Some(event) = judge(record, health, &outcome) {
                    if event.kind == EventKind::EndpointHealthy {
                        // Requests may be waiting in the queue for it.
                        if let Some(service) = policy.service(&outcome.service) {
                            service.pool.wake();
                        }
                    }
                    live.record(event);
                }
            }
        }
    }
}

/// Count `outcome` and take the endpoint in or out of traffic when its run is long enough;
/// the event that says so, if it changed.
fn judge(record: &mut Record, health: &HealthConfig, outcome: &Outcome) -> Option<Event> {
    let endpoint = &record.endpoint;
    let (kind, from_to, reason) = if outcome.passed {
        record.passes += 1;
        record.failures = 0;
        if endpoint.is_ready() || record.passes < health.healthy_after {
            return None;
        }
        endpoint.set_ready(true);
        (
            EventKind::EndpointHealthy,
            (0, record.cap),
            format!(
                "{} passed {} health checks in a row: takes traffic",
                outcome.url, record.passes
            ),
        )
    } else {
        record.failures += 1;
        record.passes = 0;
        if !endpoint.is_ready() || record.failures < health.unhealthy_after {
            return None;
        }
        endpoint.set_ready(false);
        (
            EventKind::EndpointUnhealthy,
            (record.cap, 0),
            format!(
                "{} failed {} health checks in a row ({}): takes no traffic until it recovers",
                outcome.url, record.failures, outcome.why
            ),
        )
    };
    let target = ScaleTarget::Endpoint {
        endpoint: outcome.url.clone(),
    };
    Some(Event::change(
        Utc::now(),
        &*outcome.service,
        target,
        kind,
        from_to,
        reason,
    ))
}

/// GET the health path of `endpoint`, within `health.timeout()`.
async fn probe(
    client: Client<HttpsConnector<HttpConnector>, Empty<Bytes>>,
    endpoint: Arc<Endpoint>,
    health: HealthConfig,
    service: Arc<str>,
    done: mpsc::UnboundedSender<Outcome>,
) {
    let path = health.path.parse().ok();
    let target = endpoint
        .upstream_target(path.as_ref())
        .map(|t| t.to_string())
        .unwrap_or_else(|_| health.path.clone());
    let base = endpoint.base_uri().to_string();
    let uri = format!("{}{target}", base.trim_end_matches('/'));
    let request = Request::builder()
        .method(Method::GET)
        .uri(&uri)
        // What requests to it carry: for an endpoint DNS found, the name, not its address.
        .header(header::HOST, endpoint.host_header())
        .header(header::USER_AGENT, "sluice-health-check")
        .body(Empty::new());
    let (passed, why) = match request {
        Err(e) => (false, format!("invalid health check URL {uri}: {e}")),
        Ok(request) => {
            match tokio::time::timeout(health.timeout(), client.request(request)).await {
                Err(_) => (false, format!("no answer within {:?}", health.timeout())),
                Ok(Err(e)) => (false, crate::upstream::error_chain(&e)),
                Ok(Ok(answer)) => (
                    answer.status().is_success(),
                    format!("status {}", answer.status().as_u16()),
                ),
            }
        }
    };
    let _ = done.send(Outcome {
        service,
        url: endpoint.url().to_owned(),
        passed,
        why,
    });
}
