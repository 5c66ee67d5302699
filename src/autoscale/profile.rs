//! Which profile is in force at a wall-clock instant: schedules in IANA time zones.
//!
//! Order, as for cloud autoscale settings: a fixed-date profile that covers now, else the
//! recurrence profile whose latest start is the most recent, else the regular profile.
//! Local times that a DST change skips start at the first minute that exists after them
//! (the moment the clocks jump); local times that happen twice mean the first of the two.

use chrono::{DateTime, Datelike, Duration as ChronoDuration, NaiveDateTime, TimeZone, Utc};
use chrono_tz::Tz;

use super::settings::{FixedDate, Profile, Recurrence};

/// The profile in force at `now`, or `None` when no profile applies (no regular profile and
/// no schedule that covers or has started); the engine then uses the built-in default.
/// Among equals (two fixed dates covering now, two recurrences started at the same instant,
/// two regular profiles) the first listed wins.
pub fn select(profiles: &[Profile], now: DateTime<Utc>) -> Option<&Profile> {
    if let Some(p) = profiles
        .iter()
        .find(|p| p.fixed_date.as_ref().is_some_and(|f| covers(f, now)))
    {
        return Some(p);
    }
    let mut latest: Option<(DateTime<Utc>, &Profile)> = None;
    for p in profiles {
        let Some(started) = p.recurrence.as_ref().and_then(|r| last_start(r, now)) else {
            continue;
        };
        if latest.is_none_or(|(t, _)| started > t) {
            latest = Some((started, p));
        }
    }
    if let Some((_, p)) = latest {
        return Some(p);
    }
    profiles.iter().find(|p| p.is_regular())
}

/// Whether `fixed` covers `now` (start and end inclusive). An unknown time zone covers
/// nothing (validation reports it).
pub fn covers(fixed: &FixedDate, now: DateTime<Utc>) -> bool {
    let Ok(tz) = fixed.time_zone.parse::<Tz>() else {
        return false;
    };
    match (local_to_utc(tz, fixed.start), local_to_utc(tz, fixed.end)) {
        (Some(start), Some(end)) => start <= now && now <= end,
        _ => false,
    }
}

/// The latest instant at or before `now` at which `recurrence` started, if any in the last
/// week (there always is one when `days`, `hours` and `minutes` are non-empty and valid).
pub fn last_start(recurrence: &Recurrence, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let tz = recurrence.time_zone.parse::<Tz>().ok()?;
    let today = now.with_timezone(&tz).date_naive();
    let mut best: Option<DateTime<Utc>> = None;
    // Eight days back: today's start may still be ahead, and then last week's same day is it.
    for back in 0..=7 {
        let Some(date) = today.checked_sub_signed(ChronoDuration::days(back)) else {
            continue;
        };
        if !recurrence
            .days
            .iter()
            .any(|d| d.weekday() == date.weekday())
        {
            continue;
        }
        for &h in &recurrence.hours {
            for &m in &recurrence.minutes {
                let Some(local) = date.and_hms_opt(h, m, 0) else {
                    continue;
                };
                let Some(t) = local_to_utc(tz, local) else {
                    continue;
                };
                if t <= now && best.is_none_or(|b| t > b) {
                    best = Some(t);
                }
            }
        }
        if best.is_some() {
            // Earlier days can only hold earlier starts.
            return best;
        }
    }
    best
}

/// The UTC instant of a local date-time in `tz`: the earlier one if it happens twice, the
/// first existing minute after it if a DST jump skips it.
pub fn local_to_utc(tz: Tz, local: NaiveDateTime) -> Option<DateTime<Utc>> {
    // Gaps are at most a day long in the tz database (Samoa skipped 2011-12-30 whole).
    for minutes in 0..=(24 * 60) {
        let candidate = local.checked_add_signed(ChronoDuration::minutes(minutes))?;
        if let Some(t) = tz.from_local_datetime(&candidate).earliest() {
            return Some(t.with_timezone(&Utc));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autoscale::settings::Day;
    use chrono::NaiveDate;

    fn profile(name: &str) -> Profile {
        Profile {
            name: name.into(),
            ..Profile::builtin_default()
        }
    }

    fn utc(s: &str) -> DateTime<Utc> {
        s.parse().expect("test timestamp")
    }

    fn naive(s: &str) -> NaiveDateTime {
        s.parse().expect("test local time")
    }

    fn weekday_weekend() -> Vec<Profile> {
        let la = "America/Los_Angeles".to_string();
        let rec = |days: Vec<Day>| Recurrence {
            time_zone: la.clone(),
            days,
            hours: vec![0],
            minutes: vec![0],
        };
        vec![
            Profile {
                recurrence: Some(rec(vec![Day::Saturday])),
                ..profile("weekend")
            },
            Profile {
                recurrence: Some(rec(vec![
                    Day::Monday,
                    Day::Tuesday,
                    Day::Wednesday,
                    Day::Thursday,
                    Day::Friday,
                ])),
                ..profile("weekday")
            },
            profile("regular"),
        ]
    }

    fn name(p: Option<&Profile>) -> &str {
        p.map_or("none", |p| p.name.as_str())
    }

    #[test]
    fn weekday_weekend_switch_at_local_midnight_in_winter_and_summer() {
        let ps = weekday_weekend();
        // 2026-03-07 is a Saturday. PST = UTC-8: local midnight is 08:00Z.
        assert_eq!(name(select(&ps, utc("2026-03-07T07:59:59Z"))), "weekday");
        assert_eq!(name(select(&ps, utc("2026-03-07T08:00:00Z"))), "weekend");
        // Sunday 2026-03-08 is the DST change (02:00 PST → 03:00 PDT): still weekend.
        assert_eq!(name(select(&ps, utc("2026-03-08T12:00:00Z"))), "weekend");
        // Monday midnight is now PDT = UTC-7: 07:00Z, an hour earlier in UTC than a week ago.
        assert_eq!(name(select(&ps, utc("2026-03-09T06:59:59Z"))), "weekend");
        assert_eq!(name(select(&ps, utc("2026-03-09T07:00:00Z"))), "weekday");
    }

    #[test]
    fn switch_follows_the_fall_back_change_too() {
        let ps = weekday_weekend();
        // 2026-11-01 (Sunday) falls back to PST; Saturday 10-31 midnight is PDT (07:00Z) and
        // Monday 11-02 midnight is PST (08:00Z).
        assert_eq!(name(select(&ps, utc("2026-10-31T06:59:59Z"))), "weekday");
        assert_eq!(name(select(&ps, utc("2026-10-31T07:00:00Z"))), "weekend");
        assert_eq!(name(select(&ps, utc("2026-11-02T07:30:00Z"))), "weekend");
        assert_eq!(name(select(&ps, utc("2026-11-02T08:00:00Z"))), "weekday");
    }

    #[test]
    fn fixed_date_beats_recurrence_beats_regular() {
        let mut ps = weekday_weekend();
        ps.push(Profile {
            fixed_date: Some(FixedDate {
                time_zone: "Europe/Paris".into(),
                start: naive("2026-12-24T00:00:00"),
                end: naive("2026-12-24T23:59:00"),
            }),
            ..profile("christmas_eve")
        });
        // 2026-12-24 is a Thursday; Paris is UTC+1 in winter.
        assert_eq!(name(select(&ps, utc("2026-12-23T22:59:59Z"))), "weekday");
        assert_eq!(
            name(select(&ps, utc("2026-12-23T23:00:00Z"))),
            "christmas_eve"
        );
        assert_eq!(
            name(select(&ps, utc("2026-12-24T22:59:00Z"))),
            "christmas_eve"
        );
        assert_eq!(name(select(&ps, utc("2026-12-24T22:59:01Z"))), "weekday");
        // Without recurrences the regular profile is the fallback.
        let only_regular: Vec<Profile> =
            ps.into_iter().filter(|p| p.recurrence.is_none()).collect();
        assert_eq!(
            name(select(&only_regular, utc("2026-06-01T00:00:00Z"))),
            "regular"
        );
        assert_eq!(name(select(&[], utc("2026-06-01T00:00:00Z"))), "none");
    }

    #[test]
    fn skipped_local_time_starts_when_clocks_jump() {
        let tz: Tz = "America/Los_Angeles".parse().expect("known zone");
        let skipped = NaiveDate::from_ymd_opt(2026, 3, 8)
            .and_then(|d| d.and_hms_opt(2, 30, 0))
            .expect("valid date");
        assert_eq!(local_to_utc(tz, skipped), Some(utc("2026-03-08T10:00:00Z")));
        // 01:30 happens twice on 2026-11-01; the first (PDT, UTC-7) is meant.
        let twice = naive("2026-11-01T01:30:00");
        assert_eq!(local_to_utc(tz, twice), Some(utc("2026-11-01T08:30:00Z")));
    }
}
