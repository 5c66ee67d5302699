//! Semantic checks on `[service.autoscale]`, for the config validator to call with the key
//! path of the table. Unknown names (metric, operator, type, statistic, aggregation, target,
//! day) are already refused by serde when parsing, with the list of allowed names.

use std::collections::HashMap;
use std::time::Duration;

use chrono_tz::Tz;

use super::evaluate::CONCURRENCY_BOUNDS;
use super::settings::{AutoscaleSettings, ChangeType, Direction, Profile, Rule, Target};

/// Most storage grains a metric window may hold (per resource: 24 bytes each).
pub const MAX_WINDOW_GRAINS: u64 = 20_000;
/// Shortest `interval`, `time_grain`, `time_window` and `cooldown`.
pub const MIN_DURATION: Duration = Duration::from_secs(1);
/// Longest `time_grain`.
pub const MAX_TIME_GRAIN: Duration = Duration::from_secs(12 * 3600);
/// Longest `time_window`.
pub const MAX_TIME_WINDOW: Duration = Duration::from_secs(24 * 3600);

/// One problem in autoscale settings: the dotted key it concerns and what is wrong with it (the
/// config validator reports it as its own).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key path, e.g. `service[0].autoscale.interval`.
    pub key: String,
    /// What is wrong and what is allowed.
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// Check `settings` (found at `key`, e.g. `service[0].autoscale`) for a service whose
/// resources may autoscale up to `max_tps`. Returns every problem, each naming its key.
pub fn validate(settings: &AutoscaleSettings, key: &str, max_tps: u32) -> Vec<Problem> {
    let mut p = Vec::new();
    let mut add = |key: String, message: String| p.push(Problem { key, message });

    at_least(
        &mut add,
        format!("{key}.interval"),
        settings.interval,
        MIN_DURATION,
    );
    if settings.expected_latency < Duration::from_millis(1) {
        add(
            format!("{key}.expected_latency"),
            "must be at least 1ms (e.g. \"50ms\")".into(),
        );
    }
    for (i, url) in settings.notify.iter().enumerate() {
        let ok = url.parse::<http::Uri>().ok().is_some_and(|u| {
            matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some()
        });
        if !ok {
            add(
                format!("{key}.notify[{i}]"),
                format!("{url:?} is not an http:// or https:// URL"),
            );
        }
    }

    let mut names: HashMap<&str, usize> = HashMap::new();
    let mut regular: Option<usize> = None;
    for (i, profile) in settings.profiles.iter().enumerate() {
        let pk = format!("{key}.profile[{i}]");
        if profile.name.trim().is_empty() {
            add(format!("{pk}.name"), "must not be empty".into());
        } else if let Some(first) = names.insert(&profile.name, i) {
            add(
                format!("{pk}.name"),
                format!(
                    "duplicate profile name {:?} (also profile[{first}])",
                    profile.name
                ),
            );
        }
        if profile.fixed_date.is_some() && profile.recurrence.is_some() {
            add(pk.clone(), "set fixed_date or recurrence, not both".into());
        }
        if profile.is_regular() {
            if let Some(first) = regular {
                add(
                    pk.clone(),
                    format!(
                        "only one profile may have neither fixed_date nor recurrence \
                         (also profile[{first}])"
                    ),
                );
            }
            regular.get_or_insert(i);
        }
        check_bounds(&mut add, &pk, profile, max_tps);
        check_schedule(&mut add, &pk, profile);
        for (j, rule) in profile.rules.iter().enumerate() {
            check_rule(&mut add, &format!("{pk}.rule[{j}]"), rule);
        }
    }

    // Memory bound: every window is a ring of storage grains (the GCD of all time_grains).
    let spec = settings.window_spec();
    let grain = spec.grain.as_secs().max(1);
    for (i, profile) in settings.profiles.iter().enumerate() {
        for (j, rule) in profile.rules.iter().enumerate() {
            let needed = rule.time_window.as_secs() / grain;
            if needed > MAX_WINDOW_GRAINS {
                add(
                    format!("{key}.profile[{i}].rule[{j}].time_window"),
                    format!(
                        "needs {needed} grains of {}s (the common divisor of every time_grain); \
                         at most {MAX_WINDOW_GRAINS}: use time_grains that are multiples of a \
                         longer duration, or a shorter time_window",
                        grain
                    ),
                );
            }
        }
    }
    p
}

fn at_least(add: &mut impl FnMut(String, String), key: String, value: Duration, min: Duration) {
    if value < min {
        add(
            key,
            format!(
                "{} is too short; at least {}",
                humantime::format_duration(value),
                humantime::format_duration(min)
            ),
        );
    }
}

fn at_most(add: &mut impl FnMut(String, String), key: String, value: Duration, max: Duration) {
    if value > max {
        add(
            key,
            format!(
                "{} is too long; at most {}",
                humantime::format_duration(value),
                humantime::format_duration(max)
            ),
        );
    }
}

/// 1 <= min <= default <= max <= max_tps, for the ones given.
fn check_bounds(add: &mut impl FnMut(String, String), pk: &str, p: &Profile, max_tps: u32) {
    for (field, value) in [("min", p.min), ("default", p.default), ("max", p.max)] {
        match value {
            Some(0) => add(
                format!("{pk}.{field}"),
                format!("must be at least 1 TPS; allowed 1..={max_tps}"),
            ),
            Some(v) if v > max_tps => add(
                format!("{pk}.{field}"),
                format!("{v} is above the service's max_tps; allowed 1..={max_tps}"),
            ),
            _ => {}
        }
    }
    if let (Some(min), Some(default)) = (p.min, p.default) {
        if default < min {
            add(
                format!("{pk}.default"),
                format!("{default} is below min ({min})"),
            );
        }
    }
    if let (Some(default), Some(max)) = (p.default, p.max) {
        if default > max {
            add(
                format!("{pk}.default"),
                format!("{default} is above max ({max})"),
            );
        }
    }
    if let (Some(min), Some(max)) = (p.min, p.max) {
        if min > max {
            add(format!("{pk}.min"), format!("{min} is above max ({max})"));
        }
    }
}

fn check_zone(add: &mut impl FnMut(String, String), key: String, zone: &str) -> Option<Tz> {
    let tz = zone.parse::<Tz>().ok();
    if tz.is_none() {
        add(
            key,
            format!("{zone:?} is not an IANA time zone name (e.g. \"Europe/Paris\", \"UTC\")"),
        );
    }
    tz
}

fn check_schedule(add: &mut impl FnMut(String, String), pk: &str, p: &Profile) {
    if let Some(f) = &p.fixed_date {
        check_zone(add, format!("{pk}.fixed_date.time_zone"), &f.time_zone);
        if f.start >= f.end {
            add(
                format!("{pk}.fixed_date.end"),
                format!("{} must be after start ({})", f.end, f.start),
            );
        }
    }
    if let Some(r) = &p.recurrence {
        check_zone(add, format!("{pk}.recurrence.time_zone"), &r.time_zone);
        let lists = [
            ("days", r.days.len()),
            ("hours", r.hours.len()),
            ("minutes", r.minutes.len()),
        ];
        for (field, values) in lists {
            if values == 0 {
                add(
                    format!("{pk}.recurrence.{field}"),
                    "must list at least one value".into(),
                );
            }
        }
        for (j, h) in r.hours.iter().enumerate() {
            if *h > 23 {
                add(
                    format!("{pk}.recurrence.hours[{j}]"),
                    format!("{h} is out of range; allowed 0..=23"),
                );
            }
        }
        for (j, m) in r.minutes.iter().enumerate() {
            if *m > 59 {
                add(
                    format!("{pk}.recurrence.minutes[{j}]"),
                    format!("{m} is out of range; allowed 0..=59"),
                );
            }
        }
    }
}

fn check_rule(add: &mut impl FnMut(String, String), rk: &str, r: &Rule) {
    at_least(add, format!("{rk}.time_grain"), r.time_grain, MIN_DURATION);
    at_most(
        add,
        format!("{rk}.time_grain"),
        r.time_grain,
        MAX_TIME_GRAIN,
    );
    if r.time_grain.subsec_nanos() != 0 {
        add(
            format!("{rk}.time_grain"),
            "must be a whole number of seconds (e.g. \"30s\", \"1m\")".into(),
        );
    }
    if r.time_window < r.time_grain {
        add(
            format!("{rk}.time_window"),
            format!(
                "{} is shorter than time_grain ({}); a window holds whole grains",
                humantime::format_duration(r.time_window),
                humantime::format_duration(r.time_grain)
            ),
        );
    }
    at_least(
        add,
        format!("{rk}.time_window"),
        r.time_window,
        MIN_DURATION,
    );
    at_most(
        add,
        format!("{rk}.time_window"),
        r.time_window,
        MAX_TIME_WINDOW,
    );
    at_least(add, format!("{rk}.cooldown"), r.cooldown, MIN_DURATION);
    if !r.threshold.is_finite() {
        add(format!("{rk}.threshold"), "must be a finite number".into());
    }
    if r.value == 0 {
        add(format!("{rk}.value"), "must be at least 1".into());
    }
    if r.change == ChangeType::PercentChangeCount
        && r.direction == Direction::Decrease
        && r.value > 100
    {
        add(
            format!("{rk}.value"),
            format!(
                "{} is out of range for a percent decrease; allowed 1..=100",
                r.value
            ),
        );
    }
    if r.target == Target::EndpointConcurrency {
        if r.metric.is_per_resource() {
            add(
                format!("{rk}.target"),
                format!(
                    "endpoint_concurrency needs a per-service metric (latency_ms, in_flight, \
                     queue_length, queue_oldest_age_ms, capacity_headroom_tps); {} is per resource",
                    r.metric.name()
                ),
            );
        }
        let b = CONCURRENCY_BOUNDS;
        if r.change == ChangeType::ExactCount && !(b.lower..=b.upper).contains(&r.value) {
            add(
                format!("{rk}.value"),
                format!(
                    "{} is out of range for endpoint concurrency; allowed {}..={}",
                    r.value, b.lower, b.upper
                ),
            );
        }
    }
}
