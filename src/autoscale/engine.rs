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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
    pub spec: ResourceSpecView,
    /// Current TPS limit.
    pub limit: u32,
    /// When the limit last changed by a scale action (cooldowns count from it).
    #[serde(skip)]
    pub last_action: Option<Instant>,
}

/// Serializable copy of a [`ResourceSpec`] (for the admin API).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ResourceSpecView {
    /// Configured TPS limit.
    pub base: u32,
    /// Highest autoscaled limit.
    pub max_tps: u32,
    /// Whether autoscaling applies.
    pub enabled: bool,
}

impl From<ResourceSpec> for ResourceSpecView {
    fn from(s: ResourceSpec) -> Self {
        Self {
            base: s.base,
            max_tps: s.max_tps,
            enabled: s.enabled,
        }
    }
}

/// Why a manual change was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// No resource of that name in this service.
    #[error("unknown resource {0:?}")]
    UnknownResource(String),
    /// The value is outside what the resource allows.
    #[error("{value} is out of range; allowed {lower}..={upper}")]
    OutOfRange {
        /// The value asked for.
        value: u32,
        /// The resource's base.
        lower: u32,
        /// The resource's max_tps.
        upper: u32,
    },
}

/// Endpoint concurrency state of the service.
#[derive(Debug, Clone, Copy)]
struct Concurrency {
    base: u32,
    value: u32,
    last_action: Option<Instant>,
}

/// Autoscaling state of one service and its resources.
#[derive(Debug, Clone)]
pub struct ServiceEngine {
    service: String,
    settings: AutoscaleSettings,
    builtin: Profile,
    resources: BTreeMap<String, ResourceState>,
    concurrency: Concurrency,
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
                spec: spec.into(),
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

    /// Turn autoscaling on or off for a resource. Turning it off sends the limit back to the
    /// base at once (returned as an `autoscale_off` event when the limit changes).
    pub fn set_enabled(
        &mut self,
        name: &str,
        enabled: bool,
        wall: DateTime<Utc>,
    ) -> Result<Option<Event>, EngineError> {
        let r = self
            .resources
            .get_mut(name)
            .ok_or_else(|| EngineError::UnknownResource(name.to_owned()))?;
        r.spec.enabled = enabled;
        if enabled || r.limit == r.spec.base {
            return Ok(None);
        }
        let from = r.limit;
        r.limit = r.spec.base;
        r.last_action = None;
        let reason = "autoscale turned off: back to the base limit".to_owned();
        Ok(Some(self.event(
            wall,
            name,
            EventKind::AutoscaleOff,
            from,
            None,
            None,
            reason,
        )))
    }

    /// Set a resource's limit by hand, within [base, max_tps]. Cooldowns count from now, so
    /// the next interval does not undo it at once.
    pub fn set_limit(
        &mut self,
        name: &str,
        limit: u32,
        now: Instant,
        wall: DateTime<Utc>,
    ) -> Result<Event, EngineError> {
        let r = self
            .resources
            .get_mut(name)
            .ok_or_else(|| EngineError::UnknownResource(name.to_owned()))?;
        let (lower, upper) = (r.spec.base, r.spec.max_tps.max(r.spec.base));
        if !(lower..=upper).contains(&limit) {
            return Err(EngineError::OutOfRange {
                value: limit,
                lower,
                upper,
            });
        }
        let from = r.limit;
        r.limit = limit;
        r.last_action = Some(now);
        let reason = "set by an operator".to_owned();
        Ok(self.event(wall, name, EventKind::Manual, from, None, None, reason))
    }

    /// Take new settings and resource specs after a config reload. Resources keep their
    /// current limit when it is still allowed; otherwise it moves into [base, max_tps]
    /// (`reload` event), or to the base when autoscaling is now off (`autoscale_off`). New
    /// resources start at their base; missing ones are dropped. A changed
    /// `endpoint_concurrency` base resets the service's concurrency to it.
    pub fn reload(
        &mut self,
        settings: AutoscaleSettings,
        resources: &BTreeMap<String, ResourceSpec>,
        endpoint_concurrency: u32,
        wall: DateTime<Utc>,
    ) -> Vec<Event> {
        self.settings = settings;
        let mut events = Vec::new();
        let old = std::mem::take(&mut self.resources);
        for (name, spec) in resources {
            let Some(mut state) = old.get(name).cloned() else {
                self.add_resource(name, *spec);
                continue;
            };
            state.spec = (*spec).into();
            let from = state.limit;
            let (kind, to, why) = if !spec.enabled {
                (
                    EventKind::AutoscaleOff,
                    spec.base,
                    "autoscale turned off by reload",
                )
            } else {
                let upper = spec.max_tps.max(spec.base);
                let to = from.clamp(spec.base, upper);
                (
                    EventKind::Reload,
                    to,
                    "outside the reloaded [base, max_tps]",
                )
            };
            state.limit = to;
            self.resources.insert(name.clone(), state);
            if to != from {
                events.push(self.event(wall, name, kind, from, None, None, why.to_owned()));
            }
        }
        if endpoint_concurrency != self.concurrency.base {
            let from = self.concurrency.value;
            self.concurrency = Concurrency {
                base: endpoint_concurrency,
                value: endpoint_concurrency,
                last_action: None,
            };
            if from != endpoint_concurrency {
                let mut e =
                    self.event(wall, "", EventKind::Reload, from, None, None, String::new());
                e.target = ScaleTarget::EndpointConcurrency;
                e.to = endpoint_concurrency;
                e.reason = "max_concurrent changed by reload".into();
                events.push(e);
            }
        }
        events
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
                        let p = Some(profile.name.clone());
                        events.push(self.event(wall, &name, kind, from, p, rule, reason));
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
            let p = Some(profile.name.clone());
            let mut e = self.event(wall, &name, kind, from, p, rule, reason);
            e.to = granted;
            events.push(e);
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
        let mut e = self.event(
            wall,
            "",
            kind,
            from,
            Some(profile.name.clone()),
            rule,
            reason,
        );
        e.target = ScaleTarget::EndpointConcurrency;
        e.to = to;
        Some(e)
    }

    /// An event about resource `name` with `to == from` (callers set `to` when it moved).
    #[allow(clippy::too_many_arguments)] // a struct literal in disguise
    fn event(
        &self,
        at: DateTime<Utc>,
        name: &str,
        kind: EventKind,
        from: u32,
        profile: Option<String>,
        rule: Option<String>,
        reason: String,
    ) -> Event {
        let to = self.resources.get(name).map_or(from, |r| r.limit);
        Event {
            id: 0,
            at,
            service: self.service.clone(),
            target: ScaleTarget::Resource {
                resource: name.to_owned(),
            },
            kind,
            from,
            to,
            profile,
            rule,
            reason,
        }
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
