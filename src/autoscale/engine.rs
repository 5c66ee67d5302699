//! The per-service engine: the only stateful part of autoscaling. It holds each resource's
//! current limit and last action time (and the service's endpoint concurrency), and
//! [`ServiceEngine::step`] applies one interval's decisions, returning the events. The
//! decisions themselves are the pure functions of `evaluate.rs`, `capacity.rs` and
//! `profile.rs`; time comes in as arguments, so the loop around this is a timer and a
//! `for` over the events (apply limits, log, record, notify).

use std::collections::BTreeMap;
use std::time::Instant;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::capacity::{gate, CapacityInput, Gate};
use super::evaluate::{evaluate, Bounds, Cause, Decision, EvalInput, CONCURRENCY_BOUNDS};
use super::events::{Event, EventKind, ScaleTarget};
use super::metrics::Metrics;
use super::profile::select;
use super::settings::{AutoscaleSettings, Profile, Target};

/// A resource as configured: what the engine needs to scale it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ResourceSpec {
    /// Its configured TPS limit: the floor, and where it starts.
    pub base: u32,
    /// The highest limit autoscaling may give it.
    pub max_tps: u32,
    /// Whether autoscaling applies to it.
    pub enabled: bool,
}

/// A resource's autoscaling state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ResourceState {
    /// As configured.
    #[serde(flatten)]
    pub spec: ResourceSpec,
    /// Current TPS limit.
    pub limit: u32,
    /// When the limit last changed by a scale action (cooldowns count from it).
    #[serde(skip)]
    pub last_action: Option<Instant>,
}

/// Endpoint concurrency state of the service.
#[derive(Debug, Clone, Copy)]
pub(super) struct Concurrency {
    pub(super) base: u32,
    pub(super) value: u32,
    pub(super) last_action: Option<Instant>,
}

/// Autoscaling state of one service and its resources.
#[derive(Debug, Clone)]
pub struct ServiceEngine {
    service: String,
    pub(super) settings: AutoscaleSettings,
    builtin: Profile,
    pub(super) resources: BTreeMap<String, ResourceState>,
    pub(super) concurrency: Concurrency,
}

impl ServiceEngine {
    /// An engine for `service` with no resources yet; `endpoint_concurrency` is the service's
    /// configured per-endpoint `max_concurrent`.
    pub fn new(service: &str, settings: AutoscaleSettings, endpoint_concurrency: u32) -> Self {
        Self {
            service: service.to_owned(),
            settings,
            builtin: Profile::builtin_default(),
            resources: BTreeMap::new(),
            concurrency: Concurrency {
                base: endpoint_concurrency,
                value: endpoint_concurrency,
                last_action: None,
            },
        }
    }

    /// Add (or reset) a resource at its base limit.
    pub fn add_resource(&mut self, name: &str, spec: ResourceSpec) {
        self.resources.insert(
            name.to_owned(),
            ResourceState {
                spec,
                limit: spec.base,
                last_action: None,
            },
        );
    }

    /// The service name.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The settings in force.
    pub fn settings(&self) -> &AutoscaleSettings {
        &self.settings
    }

    /// State of one resource.
    pub fn resource(&self, name: &str) -> Option<&ResourceState> {
        self.resources.get(name)
    }

    /// Every resource, by name.
    pub fn resources(&self) -> impl Iterator<Item = (&str, &ResourceState)> {
        self.resources.iter().map(|(n, s)| (n.as_str(), s))
    }

    /// Current TPS limit of a resource.
    pub fn limit(&self, name: &str) -> Option<u32> {
        self.resources.get(name).map(|r| r.limit)
    }

    /// Current per-endpoint concurrency cap of the service.
    pub fn endpoint_concurrency(&self) -> u32 {
        self.concurrency.value
    }

    /// The profile in force at `wall` (the built-in default when none applies).
    pub fn profile_at(&self, wall: DateTime<Utc>) -> &Profile {
        select(&self.settings.profiles, wall).unwrap_or(&self.builtin)
    }

    /// One interval: evaluate the profile in force for the endpoint concurrency and for every
    /// autoscaled resource, gate increases by `capacity`, apply the outcome to the state and
    /// return what happened. Raises granted to earlier resources (by name order) use up the
    /// capacity later ones see in the same step.
    pub fn step(
        &mut self,
        now: Instant,
        wall: DateTime<Utc>,
        metrics: &dyn Metrics,
        capacity: &CapacityInput,
    ) -> Vec<Event> {
        let profile = self.profile_at(wall).clone();
        let mut events = Vec::new();
        if let Some(e) = self.step_concurrency(&profile, now, wall, metrics) {
            events.push(e);
        }
        let mut available = capacity.available_tps();
        let names: Vec<String> = self.resources.keys().cloned().collect();
        for name in names {
            let Some(r) = self.resources.get(&name) else {
                continue;
            };
            if !r.spec.enabled {
                continue;
            }
            let bounds = Bounds::for_resource(&profile, r.spec.base, r.spec.max_tps);
            let input = EvalInput {
                profile: &profile,
                target: Target::ResourceTps,
                current: r.limit,
                bounds,
                default: Some(profile.default.unwrap_or(r.spec.base)),
                last_action: r.last_action,
                now,
            };
            let decision = evaluate(&input, &mut |rule| {
                metrics.read(rule.metric, Some(&name), &rule.query(), now)
            });
            let Decision::Change { to, cause } = decision else {
                continue;
            };
            let from = r.limit;
            let (rule, mut reason) = explain(&profile, cause, bounds);
            let mut granted = to;
            if to > from {
                match gate(from, to, available) {
                    Gate::Full(t) => granted = t,
                    Gate::Partial(t) => {
                        granted = t;
                        reason.push_str(&format!(
                            "; wanted {to}, capacity for +{} TPS only ({})",
                            t - from,
                            capacity_words(capacity, available)
                        ));
                    }
                    Gate::Deferred => {
                        reason.push_str(&format!(
                            "; wanted {to}, no capacity left ({}); retried next interval",
                            capacity_words(capacity, available)
                        ));
                        let kind = EventKind::DeferredInsufficientCapacity;
                        events.push(Event {
                            profile: Some(profile.name.clone()),
                            rule,
                            reason,
                            ..self.event(wall, resource(&name), kind, from, from)
                        });
                        continue;
                    }
                }
                available -= f64::from(granted - from);
            }
            if let Some(r) = self.resources.get_mut(&name) {
                r.limit = granted;
                r.last_action = Some(now);
            }
            let kind = if granted > from {
                EventKind::ScaleUp
            } else {
                EventKind::ScaleDown
            };
            events.push(Event {
                profile: Some(profile.name.clone()),
                rule,
                reason,
                ..self.event(wall, resource(&name), kind, from, granted)
            });
        }
        events
    }

    /// Concurrency rules of the profile, if any: no default (the profile's default is a TPS
    /// value) and no capacity gate (more slots is more capacity).
    fn step_concurrency(
        &mut self,
        profile: &Profile,
        now: Instant,
        wall: DateTime<Utc>,
        metrics: &dyn Metrics,
    ) -> Option<Event> {
        if !profile
            .rules
            .iter()
            .any(|r| r.target == Target::EndpointConcurrency)
        {
            return None;
        }
        let input = EvalInput {
            profile,
            target: Target::EndpointConcurrency,
            current: self.concurrency.value,
            bounds: CONCURRENCY_BOUNDS,
            default: None,
            last_action: self.concurrency.last_action,
            now,
        };
        let decision = evaluate(&input, &mut |rule| {
            metrics.read(rule.metric, None, &rule.query(), now)
        });
        let Decision::Change { to, cause } = decision else {
            return None;
        };
        let from = self.concurrency.value;
        self.concurrency.value = to;
        self.concurrency.last_action = Some(now);
        let (rule, reason) = explain(profile, cause, CONCURRENCY_BOUNDS);
        let kind = if to > from {
            EventKind::ScaleUp
        } else {
            EventKind::ScaleDown
        };
        Some(Event {
            profile: Some(profile.name.clone()),
            rule,
            reason,
            ..self.event(wall, ScaleTarget::EndpointConcurrency, kind, from, to)
        })
    }

    /// An event about `target` of this service, without profile, rule or reason.
    pub(super) fn event(
        &self,
        at: DateTime<Utc>,
        target: ScaleTarget,
        kind: EventKind,
        from: u32,
        to: u32,
    ) -> Event {
        Event::change(
            at,
            self.service.clone(),
            target,
            kind,
            (from, to),
            String::new(),
        )
    }
}

/// The target of a resource's events.
pub(super) fn resource(name: &str) -> ScaleTarget {
    ScaleTarget::Resource {
        resource: name.to_owned(),
    }
}

/// The rule description and a reason sentence for a change.
fn explain(profile: &Profile, cause: Cause, bounds: Bounds) -> (Option<String>, String) {
    match cause {
        Cause::Rule { index, observed } => {
            let Some(rule) = profile.rules.get(index) else {
                return (None, "rule triggered".into());
            };
            let reason = format!(
                "{} {} over {} was {observed} ({} {})",
                rule.metric.name(),
                rule.time_aggregation.name(),
                humantime::format_duration(rule.time_window),
                rule.operator.symbol(),
                rule.threshold
            );
            (Some(rule.describe()), reason)
        }
        Cause::Default { missing } => {
            let metric = profile
                .rules
                .get(missing)
                .map_or("a metric", |r| r.metric.name());
            let reason = format!("{metric} could not be read: raised to the profile default");
            (None, reason)
        }
        Cause::Bounds => (
            None,
            format!(
                "outside profile {:?} bounds [{}, {}]",
                profile.name, bounds.lower, bounds.upper
            ),
        ),
    }
}

fn capacity_words(capacity: &CapacityInput, available: f64) -> String {
    format!(
        "projected {:.0} TPS, admitted {:.0} TPS, {:.0} available",
        capacity.projected_tps(),
        capacity.admitted_tps,
        available.max(0.0)
    )
}
