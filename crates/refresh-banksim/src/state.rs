//! The simulator's memory: datasets and scenarios per consent key, and the log
//! of data calls. Locks are std locks held for a few instructions, never across
//! an `.await`.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::dataset::Dataset;
use crate::generate::generate;
use crate::settings::SimSettings;

/// The call log keeps this many calls, dropping the oldest.
pub(crate) const CALL_LOG_CAPACITY: usize = 200_000;

/// What "today" is, as the day a new consent key's data is anchored at.
pub(crate) type Today = Box<dyn Fn() -> NaiveDate + Send + Sync>;

/// State shared by all handlers.
pub(crate) struct Sim {
    pub(crate) settings: SimSettings,
    pub(crate) shutdown: CancellationToken,
    consents: RwLock<HashMap<String, Arc<Consent>>>,
    calls: Mutex<VecDeque<CallRecord>>,
    today: Today,
}

/// One consent key's dataset and scenario.
pub(crate) struct Consent {
    dataset: RwLock<Arc<Dataset>>,
    scenario: Mutex<Scenario>,
}

/// The faults a consent's data calls get (`PATCH /sim/consents/{id}/scenario`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Scenario {
    /// Every data call: 403 `UK.OBIE.Resource.InvalidConsentStatus`.
    pub(crate) revoked: bool,
    /// Every data call: 403 `UK.OBIE.Reauthenticate`.
    pub(crate) mfa_required: bool,
    /// Added to every data call of this consent.
    pub(crate) latency_ms: u64,
    /// The next `count` data calls answer `status`.
    pub(crate) fail_next: FailNext,
    /// The next `hang_next` data calls never answer.
    pub(crate) hang_next: u32,
    /// This share (0–100) of the data calls fails, drawn from a fixed sequence: half
    /// of those answer 503, half never answer (a timeout at the client).
    pub(crate) fail_percent: u8,
    /// Draws made for `fail_percent` so far.
    #[serde(skip)]
    pub(crate) draws: u64,
}

impl Scenario {
    /// The next draw for `fail_percent`: a failure (503 or a hang, alternately by
    /// draw) or none. The sequence is fixed (a SplitMix64 of the draw number), so a
    /// run is repeatable.
    fn draw_failure(&mut self) -> Option<Action> {
        if self.fail_percent == 0 {
            return None;
        }
        self.draws += 1;
        let mut z = self.draws.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        if z % 100 >= u64::from(self.fail_percent) {
            return None;
        }
        Some(if (z / 100).is_multiple_of(2) {
            Action::Fail(503)
        } else {
            Action::Hang
        })
    }
}

/// `failNext`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct FailNext {
    pub(crate) count: u32,
    pub(crate) status: u16,
}

impl Default for FailNext {
    fn default() -> Self {
        Self {
            count: 0,
            status: 503,
        }
    }
}

/// A change to a scenario: what is given replaces, what is absent stays.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct ScenarioPatch {
    pub(crate) revoked: Option<bool>,
    pub(crate) mfa_required: Option<bool>,
    pub(crate) latency_ms: Option<u64>,
    pub(crate) fail_next: Option<FailNext>,
    pub(crate) hang_next: Option<u32>,
    pub(crate) fail_percent: Option<u8>,
}

/// What a data call gets, decided when it arrives. Injected faults go first
/// (hang, then fail), then revoked, then MFA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    Hang,
    Fail(u16),
    Revoked,
    MfaRequired,
    Serve,
}

/// One data call, as `GET /sim/calls` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct CallRecord {
    /// When it arrived.
    pub(crate) at: DateTime<Utc>,
    /// The bearer token; `null` when there was none.
    pub(crate) bank_consent_id: Option<String>,
    pub(crate) method: String,
    pub(crate) path: String,
    /// The query string as sent (e.g. `fromBookingDateTime=…`); `null` when none.
    pub(crate) query: Option<String>,
    /// The status answered; `null` for a call held by `hangNext`.
    pub(crate) status: Option<u16>,
    /// The W3C `traceparent` header as received; `null` when none.
    pub(crate) traceparent: Option<String>,
    /// The request id as received (`x-fapi-interaction-id` for OBIE, `X-Request-ID`
    /// for Berlin Group); `null` when none.
    pub(crate) request_id: Option<String>,
}

/// A header's value as text, for the call log.
pub(crate) fn header_text(headers: &axum::http::HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic cannot leave these structures half-changed: take them as they are.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Sim {
    pub(crate) fn new(settings: SimSettings, shutdown: CancellationToken, today: Today) -> Self {
        Self {
            settings,
            shutdown,
            consents: RwLock::default(),
            calls: Mutex::default(),
            today,
        }
    }

    /// The consent of `key`, its data generated on first sight.
    pub(crate) fn consent(&self, key: &str) -> Arc<Consent> {
        let known = self
            .consents
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
            .cloned();
        if let Some(consent) = known {
            return consent;
        }
        // Generated outside the lock (it takes a few milliseconds); if two calls
        // race, both generate the same data and the first insert wins.
        let fresh = Arc::new(Consent::new(Dataset::generated(generate(
            key,
            (self.today)(),
        ))));
        self.consents
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(key.to_owned())
            .or_insert(fresh)
            .clone()
    }

    /// Replaces (or sets, for a key not seen yet) the dataset of `key`.
    pub(crate) fn replace(&self, key: &str, dataset: Dataset) {
        let mut consents = self
            .consents
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        match consents.get(key) {
            Some(consent) => consent.set_dataset(dataset),
            None => {
                consents.insert(key.to_owned(), Arc::new(Consent::new(dataset)));
            }
        }
    }

    pub(crate) fn log(&self, record: CallRecord) {
        let mut calls = lock(&self.calls);
        if calls.len() >= CALL_LOG_CAPACITY {
            calls.pop_front();
        }
        calls.push_back(record);
    }

    /// Logged calls that arrived at or after `since`, of `consent` if given.
    pub(crate) fn calls(
        &self,
        since: Option<DateTime<Utc>>,
        consent: Option<&str>,
    ) -> Vec<CallRecord> {
        lock(&self.calls)
            .iter()
            .filter(|c| since.is_none_or(|s| c.at >= s))
            .filter(|c| consent.is_none_or(|k| c.bank_consent_id.as_deref() == Some(k)))
            .cloned()
            .collect()
    }
}

impl Consent {
    fn new(dataset: Dataset) -> Self {
        Self {
            dataset: RwLock::new(Arc::new(dataset)),
            scenario: Mutex::default(),
        }
    }

    pub(crate) fn dataset(&self) -> Arc<Dataset> {
        self.dataset
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set_dataset(&self, dataset: Dataset) {
        *self.dataset.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(dataset);
    }

    pub(crate) fn scenario(&self) -> Scenario {
        lock(&self.scenario).clone()
    }

    pub(crate) fn patch(&self, patch: ScenarioPatch) -> Scenario {
        let mut s = lock(&self.scenario);
        if let Some(v) = patch.revoked {
            s.revoked = v;
        }
        if let Some(v) = patch.mfa_required {
            s.mfa_required = v;
        }
        if let Some(v) = patch.latency_ms {
            s.latency_ms = v;
        }
        if let Some(v) = patch.fail_next {
            s.fail_next = v;
        }
        if let Some(v) = patch.hang_next {
            s.hang_next = v;
        }
        if let Some(v) = patch.fail_percent {
            s.fail_percent = v;
        }
        s.clone()
    }

    /// Decides a data call's fate, using up one injected fault if any is left;
    /// also returns the consent's extra latency.
    pub(crate) fn next_action(&self) -> (Action, u64) {
        let mut s = lock(&self.scenario);
        let action = if s.hang_next > 0 {
            s.hang_next -= 1;
            Action::Hang
        } else if s.fail_next.count > 0 {
            s.fail_next.count -= 1;
            Action::Fail(s.fail_next.status)
        } else if let Some(action) = s.draw_failure() {
            action
        } else if s.revoked {
            Action::Revoked
        } else if s.mfa_required {
            Action::MfaRequired
        } else {
            Action::Serve
        };
        (action, s.latency_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::DatasetWire;

    fn consent() -> Consent {
        Consent::new(Dataset::generated(DatasetWire::default()))
    }

    fn patch(json: &str) -> ScenarioPatch {
        serde_json::from_str(json).unwrap()
    }

    fn actions(c: &Consent, n: usize) -> Vec<Action> {
        (0..n).map(|_| c.next_action().0).collect()
    }

    #[test]
    fn a_fail_percent_fails_that_share_half_503_half_hanging_repeatably() {
        let c = consent();
        c.patch(patch(r#"{"failPercent": 30}"#));
        let drawn = actions(&c, 10_000);
        let fails = drawn.iter().filter(|a| **a == Action::Fail(503)).count();
        let hangs = drawn.iter().filter(|a| **a == Action::Hang).count();
        let served = drawn.iter().filter(|a| **a == Action::Serve).count();
        assert_eq!(fails + hangs + served, 10_000);
        assert!(
            (2_700..=3_300).contains(&(fails + hangs)),
            "{fails} + {hangs}"
        );
        assert!(fails.abs_diff(hangs) < 400, "{fails} vs {hangs}");
        let again = consent();
        again.patch(patch(r#"{"failPercent": 30}"#));
        assert_eq!(actions(&again, 10_000), drawn);
        c.patch(patch(r#"{"failPercent": 0}"#));
        assert_eq!(actions(&c, 3), [Action::Serve; 3]);
    }

    #[test]
    fn faults_are_used_up_in_order() {
        use Action::*;
        let c = consent();
        assert_eq!(actions(&c, 2), [Serve, Serve]);
        c.patch(patch(
            r#"{"failNext": {"count": 2, "status": 429}, "hangNext": 1}"#,
        ));
        assert_eq!(actions(&c, 4), [Hang, Fail(429), Fail(429), Serve]);
        c.patch(patch(r#"{"revoked": true, "mfaRequired": true}"#));
        assert_eq!(actions(&c, 2), [Revoked, Revoked]);
        c.patch(patch(r#"{"revoked": false}"#));
        assert_eq!(actions(&c, 1), [MfaRequired]);
        c.patch(patch(r#"{"failNext": {"count": 1, "status": 500}}"#));
        assert_eq!(actions(&c, 2), [Fail(500), MfaRequired]);
        c.patch(patch(r#"{"mfaRequired": false, "latencyMs": 25}"#));
        assert_eq!(c.next_action(), (Serve, 25));
        assert_eq!(
            serde_json::to_value(c.scenario()).unwrap(),
            serde_json::json!({"revoked": false, "mfaRequired": false, "latencyMs": 25,
                               "failNext": {"count": 0, "status": 500}, "hangNext": 0,
                               "failPercent": 0})
        );
    }

    #[test]
    fn patches_are_checked() {
        for bad in [
            r#"{"revokd": true}"#,
            r#"{"failNext": {"count": 1}}"#,
            r#"{"failNext": {"count": 1, "status": 503, "x": 1}}"#,
            r#"{"hangNext": -1}"#,
            r#"{"latencyMs": "5"}"#,
        ] {
            assert!(serde_json::from_str::<ScenarioPatch>(bad).is_err(), "{bad}");
        }
    }
}
