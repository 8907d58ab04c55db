//! `refreshd` role processes the scenarios start beside the bench process: a free
//! port to serve on, waiting until a role answers, and an ingress of its own.

use std::time::Duration;

use anyhow::Result;
use refresh_tests::TestApp;
use tokio::time::Instant;

use crate::workers::Worker;

/// How long a role may take to start answering.
const STARTUP_LIMIT: Duration = Duration::from_secs(60);

/// A port nobody listens on at the moment of asking.
pub(crate) fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Waits until `url` answers 200, failing early if `process` (`refreshd {role}`) exits.
pub(crate) async fn wait_ready(
    client: &reqwest::Client,
    url: &str,
    role: &str,
    process: &mut Worker,
) -> Result<()> {
    let deadline = Instant::now() + STARTUP_LIMIT;
    loop {
        if let Some(status) = process.exited() {
            anyhow::bail!("refreshd {role} exited while starting ({status})");
        }
        if let Ok(response) = client.get(url).send().await
            && response.status() == 200
        {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "refreshd {role} did not answer {url} within {} s",
            STARTUP_LIMIT.as_secs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A `refreshd ingress` process on `app`'s namespace, so that its CPU is its own and
/// not mixed with the load generator's; SIGKILLed when dropped.
pub(crate) struct Ingress {
    pub(crate) process: Worker,
    /// `http://127.0.0.1:{port}`.
    pub(crate) base: String,
}

impl Ingress {
    /// Starts it on a free port with the dev settings plus `overrides`, and waits
    /// until it is ready.
    pub(crate) async fn start(app: &TestApp, overrides: &[(&str, &str)]) -> Result<Self> {
        let bind = format!("127.0.0.1:{}", free_port()?);
        let mut settings = overrides.to_vec();
        settings.push(("http.bind", bind.as_str()));
        let mut process = Worker::spawn_role(app, "ingress", &settings)?;
        let base = format!("http://{bind}");
        wait_ready(
            &reqwest::Client::new(),
            &format!("{base}/readyz"),
            "ingress",
            &mut process,
        )
        .await?;
        Ok(Self { process, base })
    }
}
