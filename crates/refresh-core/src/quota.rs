//! Per-consent quota arithmetic: rules, windows, DST-correct local midnights and the retry-after text.

use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime, TimeDelta, TimeZone, Utc};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::parse::string_enum;
use crate::requested_by::RequestedBy;

string_enum! {
    /// How admissions are counted against a quota rule.
    pub enum QuotaWindow as "quota window" {
        /// Admissions of the last 24 hours, i.e. in `(now − 24 h, now]`.
        Rolling24h => "rolling_24h",
        /// Admissions since the last local midnight in `quota.time_zone`.
        CalendarDay => "calendar_day",
    }
}

/// The length of a rolling window.
pub const ROLLING_WINDOW: TimeDelta = TimeDelta::hours(24);

/// One configured quota rule: at most `limit` admissions per consent in
/// `window`, counting only requests from `sources`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaRule {
    /// The channels this rule counts and limits.
    pub sources: Vec<RequestedBy>,
    /// Admissions allowed per window.
    pub limit: u32,
    /// The window kind.
    pub window: QuotaWindow,
}

/// A quota rule that cannot work.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum QuotaRuleError {
    /// A rule without sources limits nothing.
    #[error("a quota rule needs at least one source")]
    NoSources,
    /// A limit of 0 refuses everything and has no time at which it would admit again.
    #[error("a quota rule's limit must be at least 1")]
    ZeroLimit,
}

impl QuotaRule {
    /// Whether requests from `source` count against (and are limited by) this rule.
    pub fn applies_to(&self, source: RequestedBy) -> bool {
        self.sources.contains(&source)
    }

    /// Checks the rule is usable; run once when settings are loaded.
    pub fn validate(&self) -> Result<(), QuotaRuleError> {
        if self.sources.is_empty() {
            return Err(QuotaRuleError::NoSources);
        }
        if self.limit == 0 {
            return Err(QuotaRuleError::ZeroLimit);
        }
        Ok(())
    }
}

/// The default `quota.rules`: 4 per rolling 24 h for `API`, `PORTAL` and `APP`;
/// `AUTOSYNC` and `ADMIN` exempt.
pub fn default_quota_rules() -> Vec<QuotaRule> {
    vec![QuotaRule {
        sources: vec![RequestedBy::Api, RequestedBy::Portal, RequestedBy::App],
        limit: 4,
        window: QuotaWindow::Rolling24h,
    }]
}

/// The rules that apply to requests from `source`, in configuration order.
pub fn rules_for(rules: &[QuotaRule], source: RequestedBy) -> impl Iterator<Item = &QuotaRule> {
    rules.iter().filter(move |rule| rule.applies_to(source))
}

/// The first instant of the local day `date` in `tz`: local midnight, or, on a
/// day whose midnight the clocks skip, the instant they jump (the day's first
/// existing local time). Of a repeated midnight, the earlier one.
pub fn start_of_local_day(date: NaiveDate, tz: Tz) -> DateTime<Utc> {
    let midnight = date.and_time(NaiveTime::MIN);
    match tz.from_local_datetime(&midnight) {
        chrono::MappedLocalTime::Single(t) | chrono::MappedLocalTime::Ambiguous(t, _) => t.to_utc(),
        chrono::MappedLocalTime::None => {
            first_instant_reaching(midnight, tz).unwrap_or_else(|| midnight.and_utc())
        }
    }
}

/// The first instant whose local time in `tz` is at or after `local`, for a
/// `local` that falls in a gap. Found by bisection over whole seconds, which is
/// exact because tz transitions happen on whole seconds; `None` only at the
/// ends of chrono's date range.
fn first_instant_reaching(local: NaiveDateTime, tz: Tz) -> Option<DateTime<Utc>> {
    // Real UTC offsets stay well within ±18 h, so the instant lies in this bracket.
    const BRACKET_SECS: i64 = 18 * 3600;
    let reached = |ts: i64| -> Option<bool> {
        let instant = DateTime::<Utc>::from_timestamp(ts, 0)?;
        Some(instant.with_timezone(&tz).naive_local() >= local)
    };
    let centre = local.and_utc().timestamp();
    let (mut lo, mut hi) = (centre - BRACKET_SECS, centre + BRACKET_SECS);
    if reached(lo)? || !reached(hi)? {
        return None;
    }
    // Invariant: not reached at `lo`, reached at `hi`.
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if reached(mid)? {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    DateTime::<Utc>::from_timestamp(hi, 0)
}

/// The next local midnight in `tz` strictly after `now`: when a `calendar_day`
/// window resets. DST-correct: days may last 23 or 25 hours, and where a DST
/// change skips midnight it is the first instant of the new local day.
pub fn next_midnight(now: DateTime<Utc>, tz: Tz) -> DateTime<Utc> {
    let mut day = now.with_timezone(&tz).date_naive();
    // One step unless a whole local day was skipped (Samoa, 2011-12-30) or the
    // clocks went back across midnight.
    for _ in 0..3 {
        let Some(next) = day.succ_opt() else { break };
        let start = start_of_local_day(next, tz);
        if start > now {
            return start;
        }
        day = next;
    }
    now.checked_add_signed(ROLLING_WINDOW)
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// The start of the local day containing `now` in `tz`: where a `calendar_day` window begins.
pub fn start_of_current_day(now: DateTime<Utc>, tz: Tz) -> DateTime<Utc> {
    start_of_local_day(now.with_timezone(&tz).date_naive(), tz).min(now)
}

/// The earliest admission time still counted by `window` at `now`. An admission
/// at `t` counts when `t > since` for rolling windows and `t >= since` for calendar days.
pub fn window_start(window: QuotaWindow, now: DateTime<Utc>, tz: Tz) -> DateTime<Utc> {
    match window {
        QuotaWindow::Rolling24h => now
            .checked_sub_signed(ROLLING_WINDOW)
            .unwrap_or(DateTime::<Utc>::MIN_UTC),
        QuotaWindow::CalendarDay => start_of_current_day(now, tz),
    }
}

/// When a full quota next admits a refresh: the oldest counted admission plus
/// 24 h for rolling windows, the next local midnight for calendar days.
/// Never before `now`.
pub fn next_refresh_possible_at(
    window: QuotaWindow,
    oldest_counted: DateTime<Utc>,
    now: DateTime<Utc>,
    tz: Tz,
) -> DateTime<Utc> {
    match window {
        QuotaWindow::Rolling24h => now
            .checked_add_signed(rolling_retry_after(oldest_counted, now))
            .unwrap_or(DateTime::<Utc>::MAX_UTC),
        QuotaWindow::CalendarDay => next_midnight(now, tz),
    }
}

/// Rolling window: oldest counted admission + 24 h − now, never negative.
pub fn rolling_retry_after(oldest_counted: DateTime<Utc>, now: DateTime<Utc>) -> TimeDelta {
    (oldest_counted.signed_duration_since(now) + ROLLING_WINDOW).max(TimeDelta::zero())
}

/// Whole seconds to wait, rounded up, at least 1 (a `Retry-After` of 0 invites a hot loop).
pub fn retry_after_seconds(d: TimeDelta) -> u64 {
    let mut secs = d.num_seconds();
    if d.subsec_nanos() > 0 {
        secs += 1;
    }
    u64::try_from(secs).unwrap_or(0).max(1)
}

/// `{H}h{MM}`: hours unpadded, minutes two digits, rounded up to the next
/// whole minute; negative durations read as `0h00`.
pub fn format_retry_after(d: TimeDelta) -> String {
    let minutes = if d <= TimeDelta::zero() {
        0
    } else {
        retry_after_seconds(d).div_ceil(60)
    };
    format!("{}h{:02}", minutes / 60, minutes % 60)
}

/// The `daily_limit_reached` detail, exactly as SPEC §2 words it.
pub fn daily_limit_detail(limit: u32, retry_after: TimeDelta) -> String {
    format!(
        "Daily limit of {limit} requests/consent reached. Try again in {}.",
        format_retry_after(retry_after)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono_tz::{America, Europe, Pacific, UTC};

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    fn hms(h: i64, m: i64, s: i64) -> TimeDelta {
        TimeDelta::seconds(h * 3600 + m * 60 + s)
    }

    #[test]
    fn formats_retry_after_rounding_up() {
        let check =
            |d: TimeDelta, expected: &str| assert_eq!(format_retry_after(d), expected, "{d}");
        check(TimeDelta::zero(), "0h00");
        check(TimeDelta::seconds(-90), "0h00");
        check(TimeDelta::nanoseconds(1), "0h01");
        check(TimeDelta::seconds(1), "0h01");
        check(TimeDelta::seconds(59), "0h01");
        check(TimeDelta::seconds(60), "0h01");
        check(TimeDelta::seconds(61), "0h02");
        check(TimeDelta::milliseconds(60_001), "0h02");
        check(hms(0, 59, 1), "1h00");
        check(hms(1, 0, 0), "1h00");
        check(hms(9, 5, 0), "9h05");
        check(hms(14, 6, 0), "14h06");
        check(hms(14, 6, 1), "14h07");
        check(hms(23, 59, 0), "23h59");
        check(hms(23, 59, 1), "24h00");
        check(hms(24, 0, 0), "24h00");
        check(hms(25, 0, 0), "25h00");
        check(hms(100, 30, 0), "100h30");
    }

    #[test]
    fn retry_after_seconds_round_up() {
        let check =
            |d: TimeDelta, expected: u64| assert_eq!(retry_after_seconds(d), expected, "{d}");
        check(TimeDelta::seconds(-10), 1);
        check(TimeDelta::zero(), 1);
        check(TimeDelta::nanoseconds(1), 1);
        check(TimeDelta::seconds(1), 1);
        check(TimeDelta::milliseconds(1_500), 2);
        check(hms(14, 6, 1), 50_761);
        check(hms(24, 0, 0), 86_400);
    }

    #[test]
    fn daily_limit_detail_text() {
        let check = |limit: u32, d: TimeDelta, expected: &str| {
            assert_eq!(daily_limit_detail(limit, d), expected)
        };
        check(
            6,
            hms(14, 6, 1),
            "Daily limit of 6 requests/consent reached. Try again in 14h07.",
        );
        check(
            4,
            hms(0, 0, 30),
            "Daily limit of 4 requests/consent reached. Try again in 0h01.",
        );
        check(
            1,
            hms(24, 0, 0),
            "Daily limit of 1 requests/consent reached. Try again in 24h00.",
        );
    }

    #[test]
    fn rolling_windows() {
        let check = |oldest: &str, now: &str, expected: TimeDelta| {
            assert_eq!(
                rolling_retry_after(at(oldest), at(now)),
                expected,
                "{oldest} {now}"
            );
            assert_eq!(
                next_refresh_possible_at(QuotaWindow::Rolling24h, at(oldest), at(now), UTC),
                at(now) + expected
            );
        };
        check("2024-01-01T10:00:00Z", "2024-01-02T09:00:00Z", hms(1, 0, 0));
        check(
            "2024-01-01T10:00:00Z",
            "2024-01-01T10:00:00Z",
            hms(24, 0, 0),
        );
        check(
            "2024-01-01T23:30:00Z",
            "2024-01-02T00:10:00Z",
            hms(23, 20, 0),
        );
        check(
            "2024-01-01T17:53:59Z",
            "2024-01-02T03:47:58Z",
            hms(14, 6, 1),
        );
        check(
            "2024-01-01T10:00:00Z",
            "2024-01-02T10:00:00Z",
            TimeDelta::zero(),
        );
        check(
            "2024-01-01T10:00:00Z",
            "2024-01-03T10:00:00Z",
            TimeDelta::zero(),
        );
        // A rolling window is 24 real hours, DST or not.
        check("2024-03-30T12:00:00Z", "2024-03-31T11:00:00Z", hms(1, 0, 0));
    }

    #[test]
    fn next_midnights() {
        let check = |now: &str, tz: Tz, expected: &str| {
            let got = next_midnight(at(now), tz);
            assert_eq!(got, at(expected), "{now} in {tz}");
            assert_eq!(
                next_refresh_possible_at(QuotaWindow::CalendarDay, at(now), at(now), tz),
                at(expected)
            );
        };
        // UTC, across midnight, and strictly after `now`.
        check("2024-03-10T15:00:00Z", UTC, "2024-03-11T00:00:00Z");
        check("2024-03-10T23:59:59.999Z", UTC, "2024-03-11T00:00:00Z");
        check("2024-03-11T00:00:00Z", UTC, "2024-03-12T00:00:00Z");
        check("2024-12-31T12:00:00Z", UTC, "2025-01-01T00:00:00Z");
        check("2024-02-28T12:00:00Z", UTC, "2024-02-29T00:00:00Z");
        // London in winter and summer.
        check(
            "2024-01-15T23:30:00Z",
            Europe::London,
            "2024-01-16T00:00:00Z",
        );
        check(
            "2024-06-15T22:30:00Z",
            Europe::London,
            "2024-06-15T23:00:00Z",
        );
        check(
            "2024-06-15T23:30:00Z",
            Europe::London,
            "2024-06-16T23:00:00Z",
        );
        // London spring forward (2024-03-31, 01:00 GMT → 02:00 BST): a 23-hour day.
        check(
            "2024-03-30T12:00:00Z",
            Europe::London,
            "2024-03-31T00:00:00Z",
        );
        check(
            "2024-03-31T00:00:00Z",
            Europe::London,
            "2024-03-31T23:00:00Z",
        );
        check(
            "2024-03-31T00:59:59Z",
            Europe::London,
            "2024-03-31T23:00:00Z",
        );
        check(
            "2024-03-31T01:00:00Z",
            Europe::London,
            "2024-03-31T23:00:00Z",
        );
        // London fall back (2024-10-27, 02:00 BST → 01:00 GMT): a 25-hour day.
        check(
            "2024-10-26T23:00:00Z",
            Europe::London,
            "2024-10-28T00:00:00Z",
        );
        check(
            "2024-10-27T01:30:00Z",
            Europe::London,
            "2024-10-28T00:00:00Z",
        );
        check(
            "2024-10-26T22:59:59Z",
            Europe::London,
            "2024-10-26T23:00:00Z",
        );
        // New York spring forward (2024-03-10, 02:00 EST → 03:00 EDT): 23 hours.
        check(
            "2024-03-10T05:00:00Z",
            America::New_York,
            "2024-03-11T04:00:00Z",
        );
        check(
            "2024-03-10T04:59:59Z",
            America::New_York,
            "2024-03-10T05:00:00Z",
        );
        // New York fall back (2024-11-03, 02:00 EDT → 01:00 EST): 25 hours.
        check(
            "2024-11-03T04:00:00Z",
            America::New_York,
            "2024-11-04T05:00:00Z",
        );
        check(
            "2024-11-03T06:30:00Z",
            America::New_York,
            "2024-11-04T05:00:00Z",
        );
        // Santiago skips 2024-09-08 00:00 (−04 → −03): the day starts at 01:00 −03.
        check(
            "2024-09-07T12:00:00Z",
            America::Santiago,
            "2024-09-08T04:00:00Z",
        );
        check(
            "2024-09-08T04:00:00Z",
            America::Santiago,
            "2024-09-09T03:00:00Z",
        );
        // Santiago repeats 23:00 on 2024-04-06 (−03 → −04): midnight comes once, 25 hours later.
        check(
            "2024-04-06T03:00:00Z",
            America::Santiago,
            "2024-04-07T04:00:00Z",
        );
        // Havana skips 2024-03-10 00:00 (CST → CDT).
        check(
            "2024-03-09T20:00:00Z",
            America::Havana,
            "2024-03-10T05:00:00Z",
        );
        check(
            "2024-03-10T05:00:00Z",
            America::Havana,
            "2024-03-11T04:00:00Z",
        );
        // Samoa skipped 2011-12-30 entirely: 29 December was followed by 31 December.
        check(
            "2011-12-29T20:00:00Z",
            Pacific::Apia,
            "2011-12-30T10:00:00Z",
        );
    }

    #[test]
    fn calendar_day_starts() {
        let check = |now: &str, tz: Tz, expected: &str| {
            assert_eq!(
                window_start(QuotaWindow::CalendarDay, at(now), tz),
                at(expected),
                "{now} in {tz}"
            );
        };
        check("2024-03-10T15:00:00Z", UTC, "2024-03-10T00:00:00Z");
        check("2024-03-10T00:00:00Z", UTC, "2024-03-10T00:00:00Z");
        check(
            "2024-06-15T22:30:00Z",
            Europe::London,
            "2024-06-14T23:00:00Z",
        );
        check(
            "2024-06-15T23:30:00Z",
            Europe::London,
            "2024-06-15T23:00:00Z",
        );
        check(
            "2024-03-31T12:00:00Z",
            Europe::London,
            "2024-03-31T00:00:00Z",
        );
        check(
            "2024-11-03T12:00:00Z",
            America::New_York,
            "2024-11-03T04:00:00Z",
        );
        check(
            "2024-09-08T12:00:00Z",
            America::Santiago,
            "2024-09-08T04:00:00Z",
        );
        assert_eq!(
            window_start(QuotaWindow::Rolling24h, at("2024-03-10T15:00:00Z"), UTC),
            at("2024-03-09T15:00:00Z")
        );
    }

    #[test]
    fn start_of_skipped_and_repeated_days() {
        let check = |date: &str, tz: Tz, expected: &str| {
            assert_eq!(
                start_of_local_day(date.parse().unwrap(), tz),
                at(expected),
                "{date} in {tz}"
            );
        };
        check("2024-09-08", America::Santiago, "2024-09-08T04:00:00Z");
        check("2024-03-10", America::Havana, "2024-03-10T05:00:00Z");
        check("2024-04-07", America::Santiago, "2024-04-07T04:00:00Z");
        check("2024-03-31", Europe::London, "2024-03-31T00:00:00Z");
        // The skipped Samoan day "starts" when the next one does.
        check("2011-12-30", Pacific::Apia, "2011-12-30T10:00:00Z");
    }

    #[test]
    fn rules() {
        let rules = vec![
            QuotaRule {
                sources: vec![RequestedBy::Api, RequestedBy::Portal],
                limit: 4,
                window: QuotaWindow::Rolling24h,
            },
            QuotaRule {
                sources: vec![RequestedBy::Api],
                limit: 10,
                window: QuotaWindow::CalendarDay,
            },
        ];
        let check = |source: RequestedBy, expected: &[u32]| {
            let limits: Vec<u32> = rules_for(&rules, source).map(|r| r.limit).collect();
            assert_eq!(limits, expected, "{source}");
        };
        check(RequestedBy::Api, &[4, 10]);
        check(RequestedBy::Portal, &[4]);
        check(RequestedBy::App, &[]);
        check(RequestedBy::Autosync, &[]);
    }

    #[test]
    fn rule_config() {
        let check = |toml_like_json: &str, expected: Result<QuotaRule, &str>| {
            let parsed =
                serde_json::from_str::<QuotaRule>(toml_like_json).map_err(|e| e.to_string());
            match (parsed, expected) {
                (Ok(got), Ok(want)) => assert_eq!(got, want),
                (Err(got), Err(want)) => assert!(got.contains(want), "{got}"),
                (got, want) => panic!("{toml_like_json}: got {got:?}, expected {want:?}"),
            }
        };
        check(
            r#"{"sources": ["API", "PORTAL", "APP"], "limit": 4, "window": "rolling_24h"}"#,
            Ok(default_quota_rules().remove(0)),
        );
        check(
            r#"{"sources": ["API"], "limit": 2, "window": "calendar_day"}"#,
            Ok(QuotaRule {
                sources: vec![RequestedBy::Api],
                limit: 2,
                window: QuotaWindow::CalendarDay,
            }),
        );
        check(
            r#"{"sources": ["API"], "limit": 2, "window": "daily"}"#,
            Err("unknown quota window"),
        );
        check(
            r#"{"sources": ["api"], "limit": 2, "window": "calendar_day"}"#,
            Err("unknown requestedBy"),
        );
        check(
            r#"{"sources": ["API"], "limit": 2, "window": "calendar_day", "max": 1}"#,
            Err("unknown field"),
        );
        check(
            r#"{"sources": ["API"], "window": "calendar_day"}"#,
            Err("missing field `limit`"),
        );
    }

    #[test]
    fn rule_validation() {
        let check =
            |sources: Vec<RequestedBy>, limit: u32, expected: Result<(), QuotaRuleError>| {
                let rule = QuotaRule {
                    sources,
                    limit,
                    window: QuotaWindow::Rolling24h,
                };
                assert_eq!(rule.validate(), expected);
            };
        check(vec![RequestedBy::Api], 1, Ok(()));
        check(vec![], 1, Err(QuotaRuleError::NoSources));
        check(vec![RequestedBy::Api], 0, Err(QuotaRuleError::ZeroLimit));
    }

    #[test]
    fn window_spellings() {
        let check = |w: QuotaWindow, s: &str| {
            assert_eq!(w.to_string(), s);
            assert_eq!(s.parse::<QuotaWindow>().unwrap(), w);
            assert_eq!(serde_json::to_string(&w).unwrap(), format!("\"{s}\""));
        };
        check(QuotaWindow::Rolling24h, "rolling_24h");
        check(QuotaWindow::CalendarDay, "calendar_day");
    }

    /// Properties of the arithmetic around DST transitions (and a skipped day), each
    /// checked by evaluating the model (`gate_model::rule_standing`) at the instants
    /// the answers name.
    mod properties {
        use proptest::prelude::*;

        use super::*;
        use crate::gate_model::{RuleStanding, rule_standing};

        /// Zones with DST, a 30-minute DST, transitions at midnight, and a skipped day.
        const ZONES: [Tz; 7] = [
            UTC,
            Europe::London,
            America::New_York,
            chrono_tz::Australia::Lord_Howe,
            America::Sao_Paulo,
            chrono_tz::Asia::Beirut,
            Pacific::Apia,
        ];

        /// Instants near the zones' transitions.
        const NEAR: [&str; 8] = [
            "2024-03-31T01:00:00Z",
            "2024-10-27T01:00:00Z",
            "2024-03-10T07:00:00Z",
            "2024-11-03T06:00:00Z",
            "2018-11-04T03:00:00Z",
            "2024-03-30T22:00:00Z",
            "2011-12-30T10:00:00Z",
            "2024-04-06T15:00:00Z",
        ];

        const DAY_MS: i64 = 86_400_000;

        fn instant() -> impl Strategy<Value = DateTime<Utc>> {
            (0..NEAR.len(), -2 * DAY_MS..2 * DAY_MS)
                .prop_map(|(i, off)| at(NEAR[i]) + TimeDelta::milliseconds(off))
        }

        fn zone() -> impl Strategy<Value = Tz> {
            (0..ZONES.len()).prop_map(|i| ZONES[i])
        }

        fn window() -> impl Strategy<Value = QuotaWindow> {
            prop_oneof![
                Just(QuotaWindow::Rolling24h),
                Just(QuotaWindow::CalendarDay)
            ]
        }

        /// A rule and up to 8 admissions of the last 30 h before `now`.
        fn case() -> impl Strategy<Value = (QuotaRule, Vec<DateTime<Utc>>, DateTime<Utc>, Tz)> {
            (
                window(),
                1_u32..5,
                prop::collection::vec(0_i64..30 * 3_600_000, 0..8),
                instant(),
                zone(),
            )
                .prop_map(|(window, limit, ages, now, tz)| {
                    let rule = QuotaRule {
                        sources: vec![RequestedBy::Api],
                        limit,
                        window,
                    };
                    let history = ages
                        .iter()
                        .map(|age| now - TimeDelta::milliseconds(*age))
                        .collect();
                    (rule, history, now, tz)
                })
        }

        /// `Try again in {H}h{MM}.` as a duration.
        fn text_wait(detail: &str) -> TimeDelta {
            let rest = detail
                .split("Try again in ")
                .nth(1)
                .and_then(|r| r.strip_suffix('.'))
                .unwrap();
            let (h, m) = rest.split_once('h').unwrap();
            assert_eq!(m.len(), 2, "{detail}");
            TimeDelta::hours(h.parse().unwrap()) + TimeDelta::minutes(m.parse().unwrap())
        }

        proptest! {
            /// A refusal names when a request is admitted again: at that instant,
            /// at the instant its text names (rounded up to minutes) and at the one
            /// its `Retry-After` seconds name, the model admits; a millisecond
            /// before `nextRefreshPossibleAt` it still refuses (the wait is not
            /// overstated).
            #[test]
            fn the_retry_after_never_names_an_instant_still_refused(
                (rule, history, now, tz) in case()
            ) {
                let RuleStanding::Refuses { used, next } = rule_standing(&rule, &history, now, tz)
                else {
                    return Ok(());
                };
                prop_assert!(next > now, "{next} after {now}");
                prop_assert!(used >= rule.limit);
                let problem = crate::Problem::daily_limit_reached(
                    rule.limit, used, rule.window, next - now, next,
                );
                let admits = |t: DateTime<Utc>| {
                    matches!(rule_standing(&rule, &history, t, tz), RuleStanding::Admits { .. })
                };
                let said = now + text_wait(&problem.detail);
                let header = now + TimeDelta::seconds(
                    i64::try_from(problem.retry_after_seconds.unwrap()).unwrap(),
                );
                prop_assert!(admits(next), "refused at nextRefreshPossibleAt {next}");
                prop_assert!(admits(said), "{:?} names {said}, still refused", problem.detail);
                prop_assert!(admits(header), "Retry-After names {header}, still refused");
                prop_assert!(said >= next && said - next < TimeDelta::minutes(1));
                prop_assert!(
                    !admits(next - TimeDelta::milliseconds(1)),
                    "admits before {next}: the wait is overstated"
                );
            }

            /// A calendar day starts at the first instant of its local date (also on
            /// a day whose midnight does not exist) and the next starts later, on a
            /// later local date, within a day and a few hours.
            #[test]
            fn local_days_follow_the_zone(now in instant(), tz in zone()) {
                let start = start_of_current_day(now, tz);
                let next = next_midnight(now, tz);
                prop_assert!(start <= now && now < next, "{start} {now} {next}");
                prop_assert_eq!(start.with_timezone(&tz).date_naive(), now.with_timezone(&tz).date_naive());
                prop_assert!(next.with_timezone(&tz).date_naive() > now.with_timezone(&tz).date_naive());
                let before = next - TimeDelta::seconds(1);
                prop_assert!(before.with_timezone(&tz).date_naive() < next.with_timezone(&tz).date_naive());
                prop_assert!(next - now <= TimeDelta::hours(26));
                prop_assert_eq!(window_start(QuotaWindow::CalendarDay, now, tz), start);
                prop_assert_eq!(
                    window_start(QuotaWindow::Rolling24h, now, tz),
                    now - ROLLING_WINDOW
                );
            }

            /// Counting is monotone in time: once a rule admits again (and nothing
            /// new is admitted), it keeps admitting.
            #[test]
            fn once_admitting_a_rule_keeps_admitting(
                (rule, history, now, tz) in case(),
                later in 0_i64..DAY_MS,
            ) {
                if let RuleStanding::Refuses { next, .. } = rule_standing(&rule, &history, now, tz) {
                    let t = next + TimeDelta::milliseconds(later);
                    prop_assert!(
                        matches!(rule_standing(&rule, &history, t, tz), RuleStanding::Admits { .. }),
                        "refused again at {t}"
                    );
                }
            }
        }
    }
}
