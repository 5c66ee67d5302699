//! The `[service.autoscale]` table: serde structs for settings, profiles and rules, their
//! defaults, and the built-in default profile used when a service lists none.
//!
//! Everything here is plain data; checks live in `validate.rs`, the meaning of a rule in
//! `evaluate.rs`, and profile scheduling in `profile.rs`.

use std::time::Duration;

use chrono::NaiveDateTime;
use serde::{Deserialize, Serialize};

use super::metrics::Metric;
use super::window::{WindowQuery, WindowSpec};

/// `[service.autoscale]`: how often and by which profiles a service's limits are scaled.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AutoscaleSettings {
    /// How often the rules are evaluated.
    #[serde(default = "default_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// Endpoint latency assumed by the capacity projection before any is observed.
    #[serde(default = "default_expected_latency", with = "humantime_serde")]
    pub expected_latency: Duration,
    /// URLs that receive a JSON POST for every scale action (sent by the loop, not here).
    #[serde(default)]
    pub notify: Vec<String>,
    /// Scaling profiles; empty means [`Profile::builtin_default`].
    #[serde(default, rename = "profile", skip_serializing_if = "Vec::is_empty")]
    pub profiles: Vec<Profile>,
}

impl Default for AutoscaleSettings {
    fn default() -> Self {
        Self {
            interval: default_interval(),
            expected_latency: default_expected_latency(),
            notify: Vec::new(),
            profiles: Vec::new(),
        }
    }
}

fn default_interval() -> Duration {
    Duration::from_secs(300)
}

fn default_expected_latency() -> Duration {
    Duration::from_millis(50)
}

/// Storage grains are never coarser than this, so a sample is at most a minute old when it
/// is first seen and per-grain counters stay far from overflow.
const MAX_STORAGE_GRAIN: Duration = Duration::from_secs(60);

impl AutoscaleSettings {
    /// The profiles in force: the configured ones, or the built-in default when none is given.
    pub fn effective_profiles(&self) -> Vec<Profile> {
        if self.profiles.is_empty() {
            vec![Profile::builtin_default()]
        } else {
            self.profiles.clone()
        }
    }

    /// Shape of the metric windows these settings need: the storage grain is the greatest
    /// common divisor of every rule's `time_grain` (and at most a minute), and the ring is
    /// long enough for the longest `time_window` and for one `interval` (the capacity window).
    pub fn window_spec(&self) -> WindowSpec {
        let profiles = self.effective_profiles();
        let rules = profiles.iter().flat_map(|p| p.rules.iter());
        // Whole seconds: validation rejects sub-second grains, and a 1s floor here keeps an
        // unvalidated value from asking for millions of buckets.
        let mut grain_s = MAX_STORAGE_GRAIN.as_secs();
        let mut longest = self.interval + MAX_STORAGE_GRAIN;
        for r in rules {
            grain_s = gcd(grain_s, r.time_grain.as_secs().max(1));
            // A window of complete grains can end up to one rule grain before now.
            longest = longest.max(r.time_window.max(r.time_grain) + r.time_grain);
        }
        let grain = Duration::from_secs(grain_s.max(1));
        WindowSpec::covering(grain, longest)
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// One `[[service.autoscale.profile]]`: bounds, an optional schedule, and rules.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// Name shown in events and the admin API.
    pub name: String,
    /// Lowest TPS limit this profile scales a resource to (never below the resource's base).
    /// Omitted: the resource's base `tps`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<u32>,
    /// Highest TPS limit. Omitted: the service's `max_tps`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<u32>,
    /// Limit applied when a rule's metric cannot be read. Omitted: the resource's base `tps`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<u32>,
    /// In force between two local date-times in a time zone (wins over everything else).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fixed_date: Option<FixedDate>,
    /// In force from each listed local day/hour/minute until another profile starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recurrence: Option<Recurrence>,
    /// The scaling rules of this profile.
    #[serde(default, rename = "rule", skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<Rule>,
}

impl Profile {
    /// The profile used when none is configured: +100% when the resource was throttled at all
    /// over the last 5 minutes (cooldown 5m), −50% when its utilization averaged under 25%
    /// over the last 30 minutes (cooldown 30m), bounded by the resource's [base tps, max_tps].
    pub fn builtin_default() -> Self {
        Self {
            name: "default".into(),
            min: None,
            max: None,
            default: None,
            fixed_date: None,
            recurrence: None,
            rules: vec![
                Rule {
                    metric: Metric::ThrottledRequests,
                    statistic: Statistic::Sum,
                    time_grain: Duration::from_secs(60),
                    time_window: Duration::from_secs(300),
                    time_aggregation: Aggregation::Total,
                    operator: Operator::GreaterThan,
                    threshold: 0.0,
                    direction: Direction::Increase,
                    change: ChangeType::PercentChangeCount,
                    value: 100,
                    cooldown: Duration::from_secs(300),
                    target: Target::ResourceTps,
                },
                Rule {
                    metric: Metric::UtilizationPercent,
                    statistic: Statistic::Average,
                    time_grain: Duration::from_secs(60),
                    time_window: Duration::from_secs(1800),
                    time_aggregation: Aggregation::Average,
                    operator: Operator::LessThan,
                    threshold: 25.0,
                    direction: Direction::Decrease,
                    change: ChangeType::PercentChangeCount,
                    value: 50,
                    cooldown: Duration::from_secs(1800),
                    target: Target::ResourceTps,
                },
            ],
        }
    }

    /// A regular profile has neither `fixed_date` nor `recurrence`: the fallback.
    pub fn is_regular(&self) -> bool {
        self.fixed_date.is_none() && self.recurrence.is_none()
    }
}

/// `fixed_date = { time_zone, start, end }`: local date-times, both inclusive.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FixedDate {
    /// IANA time zone name, e.g. "Europe/Paris".
    pub time_zone: String,
    /// First local instant the profile is in force, e.g. "2026-12-24T00:00:00".
    pub start: NaiveDateTime,
    /// Last local instant the profile is in force.
    pub end: NaiveDateTime,
}

/// `recurrence = { time_zone, days, hours, minutes }`: the profile starts at every listed
/// local (day, hour, minute) and stays in force until another profile starts.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Recurrence {
    /// IANA time zone name, e.g. "America/Los_Angeles".
    pub time_zone: String,
    /// Week days the profile starts on.
    pub days: Vec<Day>,
    /// Local hours (0..=23) it starts at; default midnight.
    #[serde(default = "default_clock")]
    pub hours: Vec<u32>,
    /// Minutes (0..=59) past those hours; default 0.
    #[serde(default = "default_clock")]
    pub minutes: Vec<u32>,
}

fn default_clock() -> Vec<u32> {
    vec![0]
}

/// A day of the week, written "Monday" (or "monday").
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[allow(missing_docs)] // the variants are the days of the week
pub enum Day {
    #[serde(alias = "monday")]
    Monday,
    #[serde(alias = "tuesday")]
    Tuesday,
    #[serde(alias = "wednesday")]
    Wednesday,
    #[serde(alias = "thursday")]
    Thursday,
    #[serde(alias = "friday")]
    Friday,
    #[serde(alias = "saturday")]
    Saturday,
    #[serde(alias = "sunday")]
    Sunday,
}

impl Day {
    /// The chrono weekday.
    pub fn weekday(self) -> chrono::Weekday {
        use chrono::Weekday as W;
        match self {
            Self::Monday => W::Mon,
            Self::Tuesday => W::Tue,
            Self::Wednesday => W::Wed,
            Self::Thursday => W::Thu,
            Self::Friday => W::Fri,
            Self::Saturday => W::Sat,
            Self::Sunday => W::Sun,
        }
    }
}

/// One `[[service.autoscale.profile.rule]]`: a metric condition and the scale action it triggers.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// What is measured.
    pub metric: Metric,
    /// How samples are combined inside one time grain.
    pub statistic: Statistic,
    /// Length of one grain.
    #[serde(with = "humantime_serde")]
    pub time_grain: Duration,
    /// How far back the rule looks (whole grains; `time_window / time_grain` of them).
    #[serde(with = "humantime_serde")]
    pub time_window: Duration,
    /// How grain values are combined over the window.
    pub time_aggregation: Aggregation,
    /// Comparison of the aggregated value with `threshold`.
    pub operator: Operator,
    /// The value compared against.
    pub threshold: f64,
    /// Whether the rule raises or lowers its target.
    pub direction: Direction,
    /// How `value` changes the target.
    #[serde(rename = "type")]
    pub change: ChangeType,
    /// Amount: a count, a percentage, or the exact new value.
    pub value: u32,
    /// Time since the target's last scale action before this rule may act.
    #[serde(with = "humantime_serde")]
    pub cooldown: Duration,
    /// What the rule scales.
    #[serde(default)]
    pub target: Target,
}

impl Rule {
    /// What this rule asks of a metric window.
    pub fn query(&self) -> WindowQuery {
        WindowQuery {
            statistic: self.statistic,
            time_grain: self.time_grain,
            time_window: self.time_window,
            aggregation: self.time_aggregation,
        }
    }

    /// Short human description for events, e.g.
    /// `throttled_requests sum/1m total over 5m > 0 → +100%`.
    pub fn describe(&self) -> String {
        let sign = match self.direction {
            Direction::Increase => "+",
            Direction::Decrease => "-",
        };
        let action = match self.change {
            ChangeType::ChangeCount => format!("{sign}{}", self.value),
            ChangeType::PercentChangeCount => format!("{sign}{}%", self.value),
            ChangeType::ExactCount => format!("={}", self.value),
        };
        format!(
            "{} {}/{} {} over {} {} {} → {}{}",
            self.metric.name(),
            self.statistic.name(),
            humantime::format_duration(self.time_grain),
            self.time_aggregation.name(),
            humantime::format_duration(self.time_window),
            self.operator.symbol(),
            self.threshold,
            action,
            match self.target {
                Target::ResourceTps => "",
                Target::EndpointConcurrency => " endpoint concurrency",
            }
        )
    }
}

/// How samples are combined inside one time grain.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Statistic {
    /// Mean of the samples.
    Average,
    /// Smallest sample.
    Min,
    /// Largest sample.
    Max,
    /// Sum of the samples.
    Sum,
}

impl Statistic {
    /// The config name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Average => "average",
            Self::Min => "min",
            Self::Max => "max",
            Self::Sum => "sum",
        }
    }
}

/// How grain values are combined over a rule's time window.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Aggregation {
    /// Mean of the grain values.
    Average,
    /// Smallest grain value.
    Minimum,
    /// Largest grain value.
    Maximum,
    /// Sum of the grain values.
    Total,
    /// The most recent complete grain's value.
    Last,
    /// Number of raw samples in the window (for counters: the number of events).
    Count,
}

impl Aggregation {
    /// The config name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Average => "average",
            Self::Minimum => "minimum",
            Self::Maximum => "maximum",
            Self::Total => "total",
            Self::Last => "last",
            Self::Count => "count",
        }
    }
}

/// Comparison between the aggregated metric and the threshold.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
#[allow(missing_docs)] // the names say it
pub enum Operator {
    GreaterThan,
    GreaterThanOrEqual,
    LessThan,
    LessThanOrEqual,
    Equals,
    NotEquals,
}

impl Operator {
    /// Whether `value <op> threshold` holds.
    pub fn holds(self, value: f64, threshold: f64) -> bool {
        match self {
            Self::GreaterThan => value > threshold,
            Self::GreaterThanOrEqual => value >= threshold,
            Self::LessThan => value < threshold,
            Self::LessThanOrEqual => value <= threshold,
            // Aggregates are sums and means of floats: compare with a tolerance so that
            // `equals 0.3` can match 0.1 + 0.2.
            Self::Equals => (value - threshold).abs() <= 1e-9 * threshold.abs().max(1.0),
            Self::NotEquals => (value - threshold).abs() > 1e-9 * threshold.abs().max(1.0),
        }
    }

    /// Mathematical symbol for descriptions.
    pub fn symbol(self) -> &'static str {
        match self {
            Self::GreaterThan => ">",
            Self::GreaterThanOrEqual => ">=",
            Self::LessThan => "<",
            Self::LessThanOrEqual => "<=",
            Self::Equals => "==",
            Self::NotEquals => "!=",
        }
    }
}

/// Whether a rule raises or lowers its target.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Raise (scale up).
    Increase,
    /// Lower (scale down).
    Decrease,
}

/// How a rule's `value` changes its target.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ChangeType {
    /// Add or subtract `value`.
    ChangeCount,
    /// Add or subtract `value` percent of the current value (rounded up).
    PercentChangeCount,
    /// Set to `value` (never against the rule's direction).
    ExactCount,
}

/// What a rule scales.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// Each autoscaled resource's TPS limit.
    #[default]
    ResourceTps,
    /// The service's per-endpoint `max_concurrent` (1..=200); per-service metrics only.
    EndpointConcurrency,
}
