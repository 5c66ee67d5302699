//! Scale events (every action and deferral, as data the admin API serves as JSON) and the
//! bounded in-memory history they are kept in. Logging and notify POSTs belong to the loop.

use std::collections::VecDeque;
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// History length when none is configured.
pub const DEFAULT_HISTORY: usize = 1000;

/// What a scale event did.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// The target went up (a rule, the profile default, or the profile's bounds).
    ScaleUp,
    /// The target went down (rules or bounds).
    ScaleDown,
    /// An increase was wanted but the service had no capacity left; retried next interval.
    DeferredInsufficientCapacity,
    /// An operator set the value by hand.
    Manual,
    /// A config reload changed the value (new base or bounds).
    Reload,
    /// Autoscale was turned off for the resource: back to its base limit.
    AutoscaleOff,
    /// An endpoint joined the service (`from` 0, `to` its cap).
    EndpointAdded,
    /// An endpoint left the service (`from` its cap, `to` 0): it takes no new request, and
    /// those in flight finish.
    EndpointRemoved,
    /// An endpoint passed its health check `healthy_after` times in a row: it takes traffic
    /// (`from` 0, `to` its cap).
    EndpointHealthy,
    /// An endpoint failed its health check `unhealthy_after` times in a row: it takes none
    /// until it recovers (`from` its cap, `to` 0).
    EndpointUnhealthy,
    /// An endpoint answered that it is full (an overload status): it takes no request until
    /// its cooldown ends, then one probe (`from` its cap, `to` 0).
    EndpointCooledDown,
    /// An endpoint failed `consecutive_failures` times in a row: ejected for a while, then
    /// probed (`from` its cap, `to` 0).
    EndpointEjected,
}

/// What an event is about.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(tag = "target", rename_all = "snake_case")]
pub enum ScaleTarget {
    /// A resource's TPS limit.
    Resource {
        /// Resource name (never its key).
        resource: String,
    },
    /// The service's per-endpoint `max_concurrent`.
    EndpointConcurrency,
    /// Another setting changed by an operator or a reload (`key` names it, e.g.
    /// `queue_size`; `config` for a whole reload).
    Setting {
        /// The setting's key.
        key: String,
    },
    /// One endpoint of the service.
    Endpoint {
        /// Its URL.
        endpoint: String,
    },
}

/// One scale action or deferral.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct Event {
    /// Sequence number given by [`EventHistory::push`] (0 until then); increases by one per
    /// event, so clients can poll for what is new.
    pub id: u64,
    /// Wall-clock time of the decision.
    pub at: DateTime<Utc>,
    /// Service name.
    pub service: String,
    /// What was scaled.
    #[serde(flatten)]
    pub target: ScaleTarget,
    /// What happened.
    pub kind: EventKind,
    /// Value before.
    pub from: u32,
    /// Value after (equal to `from` for a deferral).
    pub to: u32,
    /// Profile in force, for automatic actions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    /// The rule that acted, described (see `Rule::describe`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// Why, in words, with the numbers behind it.
    pub reason: String,
}

impl Event {
    /// An event no rule or profile made (an operator, a reload, an endpoint that joined,
    /// left or changed health); numbered when pushed to the history.
    pub fn change(
        at: DateTime<Utc>,
        service: impl Into<String>,
        target: ScaleTarget,
        kind: EventKind,
        (from, to): (u32, u32),
        reason: impl Into<String>,
    ) -> Self {
        Self {
            id: 0,
            at,
            service: service.into(),
            target,
            kind,
            from,
            to,
            profile: None,
            rule: None,
            reason: reason.into(),
        }
    }

    /// The resource the event is about, if it is about one.
    pub fn resource(&self) -> Option<&str> {
        match &self.target {
            ScaleTarget::Resource { resource } => Some(resource),
            ScaleTarget::EndpointConcurrency
            | ScaleTarget::Setting { .. }
            | ScaleTarget::Endpoint { .. } => None,
        }
    }
}

/// Filter for [`EventHistory::query`]; every field set must match. Deserializable so the
/// admin API can take it from a query string.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct EventQuery {
    /// Only this service.
    pub service: Option<String>,
    /// Only this resource.
    pub resource: Option<String>,
    /// Only events at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// At most this many, the most recent ones.
    pub limit: Option<usize>,
}

#[derive(Debug)]
struct Ring {
    max: usize,
    next_id: u64,
    events: VecDeque<Event>,
    /// Events ever pushed, by kind (monotonic, for metrics).
    totals: std::collections::BTreeMap<EventKindName, u64>,
}

type EventKindName = &'static str;

impl EventKind {
    /// The kind as written in JSON and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ScaleUp => "scale_up",
            Self::ScaleDown => "scale_down",
            Self::DeferredInsufficientCapacity => "deferred_insufficient_capacity",
            Self::Manual => "manual",
            Self::Reload => "reload",
            Self::AutoscaleOff => "autoscale_off",
            Self::EndpointAdded => "endpoint_added",
            Self::EndpointRemoved => "endpoint_removed",
            Self::EndpointHealthy => "endpoint_healthy",
            Self::EndpointUnhealthy => "endpoint_unhealthy",
            Self::EndpointCooledDown => "endpoint_cooled_down",
            Self::EndpointEjected => "endpoint_ejected",
        }
    }
}

/// The last `max` events, oldest dropped first. Shared by the loop (writer) and the admin
/// API (reader) behind one `Mutex`: both touch it once per interval or request.
#[derive(Debug)]
pub struct EventHistory {
    ring: Mutex<Ring>,
}

impl Default for EventHistory {
    fn default() -> Self {
        Self::new(DEFAULT_HISTORY)
    }
}

impl EventHistory {
    /// An empty history keeping at most `max` events (at least one).
    pub fn new(max: usize) -> Self {
        let max = max.max(1);
        Self {
            ring: Mutex::new(Ring {
                max,
                next_id: 1,
                events: VecDeque::with_capacity(max.min(DEFAULT_HISTORY)),
                totals: std::collections::BTreeMap::new(),
            }),
        }
    }

    /// Append `event`, numbering it; returns its id.
    pub fn push(&self, mut event: Event) -> u64 {
        let mut ring = self.lock();
        let id = ring.next_id;
        ring.next_id += 1;
        event.id = id;
        *ring.totals.entry(event.kind.as_str()).or_default() += 1;
        if ring.events.len() == ring.max {
            ring.events.pop_front();
        }
        ring.events.push_back(event);
        id
    }

    /// Events matching `query`, oldest first.
    pub fn query(&self, query: &EventQuery) -> Vec<Event> {
        let ring = self.lock();
        let matching = ring.events.iter().filter(|e| {
            query.service.as_ref().is_none_or(|s| &e.service == s)
                && query
                    .resource
                    .as_ref()
                    .is_none_or(|r| e.resource() == Some(r.as_str()))
                && query.since.is_none_or(|t| e.at >= t)
        });
        let mut out: Vec<Event> = matching.cloned().collect();
        if let Some(limit) = query.limit {
            let drop = out.len().saturating_sub(limit);
            out.drain(..drop);
        }
        out
    }

    /// Events ever pushed, by kind.
    pub fn totals(&self) -> Vec<(&'static str, u64)> {
        self.lock().totals.iter().map(|(k, v)| (*k, *v)).collect()
    }

    /// Number of events held.
    pub fn len(&self) -> usize {
        self.lock().events.len()
    }

    /// Whether no event is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ring> {
        // A panic while pushing leaves a consistent deque (push/pop are atomic for us).
        self.ring.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(service: &str, resource: Option<&str>, at: &str) -> Event {
        Event {
            id: 0,
            at: at.parse().expect("test time"),
            service: service.into(),
            target: resource.map_or(ScaleTarget::EndpointConcurrency, |r| {
                ScaleTarget::Resource { resource: r.into() }
            }),
            kind: EventKind::ScaleUp,
            from: 10,
            to: 20,
            profile: Some("default".into()),
            rule: None,
            reason: "test".into(),
        }
    }

    #[test]
    fn history_is_bounded_and_numbered() {
        let h = EventHistory::new(3);
        for i in 0..10 {
            h.push(event("s", Some("r"), &format!("2026-01-01T00:00:0{i}Z")));
        }
        let all = h.query(&EventQuery::default());
        assert_eq!(all.len(), 3);
        assert_eq!(all.iter().map(|e| e.id).collect::<Vec<_>>(), vec![8, 9, 10]);
    }

    #[test]
    fn query_by_service_resource_since_and_limit() {
        let h = EventHistory::default();
        h.push(event("a", Some("r1"), "2026-01-01T00:00:00Z"));
        h.push(event("a", Some("r2"), "2026-01-01T00:05:00Z"));
        h.push(event("b", Some("r1"), "2026-01-01T00:10:00Z"));
        h.push(event("a", None, "2026-01-01T00:15:00Z"));
        let q = |service: Option<&str>, resource: Option<&str>, since: Option<&str>| EventQuery {
            service: service.map(Into::into),
            resource: resource.map(Into::into),
            since: since.map(|s| s.parse().expect("test time")),
            limit: None,
        };
        assert_eq!(h.query(&q(Some("a"), None, None)).len(), 3);
        assert_eq!(h.query(&q(None, Some("r1"), None)).len(), 2);
        assert_eq!(h.query(&q(Some("a"), Some("r1"), None)).len(), 1);
        assert_eq!(
            h.query(&q(None, None, Some("2026-01-01T00:05:00Z"))).len(),
            3
        );
        let last = h.query(&EventQuery {
            limit: Some(1),
            ..EventQuery::default()
        });
        assert_eq!(last.len(), 1);
        assert_eq!(last[0].id, 4);
    }

    #[test]
    fn events_serialize_as_flat_json() {
        let mut e = event("a", Some("r1"), "2026-01-01T00:00:00Z");
        e.kind = EventKind::DeferredInsufficientCapacity;
        let json = serde_json::to_value(&e).expect("serializable");
        assert_eq!(json["target"], "resource");
        assert_eq!(json["resource"], "r1");
        assert_eq!(json["kind"], "deferred_insufficient_capacity");
        assert_eq!(json["at"], "2026-01-01T00:00:00Z");
        let back: Event = serde_json::from_value(json).expect("round trip");
        assert_eq!(back, e);
        let e = event("a", None, "2026-01-01T00:00:00Z");
        let json = serde_json::to_value(&e).expect("serializable");
        assert_eq!(json["target"], "endpoint_concurrency");
    }
}
