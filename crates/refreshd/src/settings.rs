//! Typed configuration: the layers of SPEC §7 merged into one [`Settings`], validated
//! once at start-up. Each adapter is handed its own section.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use refresh_amqp::AmqpSettings;
use refresh_banksim::SimSettings;
use refresh_core::{QuotaRule, StaggerSettings};
use refresh_pg::DatabaseSettings;
use refresh_redis::RedisSettings;
use secrecy::{ExposeSecret as _, SecretString};
use serde::Deserialize;

use crate::Role;

/// The defaults, built into the binary so it runs from any directory.
const DEFAULTS: &str = include_str!("../../../config/default.toml");

/// Everything refreshd can be configured with (`config/default.toml` documents each key).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub namespace: String,
    pub log: LogSettings,
    pub redis: RedisSettings,
    pub amqp: AmqpSettings,
    pub database: DatabaseSettings,
    pub http: HttpSettings,
    pub bank_sim: SimSettings,
    pub quota: QuotaSettings,
    pub stagger: StaggerSettings,
    pub lock: LockSettings,
    pub shutdown: ShutdownSettings,
    pub worker: WorkerSettings,
    pub history: HistorySettings,
    pub scheduler: SchedulerSettings,
    #[serde(default)]
    pub auth: AuthSettings,
    #[serde(default)]
    pub crypto: CryptoSettings,
    pub providers: BTreeMap<String, ProviderSettings>,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Auto,
    Json,
    Pretty,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    pub bind: String,
    pub sync_wait_secs: u64,
    /// `Secure` on the portal's cookies (off in `dev`, which serves plain HTTP).
    pub secure_cookies: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaSettings {
    pub rules: Vec<QuotaRule>,
    pub time_zone: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockSettings {
    pub lease_secs: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownSettings {
    pub grace_secs: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerSettings {
    pub concurrency: u32,
    pub max_attempts: u32,
    pub prefetch: u16,
    /// Where a standalone worker serves `/healthz`, `/readyz`, `/metrics` (empty: nowhere).
    pub metrics_bind: String,
    /// Days before the last successful refresh that a plain refresh fetches again.
    pub overlap_days: u32,
    /// Days back that any fetch reaches (the initial load's window).
    pub history_days: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistorySettings {
    pub retention_days: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulerSettings {
    pub tick_secs: u64,
    /// Consents requested per tick and replica at most.
    pub batch_size: u32,
    /// A refresh still INITIALIZED this long after its start slot, with no worker
    /// holding its lock, is ended ERROR `internal_error`.
    pub stalled_after_secs: u64,
    /// Where a standalone scheduler serves `/healthz`, `/readyz`, `/metrics` (empty: nowhere).
    pub metrics_bind: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    pub jwt_hs256_secret: Option<SecretString>,
    pub jwt_rs256_public_key_pem: Option<String>,
    /// Tokens must carry this `iss` (unset: not checked).
    pub issuer: Option<String>,
    /// Tokens' `aud` must contain this (unset: not checked).
    pub audience: Option<String>,
}

/// The shortest HS256 secret accepted outside `refreshd dev` (RFC 7518 §3.2: a key
/// at least as long as the hash).
pub const MIN_HS256_SECRET_BYTES: usize = 32;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CryptoSettings {
    /// 32 bytes, base64: encrypts (and decrypts) bank tokens.
    pub key: Option<SecretString>,
    /// Earlier keys, 32 bytes base64 each: decrypt only, until every token is
    /// re-encrypted with `key`.
    #[serde(default)]
    pub retired_keys: Vec<SecretString>,
    /// Tokens re-encrypted with `key` per scheduler tick and replica at most (one
    /// transaction), and per batch of `refreshd rekey`.
    pub rekey_batch_size: u32,
}

/// `providers.{id}.kind`: the connectors' own type, so a kind is named once.
pub use refresh_bank::ProviderKind;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderSettings {
    pub kind: ProviderKind,
    pub base_url: String,
    pub timeout_secs: u64,
}

/// Where the layers come from.
#[derive(Debug, Default)]
pub struct LoadOptions {
    /// The environment (`REFRESHD_ENV`): selects `config/{env}.toml`.
    pub env: Option<String>,
    /// The folder of environment files (default `config`).
    pub config_dir: Option<PathBuf>,
    /// `--config FILE`.
    pub config_file: Option<PathBuf>,
    /// Read `REFRESHD__SECTION__KEY` variables (off in tests, so they are hermetic).
    pub environment_variables: bool,
    /// Last-word overrides, `("stagger.limit", "3")`; used by tests.
    pub overrides: Vec<(String, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("{0}")]
    Load(#[from] config::ConfigError),
    #[error("{key}: {problem}")]
    Invalid {
        key: std::borrow::Cow<'static, str>,
        problem: String,
    },
    #[error(
        "{} not found: the dev environment reads its settings from it; run from the repository's root or set REFRESHD_CONFIG_DIR to its config folder",
        path.display()
    )]
    DevFileMissing { path: PathBuf },
}

fn invalid(
    key: impl Into<std::borrow::Cow<'static, str>>,
    problem: impl Into<String>,
) -> SettingsError {
    SettingsError::Invalid {
        key: key.into(),
        problem: problem.into(),
    }
}

impl Settings {
    /// Merges the layers of SPEC §7, later wins: defaults, `config/{env}.toml`,
    /// `--config FILE`, environment variables, then `overrides`.
    pub fn load(options: &LoadOptions) -> Result<Self, SettingsError> {
        use config::{Config, Environment, File, FileFormat};
        let mut builder = Config::builder().add_source(File::from_str(DEFAULTS, FileFormat::Toml));
        if let Some(env) = &options.env {
            let dir = options.config_dir.as_deref().unwrap_or(Path::new("config"));
            let path = dir.join(format!("{env}.toml"));
            // The dev environment's secrets live in its file: without it, validation would
            // fail on a missing secret, far from the real cause.
            if env == "dev" && !path.is_file() {
                return Err(SettingsError::DevFileMissing { path });
            }
            builder = builder.add_source(File::from(path).required(false));
        }
        if let Some(file) = &options.config_file {
            builder = builder.add_source(File::from(file.as_path()).required(true));
        }
        if options.environment_variables {
            builder = builder.add_source(
                Environment::with_prefix("REFRESHD")
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(true)
                    // A list of base64 keys from one variable (a secret), comma-separated.
                    .list_separator(",")
                    .with_list_parse_key("crypto.retired_keys"),
            );
        }
        for (key, value) in &options.overrides {
            builder = builder.set_override(key.as_str(), value.as_str())?;
        }
        Ok(builder.build()?.try_deserialize()?)
    }

    /// Checks every value once, naming the key and what is allowed. `role` decides
    /// which secrets are required.
    pub fn validate(&self, role: Role) -> Result<(), SettingsError> {
        refresh_pg::Schema::parse(&self.namespace).map_err(|_| {
            invalid(
                "namespace",
                "must be 1 to 40 lowercase letters, digits or '_', starting with a letter",
            )
        })?;
        self.quota_time_zone()?;
        self.redis.check().map_err(|problem| {
            let key = if self.redis.cluster_nodes.is_empty() {
                "redis.url"
            } else {
                "redis.cluster_nodes"
            };
            invalid(key, problem)
        })?;
        if self.quota.rules.is_empty() {
            // Allowed: no rule means every source is exempt. Nothing to check.
        }
        for rule in &self.quota.rules {
            if rule.sources.is_empty() {
                return Err(invalid(
                    "quota.rules",
                    "every rule names at least one source",
                ));
            }
            if rule.limit == 0 {
                return Err(invalid("quota.rules", "limit must be at least 1"));
            }
        }
        if self.stagger.limit == 0 {
            return Err(invalid("stagger.limit", "must be at least 1"));
        }
        if self.stagger.period_secs == 0 {
            return Err(invalid("stagger.period_secs", "must be at least 1"));
        }
        if self.stagger.validate().is_err() {
            return Err(invalid(
                "stagger.autosync_share",
                "must be more than 0 and at most 1",
            ));
        }
        let positive: [(&'static str, u64); 14] = [
            ("lock.lease_secs", self.lock.lease_secs),
            ("shutdown.grace_secs", self.shutdown.grace_secs),
            ("worker.concurrency", self.worker.concurrency.into()),
            ("worker.max_attempts", self.worker.max_attempts.into()),
            ("worker.prefetch", self.worker.prefetch.into()),
            ("worker.history_days", self.worker.history_days.into()),
            ("history.retention_days", self.history.retention_days.into()),
            ("http.sync_wait_secs", self.http.sync_wait_secs),
            ("redis.command_timeout_ms", self.redis.command_timeout_ms),
            ("amqp.confirm_timeout_ms", self.amqp.confirm_timeout_ms),
            ("amqp.requests_prefetch", self.amqp.requests_prefetch.into()),
            ("scheduler.tick_secs", self.scheduler.tick_secs),
            ("scheduler.batch_size", self.scheduler.batch_size.into()),
            (
                "scheduler.stalled_after_secs",
                self.scheduler.stalled_after_secs,
            ),
        ];
        if let Some((key, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(invalid(*key, "must be at least 1"));
        }
        if self.worker.overlap_days > self.worker.history_days {
            return Err(invalid(
                "worker.overlap_days",
                "must be at most worker.history_days",
            ));
        }
        if self.lock.lease_secs < 5 {
            return Err(invalid("lock.lease_secs", "must be at least 5"));
        }
        for (id, provider) in &self.providers {
            if refresh_core::ProviderId::parse(id).is_err() {
                return Err(invalid("providers", format!("invalid provider id {id:?}")));
            }
            if !(provider.base_url.starts_with("http://")
                || provider.base_url.starts_with("https://"))
            {
                return Err(invalid(
                    "providers.*.base_url",
                    format!("{id}: must be an http(s) URL"),
                ));
            }
            if provider.timeout_secs == 0 {
                return Err(invalid(
                    "providers.*.timeout_secs",
                    format!("{id}: must be at least 1"),
                ));
            }
        }
        if role.serves_api()
            && self.auth.jwt_hs256_secret.is_none()
            && self.auth.jwt_rs256_public_key_pem.is_none()
        {
            return Err(invalid(
                "auth",
                "set auth.jwt_hs256_secret or auth.jwt_rs256_public_key_pem (required outside the dev environment)",
            ));
        }
        if role.serves_api()
            && role != Role::Dev
            && self.auth.jwt_rs256_public_key_pem.is_none()
            && self
                .auth
                .jwt_hs256_secret
                .as_ref()
                .is_some_and(|s| s.expose_secret().len() < MIN_HS256_SECRET_BYTES)
        {
            return Err(invalid(
                "auth.jwt_hs256_secret",
                format!("must be at least {MIN_HS256_SECRET_BYTES} bytes"),
            ));
        }
        if role.serves_api() && self.amqp.requested_by.is_empty() {
            return Err(invalid(
                "amqp.requested_by",
                "name at least one source (APP, API, PORTAL, ADMIN, AUTOSYNC)",
            ));
        }
        for (key, value) in [
            ("auth.issuer", &self.auth.issuer),
            ("auth.audience", &self.auth.audience),
        ] {
            if value.as_deref().is_some_and(|v| v.trim().is_empty()) {
                return Err(invalid(
                    key,
                    "must not be empty (leave it unset to not check)",
                ));
            }
        }
        if role.handles_tokens() {
            self.crypto_key()?;
        }
        self.retired_keys()?;
        if self.crypto.rekey_batch_size == 0 {
            return Err(invalid("crypto.rekey_batch_size", "must be at least 1"));
        }
        Ok(())
    }

    /// The quota time zone.
    pub fn quota_time_zone(&self) -> Result<chrono_tz::Tz, SettingsError> {
        self.quota.time_zone.parse().map_err(|_| {
            invalid(
                "quota.time_zone",
                format!(
                    "{:?} is not an IANA time zone name (e.g. Europe/London)",
                    self.quota.time_zone
                ),
            )
        })
    }

    /// The 32-byte key that encrypts bank tokens at rest.
    pub fn crypto_key(&self) -> Result<[u8; 32], SettingsError> {
        let key = self.crypto.key.as_ref().ok_or_else(|| {
            invalid(
                "crypto.key",
                "required outside the dev environment: 32 random bytes, base64",
            )
        })?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(key.expose_secret().trim())
            .map_err(|_| invalid("crypto.key", "must be base64"))?;
        bytes
            .try_into()
            .map_err(|_| invalid("crypto.key", "must decode to exactly 32 bytes"))
    }

    /// The retired keys, each named by its place in the list when it is bad.
    pub fn retired_keys(&self) -> Result<Vec<[u8; 32]>, SettingsError> {
        let mut keys = Vec::with_capacity(self.crypto.retired_keys.len());
        for (i, key) in self.crypto.retired_keys.iter().enumerate() {
            // An empty variable (`REFRESHD__CRYPTO__RETIRED_KEYS=`) names no key.
            if key.expose_secret().trim().is_empty() {
                continue;
            }
            let name = || format!("crypto.retired_keys[{i}]");
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(key.expose_secret().trim())
                .map_err(|_| invalid(name(), "must be base64"))?;
            keys.push(
                bytes
                    .try_into()
                    .map_err(|_| invalid(name(), "must decode to exactly 32 bytes"))?,
            );
        }
        Ok(keys)
    }

    /// The cipher of bank tokens: `crypto.key` encrypts, it and `crypto.retired_keys`
    /// decrypt.
    pub fn token_cipher(&self) -> Result<refresh_pg::TokenCipher, SettingsError> {
        Ok(refresh_pg::TokenCipher::with_retired(
            &self.crypto_key()?,
            &self.retired_keys()?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(overrides: &[(&str, &str)]) -> Result<Settings, SettingsError> {
        Settings::load(&LoadOptions {
            overrides: overrides
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ..LoadOptions::default()
        })
    }

    #[test]
    fn defaults_match_the_spec() {
        let s = load(&[]).unwrap();
        assert_eq!(s.namespace, "refreshd");
        assert_eq!(s.http.bind, "127.0.0.1:8080");
        assert_eq!(s.bank_sim.bind, "127.0.0.1:8090");
        assert_eq!(
            (
                s.stagger.limit,
                s.stagger.period_secs,
                s.stagger.max_delay_secs
            ),
            (30, 60, 3600)
        );
        assert_eq!(s.lock.lease_secs, 120);
        assert_eq!((s.http.sync_wait_secs, s.shutdown.grace_secs), (30, 30));
        assert_eq!(
            (
                s.worker.concurrency,
                s.worker.max_attempts,
                s.worker.prefetch
            ),
            (16, 5, 32)
        );
        assert_eq!(s.amqp.requests_prefetch, 128);
        assert_eq!((s.worker.overlap_days, s.worker.history_days), (7, 90));
        assert_eq!(s.history.retention_days, 7);
        assert_eq!(s.quota.rules.len(), 1);
        assert_eq!(s.quota.rules[0].limit, 4);
        assert_eq!(s.quota.time_zone, "UTC");
        assert!(s.providers.contains_key("sim"));
        // The defaults are valid for roles that need no secrets.
        s.validate(Role::Migrate).unwrap();
        s.validate(Role::BankSim).unwrap();
    }

    #[test]
    fn a_short_hs256_secret_is_refused_outside_dev() {
        const KEY: (&str, &str) = ("crypto.key", "ZGV2LWtleS1ub3QtZm9yLXByb2R1Y3Rpb24tMzJieXQ=");
        let short = [
            ("auth.jwt_hs256_secret", "31 bytes of a secret, too short"),
            KEY,
        ];
        assert_eq!(short[0].1.len(), 31);
        let err = load(&short)
            .and_then(|s| s.validate(Role::Ingress).map(|()| s))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "auth.jwt_hs256_secret: must be at least 32 bytes"
        );
        load(&short).unwrap().validate(Role::Dev).unwrap();
        let long = [
            ("auth.jwt_hs256_secret", "32 bytes of a secret, long enuf!"),
            KEY,
        ];
        assert_eq!(long[0].1.len(), 32);
        load(&long).unwrap().validate(Role::Ingress).unwrap();
        // A worker does not verify tokens.
        let worker = load(&short).unwrap().validate(Role::Worker);
        assert!(!matches!(
            worker,
            Err(SettingsError::Invalid { key, .. }) if key == "auth.jwt_hs256_secret"
        ));
        let empty = load(&[
            ("auth.jwt_hs256_secret", &"x".repeat(40)),
            ("auth.issuer", " "),
        ])
        .unwrap()
        .validate(Role::Ingress)
        .unwrap_err();
        assert_eq!(
            empty.to_string(),
            "auth.issuer: must not be empty (leave it unset to not check)"
        );
    }

    #[test]
    fn bad_values_name_their_key() {
        let check = |key: &str, value: &str, role: Role, expected: &str| {
            let err = load(&[(key, value)])
                .and_then(|s| s.validate(role).map(|()| s))
                .unwrap_err();
            let text = err.to_string();
            assert!(text.contains(expected), "{key}={value}: {text}");
        };
        check("namespace", "Bad-Name", Role::Migrate, "namespace: must be");
        check(
            "stagger.limit",
            "0",
            Role::Migrate,
            "stagger.limit: must be at least 1",
        );
        check("stagger.limit", "many", Role::Migrate, "stagger.limit");
        check(
            "quota.time_zone",
            "Mars/Olympus",
            Role::Migrate,
            "quota.time_zone",
        );
        check(
            "lock.lease_secs",
            "1",
            Role::Migrate,
            "lock.lease_secs: must be at least 5",
        );
        check(
            "worker.concurrency",
            "0",
            Role::Migrate,
            "worker.concurrency",
        );
        check(
            "worker.history_days",
            "0",
            Role::Migrate,
            "worker.history_days: must be at least 1",
        );
        check(
            "worker.overlap_days",
            "91",
            Role::Migrate,
            "worker.overlap_days: must be at most worker.history_days",
        );
        check("worker.overlap_days", "-1", Role::Migrate, "overlap_days");
        check("stagger.scope", "galaxy", Role::Migrate, "scope");
        check("providers.sim.kind", "fints", Role::Migrate, "fints");
        check(
            "crypto.key",
            "c2hvcnQ=",
            Role::Worker,
            "crypto.key: must decode to exactly 32 bytes",
        );
        check("namespace", "ok", Role::Ingress, "auth:");
        check("namespace", "ok", Role::Worker, "crypto.key: required");
    }

    #[test]
    fn a_bad_retired_key_is_named_by_its_place() {
        const GOOD: &str = "ZGV2LWtleS1ub3QtZm9yLXByb2R1Y3Rpb24tMzJieXQ=";
        let check = |retired: &[&str], expected: Option<&str>| {
            let mut s = load(&[("crypto.key", GOOD)]).unwrap();
            s.crypto.retired_keys = retired.iter().map(|k| SecretString::from(*k)).collect();
            match (s.validate(Role::Migrate), expected) {
                (Ok(()), None) => assert_eq!(s.retired_keys().unwrap().len(), retired.len()),
                (Err(e), Some(text)) => assert_eq!(e.to_string(), text, "{retired:?}"),
                (got, want) => panic!("{retired:?}: {got:?}, expected {want:?}"),
            }
        };
        check(&[], None);
        check(&[GOOD], None);
        let mut s = load(&[("crypto.key", GOOD)]).unwrap();
        s.crypto.retired_keys = vec![SecretString::from("")];
        assert_eq!(
            s.retired_keys().unwrap(),
            Vec::<[u8; 32]>::new(),
            "blank: none"
        );
        check(
            &[GOOD, "bm90LTMy"],
            Some("crypto.retired_keys[1]: must decode to exactly 32 bytes"),
        );
        check(
            &["not base64!"],
            Some("crypto.retired_keys[0]: must be base64"),
        );
        check(
            &["c2hvcnQ="],
            Some("crypto.retired_keys[0]: must decode to exactly 32 bytes"),
        );
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = load(&[("stagger.limitt", "3")]).unwrap_err().to_string();
        assert!(err.contains("limitt"), "{err}");
    }

    #[test]
    fn environment_files_layer_over_defaults() {
        let s = Settings::load(&LoadOptions {
            env: Some("dev".into()),
            config_dir: Some(PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../config"
            ))),
            ..LoadOptions::default()
        })
        .unwrap();
        assert_eq!(s.log.format, LogFormat::Pretty);
        s.validate(Role::Dev).unwrap();
        assert_eq!(s.crypto_key().unwrap().len(), 32);
    }

    #[test]
    fn a_missing_dev_file_is_named() {
        let load_from = |dir: &str, env: &str| {
            Settings::load(&LoadOptions {
                env: Some(env.into()),
                config_dir: Some(PathBuf::from(dir)),
                ..LoadOptions::default()
            })
        };
        let err = load_from("/nonexistent/config", "dev")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "/nonexistent/config/dev.toml not found: the dev environment reads its settings \
             from it; run from the repository's root or set REFRESHD_CONFIG_DIR to its config folder"
        );
        // Other environments' files stay optional (SPEC §7: "if present").
        load_from("/nonexistent/config", "production").unwrap();
    }
}
