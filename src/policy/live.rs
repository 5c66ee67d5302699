//! The live state: what the request path reads on every request and the control plane changes
//! — the policy in force, the history of changes and autoscale events, and the fleet's store.
//! The control plane holds this, not the proxy.

use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use super::Policy;
use crate::autoscale::{Event, EventHistory, EventKind, DEFAULT_HISTORY};
use crate::balance::Discovered;
use crate::store::Fleet;

/// The policy in force (swapped whole), the event history and the fleet's store.
#[derive(Debug)]
pub struct Live {
    policy: ArcSwap<Policy>,
    events: Arc<EventHistory>,
    fleet: Option<Arc<Fleet>>,
    /// What DNS found last for the entries to resolve; every policy is built with it.
    discovered: Mutex<Arc<Discovered>>,
}

impl Live {
    /// `policy` in force; `fleet` is the shared store its limits use, if any.
    pub fn new(policy: Policy, fleet: Option<Arc<Fleet>>) -> Arc<Self> {
        Arc::new(Self {
            policy: ArcSwap::from_pointee(policy),
            events: Arc::new(EventHistory::new(DEFAULT_HISTORY)),
            fleet,
            discovered: Mutex::default(),
        })
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy.load_full()
    }

    /// Replace the policy; requests already admitted finish under the one they saw.
    pub fn set_policy(&self, policy: Policy) {
        self.policy.store(Arc::new(policy));
    }

    /// The history of changes and autoscale events.
    pub fn events(&self) -> &Arc<EventHistory> {
        &self.events
    }

    /// Number `event` into the history and log it: a warning when an endpoint went out of
    /// traffic, else info. Every event goes through here, whatever caused it (an operator, a
    /// reload, the autoscaler, a health check, an endpoint's answer).
    pub fn record(&self, mut event: Event) -> Event {
        event.id = self.events.push(event.clone());
        let e = &event;
        macro_rules! log {
            ($level:ident) => {
                tracing::$level!(
                    target: "sluice::events",
                    id = e.id,
                    service = %e.service,
                    resource = e.resource(),
                    kind = ?e.kind,
                    from = e.from,
                    to = e.to,
                    rule = e.rule.as_deref(),
                    reason = %e.reason,
                    "event"
                )
            };
        }
        match e.kind {
            EventKind::EndpointUnhealthy
            | EventKind::EndpointCooledDown
            | EventKind::EndpointEjected => log!(warn),
            _ => log!(info),
        }
        event
    }

    /// What DNS found last for the entries to resolve.
    pub fn discovered(&self) -> Arc<Discovered> {
        Arc::clone(&self.discovered.lock().expect("discovered set lock"))
    }

    /// Record what DNS found; the next policy built uses it.
    pub fn set_discovered(&self, discovered: Discovered) {
        *self.discovered.lock().expect("discovered set lock") = Arc::new(discovered);
    }

    /// The shared store, when replicas share limits.
    pub fn fleet(&self) -> Option<&Arc<Fleet>> {
        self.fleet.as_ref()
    }
}
