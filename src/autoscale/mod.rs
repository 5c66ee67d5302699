//! Autoscaling of resource TPS limits (and optionally endpoint concurrency): the settings of
//! `[service.autoscale]`, bounded metric windows fed by the request path, the pure decision
//! (profile in force → rules → cooldowns → clamp → capacity gate), a small per-service engine
//! that holds the state, and the event history the admin API serves.
//!
//! Pure: nothing here reads a clock, touches the network or knows the live policy. The policy
//! holds each service's engine (`policy::ServiceAutoscaler`); the control plane drives it
//! every interval and sends the notifications (`control::autoscale`, `control::notify`).
//!
//! Time is always an argument: monotonic `Instant`s for windows and cooldowns (pass
//! `tokio::time::Instant::now().into_std()` so paused test time works), `DateTime<Utc>` for
//! profile schedules.

mod capacity;
mod control;
mod engine;
mod evaluate;
mod events;
mod metrics;
mod profile;
mod ring;
mod settings;
mod validate;
mod window;

pub use capacity::{gate, CapacityInput, EndpointCapacity, Gate};
pub use control::EngineError;
pub use engine::{ResourceSpec, ResourceState, ServiceEngine};
pub use evaluate::{evaluate, proposed, Bounds, Cause, Decision, EvalInput, CONCURRENCY_BOUNDS};
pub use events::{Event, EventHistory, EventKind, EventQuery, ScaleTarget, DEFAULT_HISTORY};
pub use metrics::{Metric, Metrics, ResourceMetrics, ServiceMetrics};
pub use profile::{covers, last_start, local_to_utc, select};
pub use ring::{CounterRing, GaugeRing};
pub use settings::{
    Aggregation, AutoscaleSettings, ChangeType, Day, Direction, FixedDate, Operator, Profile,
    Recurrence, Rule, Statistic, Target,
};
pub use validate::{
    validate, Problem, MAX_TIME_GRAIN, MAX_TIME_WINDOW, MAX_WINDOW_GRAINS, MIN_DURATION,
};
pub use window::{aggregate, recent, Summary, WindowQuery, WindowSpec};
