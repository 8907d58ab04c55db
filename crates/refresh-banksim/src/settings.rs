//! The simulator's settings (config section `bank_sim`).

use serde::{Deserialize, Serialize};

/// Settings of `refreshd bank-sim`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimSettings {
    /// Address to listen on.
    pub bind: String,
    /// Items per page of every listing; `Links.Next` leads to the rest.
    pub page_size: usize,
    /// Added to every data call, before the answer.
    pub latency_ms: u64,
}

impl Default for SimSettings {
    fn default() -> Self {
        Self {
            bind: "127.0.0.1:8090".to_owned(),
            page_size: 100,
            latency_ms: 0,
        }
    }
}

/// The most items a page may hold.
pub const MAX_PAGE_SIZE: usize = 10_000;
/// The longest latency that may be configured, in milliseconds.
pub const MAX_LATENCY_MS: u64 = 600_000;

/// A setting out of range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SimSettingsError {
    #[error("bank_sim.bind must not be empty")]
    EmptyBind,
    #[error("bank_sim.page_size must be between 1 and {MAX_PAGE_SIZE}, not {0}")]
    PageSize(usize),
    #[error("bank_sim.latency_ms must be at most {MAX_LATENCY_MS}, not {0}")]
    Latency(u64),
}

impl SimSettings {
    /// Checks the ranges; call once at start-up.
    pub fn validate(&self) -> Result<(), SimSettingsError> {
        if self.bind.trim().is_empty() {
            return Err(SimSettingsError::EmptyBind);
        }
        if !(1..=MAX_PAGE_SIZE).contains(&self.page_size) {
            return Err(SimSettingsError::PageSize(self.page_size));
        }
        if self.latency_ms > MAX_LATENCY_MS {
            return Err(SimSettingsError::Latency(self.latency_ms));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(json: &str, expected: Result<SimSettings, &str>) {
        let got = serde_json::from_str::<SimSettings>(json)
            .map_err(|e| e.to_string())
            .and_then(|s| s.validate().map(|()| s).map_err(|e| e.to_string()));
        match (got, expected) {
            (Ok(got), Ok(want)) => assert_eq!(got, want, "{json}"),
            (Err(got), Err(want)) => assert!(got.contains(want), "{json}: {got}"),
            (got, want) => panic!("{json}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn settings() {
        check("{}", Ok(SimSettings::default()));
        check(
            r#"{"bind": "0.0.0.0:9000", "page_size": 5, "latency_ms": 20}"#,
            Ok(SimSettings {
                bind: "0.0.0.0:9000".into(),
                page_size: 5,
                latency_ms: 20,
            }),
        );
        check(r#"{"page_size": 0}"#, Err("page_size must be between 1"));
        check(
            r#"{"page_size": 10001}"#,
            Err("page_size must be between 1"),
        );
        check(
            r#"{"latency_ms": 600001}"#,
            Err("latency_ms must be at most"),
        );
        check(r#"{"bind": " "}"#, Err("bind must not be empty"));
        check(r#"{"pagesize": 5}"#, Err("unknown field"));
    }
}
