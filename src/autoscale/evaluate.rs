//! The pure decision for one target (a resource's TPS limit or a service's endpoint
//! concurrency) under one profile: which rules trigger, what they propose, cooldowns, the
//! profile's default when metrics are missing, and clamping. No capacity gate here (see
//! `capacity.rs`) and no state: the engine feeds in the current value and last action time.
//!
//! The combination follows the documented behaviour of cloud autoscale settings: any
//! triggered increase wins and the largest proposal is taken; decreases act only when no
//! increase triggered and *every* decrease rule triggered, and then the largest (safest)
//! proposal is taken.

use std::time::Instant;

use super::settings::{ChangeType, Direction, Profile, Rule, Target};

/// Per-endpoint concurrency caps the `endpoint_concurrency` target is kept within.
pub const CONCURRENCY_BOUNDS: Bounds = Bounds {
    lower: 1,
    upper: 200,
};

/// Inclusive range a target is clamped to; `lower <= upper` always.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// Lowest value.
    pub lower: u32,
    /// Highest value.
    pub upper: u32,
}

impl Bounds {
    /// Bounds of a resource's TPS limit under `profile`: [max(min, base), min(max, max_tps)].
    /// A resource never goes below its base; if the profile's max is below the base, the
    /// base wins.
    pub fn for_resource(profile: &Profile, base: u32, max_tps: u32) -> Self {
        let lower = profile.min.unwrap_or(base).max(base);
        let upper = profile.max.unwrap_or(max_tps).min(max_tps).max(lower);
        Self { lower, upper }
    }

    /// `value` brought within the bounds.
    pub fn clamp(&self, value: u32) -> u32 {
        value.clamp(self.lower, self.upper)
    }
}

/// Everything a decision depends on besides the metric readings.
#[derive(Debug, Clone, Copy)]
pub struct EvalInput<'a> {
    /// The profile in force.
    pub profile: &'a Profile,
    /// Which of its rules apply (rules of the other target are ignored).
    pub target: Target,
    /// Current value of the target.
    pub current: u32,
    /// Range the result is clamped to.
    pub bounds: Bounds,
    /// Floor applied when some rule's metric cannot be read; `None` disables it.
    pub default: Option<u32>,
    /// When the target last changed by a scale action (cooldowns count from it).
    pub last_action: Option<Instant>,
    /// Monotonic now.
    pub now: Instant,
}

/// Why a target changes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Cause {
    /// Rule `index` of the profile triggered with the metric at `observed`.
    Rule {
        /// Index into the profile's rules.
        index: usize,
        /// The aggregated metric value that triggered it.
        observed: f64,
    },
    /// The metric of rule `missing` could not be read and the value was below the default.
    Default {
        /// Index of the first rule that could not be read.
        missing: usize,
    },
    /// The value was outside the profile's bounds (e.g. right after a profile switch).
    Bounds,
}

/// The outcome of [`evaluate`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decision {
    /// Leave the target as it is.
    Hold,
    /// Rules triggered but the target's last action is within their cooldown.
    CoolingDown {
        /// Index of a triggered rule that is cooling down.
        rule: usize,
    },
    /// Set the target to `to` (always different from the current value).
    Change {
        /// New value, within the bounds.
        to: u32,
        /// Why.
        cause: Cause,
    },
}

/// Decide the next value of one target. `read` gives a rule's aggregated metric, `None`
/// when it cannot be read; it is called once per rule of the target, in order.
///
/// Missing data: a rule that cannot be read never triggers. If any rule of the target could
/// not be read and nothing else changed the value, a value below the profile's `default` is
/// raised to it (a value at or above the default is left alone: missing data never scales
/// down). This is how cloud autoscale treats an unreadable metric.
pub fn evaluate(input: &EvalInput<'_>, read: &mut dyn FnMut(&Rule) -> Option<f64>) -> Decision {
    let readings: Vec<(usize, &Rule, Option<f64>)> = input
        .profile
        .rules
        .iter()
        .enumerate()
        .filter(|(_, r)| r.target == input.target)
        .map(|(i, r)| (i, r, read(r)))
        .collect();
    let triggered = |r: &Rule, v: Option<f64>| v.is_some_and(|v| r.operator.holds(v, r.threshold));
    let cooled = |r: &Rule| {
        input
            .last_action
            .is_none_or(|t| input.now.saturating_duration_since(t) >= r.cooldown)
    };

    let mut waiting = None;
    let increases: Vec<_> = readings
        .iter()
        .filter(|(_, r, v)| r.direction == Direction::Increase && triggered(r, *v))
        .collect();
    let decreases: Vec<_> = readings
        .iter()
        .filter(|(_, r, _)| r.direction == Direction::Decrease)
        .collect();
    let fired = if !increases.is_empty() {
        best(&increases, input, &cooled, &mut waiting)
    } else if !decreases.is_empty() && decreases.iter().all(|(_, r, v)| triggered(r, *v)) {
        best(&decreases, input, &cooled, &mut waiting)
    } else {
        None
    };
    if let Some(d) = fired {
        return d;
    }

    if let (Some(default), Some((missing, _, _))) =
        (input.default, readings.iter().find(|(_, _, v)| v.is_none()))
    {
        let to = input.bounds.clamp(default);
        if to > input.current {
            let cause = Cause::Default { missing: *missing };
            return Decision::Change { to, cause };
        }
    }
    let clamped = input.bounds.clamp(input.current);
    if clamped != input.current {
        return Decision::Change {
            to: clamped,
            cause: Cause::Bounds,
        };
    }
    waiting.map_or(Decision::Hold, |rule| Decision::CoolingDown { rule })
}

/// The largest clamped proposal among triggered rules of one direction, or `None` (with
/// `waiting` set) when any of them is cooling down, or when the proposal changes nothing.
fn best(
    rules: &[&(usize, &Rule, Option<f64>)],
    input: &EvalInput<'_>,
    cooled: &dyn Fn(&Rule) -> bool,
    waiting: &mut Option<usize>,
) -> Option<Decision> {
    // A rule in cooldown holds its whole direction back: acting on the others would defeat
    // the cooldown the user set for this kind of move.
    if let Some((i, _, _)) = rules.iter().find(|(_, r, _)| !cooled(r)) {
        *waiting = Some(*i);
        return None;
    }
    let (index, observed, to) = rules
        .iter()
        .map(|(i, r, v)| {
            (
                *i,
                v.unwrap_or(f64::NAN),
                input.bounds.clamp(proposed(r, input.current)),
            )
        })
        .max_by_key(|(_, _, to)| *to)?;
    (to != input.current).then_some(Decision::Change {
        to,
        cause: Cause::Rule { index, observed },
    })
}

/// What `rule` makes of `current`, before clamping. Percentages round so that an increase
/// always moves by at least one and a decrease never removes more than asked; an exact count
/// never moves against the rule's direction.
pub fn proposed(rule: &Rule, current: u32) -> u32 {
    let c = u64::from(current);
    let v = u64::from(rule.value);
    let up = rule.direction == Direction::Increase;
    let next = match rule.change {
        ChangeType::ChangeCount if up => c + v,
        ChangeType::ChangeCount => c.saturating_sub(v),
        ChangeType::PercentChangeCount if up => c + (c * v).div_ceil(100).max(1),
        ChangeType::PercentChangeCount => c.saturating_sub(c * v / 100),
        ChangeType::ExactCount if up => c.max(v),
        ChangeType::ExactCount => c.min(v),
    };
    u32::try_from(next).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autoscale::metrics::Metric;
    use crate::autoscale::settings::{Aggregation, Operator, Statistic};
    use std::time::Duration;

    fn rule(direction: Direction, change: ChangeType, value: u32) -> Rule {
        Rule {
            metric: Metric::UtilizationPercent,
            statistic: Statistic::Average,
            time_grain: Duration::from_secs(60),
            time_window: Duration::from_secs(300),
            time_aggregation: Aggregation::Average,
            operator: Operator::GreaterThan,
            threshold: 50.0,
            direction,
            change,
            value,
            cooldown: Duration::from_secs(300),
            target: Target::ResourceTps,
        }
    }

    fn profile(rules: Vec<Rule>) -> Profile {
        Profile {
            name: "p".into(),
            min: Some(1),
            max: Some(1000),
            default: Some(1),
            rules,
            ..Profile::builtin_default()
        }
    }

    /// Evaluate with readings given per rule index (`None` = metric unreadable).
    fn run(
        p: &Profile,
        current: u32,
        readings: &[Option<f64>],
        last: Option<Duration>,
    ) -> Decision {
        let now = Instant::now() + Duration::from_secs(3600);
        let input = EvalInput {
            profile: p,
            target: Target::ResourceTps,
            current,
            bounds: Bounds {
                lower: p.min.unwrap_or(1),
                upper: p.max.unwrap_or(1000),
            },
            default: p.default,
            last_action: last.map(|ago| now - ago),
            now,
        };
        let mut i = 0;
        evaluate(&input, &mut |_| {
            i += 1;
            readings[i - 1]
        })
    }

    fn to(d: Decision) -> Option<u32> {
        match d {
            Decision::Change { to, .. } => Some(to),
            _ => None,
        }
    }

    const FIRE: Option<f64> = Some(99.0); // above the threshold of 50
    const CALM: Option<f64> = Some(1.0);

    #[test]
    fn all_decreases_firing_take_the_largest_result() {
        let p = profile(vec![
            rule(Direction::Decrease, ChangeType::PercentChangeCount, 50),
            rule(Direction::Decrease, ChangeType::ChangeCount, 3),
        ]);
        assert_eq!(to(run(&p, 10, &[FIRE, FIRE], None)), Some(7));
    }

    #[test]
    fn one_of_two_decreases_firing_changes_nothing() {
        let p = profile(vec![
            rule(Direction::Decrease, ChangeType::PercentChangeCount, 50),
            rule(Direction::Decrease, ChangeType::ChangeCount, 3),
        ]);
        assert_eq!(run(&p, 10, &[FIRE, CALM], None), Decision::Hold);
        assert_eq!(run(&p, 10, &[CALM, FIRE], None), Decision::Hold);
    }

    #[test]
    fn any_increase_wins_with_the_largest_result() {
        let p = profile(vec![
            rule(Direction::Increase, ChangeType::ChangeCount, 5),
            rule(Direction::Increase, ChangeType::PercentChangeCount, 100),
            rule(Direction::Increase, ChangeType::ChangeCount, 50),
            rule(Direction::Decrease, ChangeType::ChangeCount, 3),
        ]);
        assert_eq!(to(run(&p, 10, &[FIRE, FIRE, CALM, FIRE], None)), Some(20));
        assert_eq!(to(run(&p, 10, &[FIRE, FIRE, FIRE, FIRE], None)), Some(60));
        assert_eq!(to(run(&p, 10, &[FIRE, CALM, CALM, FIRE], None)), Some(15));
        // No increase: the only decrease fires.
        assert_eq!(to(run(&p, 10, &[CALM, CALM, CALM, FIRE], None)), Some(7));
    }

    #[test]
    fn cooldown_counts_from_the_last_action() {
        let p = profile(vec![rule(Direction::Increase, ChangeType::ChangeCount, 5)]);
        let four_min = Some(Duration::from_secs(240));
        assert_eq!(
            run(&p, 10, &[FIRE], four_min),
            Decision::CoolingDown { rule: 0 }
        );
        assert_eq!(
            to(run(&p, 10, &[FIRE], Some(Duration::from_secs(300)))),
            Some(15)
        );
        // A cooling increase also keeps decreases from acting.
        let p = profile(vec![
            rule(Direction::Increase, ChangeType::ChangeCount, 5),
            Rule {
                cooldown: Duration::from_secs(60),
                ..rule(Direction::Decrease, ChangeType::ChangeCount, 3)
            },
        ]);
        assert_eq!(
            run(&p, 10, &[FIRE, FIRE], four_min),
            Decision::CoolingDown { rule: 0 }
        );
        assert_eq!(to(run(&p, 10, &[CALM, FIRE], four_min)), Some(7));
    }

    #[test]
    fn results_are_clamped_to_the_profile_bounds() {
        let mut p = profile(vec![
            rule(Direction::Increase, ChangeType::PercentChangeCount, 100),
            rule(Direction::Decrease, ChangeType::ChangeCount, 100),
        ]);
        p.min = Some(5);
        p.max = Some(30);
        assert_eq!(to(run(&p, 20, &[FIRE, FIRE], None)), Some(30));
        assert_eq!(to(run(&p, 20, &[CALM, FIRE], None)), Some(5));
        // Already at the bound: nothing to do.
        assert_eq!(run(&p, 30, &[FIRE, CALM], None), Decision::Hold);
        // Out of bounds (profile switch): brought in even without a rule firing.
        assert_eq!(
            run(&p, 50, &[CALM, CALM], None),
            Decision::Change {
                to: 30,
                cause: Cause::Bounds
            }
        );
    }

    #[test]
    fn exact_count_sets_but_never_against_its_direction() {
        let p = profile(vec![rule(Direction::Increase, ChangeType::ExactCount, 200)]);
        assert_eq!(to(run(&p, 10, &[FIRE], None)), Some(200));
        assert_eq!(run(&p, 300, &[FIRE], None), Decision::Hold);
        let p = profile(vec![rule(Direction::Decrease, ChangeType::ExactCount, 40)]);
        assert_eq!(to(run(&p, 100, &[FIRE], None)), Some(40));
        assert_eq!(run(&p, 20, &[FIRE], None), Decision::Hold);
    }

    #[test]
    fn unreadable_metric_raises_to_the_default_but_never_lowers() {
        let mut p = profile(vec![
            rule(Direction::Increase, ChangeType::ChangeCount, 5),
            rule(Direction::Decrease, ChangeType::ChangeCount, 5),
        ]);
        p.default = Some(50);
        assert_eq!(
            run(&p, 10, &[None, CALM], None),
            Decision::Change {
                to: 50,
                cause: Cause::Default { missing: 0 }
            }
        );
        // Above the default, an unreadable decrease rule keeps the value.
        assert_eq!(run(&p, 80, &[CALM, None], None), Decision::Hold);
        // A readable increase that fires still wins.
        assert_eq!(to(run(&p, 10, &[FIRE, None], None)), Some(15));
    }

    #[test]
    fn percentages_round_towards_safety() {
        let up = rule(Direction::Increase, ChangeType::PercentChangeCount, 10);
        let down = rule(Direction::Decrease, ChangeType::PercentChangeCount, 50);
        assert_eq!(proposed(&up, 1), 2);
        assert_eq!(proposed(&up, 15), 17);
        assert_eq!(proposed(&down, 15), 8);
        assert_eq!(proposed(&down, 1), 1);
        let all = rule(Direction::Decrease, ChangeType::PercentChangeCount, 100);
        assert_eq!(proposed(&all, 15), 0);
    }
}
