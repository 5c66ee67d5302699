//! The autoscale engine driven through the public API in simulated time: an hour of traffic
//! is a loop over seconds, with the engine stepped every interval like the loop will.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sluice::autoscale::{
    AutoscaleSettings, CapacityInput, EndpointCapacity, EventKind, Metric, Profile, ResourceSpec,
    ScaleTarget, ServiceEngine, ServiceMetrics,
};

const SEC: Duration = Duration::from_secs(1);

fn wall(start: &str, s: u32) -> DateTime<Utc> {
    let t0: DateTime<Utc> = start.parse().expect("test time");
    t0 + chrono::Duration::seconds(i64::from(s))
}

/// Ten endpoints of 200 slots: far more capacity than any test resource wants.
fn plenty() -> CapacityInput {
    CapacityInput {
        endpoints: vec![
            EndpointCapacity {
                max_concurrent: 200,
                latency: None,
            };
            10
        ],
        cluster_max_concurrent: None,
        expected_latency: Duration::from_millis(50),
        admitted_tps: 0.0,
    }
}

/// A service with one resource offered `offered` TPS for `seconds`, stepped every interval.
/// Returns the limit after each step, and the events.
fn overload(
    enabled: bool,
    offered: u32,
    seconds: u32,
) -> (Vec<u32>, Vec<sluice::autoscale::Event>) {
    let settings = AutoscaleSettings::default();
    let t0 = Instant::now();
    let mut metrics = ServiceMetrics::new(settings.window_spec(), t0, 1);
    let alice = metrics.add_resource("alice", 10, t0);
    let mut engine = ServiceEngine::new("scoring", settings, 20);
    let spec = ResourceSpec {
        base: 10,
        max_tps: 1000,
        enabled,
    };
    engine.add_resource("alice", spec);
    let (mut limits, mut events) = (Vec::new(), Vec::new());
    for s in 0..=seconds {
        let now = t0 + SEC * s;
        if s > 0 && s % 300 == 0 {
            let happened = engine.step(now, wall("2026-05-04T12:00:00Z", s), &metrics, &plenty());
            let limit = engine.limit("alice").expect("known resource");
            alice.set_limit(limit);
            limits.push(limit);
            events.extend(happened);
        }
        let limit = alice.limit();
        alice.record(now, limit.min(offered), offered.saturating_sub(limit));
    }
    (limits, events)
}

#[test]
fn sustained_overload_doubles_every_five_minutes_up_to_max_tps() {
    let (limits, events) = overload(true, 2000, 45 * 60);
    assert_eq!(
        limits,
        vec![20, 40, 80, 160, 320, 640, 1000, 1000, 1000],
        "one step per 5 minutes, 1000 reached at 35 minutes"
    );
    let steps: Vec<(u32, u32)> = events.iter().map(|e| (e.from, e.to)).collect();
    assert_eq!(
        steps,
        vec![
            (10, 20),
            (20, 40),
            (40, 80),
            (80, 160),
            (160, 320),
            (320, 640),
            (640, 1000)
        ]
    );
    assert!(events.iter().all(|e| e.kind == EventKind::ScaleUp));
    assert_eq!(events[0].profile.as_deref(), Some("default"));
    assert_eq!(events[6].at, wall("2026-05-04T12:00:00Z", 35 * 60));
    assert!(events[0]
        .rule
        .as_deref()
        .is_some_and(|r| r.contains("throttled_requests")));
}

#[test]
fn without_autoscale_the_limit_stays_at_base() {
    let (limits, events) = overload(false, 2000, 45 * 60);
    assert!(limits.iter().all(|&l| l == 10), "{limits:?}");
    assert!(events.is_empty());
}

#[test]
fn idle_resource_scales_back_down_after_thirty_minutes_of_low_utilization() {
    let settings = AutoscaleSettings::default();
    let t0 = Instant::now();
    let mut metrics = ServiceMetrics::new(settings.window_spec(), t0, 1);
    let alice = metrics.add_resource("alice", 10, t0);
    let mut engine = ServiceEngine::new("scoring", settings, 20);
    let spec = ResourceSpec {
        base: 10,
        max_tps: 1000,
        enabled: true,
    };
    engine.add_resource("alice", spec);
    let mut limits = Vec::new();
    for s in 0..=(120 * 60) {
        let now = t0 + SEC * s;
        if s > 0 && s % 300 == 0 {
            engine.step(now, wall("2026-05-04T12:00:00Z", s), &metrics, &plenty());
            let limit = engine.limit("alice").expect("known resource");
            alice.set_limit(limit);
            limits.push(limit);
        }
        // Overloaded for 20 minutes, then a trickle of 5 TPS.
        let offered = if s < 20 * 60 { 2000 } else { 5 };
        let limit = alice.limit();
        alice.record(now, limit.min(offered), offered.saturating_sub(limit));
    }
    // 20 minutes of overload: 160. The decrease cooldown (30m) counts from the last raise
    // (at 20m), so the first decrease is at 50m, then one every 30m while utilization stays low.
    assert_eq!(&limits[..4], &[20, 40, 80, 160]);
    assert_eq!(limits[8], 160, "45m: still cooling down");
    assert_eq!(limits[9], 80, "50m");
    assert_eq!(limits[14], 80, "75m: cooling down since 50m");
    assert_eq!(limits[15], 40, "80m: 80 at 5 TPS is 6% utilized");
    assert_eq!(limits[21], 20, "110m");
    assert_eq!(*limits.last().expect("steps"), 20);
}

#[test]
fn capacity_gate_raises_partially_then_defers_then_resumes() {
    let settings = AutoscaleSettings::default();
    let interval = settings.interval;
    let t0 = Instant::now();
    let mut metrics = ServiceMetrics::new(settings.window_spec(), t0, 2);
    let alice = metrics.add_resource("alice", 10, t0);
    let bob = metrics.add_resource("bob", 700, t0);
    let mut engine = ServiceEngine::new("scoring", settings, 20);
    let base = |base, enabled| ResourceSpec {
        base,
        max_tps: 1000,
        enabled,
    };
    engine.add_resource("alice", base(10, true));
    engine.add_resource("bob", base(700, false));
    let mut outcomes = Vec::new();
    for s in 0..=(35 * 60) {
        let now = t0 + SEC * s;
        if s > 0 && s % 300 == 0 {
            // 2 endpoints × 20 slots at 50 ms: 800 TPS projected.
            let capacity = CapacityInput::from_metrics(
                &metrics,
                &[20, 20],
                None,
                Duration::from_millis(50),
                now,
                interval,
            );
            assert_eq!(capacity.projected_tps(), 800.0);
            let events = engine.step(now, wall("2026-05-04T12:00:00Z", s), &metrics, &capacity);
            assert!(events.len() <= 1, "{events:?}");
            let limit = engine.limit("alice").expect("known resource");
            alice.set_limit(limit);
            outcomes.push(events.first().map(|e| (e.kind, e.from, e.to)));
        }
        let limit = alice.limit();
        alice.record(now, limit, 2000 - limit);
        // Bob admits a steady 700 TPS for 30 minutes, then goes quiet.
        if s < 30 * 60 {
            bob.record(now, 700, 0);
        }
        metrics.record_latency((s % 2) as usize, Duration::from_millis(50), now);
    }
    use EventKind::{DeferredInsufficientCapacity as Deferred, ScaleUp};
    assert_eq!(
        outcomes,
        vec![
            Some((ScaleUp, 10, 20)),    // 710 admitted: 90 available, +10 fits
            Some((ScaleUp, 20, 40)),    // 720: 80 available
            Some((ScaleUp, 40, 80)),    // 740: 60 available
            Some((ScaleUp, 80, 100)),   // 780: 20 available, wanted +80: partial
            Some((Deferred, 100, 100)), // 800: nothing available
            Some((Deferred, 100, 100)), // rechecked every interval
            Some((ScaleUp, 100, 200)),  // bob went quiet: 700 available
        ]
    );
}

#[test]
fn capacity_is_shared_between_resources_raised_in_one_step() {
    let settings = AutoscaleSettings::default();
    let t0 = Instant::now();
    let mut metrics = ServiceMetrics::new(settings.window_spec(), t0, 1);
    let a = metrics.add_resource("a", 100, t0);
    let b = metrics.add_resource("b", 100, t0);
    let mut engine = ServiceEngine::new("scoring", settings, 20);
    for name in ["a", "b"] {
        let spec = ResourceSpec {
            base: 100,
            max_tps: 1000,
            enabled: true,
        };
        engine.add_resource(name, spec);
    }
    for s in 0..300 {
        let now = t0 + SEC * s;
        a.record(now, 100, 50);
        b.record(now, 100, 50);
    }
    let mut capacity = plenty();
    capacity.endpoints.truncate(1); // 200 slots at 50 ms: 4000 TPS
    capacity.admitted_tps = 3850.0; // 150 available for two raises of +100
    let now = t0 + SEC * 300;
    let events = engine.step(now, wall("2026-05-04T12:00:00Z", 300), &metrics, &capacity);
    let moves: Vec<_> = events.iter().map(|e| (e.resource(), e.to)).collect();
    assert_eq!(moves, vec![(Some("a"), 200), (Some("b"), 150)]);
}

#[test]
fn turning_autoscale_off_returns_to_base_at_once() {
    let t0 = Instant::now();
    let mut engine = ServiceEngine::new("scoring", AutoscaleSettings::default(), 20);
    let spec = ResourceSpec {
        base: 10,
        max_tps: 1000,
        enabled: true,
    };
    engine.add_resource("alice", spec);
    let at = wall("2026-05-04T12:00:00Z", 0);
    let manual = engine.set_limit("alice", 300, t0, at).expect("in range");
    assert_eq!(
        (manual.kind, manual.from, manual.to),
        (EventKind::Manual, 10, 300)
    );
    assert!(engine.set_limit("alice", 5000, t0, at).is_err());
    assert!(engine.set_limit("nobody", 50, t0, at).is_err());
    let off = engine
        .set_enabled("alice", false, at)
        .expect("known resource")
        .expect("limit changed");
    assert_eq!(
        (off.kind, off.from, off.to),
        (EventKind::AutoscaleOff, 300, 10)
    );
    assert_eq!(engine.limit("alice"), Some(10));
}

/// A profile whose rule reads a gauge nobody samples: the default applies.
#[test]
fn unreadable_metric_applies_the_profile_default() {
    let settings: AutoscaleSettings = toml::from_str(
        r#"
        [[profile]]
        name = "latency-guard"
        default = 50
        [[profile.rule]]
        metric = "latency_ms"
        statistic = "average"
        time_grain = "1m"
        time_window = "5m"
        time_aggregation = "average"
        operator = "less_than"
        threshold = 100
        direction = "increase"
        type = "change_count"
        value = 10
        cooldown = "5m"
        "#,
    )
    .expect("valid settings");
    let t0 = Instant::now();
    let mut metrics = ServiceMetrics::new(settings.window_spec(), t0, 1);
    metrics.add_resource("alice", 10, t0);
    let mut engine = ServiceEngine::new("scoring", settings, 20);
    let spec = ResourceSpec {
        base: 10,
        max_tps: 1000,
        enabled: true,
    };
    engine.add_resource("alice", spec);
    let at = wall("2026-05-04T12:00:00Z", 300);
    let events = engine.step(t0 + SEC * 300, at, &metrics, &plenty());
    assert_eq!(events.len(), 1);
    assert_eq!((events[0].from, events[0].to), (10, 50));
    assert!(
        events[0].reason.contains("could not be read"),
        "{}",
        events[0].reason
    );
    // Once latency is observed (and low), the rule itself acts.
    for s in 300..600 {
        metrics.record_latency(0, Duration::from_millis(40), t0 + SEC * s);
    }
    let events = engine.step(t0 + SEC * 600, at, &metrics, &plenty());
    assert_eq!((events[0].from, events[0].to), (50, 60));
}

#[test]
fn endpoint_concurrency_follows_a_queue_rule() {
    let settings: Result<AutoscaleSettings, _> = toml::from_str(
        r#"
        [[profile]]
        name = "queue"
        [[profile.rule]]
        metric = "queue_length"
        statistic = "max"
        time_grain = "10s"
        time_window = "30s"
        time_aggregation = "minimum"
        operator = "greater_than"
        threshold = 0
        direction = "increase"
        type = "exact_count"
        value = 250
        cooldown = "1m"
        target = "endpoint_concurrency"
        "#,
    );
    // 250 is refused by validation; here it shows the clamp to 200 as well.
    let settings = settings.expect("parses");
    let t0 = Instant::now();
    let metrics = ServiceMetrics::new(settings.window_spec(), t0, 1);
    let mut engine = ServiceEngine::new("scoring", settings, 20);
    for s in 0..30 {
        metrics.record_gauge(Metric::QueueLength, 3.0, t0 + SEC * s);
    }
    assert!(!metrics.record_gauge(Metric::Requests, 1.0, t0));
    let events = engine.step(
        t0 + SEC * 30,
        wall("2026-05-04T12:00:00Z", 30),
        &metrics,
        &plenty(),
    );
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].target, ScaleTarget::EndpointConcurrency);
    assert_eq!((events[0].from, events[0].to), (20, 200));
    assert_eq!(engine.endpoint_concurrency(), 200);
}

#[test]
fn weekend_profile_bounds_apply_when_it_starts() {
    let mut weekend = Profile::builtin_default();
    weekend.name = "weekend".into();
    weekend.min = Some(100);
    weekend.recurrence = Some(sluice::autoscale::Recurrence {
        time_zone: "Europe/Paris".into(),
        days: vec![
            sluice::autoscale::Day::Saturday,
            sluice::autoscale::Day::Sunday,
        ],
        hours: vec![0],
        minutes: vec![0],
    });
    let mut weekday = Profile::builtin_default();
    weekday.name = "weekday".into();
    weekday.recurrence = Some(sluice::autoscale::Recurrence {
        days: vec![sluice::autoscale::Day::Monday],
        ..weekend.recurrence.clone().expect("set above")
    });
    let settings = AutoscaleSettings {
        profiles: vec![weekend, weekday],
        ..AutoscaleSettings::default()
    };
    let t0 = Instant::now();
    let mut metrics = ServiceMetrics::new(settings.window_spec(), t0, 1);
    metrics.add_resource("alice", 10, t0);
    let mut engine = ServiceEngine::new("scoring", settings, 20);
    let spec = ResourceSpec {
        base: 10,
        max_tps: 1000,
        enabled: true,
    };
    engine.add_resource("alice", spec);
    // Friday 2026-05-08 23:00 in Paris (UTC+2): weekday, nothing to do.
    let friday: DateTime<Utc> = "2026-05-08T21:00:00Z".parse().expect("time");
    assert!(engine
        .step(t0 + SEC * 300, friday, &metrics, &plenty())
        .is_empty());
    // Saturday 00:00 Paris: the weekend profile's floor of 100 applies at once.
    let saturday: DateTime<Utc> = "2026-05-08T22:00:00Z".parse().expect("time");
    let events = engine.step(t0 + SEC * 600, saturday, &metrics, &plenty());
    assert_eq!(events[0].profile.as_deref(), Some("weekend"));
    assert_eq!((events[0].from, events[0].to), (10, 100));
}

#[test]
fn reload_keeps_allowed_limits_and_moves_the_rest() {
    let t0 = Instant::now();
    let at = wall("2026-05-04T12:00:00Z", 0);
    let mut engine = ServiceEngine::new("scoring", AutoscaleSettings::default(), 20);
    let spec = |base, max_tps, enabled| ResourceSpec {
        base,
        max_tps,
        enabled,
    };
    for name in ["kept", "capped", "off", "dropped"] {
        engine.add_resource(name, spec(10, 1000, true));
        engine.set_limit(name, 300, t0, at).expect("in range");
    }
    let specs: std::collections::BTreeMap<String, ResourceSpec> = [
        ("kept", spec(10, 1000, true)),
        ("capped", spec(10, 200, true)),
        ("off", spec(10, 1000, false)),
        ("new", spec(50, 1000, true)),
    ]
    .into_iter()
    .map(|(n, s)| (n.to_owned(), s))
    .collect();
    let events = engine.reload(AutoscaleSettings::default(), &specs, 40, at);
    let seen: Vec<_> = events
        .iter()
        .map(|e| (e.resource().unwrap_or("*"), e.kind, e.from, e.to))
        .collect();
    assert_eq!(
        seen,
        vec![
            ("capped", EventKind::Reload, 300, 200),
            ("off", EventKind::AutoscaleOff, 300, 10),
            ("*", EventKind::Reload, 20, 40),
        ]
    );
    assert_eq!(engine.limit("kept"), Some(300));
    assert_eq!(engine.limit("new"), Some(50));
    assert_eq!(engine.limit("dropped"), None);
    assert_eq!(engine.endpoint_concurrency(), 40);
}
