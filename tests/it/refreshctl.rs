//! `refreshctl`, the built binary, against the real stack: imports, refreshes
//! followed to their end, JSON output, exit codes, and dead-letter replay.

use std::time::Duration;

use refresh_tests::{
    Api, TestApp, app_with_bank, dev_token, fast_worker_config, refreshctl_command, spawn_app_with,
    start_worker,
};
use serde_json::Value;

const STORED: &str = refresh_ingress::SCOPE_STORED_DATA;

/// What a run of refreshctl left: exit code, stdout, stderr.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self}"))
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout\n{}\n--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs `refreshctl args…` against the app's ingress (when given) with `token`.
async fn refreshctl(app: &TestApp, api: Option<&Api>, token: Option<&str>, args: &[&str]) -> Run {
    let mut command = refreshctl_command(app);
    if let Some(api) = api {
        command.args(["--url", &api.base]);
    }
    if let Some(token) = token {
        command.args(["--token", token]);
    }
    command.args(args);
    let output = tokio::time::timeout(Duration::from_secs(120), command.output())
        .await
        .expect("refreshctl finishes within two minutes")
        .expect("refreshctl runs");
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

fn consent_line(n: usize) -> String {
    format!(
        r#"{{"providerId":"sim","bankConsentId":"bank-{n}","accessToken":"key-{n}","expiresAt":"2099-01-01T00:00:00Z"}}"#
    )
}

#[tokio::test]
async fn an_import_of_1000_lines_with_3_bad_ones_registers_997_and_names_the_bad_lines() {
    // Enough stagger for every initial load, so nothing but the bad lines is refused.
    let app = spawn_app_with(&[("stagger.limit", "100000")]).await;
    let api = app.start_ingress().await;
    let token = dev_token(&app, Some("acme"), STORED);
    let bad = [17_usize, 500, 1000];
    let lines: Vec<String> = (1..=1000)
        .map(|n| match n {
            17 => "{not json".to_owned(),
            500 => consent_line(n).replace("2099-01-01T00:00:00Z", "next week"),
            1000 => consent_line(n).replace(r#""accessToken":"key-1000","#, ""),
            _ => consent_line(n),
        })
        .collect();
    let dir = std::env::temp_dir().join(format!("refreshctl-{}", app.namespace));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("consents.jsonl");
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();

    let run = refreshctl(
        &app,
        Some(&api),
        Some(&token),
        &["--json", "consents", "import", file.to_str().unwrap()],
    )
    .await;
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(run.code, 1, "some lines were not registered: {run}");
    let summary = run.json();
    assert_eq!(summary["lines"], 1000, "{run}");
    assert_eq!(summary["registered"], 997, "{run}");
    assert_eq!(summary["outcomes"]["invalid"], 3, "{run}");
    let failed: Vec<u64> = summary["failures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["line"].as_u64().unwrap())
        .collect();
    assert_eq!(failed, bad.map(|n| n as u64), "{run}");
    assert_eq!(
        summary["failures"][1]["detail"],
        "expiresAt \"next week\" is not an RFC 3339 time (e.g. 2027-01-31T00:00:00Z)"
    );
    assert_eq!(summary["failures"][2]["detail"], "accessToken is missing");
    for line in bad {
        assert!(
            run.stderr.contains(&format!("line {line}: invalid line: ")),
            "line {line} is reported: {run}"
        );
    }
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM consents")
        .fetch_one(&app.pg)
        .await
        .unwrap();
    assert_eq!(stored, 997);
}

#[tokio::test]
async fn a_csv_import_prints_a_summary_by_outcome_and_a_refused_line_does_not_stop_the_rest() {
    let app = spawn_app_with(&[]).await;
    let api = app.start_ingress().await;
    let token = dev_token(&app, Some("acme"), STORED);
    let file = std::env::temp_dir().join(format!("refreshctl-{}.csv", app.namespace));
    std::fs::write(
        &file,
        "providerId,bankConsentId,accessToken,expiresAt\n\
         sim,b1,k1,2099-01-01T00:00:00Z\n\
         nobank,b2,k2,2099-01-01T00:00:00Z\n\
         sim,b3,k3\n\
         sim,b4,k4,2099-01-01T00:00:00Z\n",
    )
    .unwrap();
    let run = refreshctl(
        &app,
        Some(&api),
        Some(&token),
        &["consents", "import", file.to_str().unwrap()],
    )
    .await;
    std::fs::remove_file(&file).unwrap();
    assert_eq!(run.code, 1, "{run}");
    assert_eq!(
        run.stdout,
        "OUTCOME               LINES\n\
         registered            2\n\
         invalid line          1\n\
         refused: bad_request  1\n",
        "{run}"
    );
    assert!(
        run.stderr.contains(
            "line 3: refused: bad_request: 400 bad_request: providerId \"nobank\" is not a configured provider"
        ),
        "{run}"
    );
    assert!(
        run.stderr
            .contains("line 4: invalid line: 3 fields where the header has 4"),
        "{run}"
    );
}

#[tokio::test]
async fn refresh_wait_follows_the_refresh_to_its_terminal_status() {
    let (app, api, _bank) = app_with_bank(&[("stagger.limit", "600")]).await;
    start_worker(&app, &api, fast_worker_config(&app));
    let token = dev_token(&app, Some("acme"), STORED);
    let consent = api.seed_consent("acme", None, None).await.to_string();

    let run = refreshctl(
        &app,
        Some(&api),
        Some(&token),
        &["refresh", &consent, "--wait"],
    )
    .await;
    assert_eq!(run.code, 0, "{run}");
    assert!(
        run.stdout.lines().any(|l| l == "status         UPDATED"),
        "{run}"
    );
    let refresh_id = run
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("refreshId      "))
        .unwrap()
        .to_owned();
    assert!(
        run.stderr
            .contains(&format!("refresh {refresh_id}: UPDATED")),
        "{run}"
    );

    // The same with --json: the terminal record, parseable.
    let run = refreshctl(
        &app,
        Some(&api),
        Some(&token),
        &["--json", "refresh", &consent, "--wait"],
    )
    .await;
    assert_eq!(run.code, 0, "{run}");
    let record = run.json();
    assert_eq!(record["status"], "UPDATED", "{run}");
    assert_eq!(record["consentId"], consent.as_str());
    let second = record["refreshId"].as_str().unwrap().to_owned();

    let run = refreshctl(
        &app,
        Some(&api),
        Some(&token),
        &["--json", "refreshes", &second],
    )
    .await;
    assert_eq!(run.code, 0, "{run}");
    assert_eq!(run.json()["status"], "UPDATED");
    let run = refreshctl(
        &app,
        Some(&api),
        Some(&token),
        &["--json", "history", &consent],
    )
    .await;
    assert_eq!(run.code, 0, "{run}");
    let ids: Vec<String> = run.json()["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["refreshId"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, [second.clone(), refresh_id], "newest first");
    let run = refreshctl(
        &app,
        Some(&api),
        Some(&token),
        &["--json", "consent", &consent],
    )
    .await;
    assert_eq!(run.code, 0, "{run}");
    let shown = run.json();
    assert_eq!(shown["lastRefresh"]["refreshId"], second.as_str());
    assert_eq!(shown["quota"]["used"], 2, "{shown}");
}

#[tokio::test]
async fn refusals_usage_and_unreachable_services_have_their_exit_codes() {
    let app = spawn_app_with(&[]).await;
    let api = app.start_ingress().await;
    let token = dev_token(&app, Some("acme"), STORED);
    let unknown = uuid::Uuid::new_v4().to_string();

    let run = refreshctl(&app, Some(&api), Some(&token), &["refresh", &unknown]).await;
    assert_eq!(run.code, 1, "{run}");
    assert!(
        run.stderr.contains("404 consent_not_found"),
        "the problem is shown: {run}"
    );
    let run = refreshctl(
        &app,
        Some(&api),
        Some(&token),
        &["--json", "refresh", &unknown],
    )
    .await;
    assert_eq!(run.code, 1, "{run}");
    assert_eq!(run.json()["code"], "consent_not_found", "{run}");

    // Over AMQP: a refused request exits 1, a malformed consent id is never sent.
    let run = refreshctl(
        &app,
        None,
        None,
        &["request", "--consent", &unknown, "--tenant", "acme"],
    )
    .await;
    assert_eq!(run.code, 1, "{run}");
    assert!(
        run.stderr.contains("refused: 404 consent_not_found"),
        "{run}"
    );
    let run = refreshctl(
        &app,
        None,
        None,
        &["request", "--consent", "not-a-uuid", "--tenant", "acme"],
    )
    .await;
    assert_eq!(run.code, 2, "{run}");
    let run = refreshctl(
        &app,
        None,
        None,
        &["token", "--tenant", "acme", "--hours", "0"],
    )
    .await;
    assert_eq!(run.code, 2, "an expired token is refused: {run}");
    assert!(run.stdout.is_empty(), "{run}");
    let run = refreshctl(&app, Some(&api), None, &["consent", &unknown]).await;
    assert_eq!(run.code, 2, "no token: {run}");

    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let run = refreshctl(
        &app,
        None,
        Some(&token),
        &["--url", &url, "consent", &unknown],
    )
    .await;
    assert_eq!(run.code, 69, "{run}");
    let mut command = refreshctl_command(&app);
    command
        .env("REFRESHD__AMQP__URL", "amqp://guest:guest@127.0.0.1:1/%2f")
        .args(["dlq", "list"]);
    let output = command.output().await.unwrap();
    assert_eq!(output.status.code(), Some(69), "{output:?}");
}

#[tokio::test]
async fn dlq_replay_of_a_poison_job_that_was_then_fixed_makes_it_updated_once() {
    let (app, api, _bank) =
        app_with_bank(&[("stagger.limit", "600"), ("amqp.delivery_limit", "1")]).await;
    let token = dev_token(&app, Some("acme"), STORED);
    let consent = api.seed_consent("acme", None, None).await;
    let refresh_id = api.refresh(&token, &consent.to_string()).await;

    // A job that crashes whoever takes it: every delivery is returned unsettled,
    // until the broker dead-letters it past its delivery limit.
    let broker = &api.services.broker;
    {
        let mut jobs = broker.consume(&broker.names().jobs, 1);
        let mut deliveries = 0;
        while let Ok(Some(delivery)) =
            tokio::time::timeout(Duration::from_secs(2), jobs.next()).await
        {
            assert_eq!(delivery.message_id.as_deref(), Some(refresh_id.as_str()));
            deliveries += 1;
            drop(delivery);
        }
        assert_eq!(deliveries, 2, "delivered twice, then dead");
    }

    let run = refreshctl(&app, None, None, &["--json", "dlq", "list"]).await;
    assert_eq!(run.code, 0, "{run}");
    let listed = run.json();
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 1, "{run}");
    assert_eq!(listed[0]["messageId"], refresh_id.as_str());
    assert_eq!(listed[0]["reason"], "delivery_limit", "{run}");
    assert_eq!(listed[0]["count"], 1, "{run}");
    assert_eq!(listed[0]["body"]["refreshId"], refresh_id.as_str());
    let first_seen = listed[0]["firstSeen"].as_str().unwrap();
    let first_seen = chrono::DateTime::parse_from_rfc3339(first_seen).unwrap();
    assert!((chrono::Utc::now() - first_seen.to_utc()).num_seconds() < 60);
    let table = refreshctl(&app, None, None, &["dlq", "list"]).await;
    assert_eq!(table.code, 0, "{table}");
    assert!(
        table.stdout.starts_with("MESSAGE ID") && table.stdout.contains("delivery_limit"),
        "{table}"
    );

    // The fix: workers that handle it. Replay puts it back once.
    start_worker(&app, &api, fast_worker_config(&app));
    let run = refreshctl(
        &app,
        None,
        None,
        &["--json", "dlq", "replay", "--id", &refresh_id],
    )
    .await;
    assert_eq!(run.code, 0, "{run}");
    assert_eq!(run.json()["replayed"].as_array().unwrap().len(), 1, "{run}");
    let record = api.wait_terminal(&token, &refresh_id).await;
    assert_eq!(record["status"], "UPDATED", "{record}");

    let run = refreshctl(&app, None, None, &["--json", "dlq", "list"]).await;
    assert_eq!(run.json(), serde_json::json!([]), "the dead queue is empty");
    let run = refreshctl(&app, None, None, &["dlq", "replay", "--id", &refresh_id]).await;
    assert_eq!(run.code, 1, "nothing left to replay: {run}");
    // Nothing runs it a second time.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (attempts, updated_events): (i32, i64) = sqlx::query_as(
        "SELECT r.attempts, (SELECT count(*) FROM outbox o WHERE o.routing_key LIKE 'refresh.updated.%' AND o.payload->'data'->>'refreshId' = $2) FROM refreshes r WHERE r.refresh_id = $1",
    )
    .bind(refresh_id.parse::<uuid::Uuid>().unwrap())
    .bind(&refresh_id)
    .fetch_one(&app.pg)
    .await
    .unwrap();
    assert_eq!((attempts, updated_events), (1, 1));
}

#[tokio::test]
async fn a_replayed_job_that_dies_again_is_replayed_once_and_counted_twice() {
    let (app, api, _bank) = app_with_bank(&[("stagger.limit", "600")]).await;
    start_worker(&app, &api, fast_worker_config(&app));
    let broker = &api.services.broker;
    broker
        .publish_job(b"{\"not\": \"a job\"}", "poison-1", None)
        .await
        .unwrap();
    let dead = |count: u32| async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let listed = broker
                .dead_letters(refresh_amqp::DeadQueue::Jobs, 10)
                .await
                .unwrap();
            if listed.iter().any(|d| d.count == count) {
                return listed;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no dead message with count {count}: {listed:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let first = dead(1).await;
    assert_eq!(first.len(), 1);
    assert!(first[0].reason.contains("malformed job"), "{first:?}");

    // Replaying everything: the worker dead-letters it again at once, and the pass
    // does not pick that new copy up a second time.
    let run = refreshctl(&app, None, None, &["--json", "dlq", "replay"]).await;
    assert_eq!(run.code, 0, "{run}");
    assert_eq!(run.json()["replayed"].as_array().unwrap().len(), 1, "{run}");
    let again = dead(2).await;
    assert_eq!(again.len(), 1, "{again:?}");
    assert_eq!(again[0].message_id.as_deref(), Some("poison-1"));
    assert_eq!(
        again[0].first_seen, first[0].first_seen,
        "the first death is kept"
    );
}
