//! The portal (SPEC §6) in a real headless Chromium against the real stack (ingress,
//! worker, bank simulator, Redis, RabbitMQ, PostgreSQL), plus its session and CSRF
//! rules over plain HTTP.

use std::time::Duration;

use refresh_tests::browser::Browser;
use refresh_tests::{Api, app_with_bank, dev_token, fast_worker_config, spawn_app, start_worker};
use serde_json::{Value, json};
use thirtyfour::prelude::*;

const STORED: &str = "api:stored_data";
const LIVE: Duration = Duration::from_secs(30);

/// An `application/x-www-form-urlencoded` body.
fn form(pairs: &[(&str, &str)]) -> String {
    let encode = |s: &str| {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect::<String>()
    };
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

async fn register(api: &Api, token: &str, key: &str) -> String {
    let body = json!({ "providerId": "sim", "bankConsentId": key, "accessToken": key, "expiresAt": (chrono::Utc::now() + chrono::TimeDelta::days(30)).to_rfc3339() });
    let answer = api.post("/v1/consents", token, Some(&body)).await;
    assert_eq!(answer.status, 201, "{answer:?}");
    answer.body["consentId"].as_str().unwrap().to_owned()
}

async fn idle(api: &Api, token: &str, consent: &str) {
    for _ in 0..600 {
        let view = api.get(&format!("/v1/consents/{consent}"), token).await;
        if view.body["refreshing"] == false {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the initial load of {consent} did not finish");
}

async fn text_of(browser: &Browser, css: &str) -> String {
    browser
        .driver
        .find(By::Css(css))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Clicks "Refresh Data" and waits until the answer shows; returns the answer text.
async fn click_refresh(browser: &Browser, row: &str) -> String {
    let answer = format!("{row} .answer");
    browser
        .driver
        .execute(
            &format!("document.querySelector('{answer}').textContent = ''"),
            vec![],
        )
        .await
        .unwrap();
    browser
        .driver
        .find(By::Css(format!("{row} button.refresh")))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    browser
        .until("the answer of Refresh Data", LIVE, || async {
            let text = text_of(browser, &answer).await;
            (!text.is_empty() && text != "Requesting…").then_some(text)
        })
        .await
}

#[tokio::test]
async fn the_dashboard_in_a_real_browser() {
    // Each bank call takes 300 ms, so "Refreshing consent…" is on screen for a while.
    let (app, api, _bank) = app_with_bank(&[("bank_sim.latency_ms", "300")]).await;
    start_worker(&app, &api, fast_worker_config(&app));
    let acme = dev_token(&app, Some("acme"), STORED);
    let other = dev_token(&app, Some("other"), STORED);
    let consent = register(&api, &acme, "portal-acme").await;
    let theirs = register(&api, &other, "portal-other").await;
    idle(&api, &acme, &consent).await;

    let browser = Browser::start().await;
    let driver = &browser.driver;
    driver
        .goto(format!("{}/dashboard", api.base))
        .await
        .unwrap();
    assert!(
        driver
            .current_url()
            .await
            .unwrap()
            .path()
            .ends_with("/dashboard/login"),
        "without a session the dashboard sends to the sign-in page"
    );
    browser.screenshot("login").await;
    driver
        .find(By::Id("token"))
        .await
        .unwrap()
        .send_keys(&acme)
        .await
        .unwrap();
    driver
        .find(By::Css("form button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    browser
        .until("the dashboard", LIVE, || async {
            let url = driver.current_url().await.ok()?;
            (url.path() == "/dashboard").then_some(())
        })
        .await;
    let row = format!("#consent-{consent}");
    let status = format!("{row} .status");
    assert_eq!(text_of(&browser, &status).await, "Expires in 30 days");
    assert_eq!(
        text_of(&browser, &format!("{row} .quota")).await,
        "4 of 4 refreshes left in 24 h"
    );
    let page = driver.source().await.unwrap();
    assert!(
        !page.contains(&theirs),
        "another tenant's consent never appears"
    );
    browser
        .until("the live stream", LIVE, || async {
            (text_of(&browser, "#live-state").await == "Live").then_some(())
        })
        .await;
    browser.screenshot("dashboard").await;

    // A marker only this page load has: it survives only if nothing reloads.
    driver
        .execute("window.portalTestMarker = 42;", vec![])
        .await
        .unwrap();
    assert_eq!(click_refresh(&browser, &row).await, "Refresh requested");
    browser
        .until("Refreshing consent…", LIVE, || async {
            (text_of(&browser, &status).await == "Refreshing consent…").then_some(())
        })
        .await;
    browser.screenshot("refreshing").await;
    browser
        .until("the expiry text back", LIVE, || async {
            (text_of(&browser, &status).await == "Expires in 30 days").then_some(())
        })
        .await;
    // The history row arrived live (closed <details>: read its text, not what shows).
    let history = driver
        .execute(
            &format!(
                "return document.querySelector('{row} .history tbody tr:first-child').textContent;"
            ),
            vec![],
        )
        .await
        .unwrap();
    let history = history.json().as_str().unwrap_or_default().to_owned();
    assert!(
        history.contains("PORTAL") && history.contains("UPDATED"),
        "{history}"
    );
    let marker = driver
        .execute("return window.portalTestMarker;", vec![])
        .await
        .unwrap();
    assert_eq!(marker.json(), &json!(42), "the page was not reloaded");

    // Three more refreshes use up the quota of four; the fifth is refused in place.
    for used in 2..=4 {
        assert_eq!(click_refresh(&browser, &row).await, "Refresh requested");
        assert_eq!(
            text_of(&browser, &format!("{row} .quota")).await,
            format!("{} of 4 refreshes left in 24 h", 4 - used)
        );
        browser
            .until("the refresh to end", LIVE, || async {
                (text_of(&browser, &status).await == "Expires in 30 days").then_some(())
            })
            .await;
    }
    let refused = click_refresh(&browser, &row).await;
    // The oldest of the four was admitted a few seconds ago: 24 h minus those, rounded up.
    let wait = refused
        .strip_prefix("Daily limit of 4 requests/consent reached. Try again in ")
        .unwrap_or_else(|| panic!("{refused}"));
    assert!(["24h00.", "23h59."].contains(&wait), "{refused}");
    driver
        .execute(
            "document.querySelector('details.history').open = true;",
            vec![],
        )
        .await
        .unwrap();
    let rows = driver
        .find_all(By::Css(format!("{row} .history tbody tr")))
        .await
        .unwrap();
    assert_eq!(rows.len(), 5, "the initial load and four refreshes, live");
    assert!(rows[0].text().await.unwrap().contains("PORTAL"));
    browser.screenshot("daily-limit").await;

    // Settings that leave fewer than two chances earn the warning.
    let autosync = driver.find(By::Id("autosync")).await.unwrap();
    autosync.clear().await.unwrap();
    autosync.send_keys("48").await.unwrap();
    let inactivation = driver.find(By::Id("inactivation")).await.unwrap();
    inactivation.clear().await.unwrap();
    inactivation.send_keys("4").await.unwrap();
    driver
        .find(By::Css("form.settings button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    // The answer page (a new load: the notice) first, then its warning.
    browser
        .until("the saved settings page", LIVE, || async {
            let el = driver.find(By::Css("p.notice")).await.ok()?;
            (el.text().await.ok()? == "Settings saved.").then_some(())
        })
        .await;
    let warning = text_of(&browser, "p.warning").await;
    assert_eq!(
        warning,
        "With auto-sync every 48 h, a consent gets fewer than two refreshes in the 4 days before it becomes inactive and its stored data is removed."
    );
    assert_eq!(text_of(&browser, "p.notice").await, "Settings saved.");
    browser.screenshot("settings-warning").await;

    // A call without the CSRF token is refused, from the page itself.
    let answer = driver
        .execute_async(
            &format!(
                "const done = arguments[arguments.length - 1];
                 fetch('/dashboard/consents/{consent}/refresh', {{ method: 'POST' }})
                   .then(async r => done({{ status: r.status, body: await r.json() }}));"
            ),
            vec![],
        )
        .await
        .unwrap();
    let answer: Value = answer.json().clone();
    assert_eq!(answer["status"], 403, "{answer}");
    assert_eq!(
        answer["body"]["detail"],
        "The CSRF token is missing or does not match this session"
    );

    // Signing out ends the session: the dashboard sends to the sign-in page again.
    driver
        .find(By::Css("nav button.link"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    browser
        .until("the sign-in page", LIVE, || async {
            let url = driver.current_url().await.ok()?;
            url.path().ends_with("/dashboard/login").then_some(())
        })
        .await;
    driver
        .goto(format!("{}/dashboard", api.base))
        .await
        .unwrap();
    assert!(
        driver
            .current_url()
            .await
            .unwrap()
            .path()
            .ends_with("/dashboard/login")
    );
    browser.quit().await;
}

/// The sign-in, cookie and CSRF rules, without a browser.
#[tokio::test]
async fn sessions_cookies_and_csrf_over_http() {
    let app = spawn_app().await;
    let api = app.start_ingress().await;
    let token = dev_token(&app, Some("acme"), STORED);
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let base = &api.base;
    let unsigned = client
        .get(format!("{base}/dashboard"))
        .send()
        .await
        .unwrap();
    assert_eq!(unsigned.status(), 303);
    assert_eq!(unsigned.headers()["location"], "/dashboard/login");

    let login_form = client
        .get(format!("{base}/dashboard/login"))
        .send()
        .await
        .unwrap();
    assert_eq!(login_form.status(), 200);
    let csp = login_form.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        csp.starts_with("default-src 'none'; script-src 'self'"),
        "{csp}"
    );
    let login_cookie = login_form.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .to_owned();
    let login_value = login_cookie
        .split(';')
        .next()
        .unwrap()
        .trim_start_matches("refreshd_login=")
        .to_owned();
    // Without the form's CSRF value: refused.
    let forged = client
        .post(format!("{base}/dashboard/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form(&[("token", token.as_str()), ("csrf", "nope")]))
        .header("cookie", format!("refreshd_login={login_value}"))
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 403);
    let signed = client
        .post(format!("{base}/dashboard/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form(&[
            ("token", token.as_str()),
            ("csrf", login_value.as_str()),
        ]))
        .header("cookie", format!("refreshd_login={login_value}"))
        .send()
        .await
        .unwrap();
    assert_eq!(signed.status(), 303);
    assert_eq!(signed.headers()["location"], "/dashboard");
    let session_cookie = signed
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .find(|c| c.starts_with("refreshd_session="))
        .unwrap();
    assert!(
        session_cookie.contains("; Path=/dashboard; HttpOnly; SameSite=Strict; Max-Age="),
        "{session_cookie}"
    );
    assert!(!session_cookie.contains("Secure"), "dev serves plain HTTP");
    let session = session_cookie.split(';').next().unwrap().to_owned();
    let page = client
        .get(format!("{base}/dashboard"))
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    let csrf = html
        .split("name=\"csrf-token\" content=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap()
        .to_owned();
    // State changes need the session's CSRF token and a same-origin request.
    let settings = |csrf: &str, site: &str| {
        client
            .post(format!("{base}/dashboard/settings"))
            .header("cookie", &session)
            .header("sec-fetch-site", site)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form(&[
                ("csrf", csrf),
                ("tenant", "acme"),
                ("autosyncIntervalHours", "24"),
                ("inactivationDays", "30"),
            ]))
            .send()
    };
    assert_eq!(settings("", "same-origin").await.unwrap().status(), 403);
    assert_eq!(settings(&csrf, "cross-site").await.unwrap().status(), 403);
    let saved = settings(&csrf, "same-origin").await.unwrap();
    assert_eq!(saved.status(), 303);
    assert_eq!(saved.headers()["location"], "/dashboard?saved=1");
    let stored = api.get("/v1/apps/acme/settings", &token).await;
    assert_eq!(stored.body["autosyncIntervalHours"], 24);
    // Signing out deletes the session in Redis: the same cookie no longer works.
    let out = client
        .post(format!("{base}/dashboard/logout"))
        .header("cookie", &session)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form(&[("csrf", csrf.as_str())]))
        .send()
        .await
        .unwrap();
    assert_eq!(out.status(), 303);
    let after = client
        .get(format!("{base}/dashboard"))
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(after.status(), 303);
    let events = client
        .get(format!("{base}/dashboard/events"))
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(events.status(), 401);
}

/// Signs in over HTTP; the session cookie (`name=value`) and the page's CSRF token.
async fn sign_in(client: &reqwest::Client, base: &str, token: &str) -> (String, String) {
    let login = client
        .get(format!("{base}/dashboard/login"))
        .send()
        .await
        .unwrap();
    let cookie = login.headers()["set-cookie"].to_str().unwrap().to_owned();
    let pair = cookie.split(';').next().unwrap().to_owned();
    let value = pair.trim_start_matches("refreshd_login=").to_owned();
    let signed = client
        .post(format!("{base}/dashboard/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("cookie", &pair)
        .body(form(&[("token", token), ("csrf", &value)]))
        .send()
        .await
        .unwrap();
    assert_eq!(signed.status(), 303);
    let session = signed
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .find(|c| c.starts_with("refreshd_session="))
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let html = client
        .get(format!("{base}/dashboard"))
        .header("cookie", &session)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let csrf = html
        .split("name=\"csrf-token\" content=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap()
        .to_owned();
    (session, csrf)
}

#[tokio::test]
async fn an_operator_picks_the_tenant_and_a_tenant_sees_only_its_own() {
    let app = spawn_app().await;
    let api = app.start_ingress().await;
    let mine = api.seed_consent("acme", None, None).await.to_string();
    let theirs = api.seed_consent("other", None, None).await.to_string();
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let page = |session: String, query: &'static str| {
        let client = client.clone();
        let base = api.base.clone();
        async move {
            client
                .get(format!("{base}/dashboard{query}"))
                .header("cookie", session)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        }
    };
    let (tenant, _) = sign_in(&client, &api.base, &dev_token(&app, Some("acme"), STORED)).await;
    let own = page(tenant.clone(), "?tenant=other").await;
    assert!(
        own.contains(&mine) && !own.contains(&theirs),
        "a tenant cannot pick another"
    );
    assert!(!own.contains("<select id=\"tenant\""));

    let (operator, _) = sign_in(&client, &api.base, &dev_token(&app, None, "api:admin")).await;
    let first = page(operator.clone(), "").await;
    assert!(
        first.contains("<select id=\"tenant\" name=\"tenant\">"),
        "the picker"
    );
    assert!(first.contains("<option value=\"acme\" selected>acme</option>"));
    assert!(first.contains("<option value=\"other\">other</option>"));
    assert!(first.contains(&mine) && !first.contains(&theirs));
    let picked = page(operator, "?tenant=other").await;
    assert!(picked.contains(&theirs) && !picked.contains(&mine));
}
