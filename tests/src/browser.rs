//! A real headless Chromium over WebDriver (Debian's `chromium` and `chromedriver`,
//! installed by `make services`), one at a time, for the portal's browser tests.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use thirtyfour::prelude::*;
use tokio::process::{Child, Command};
use tokio::sync::{Mutex, MutexGuard};

/// One browser at a time across the test binary: two Chromiums on two shared cores
/// would make every timing in the tests a guess.
static ONE_BROWSER: Mutex<()> = Mutex::const_new(());

/// A running chromedriver with one browser session; both end when it is dropped.
pub struct Browser {
    pub driver: WebDriver,
    _chromedriver: Child,
    _turn: MutexGuard<'static, ()>,
}

/// Where screenshots go: `target/portal/`, next to the build output.
pub fn screenshot_dir() -> PathBuf {
    let dir = crate::repo_root().join("target").join("portal");
    std::fs::create_dir_all(&dir).expect("harness: create target/portal");
    dir
}

fn find(binary: &str) -> PathBuf {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join(binary))
        .find(|path| path.is_file())
        .unwrap_or_else(|| {
            panic!("harness: {binary} is not installed; `make services` installs chromium and chromium-driver")
        })
}

impl Browser {
    /// Starts chromedriver on a free port and a headless Chromium session on it.
    pub async fn start() -> Self {
        let turn = ONE_BROWSER.lock().await;
        let chromedriver = find("chromedriver");
        let chromium = find("chromium");
        let port = {
            let listener =
                std::net::TcpListener::bind("127.0.0.1:0").expect("harness: a free port");
            listener.local_addr().expect("harness: port").port()
        };
        let child = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("harness: start chromedriver");
        let url = format!("http://127.0.0.1:{port}");
        let mut caps = DesiredCapabilities::chrome();
        caps.set_binary(chromium.to_str().expect("harness: utf-8 path"))
            .expect("harness: chromium binary");
        // CI runs as root in a container: no sandbox, no /dev/shm to speak of.
        for arg in [
            "--headless=new",
            "--no-sandbox",
            "--disable-dev-shm-usage",
            "--disable-gpu",
            "--window-size=1280,1000",
            "--lang=en-GB",
        ] {
            caps.add_arg(arg).expect("harness: chromium argument");
        }
        let mut last = None;
        for _ in 0..100 {
            match WebDriver::new(&url, caps.clone()).await {
                Ok(driver) => {
                    return Self {
                        driver,
                        _chromedriver: child,
                        _turn: turn,
                    };
                }
                Err(error) => last = Some(error),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("harness: chromedriver did not start a browser: {last:?}");
    }

    /// Waits until `probe` answers `Some`, or fails the test after `wait`.
    pub async fn until<T, F, Fut>(&self, what: &str, wait: Duration, mut probe: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Option<T>>,
    {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(value) = probe().await {
                return value;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "waited {wait:?} for {what}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Saves a screenshot as `target/portal/{name}.png`.
    pub async fn screenshot(&self, name: &str) {
        let path = screenshot_dir().join(format!("{name}.png"));
        self.driver
            .screenshot(&path)
            .await
            .expect("harness: screenshot");
    }

    pub async fn quit(self) {
        let Self { driver, .. } = self;
        let _ = driver.quit().await;
    }
}
