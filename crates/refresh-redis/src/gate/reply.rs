//! Pure helpers of the gate: key names, day boundaries, and raw script replies turned into decisions.

use chrono::{DateTime, Days, TimeDelta, Utc};
use chrono_tz::Tz;
use redis::Value;
use refresh_core::{
    ConsentId, Problem, QuotaRule, QuotaWindow, ROLLING_WINDOW, RefreshId, rolling_retry_after,
    start_of_local_day,
};

use super::QuotaStatus;

/// The consent's in-flight lock. Consent keys share the `{c:…}` hash tag, so one
/// script can touch all of them on Redis Cluster.
pub(super) fn lock_key(namespace: &str, consent: ConsentId) -> String {
    format!("{namespace}:{{c:{consent}}}:lock")
}

/// The consent's admission facts as mirrored ([`super::ConsentFacts`]).
pub(super) fn facts_key(namespace: &str, consent: ConsentId) -> String {
    format!("{namespace}:{{c:{consent}}}:facts")
}

/// The admission times counted by quota rule `rule` (its index in `quota.rules`).
pub(super) fn quota_key(namespace: &str, consent: ConsentId, rule: usize) -> String {
    format!("{namespace}:{{c:{consent}}}:q:{rule}")
}

/// The last on-demand start slot handed out in a stagger bucket, stored as [`slot_value`].
pub(super) fn slot_key(namespace: &str, bucket: &str) -> String {
    format!("{namespace}:{{stagger:{bucket}}}")
}

/// The last auto-sync start slot handed out in a stagger bucket, stored as [`slot_value`].
pub(super) fn autosync_slot_key(namespace: &str, bucket: &str) -> String {
    format!("{namespace}:{{stagger:{bucket}}}:autosync")
}

/// Every start slot of a stagger bucket not yet past, of both classes.
pub(super) fn slots_key(namespace: &str, bucket: &str) -> String {
    format!("{namespace}:{{stagger:{bucket}}}:slots")
}

/// How the stagger script stores a slot: `<ms>:<refresh id>`.
pub(super) fn slot_value(slot: i64, refresh: RefreshId) -> String {
    format!("{slot}:{refresh}")
}

/// The workers' log of bank refresh starts in a stagger bucket.
pub(super) fn starts_key(namespace: &str, bucket: &str) -> String {
    format!("{namespace}:{{stagger:{bucket}}}:starts")
}

/// How many local days either side of the client's clock the boundaries cover:
/// Redis time may be this far off before the calendar_day scripts give up.
const DAYS_AROUND: u64 = 2;

/// Consecutive local day starts in `tz` (UTC ms, ascending) around `client_now`,
/// from which a script picks the day holding Redis time: the local days from
/// [`DAYS_AROUND`] before today to as many after, so client clock skew of up to
/// two days is harmless.
pub(super) fn day_boundaries(client_now: DateTime<Utc>, tz: Tz) -> Vec<i64> {
    let today = client_now.with_timezone(&tz).date_naive();
    let first = today
        .checked_sub_days(Days::new(DAYS_AROUND))
        .unwrap_or(today);
    first
        .iter_days()
        .take(usize::try_from(2 * DAYS_AROUND + 2).unwrap_or(6))
        .map(|day| start_of_local_day(day, tz).timestamp_millis())
        .collect()
}

/// Milliseconds since the epoch as an instant.
pub(super) fn instant(ms: i64) -> Result<DateTime<Utc>, String> {
    DateTime::from_timestamp_millis(ms).ok_or_else(|| format!("time {ms} ms is out of range"))
}

/// The reply of the admission script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum AdmitReply {
    /// Rules 1 to 4 passed: the lock is taken and the admission counted, on the
    /// state of the rebuild stamped `epoch`; the consent's provider, as mirrored.
    Admitted {
        now: i64,
        epoch: i64,
        provider: String,
    },
    /// The consent's mirrored facts are missing or refuse (rules 1–2): the caller
    /// asks the database. Nothing was written.
    LookUp,
    /// Rule 3: `holder` is the refresh id in flight.
    Locked { now: i64, holder: String },
    /// Rule 4: these rules (positions among the counted rules) are exhausted.
    OverQuota {
        now: i64,
        refusals: Vec<RuleRefusal>,
    },
    /// Redis time is outside the day boundaries the client sent.
    Skew { now: i64 },
    /// The slot's epoch is missing: the state must be rebuilt first.
    Rebuild,
}

/// One exhausted quota rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct RuleRefusal {
    /// Position among the rules passed to the script.
    pub(super) position: usize,
    pub(super) used: u32,
    /// When the rule admits again (ms).
    pub(super) at: i64,
}

/// The reply of the stagger slot script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum SlotReply {
    Slot {
        now: i64,
        slot: i64,
        /// The bucket's value before, to restore when the slot is given back.
        previous: Option<String>,
    },
    Full {
        now: i64,
        retry_after_ms: i64,
    },
    /// The slot's epoch is missing: the state must be rebuilt first.
    Rebuild,
}

/// The reply of the script deciding rules 3 to 5 at once (one Redis server).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum AdmitSlotReply {
    /// Every rule passed: the lock is taken, the admission counted and `slot` taken,
    /// on the state of the rebuild stamped `epoch`.
    Admitted {
        now: i64,
        epoch: i64,
        slot: i64,
        /// The class's last slot before it, to restore when the slot is given back.
        previous: Option<String>,
        /// The consent's provider, as mirrored.
        provider: String,
    },
    /// Rules 1–4 refused or sent to the database, or the state is lost (never
    /// [`AdmitReply::Admitted`]).
    Consent(AdmitReply),
    /// Rule 5 refused, as [`SlotReply::Full`]; nothing was written.
    Full { now: i64, retry_after_ms: i64 },
}

/// The reply of the in-flight script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum InFlightReply {
    Held(String),
    Free,
    Rebuild,
}

/// The reply of the start-log script.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum StartReply {
    Go,
    Wait { until: i64 },
}

/// The reply of the quota status script: per rule, admissions counted and, if
/// exhausted, when it admits again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum UsageReply {
    Usage(Vec<(u32, Option<i64>)>),
    Skew,
    Rebuild,
}

fn items(value: Value) -> Result<Vec<Value>, String> {
    match value {
        Value::Array(items) => Ok(items),
        other => Err(format!("expected an array, got {other:?}")),
    }
}

fn text(value: &Value) -> Result<String, String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone())
            .map_err(|_| "expected utf-8 text, got other bytes".to_owned()),
        Value::SimpleString(s) => Ok(s.clone()),
        other => Err(format!("expected text, got {other:?}")),
    }
}

fn int(value: &Value) -> Result<i64, String> {
    match value {
        Value::Int(n) => Ok(*n),
        other => text(other)?
            .parse()
            .map_err(|_| format!("expected an integer, got {other:?}")),
    }
}

fn count(value: &Value) -> Result<u32, String> {
    let n = int(value)?;
    u32::try_from(n).map_err(|_| format!("expected a count, got {n}"))
}

/// Splits a reply into its tag and the rest.
fn tagged(value: Value) -> Result<(String, Vec<Value>), String> {
    let mut items = items(value)?;
    if items.is_empty() {
        return Err("expected a tagged array, got an empty one".to_owned());
    }
    let rest = items.split_off(1);
    Ok((text(&items[0])?, rest))
}

fn arity(tag: &str, rest: &[Value], expected: usize) -> Result<(), String> {
    if rest.len() == expected {
        Ok(())
    } else {
        Err(format!(
            "{tag:?} reply with {} values, expected {expected}",
            rest.len()
        ))
    }
}

pub(super) fn parse_admit(value: Value) -> Result<AdmitReply, String> {
    let (tag, rest) = tagged(value)?;
    admit_from(&tag, &rest)
}

fn admit_from(tag: &str, rest: &[Value]) -> Result<AdmitReply, String> {
    match tag {
        "ok" => {
            arity(tag, rest, 3)?;
            Ok(AdmitReply::Admitted {
                now: int(&rest[0])?,
                epoch: int(&rest[1])?,
                provider: text(&rest[2])?,
            })
        }
        "lookup" => Ok(AdmitReply::LookUp),
        "skew" => {
            arity(tag, rest, 1)?;
            Ok(AdmitReply::Skew {
                now: int(&rest[0])?,
            })
        }
        "rebuild" => Ok(AdmitReply::Rebuild),
        "locked" => {
            arity(tag, rest, 2)?;
            Ok(AdmitReply::Locked {
                now: int(&rest[0])?,
                holder: text(&rest[1])?,
            })
        }
        "quota" => {
            let Some((now, triples)) = rest.split_first() else {
                return Err("\"quota\" reply without a time".to_owned());
            };
            if triples.is_empty() || triples.len() % 3 != 0 {
                return Err(format!("\"quota\" reply with {} values", rest.len()));
            }
            let refusals = triples
                .chunks_exact(3)
                .map(|t| {
                    Ok(RuleRefusal {
                        position: usize::try_from(int(&t[0])?)
                            .map_err(|_| "negative rule position".to_owned())?,
                        used: count(&t[1])?,
                        at: int(&t[2])?,
                    })
                })
                .collect::<Result<_, String>>()?;
            Ok(AdmitReply::OverQuota {
                now: int(now)?,
                refusals,
            })
        }
        _ => Err(format!("unknown reply tag {tag:?}")),
    }
}

pub(super) fn parse_slot(value: Value) -> Result<SlotReply, String> {
    let (tag, rest) = tagged(value)?;
    match tag.as_str() {
        "slot" => {
            arity(&tag, &rest, 3)?;
            let previous = text(&rest[2])?;
            Ok(SlotReply::Slot {
                now: int(&rest[0])?,
                slot: int(&rest[1])?,
                previous: (!previous.is_empty()).then_some(previous),
            })
        }
        "full" => {
            arity(&tag, &rest, 2)?;
            Ok(SlotReply::Full {
                now: int(&rest[0])?,
                retry_after_ms: int(&rest[1])?,
            })
        }
        "rebuild" => Ok(SlotReply::Rebuild),
        _ => Err(format!("unknown reply tag {tag:?}")),
    }
}

/// The reply of the script deciding rules 3 to 5 at once.
pub(super) fn parse_admit_with_slot(value: Value) -> Result<AdmitSlotReply, String> {
    let (tag, rest) = tagged(value)?;
    match tag.as_str() {
        "ok" => {
            arity(&tag, &rest, 5)?;
            let previous = text(&rest[3])?;
            Ok(AdmitSlotReply::Admitted {
                now: int(&rest[0])?,
                epoch: int(&rest[1])?,
                slot: int(&rest[2])?,
                previous: (!previous.is_empty()).then_some(previous),
                provider: text(&rest[4])?,
            })
        }
        "full" => {
            arity(&tag, &rest, 2)?;
            Ok(AdmitSlotReply::Full {
                now: int(&rest[0])?,
                retry_after_ms: int(&rest[1])?,
            })
        }
        _ => admit_from(&tag, &rest).map(AdmitSlotReply::Consent),
    }
}

pub(super) fn parse_in_flight(value: Value) -> Result<InFlightReply, String> {
    let (tag, rest) = tagged(value)?;
    match tag.as_str() {
        "held" => {
            arity(&tag, &rest, 1)?;
            Ok(InFlightReply::Held(text(&rest[0])?))
        }
        "free" => Ok(InFlightReply::Free),
        "rebuild" => Ok(InFlightReply::Rebuild),
        _ => Err(format!("unknown reply tag {tag:?}")),
    }
}

pub(super) fn parse_start(value: Value) -> Result<StartReply, String> {
    let (tag, rest) = tagged(value)?;
    match tag.as_str() {
        "go" => {
            arity(&tag, &rest, 1)?;
            Ok(StartReply::Go)
        }
        "wait" => {
            arity(&tag, &rest, 2)?;
            Ok(StartReply::Wait {
                until: int(&rest[1])?,
            })
        }
        _ => Err(format!("unknown reply tag {tag:?}")),
    }
}

pub(super) fn parse_usage(value: Value, rules: usize) -> Result<UsageReply, String> {
    let (tag, rest) = tagged(value)?;
    match tag.as_str() {
        "skew" => Ok(UsageReply::Skew),
        "rebuild" => Ok(UsageReply::Rebuild),
        "ok" => {
            arity(&tag, &rest, 1 + 2 * rules)?;
            rest[1..]
                .chunks_exact(2)
                .map(|pair| {
                    let at = int(&pair[1])?;
                    Ok((count(&pair[0])?, (at >= 0).then_some(at)))
                })
                .collect::<Result<_, String>>()
                .map(UsageReply::Usage)
        }
        _ => Err(format!("unknown reply tag {tag:?}")),
    }
}

/// The `daily_limit_reached` problem for the refusing rule whose retry-after is
/// longest (the first of equals). `rules` are the rules passed to the script, in order.
pub(super) fn quota_problem(
    rules: &[&QuotaRule],
    refusals: &[RuleRefusal],
    now: i64,
) -> Result<Problem, String> {
    let mut worst: Option<&RuleRefusal> = None;
    for refusal in refusals {
        if worst.is_none_or(|w| refusal.at > w.at) {
            worst = Some(refusal);
        }
    }
    let worst = worst.ok_or("a quota refusal names no rule")?;
    let rule = rules
        .get(worst.position)
        .ok_or_else(|| format!("a quota refusal names rule {}", worst.position))?;
    let now_at = instant(now)?;
    let at = instant(worst.at)?;
    let retry_after = match rule.window {
        QuotaWindow::Rolling24h => rolling_retry_after(at - ROLLING_WINDOW, now_at),
        QuotaWindow::CalendarDay => (at - now_at).max(TimeDelta::zero()),
    };
    Ok(Problem::daily_limit_reached(
        rule.limit,
        worst.used,
        rule.window,
        retry_after,
        now_at + retry_after,
    ))
}

/// The most restrictive rule's status: of the exhausted rules the one that
/// admits again last; otherwise the one with the fewest admissions left (the
/// first of equals).
pub(super) fn most_restrictive(
    rules: &[&QuotaRule],
    usage: &[(u32, Option<i64>)],
) -> Result<Option<QuotaStatus>, String> {
    if rules.len() != usage.len() {
        return Err(format!(
            "{} usages for {} quota rules",
            usage.len(),
            rules.len()
        ));
    }
    let exhausted = rules
        .iter()
        .zip(usage)
        .filter_map(|(rule, (used, at))| at.map(|at| (rule, *used, at)))
        .fold(
            None,
            |worst: Option<(&&QuotaRule, u32, i64)>, next| match worst {
                Some(w) if w.2 >= next.2 => Some(w),
                _ => Some(next),
            },
        );
    if let Some((rule, used, at)) = exhausted {
        return Ok(Some(QuotaStatus {
            limit: rule.limit,
            used,
            window: rule.window,
            next_refresh_possible_at: Some(instant(at)?),
        }));
    }
    let tightest = rules.iter().zip(usage).fold(
        None,
        |best: Option<(&&QuotaRule, u32)>, (rule, (used, _))| {
            let left = |r: &QuotaRule, u: u32| r.limit.saturating_sub(u);
            match best {
                Some(b) if left(b.0, b.1) <= left(rule, *used) => Some(b),
                _ => Some((rule, *used)),
            }
        },
    );
    Ok(tightest.map(|(rule, used)| QuotaStatus {
        limit: rule.limit,
        used,
        window: rule.window,
        next_refresh_possible_at: None,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono_tz::{America, Asia, Europe, Pacific, UTC};
    use refresh_core::{ProblemCode, RequestedBy};

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    fn ms(s: &str) -> i64 {
        at(s).timestamp_millis()
    }

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    fn array(items: Vec<Value>) -> Value {
        Value::Array(items)
    }

    /// The hash tag Redis Cluster hashes a key by: the first `{…}` with content.
    fn hash_tag(key: &str) -> &str {
        key.find('{')
            .and_then(|open| {
                let close = key[open + 1..].find('}')? + open + 1;
                (close > open + 1).then(|| &key[open + 1..close])
            })
            .unwrap_or(key)
    }

    #[test]
    fn keys_share_one_slot_per_consent_and_per_bucket() {
        let consent: ConsentId = "0190f5d2-6c1a-7b3e-8d4f-0a1b2c3d4e5f".parse().unwrap();
        let check = |key: String, expected: &str, tag: &str| {
            assert_eq!(key, expected);
            assert_eq!(hash_tag(&key), tag, "{key}");
            assert!(key.starts_with("refreshd:"), "{key}");
        };
        let c = "c:0190f5d2-6c1a-7b3e-8d4f-0a1b2c3d4e5f";
        check(
            lock_key("refreshd", consent),
            "refreshd:{c:0190f5d2-6c1a-7b3e-8d4f-0a1b2c3d4e5f}:lock",
            c,
        );
        check(
            quota_key("refreshd", consent, 1),
            "refreshd:{c:0190f5d2-6c1a-7b3e-8d4f-0a1b2c3d4e5f}:q:1",
            c,
        );
        check(
            slot_key("refreshd", "tenant.acme"),
            "refreshd:{stagger:tenant.acme}",
            "stagger:tenant.acme",
        );
        assert_eq!(
            slot_value(1_700_000_000_123, consent.into_uuid().into()),
            "1700000000123:0190f5d2-6c1a-7b3e-8d4f-0a1b2c3d4e5f"
        );
        check(
            starts_key("refreshd", "global"),
            "refreshd:{stagger:global}:starts",
            "stagger:global",
        );
    }

    #[test]
    fn day_boundaries_surround_the_clock() {
        let check = |now: &str, tz: Tz, today: &str, tomorrow: &str| {
            let b = day_boundaries(at(now), tz);
            assert_eq!(b.len(), 6, "{now} {tz}");
            assert!(b.windows(2).all(|w| w[0] <= w[1]), "{b:?}");
            // Today's interval is the third, so two days of skew either way are covered.
            assert_eq!((b[2], b[3]), (ms(today), ms(tomorrow)), "{now} {tz}");
            assert!(b[0] <= ms(now) - 2 * 86_400_000 + 3_600_000, "{now} {tz}");
            assert!(b[5] > ms(now) + 2 * 86_400_000 - 3_600_000, "{now} {tz}");
        };
        check(
            "2024-03-10T15:00:00Z",
            UTC,
            "2024-03-10T00:00:00Z",
            "2024-03-11T00:00:00Z",
        );
        check(
            "2024-06-15T23:30:00Z",
            Europe::London,
            "2024-06-15T23:00:00Z",
            "2024-06-16T23:00:00Z",
        );
        check(
            "2024-03-31T12:00:00Z",
            Europe::London,
            "2024-03-31T00:00:00Z",
            "2024-03-31T23:00:00Z",
        );
        check(
            "2024-11-03T12:00:00Z",
            America::New_York,
            "2024-11-03T04:00:00Z",
            "2024-11-04T05:00:00Z",
        );
        check(
            "2024-01-01T20:00:00Z",
            Asia::Kathmandu,
            "2024-01-01T18:15:00Z",
            "2024-01-02T18:15:00Z",
        );
        // Samoa skipped 2011-12-30: an empty interval, which no time falls into.
        let b = day_boundaries(at("2011-12-29T20:00:00Z"), Pacific::Apia);
        assert!(b.windows(2).any(|w| w[0] == w[1]), "{b:?}");
    }

    #[test]
    fn admit_replies() {
        let check = |value: Value, expected: Result<AdmitReply, &str>| {
            let got = parse_admit(value.clone());
            match (&got, &expected) {
                (Ok(g), Ok(e)) => assert_eq!(g, e),
                (Err(g), Err(e)) => assert!(g.contains(e), "{g}"),
                _ => panic!("{value:?}: got {got:?}, expected {expected:?}"),
            }
        };
        check(
            array(vec![bulk("ok"), Value::Int(17), bulk("1700"), bulk("sim")]),
            Ok(AdmitReply::Admitted {
                now: 17,
                epoch: 1700,
                provider: "sim".to_owned(),
            }),
        );
        check(
            array(vec![bulk("lookup"), Value::Int(17)]),
            Ok(AdmitReply::LookUp),
        );
        check(
            array(vec![bulk("skew"), Value::Int(17)]),
            Ok(AdmitReply::Skew { now: 17 }),
        );
        check(
            array(vec![bulk("locked"), Value::Int(5), bulk("abc")]),
            Ok(AdmitReply::Locked {
                now: 5,
                holder: "abc".to_owned(),
            }),
        );
        check(
            array(vec![
                bulk("quota"),
                Value::Int(5),
                Value::Int(0),
                Value::Int(4),
                Value::Int(90),
                Value::Int(1),
                Value::Int(2),
                Value::Int(70),
            ]),
            Ok(AdmitReply::OverQuota {
                now: 5,
                refusals: vec![
                    RuleRefusal {
                        position: 0,
                        used: 4,
                        at: 90,
                    },
                    RuleRefusal {
                        position: 1,
                        used: 2,
                        at: 70,
                    },
                ],
            }),
        );
        check(
            array(vec![bulk("quota"), Value::Int(5)]),
            Err("\"quota\" reply with 1 values"),
        );
        check(
            array(vec![bulk("quota"), Value::Int(5), Value::Int(0)]),
            Err("\"quota\" reply with 2 values"),
        );
        check(array(vec![bulk("ok")]), Err("\"ok\" reply with 0 values"));
        check(
            array(vec![bulk("nope"), Value::Int(1)]),
            Err("unknown reply tag"),
        );
        check(array(vec![]), Err("empty"));
        check(Value::Int(1), Err("expected an array"));
        check(
            array(vec![bulk("ok"), bulk("x"), bulk("1"), bulk("sim")]),
            Err("expected an integer"),
        );
        check(
            array(vec![bulk("ok"), Value::Int(1), bulk("x"), bulk("sim")]),
            Err("expected an integer"),
        );
        check(
            array(vec![bulk("ok"), Value::Int(1)]),
            Err("\"ok\" reply with 1 values"),
        );
    }

    #[test]
    fn one_script_admission_replies() {
        let parse = parse_admit_with_slot;
        assert_eq!(
            parse(array(vec![
                bulk("ok"),
                Value::Int(10),
                bulk("1700"),
                Value::Int(12),
                bulk("9:0190f5d2-6c1a-7b3e-8d4f-0a1b2c3d4e5f"),
                bulk("sim"),
            ])),
            Ok(AdmitSlotReply::Admitted {
                now: 10,
                epoch: 1700,
                slot: 12,
                previous: Some("9:0190f5d2-6c1a-7b3e-8d4f-0a1b2c3d4e5f".to_owned()),
                provider: "sim".to_owned(),
            })
        );
        assert_eq!(
            parse(array(vec![
                bulk("ok"),
                Value::Int(10),
                bulk("1700"),
                Value::Int(10),
                bulk(""),
                bulk("sim"),
            ])),
            Ok(AdmitSlotReply::Admitted {
                now: 10,
                epoch: 1700,
                slot: 10,
                previous: None,
                provider: "sim".to_owned(),
            })
        );
        assert_eq!(
            parse(array(vec![bulk("full"), Value::Int(10), Value::Int(500)])),
            Ok(AdmitSlotReply::Full {
                now: 10,
                retry_after_ms: 500
            })
        );
        assert_eq!(
            parse(array(vec![bulk("locked"), Value::Int(5), bulk("abc")])),
            Ok(AdmitSlotReply::Consent(AdmitReply::Locked {
                now: 5,
                holder: "abc".to_owned(),
            }))
        );
        assert_eq!(
            parse(array(vec![bulk("rebuild"), Value::Int(5)])),
            Ok(AdmitSlotReply::Consent(AdmitReply::Rebuild))
        );
        // The consent script's own "ok" (no slot) is not an admission here.
        assert_eq!(
            parse(array(vec![
                bulk("ok"),
                Value::Int(10),
                bulk("1700"),
                bulk("sim")
            ])),
            Err("\"ok\" reply with 3 values, expected 5".to_owned())
        );
        assert_eq!(
            parse(array(vec![bulk("full"), Value::Int(10)])),
            Err("\"full\" reply with 1 values, expected 2".to_owned())
        );
    }

    #[test]
    fn slot_start_and_usage_replies() {
        assert_eq!(
            parse_slot(array(vec![
                bulk("slot"),
                Value::Int(10),
                Value::Int(12),
                bulk("")
            ])),
            Ok(SlotReply::Slot {
                now: 10,
                slot: 12,
                previous: None
            })
        );
        assert_eq!(
            parse_slot(array(vec![
                bulk("slot"),
                Value::Int(10),
                Value::Int(12),
                bulk("10:0190f5d2-6c1a-7b3e-8d4f-0a1b2c3d4e5f")
            ])),
            Ok(SlotReply::Slot {
                now: 10,
                slot: 12,
                previous: Some("10:0190f5d2-6c1a-7b3e-8d4f-0a1b2c3d4e5f".to_owned())
            })
        );
        assert_eq!(
            parse_slot(array(vec![bulk("full"), Value::Int(10), Value::Int(500)])),
            Ok(SlotReply::Full {
                now: 10,
                retry_after_ms: 500
            })
        );
        assert_eq!(
            parse_start(array(vec![bulk("go"), Value::Int(10)])),
            Ok(StartReply::Go)
        );
        assert_eq!(
            parse_start(array(vec![bulk("wait"), Value::Int(10), Value::Int(99)])),
            Ok(StartReply::Wait { until: 99 })
        );
        assert_eq!(
            parse_usage(
                array(vec![
                    bulk("ok"),
                    Value::Int(10),
                    Value::Int(3),
                    Value::Int(-1),
                    Value::Int(4),
                    Value::Int(77)
                ]),
                2
            ),
            Ok(UsageReply::Usage(vec![(3, None), (4, Some(77))]))
        );
        assert!(parse_usage(array(vec![bulk("ok"), Value::Int(10)]), 1).is_err());
        assert_eq!(
            parse_usage(array(vec![bulk("skew"), Value::Int(10)]), 1),
            Ok(UsageReply::Skew)
        );
    }

    fn rule(limit: u32, window: QuotaWindow) -> QuotaRule {
        QuotaRule {
            sources: vec![RequestedBy::Api],
            limit,
            window,
        }
    }

    #[test]
    fn quota_refusals_report_the_longest_wait() {
        let rolling = rule(4, QuotaWindow::Rolling24h);
        let daily = rule(2, QuotaWindow::CalendarDay);
        let rules = [&rolling, &daily];
        let now = ms("2024-01-02T03:47:58Z");
        let check = |refusals: &[RuleRefusal], detail: &str, limit: u32, used: u32, next: &str| {
            let p = quota_problem(&rules, refusals, now).unwrap();
            assert_eq!(p.code, ProblemCode::DailyLimitReached);
            assert_eq!(p.detail, detail);
            assert_eq!(
                (p.limit, p.used, p.next_refresh_possible_at),
                (Some(limit), Some(used), Some(at(next)))
            );
            let wait = at(next) - instant(now).unwrap();
            assert_eq!(
                p.retry_after_seconds,
                Some(refresh_core::retry_after_seconds(wait))
            );
        };
        let rolling_refusal = RuleRefusal {
            position: 0,
            used: 4,
            at: ms("2024-01-02T17:53:59Z"),
        };
        let daily_refusal = RuleRefusal {
            position: 1,
            used: 2,
            at: ms("2024-01-03T00:00:00Z"),
        };
        check(
            &[rolling_refusal],
            "Daily limit of 4 requests/consent reached. Try again in 14h07.",
            4,
            4,
            "2024-01-02T17:53:59Z",
        );
        check(
            &[daily_refusal],
            "Daily limit of 2 requests/consent reached. Try again in 20h13.",
            2,
            2,
            "2024-01-03T00:00:00Z",
        );
        check(
            &[rolling_refusal, daily_refusal],
            "Daily limit of 2 requests/consent reached. Try again in 20h13.",
            2,
            2,
            "2024-01-03T00:00:00Z",
        );
        let later_rolling = RuleRefusal {
            at: ms("2024-01-03T01:00:00Z"),
            ..rolling_refusal
        };
        check(
            &[daily_refusal, later_rolling],
            "Daily limit of 4 requests/consent reached. Try again in 21h13.",
            4,
            4,
            "2024-01-03T01:00:00Z",
        );
        assert!(quota_problem(&rules, &[], now).is_err());
        assert!(
            quota_problem(
                &rules,
                &[RuleRefusal {
                    position: 2,
                    ..rolling_refusal
                }],
                now
            )
            .is_err()
        );
    }

    #[test]
    fn most_restrictive_status() {
        let rolling = rule(4, QuotaWindow::Rolling24h);
        let daily = rule(2, QuotaWindow::CalendarDay);
        let rules = [&rolling, &daily];
        let check = |usage: &[(u32, Option<i64>)], expected: Option<(u32, u32, Option<i64>)>| {
            let got = most_restrictive(&rules, usage).unwrap();
            let got = got.map(|s| {
                (
                    s.limit,
                    s.used,
                    s.next_refresh_possible_at.map(|t| t.timestamp_millis()),
                )
            });
            assert_eq!(got, expected, "{usage:?}");
        };
        check(&[(0, None), (0, None)], Some((2, 0, None)));
        check(&[(3, None), (0, None)], Some((4, 3, None)));
        check(&[(2, None), (0, None)], Some((4, 2, None)));
        check(&[(1, None), (1, None)], Some((2, 1, None)));
        check(&[(4, Some(50)), (1, None)], Some((4, 4, Some(50))));
        check(&[(4, Some(50)), (2, Some(60))], Some((2, 2, Some(60))));
        check(&[(4, Some(60)), (2, Some(60))], Some((4, 4, Some(60))));
        assert_eq!(most_restrictive(&[], &[]).unwrap(), None);
        assert!(most_restrictive(&rules, &[(0, None)]).is_err());
    }
}
