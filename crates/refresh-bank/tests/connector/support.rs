//! Starting the simulator and driving its control API.

use std::time::Duration;

use chrono::{DateTime, Utc};
use refresh_bank::{
    BankData, BankError, Connector, ConnectorSettings, ConsentAccess, ObieConnector,
};
use refresh_banksim::{API_PREFIX, SimSettings};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A simulator serving on a free local port; stopped when dropped.
pub(crate) struct Sim {
    pub(crate) origin: String,
    http: reqwest::Client,
    shutdown: CancellationToken,
}

impl Drop for Sim {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub(crate) async fn start_sim(page_size: usize) -> Sim {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    let settings = SimSettings {
        page_size,
        ..SimSettings::default()
    };
    tokio::spawn(refresh_banksim::serve(listener, settings, shutdown.clone()));
    let _ = rustls::crypto::ring::default_provider().install_default();
    Sim {
        origin,
        http: reqwest::Client::new(),
        shutdown,
    }
}

impl Sim {
    pub(crate) fn access(&self, token: &str) -> ConsentAccess {
        ConsentAccess {
            base_url: format!("{}{API_PREFIX}", self.origin),
            access_token: token.to_owned(),
            financial_id: "0015800001041RHAAY".to_owned(),
            trace: None,
            bank_consent_id: token.to_owned(),
        }
    }

    pub(crate) async fn dataset(&self, token: &str) -> Value {
        let url = format!("{}/sim/consents/{token}", self.origin);
        let resp = self.http.get(url).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        resp.json().await.unwrap()
    }

    pub(crate) async fn put(&self, token: &str, dataset: &Value) {
        let url = format!("{}/sim/consents/{token}", self.origin);
        let resp = self.http.put(url).json(dataset).send().await.unwrap();
        assert_eq!(resp.status(), 204, "{}", resp.text().await.unwrap());
    }

    pub(crate) async fn scenario(&self, token: &str, patch: Value) {
        let url = format!("{}/sim/consents/{token}/scenario", self.origin);
        let resp = self.http.patch(url).json(&patch).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    }

    pub(crate) async fn calls(&self, token: &str) -> Vec<Value> {
        let url = format!("{}/sim/calls?bankConsentId={token}", self.origin);
        self.http
            .get(url)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

pub(crate) fn connector(settings: ConnectorSettings) -> ObieConnector {
    ObieConnector::new(settings).unwrap()
}

pub(crate) fn quick() -> ConnectorSettings {
    ConnectorSettings {
        request_timeout: Duration::from_secs(5),
        fetch_timeout: Duration::from_secs(20),
        max_pages: 1000,
    }
}

/// Long before any generated transaction.
pub(crate) fn long_ago() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2000-01-01T00:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
}

pub(crate) async fn refresh(
    sim: &Sim,
    settings: ConnectorSettings,
    token: &str,
) -> Result<BankData, BankError> {
    connector(settings)
        .fetch_refresh(&sim.access(token), long_ago())
        .await
}

/// Items of a dataset list belonging to `account`.
pub(crate) fn of_account<'a>(dataset: &'a Value, list: &str, account: &str) -> Vec<&'a Value> {
    dataset[list]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["AccountId"] == account)
        .collect()
}
