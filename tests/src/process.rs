//! Real `refreshd worker` child processes of a test's namespace: spawned from the
//! binary cargo built next to the test binary, killed (SIGKILL) when dropped, and
//! stopped gracefully with SIGTERM through the `kill` command.

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::{Bank, TestApp, repo_root};

/// A `refreshd worker` process; SIGKILLed and reaped when dropped.
pub struct WorkerProcess {
    child: Child,
    log: PathBuf,
}

/// `target/debug/refreshd`, next to the `deps/` folder holding the test binary.
pub fn refreshd_binary() -> PathBuf {
    built_binary("refreshd")
}

/// `target/debug/refreshctl`, built with refreshd.
pub fn refreshctl_binary() -> PathBuf {
    built_binary("refreshctl")
}

fn built_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("harness: the test binary's path");
    let binary = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|dir| dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX)))
        .expect("harness: the test binary lives in target/{profile}/deps");
    assert!(
        binary.is_file(),
        "harness: {} is missing: run `make test`, or `cargo build --workspace --bins` first",
        binary.display()
    );
    binary
}

/// `stagger.limit` → `REFRESHD__STAGGER__LIMIT`.
fn env_key(key: &str) -> String {
    format!("REFRESHD__{}", key.replace('.', "__").to_uppercase())
}

/// `binary worker` on `app`'s namespace and its `sim` provider, with the dev settings
/// plus `overrides` (`("lock.lease_secs", "5")`). Hermetic: only the variables set
/// here configure the child.
pub fn worker_command(
    binary: &std::path::Path,
    app: &TestApp,
    overrides: &[(&str, &str)],
) -> Command {
    role_command(binary, "worker", app, overrides)
}

/// `binary role` on `app`'s namespace, configured like [`worker_command`].
pub fn role_command(
    binary: &std::path::Path,
    role: &str,
    app: &TestApp,
    overrides: &[(&str, &str)],
) -> Command {
    let mut command = hermetic_command(binary, app, overrides);
    command.arg(role);
    command
}

/// `refreshctl` configured like [`worker_command`] (namespace, the app's delivery
/// limit), with `REFRESHCTL_TOKEN` removed: a test passes `--url` and `--token`.
pub fn refreshctl_command(app: &TestApp) -> tokio::process::Command {
    let delivery_limit = app.settings.amqp.delivery_limit.to_string();
    let std = hermetic_command(
        &refreshctl_binary(),
        app,
        &[("amqp.delivery_limit", &delivery_limit)],
    );
    let mut command = tokio::process::Command::from(std);
    command.env_remove("REFRESHCTL_TOKEN").kill_on_drop(true);
    command
}

fn hermetic_command(
    binary: &std::path::Path,
    app: &TestApp,
    overrides: &[(&str, &str)],
) -> Command {
    let mut command = Command::new(binary);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("REFRESHD") {
            command.env_remove(key);
        }
    }
    command
        .env("REFRESHD_ENV", "dev")
        .env("REFRESHD_CONFIG_DIR", repo_root().join("config"))
        .env("RUST_LOG", "warn")
        .env(env_key("namespace"), &app.namespace);
    // The app's simulator, in both dialects.
    for provider in ["sim", "sim_bg"] {
        if let Some(sim) = app.settings.providers.get(provider) {
            command.env(
                env_key(&format!("providers.{provider}.base_url")),
                &sim.base_url,
            );
        }
    }
    for (key, value) in overrides {
        command.env(env_key(key), value);
    }
    command
}

impl WorkerProcess {
    /// Starts `refreshd worker` on `app`'s namespace and its `sim` provider, with the
    /// dev settings plus `overrides` (`("lock.lease_secs", "5")`).
    pub fn spawn(app: &TestApp, overrides: &[(&str, &str)]) -> Self {
        Self::spawn_role(app, "worker", overrides)
    }

    /// Starts `refreshd {role}` likewise (e.g. `scheduler`).
    pub fn spawn_role(app: &TestApp, role: &str, overrides: &[(&str, &str)]) -> Self {
        Self::spawn_logged(app, role, overrides, "warn")
    }

    /// Starts `refreshd {role}` likewise, logging at `rust_log` (a `RUST_LOG` filter,
    /// e.g. `info`); with `("log.format", "json")` its [`WorkerProcess::log_lines`]
    /// can be read.
    pub fn spawn_logged(
        app: &TestApp,
        role: &str,
        overrides: &[(&str, &str)],
        rust_log: &str,
    ) -> Self {
        let log = std::env::temp_dir().join(format!(
            "refreshd-{role}-{}-{}.log",
            app.namespace,
            uuid::Uuid::new_v4().simple()
        ));
        let stderr = std::fs::File::create(&log).expect("harness: create the process's log");
        let mut command = role_command(&refreshd_binary(), role, app, overrides);
        command.env("RUST_LOG", rust_log);
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("harness: spawn `refreshd worker`");
        Self { child, log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the process wrote to stderr so far (its warnings and errors).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The JSON log lines written so far (lines that are not JSON are skipped).
    pub fn log_lines(&self) -> Vec<Value> {
        self.log()
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }

    /// Panics (with the process's log) if it has exited.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().expect("harness: poll the worker") {
            panic!(
                "refreshd worker {} exited early ({status}); its log:\n{}",
                self.pid(),
                self.log()
            );
        }
    }

    /// SIGKILL, and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM (graceful shutdown), through the `kill` command.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("harness: run `kill -TERM`");
        assert!(status.success(), "kill -TERM {}: {status}", self.pid());
    }

    /// The exit status, if the process exits within `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("harness: poll the worker") {
                return Some(status);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(&self.log);
    }
}

impl Bank {
    /// `GET /sim/calls?since=`: every logged call, of every consent.
    pub async fn all_calls(&self, since: Option<chrono::DateTime<chrono::Utc>>) -> Vec<Value> {
        let mut request = reqwest::Client::new().get(format!("{}/sim/calls", self.base));
        if let Some(since) = since {
            request = request.query(&[("since", since.to_rfc3339())]);
        }
        let response = request
            .send()
            .await
            .expect("harness: the simulator answers");
        assert!(response.status().is_success(), "simulator: {response:?}");
        let calls: Value = response.json().await.expect("harness: simulator JSON");
        calls.as_array().cloned().unwrap_or_default()
    }
}
