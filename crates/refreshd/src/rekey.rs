//! `refreshd rekey`: every stored bank token re-encrypted with `crypto.key` in batches of
//! `crypto.rekey_batch_size` (the scheduler does the same, a batch per tick), with its
//! progress on stderr and a summary; it exits 0 once no token is sealed otherwise.

use std::time::Duration;

use refresh_core::ConsentId;
use refresh_pg::{Schema, Store, StoreError, TokenKeys};
use tokio_util::sync::CancellationToken;

use crate::{RunError, Settings};

/// Passes over the consents at most: a row a finishing refresh holds is skipped by a
/// batch (`SKIP LOCKED`) and taken by the next pass.
const PASSES: usize = 10;

#[derive(Debug, thiserror::Error)]
enum RekeyError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "{count} stored tokens cannot be decrypted with crypto.key nor any of crypto.retired_keys (first: consent {consent}: {reason})"
    )]
    Undecryptable {
        count: u64,
        consent: ConsentId,
        reason: String,
    },
    #[error("{0} stored tokens are still sealed with another key after {PASSES} passes")]
    Left(u64),
    #[error("interrupted; run it again to go on")]
    Interrupted,
}

#[allow(
    clippy::print_stderr,
    reason = "the command's progress and summary are for the operator's terminal"
)]
fn say(line: &str) {
    eprintln!("rekey: {line}");
}

fn by_key(keys: &TokenKeys) -> String {
    let parts: Vec<String> = keys
        .by_key
        .iter()
        .map(|(k, n)| format!("{k}={n}"))
        .collect();
    if parts.is_empty() {
        "none stored".to_owned()
    } else {
        parts.join(", ")
    }
}

/// Runs the command on the namespace of `settings`.
pub async fn run(settings: &Settings, shutdown: &CancellationToken) -> Result<(), RunError> {
    let schema = Schema::parse(&settings.namespace)?;
    let pool = refresh_pg::connect(&settings.database, &schema)?;
    refresh_pg::check_migrated(&pool, &schema).await?;
    let cipher = settings
        .token_cipher()
        .map_err(|e| RunError::Role("settings", Box::new(e)))?;
    let store = Store::new(pool.clone(), cipher);
    let outcome = rekey(
        &store,
        i64::from(settings.crypto.rekey_batch_size),
        shutdown,
    )
    .await;
    pool.close().await;
    outcome.map_err(|e| RunError::Role("rekey", Box::new(e)))
}

async fn rekey(store: &Store, batch: i64, shutdown: &CancellationToken) -> Result<(), RekeyError> {
    let key = store.cipher().key_id();
    let before = store.token_keys().await?;
    let total: u64 = before.by_key.values().sum();
    say(&format!(
        "{total} stored tokens, {} to re-encrypt with crypto.key {key} (by key: {})",
        before.to_rekey,
        by_key(&before)
    ));
    let mut rekeyed = 0;
    let mut left = before;
    for pass in 1..=PASSES {
        let mut undecryptable = 0;
        let mut first = None;
        let mut after = None;
        loop {
            if shutdown.is_cancelled() {
                say(&format!("{rekeyed} re-encrypted before the interruption"));
                return Err(RekeyError::Interrupted);
            }
            let done = store.rekey_batch(after, batch).await?;
            rekeyed += done.rekeyed;
            undecryptable += done.undecryptable;
            if first.is_none() {
                first = done.first_undecryptable;
            }
            if done.examined > 0 {
                say(&format!(
                    "pass {pass}: {rekeyed} re-encrypted, {undecryptable} undecryptable"
                ));
            }
            if done.examined < u64::try_from(batch).unwrap_or(u64::MAX) {
                break;
            }
            after = done.last;
        }
        left = store.token_keys().await?;
        if left.to_rekey <= undecryptable {
            say(&format!(
                "done: {rekeyed} re-encrypted with {key}; {undecryptable} cannot be decrypted; tokens by key: {}",
                by_key(&left)
            ));
            return match first {
                Some((consent, reason)) => Err(RekeyError::Undecryptable {
                    count: undecryptable,
                    consent,
                    reason,
                }),
                None => Ok(()),
            };
        }
        // Rows a finishing refresh held: taken by the next pass.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    say(&format!(
        "stopped: {rekeyed} re-encrypted with {key}; tokens by key: {}",
        by_key(&left)
    ));
    Err(RekeyError::Left(left.to_rekey))
}
