//! The live state: what the request path reads on every request and the control plane changes
//! — the policy in force, the history of changes and autoscale events, and the fleet's store.
//! The control plane holds this, not the proxy.

use std::sync::Arc;

use arc_swap::ArcSwap;

use super::Policy;
use crate::autoscale::{EventHistory, DEFAULT_HISTORY};
use crate::store::Fleet;

/// The policy in force (swapped whole), the event history and the fleet's store.
#[derive(Debug)]
pub struct Live {
    policy: ArcSwap<Policy>,
    events: Arc<EventHistory>,
    fleet: Option<Arc<Fleet>>,
}

impl Live {
    /// `policy` in force; `fleet` is the shared store its limits use, if any.
    pub fn new(policy: Policy, fleet: Option<Arc<Fleet>>) -> Arc<Self> {
        Arc::new(Self {
            policy: ArcSwap::from_pointee(policy),
            events: Arc::new(EventHistory::new(DEFAULT_HISTORY)),
            fleet,
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

    /// The shared store, when replicas share limits.
    pub fn fleet(&self) -> Option<&Arc<Fleet>> {
        self.fleet.as_ref()
    }
}
