//! Changes that come from outside the interval: an operator setting a limit, autoscaling
//! turned off for a resource, and a config reload. Each returns the events it caused, like
//! [`ServiceEngine::step`], so the caller applies and records them the same way.

use std::collections::BTreeMap;
use std::time::Instant;

use chrono::{DateTime, Utc};

use super::engine::{resource, Concurrency, ResourceSpec, ServiceEngine};
use super::events::{Event, EventKind, ScaleTarget};
use super::settings::AutoscaleSettings;

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

impl ServiceEngine {
    /// Turn autoscaling on or off for a resource. Turning it off sends the limit back to the
    /// base at once (an `autoscale_off` event when the limit changes); turning it on starts
    /// from the current limit at the next step.
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
        let (from, to) = (r.limit, r.spec.base);
        r.limit = to;
        // Cooldowns were about the autoscaled value, which is gone.
        r.last_action = None;
        Ok(Some(Event {
            reason: "autoscale turned off: back to the base limit".into(),
            ..self.event(wall, resource(name), EventKind::AutoscaleOff, from, to)
        }))
    }

    /// Set a resource's limit by hand, within [base, max_tps]. Cooldowns count from `now`, so
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
        Ok(Event {
            reason: "set by an operator".into(),
            ..self.event(wall, resource(name), EventKind::Manual, from, limit)
        })
    }

    /// Take the values another replica's engine decided (the fleet's autoscale leader): each
    /// changed value is set, its cooldown counts from `now` (so this engine, should it lead
    /// next, does not undo the step at once), and an event says so. Names this engine does
    /// not know are skipped: their policy has not reached this replica yet.
    pub fn follow(
        &mut self,
        limits: &BTreeMap<String, u32>,
        endpoint_concurrency: u32,
        now: Instant,
        wall: DateTime<Utc>,
    ) -> Vec<Event> {
        let mut changes = Vec::new();
        for (name, &to) in limits {
            if let Some(r) = self.resources.get_mut(name) {
                if r.limit != to && to > 0 {
                    changes.push((resource(name), r.limit, to));
                    r.limit = to;
                    r.last_action = Some(now);
                }
            }
        }
        let c = &mut self.concurrency;
        if c.value != endpoint_concurrency && endpoint_concurrency > 0 {
            changes.push((
                ScaleTarget::EndpointConcurrency,
                c.value,
                endpoint_concurrency,
            ));
            c.value = endpoint_concurrency;
            c.last_action = Some(now);
        }
        changes
            .into_iter()
            .map(|(target, from, to)| {
                let kind = if to > from {
                    EventKind::ScaleUp
                } else {
                    EventKind::ScaleDown
                };
                Event {
                    reason: "step taken by the fleet's autoscale leader".into(),
                    ..self.event(wall, target, kind, from, to)
                }
            })
            .collect()
    }

    /// Take new settings and resource specs after a config reload or an admin change. Resources keep their
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
            let was_enabled = state.spec.enabled;
            state.spec = *spec;
            let from = state.limit;
            let (kind, to, why) = if spec.enabled {
                let upper = spec.max_tps.max(spec.base);
                let to = from.clamp(spec.base, upper);
                (EventKind::Reload, to, "outside the new [base, max_tps]")
            } else {
                (
                    EventKind::AutoscaleOff,
                    spec.base,
                    "autoscale turned off: back to the base limit",
                )
            };
            state.limit = to;
            self.resources.insert(name.clone(), state);
            // A resource that never autoscaled just follows its base: the change that set it
            // is recorded by whoever made it, not as an autoscale event.
            if to != from && (was_enabled || spec.enabled) {
                events.push(Event {
                    reason: why.into(),
                    ..self.event(wall, resource(name), kind, from, to)
                });
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
                let target = ScaleTarget::EndpointConcurrency;
                events.push(Event {
                    reason: "max_concurrent changed by the policy".into(),
                    ..self.event(wall, target, EventKind::Reload, from, endpoint_concurrency)
                });
            }
        }
        events
    }
}
