//! The harness isolates concurrent tests and removes what they created.

use redis::AsyncCommands as _;
use refresh_tests::{leftovers, spawn_app, test_settings};

async fn write_probe(app: &refresh_tests::TestApp, value: &str) {
    let mut redis = app.redis.clone();
    let _: () = redis
        .set(format!("{}:probe", app.namespace), value)
        .await
        .unwrap();
    sqlx::query("INSERT INTO tenant_settings (tenant_id, inactivation_days) VALUES ($1, 30)")
        .bind(value)
        .execute(&app.pg)
        .await
        .unwrap();
}

async fn tenants(app: &refresh_tests::TestApp) -> Vec<String> {
    sqlx::query_scalar("SELECT tenant_id FROM tenant_settings ORDER BY tenant_id")
        .fetch_all(&app.pg)
        .await
        .unwrap()
}

#[tokio::test]
async fn two_concurrent_tests_see_only_their_own_data_and_leave_nothing() {
    let (a, b) = tokio::join!(spawn_app(), spawn_app());
    assert_ne!(a.namespace, b.namespace);
    tokio::join!(write_probe(&a, "tenant-a"), write_probe(&b, "tenant-b"));

    assert_eq!(tenants(&a).await, ["tenant-a"]);
    assert_eq!(tenants(&b).await, ["tenant-b"]);
    let mut redis = a.redis.clone();
    let a_probe: Option<String> = redis.get(format!("{}:probe", a.namespace)).await.unwrap();
    let b_probe: Option<String> = redis.get(format!("{}:probe", b.namespace)).await.unwrap();
    assert_eq!(
        (a_probe.as_deref(), b_probe.as_deref()),
        (Some("tenant-a"), Some("tenant-b"))
    );

    // Each namespace has its own queues, declared by the harness.
    let (schema, keys, queues) = leftovers(&a.settings).await.unwrap();
    assert!(schema);
    assert_eq!(keys, 1);
    let expected = refresh_amqp::Names::new(&a.namespace).queues().len();
    assert_eq!(queues.len(), expected, "{queues:?}");
    assert_eq!(expected, 9, "5 queues of SPEC §4 and 4 wait tiers");

    let (sa, sb) = (
        test_settings(&a.namespace, &[]),
        test_settings(&b.namespace, &[]),
    );
    drop(a);
    // Dropping one leaves the other intact.
    assert_eq!(tenants(&b).await, ["tenant-b"]);
    drop(b);
    for settings in [&sa, &sb] {
        assert_eq!(
            leftovers(settings).await.unwrap(),
            (false, 0, vec![]),
            "{}",
            settings.namespace
        );
    }
}

#[test]
fn a_failing_test_still_cleans_up() {
    let (tx, rx) = std::sync::mpsc::channel();
    let failed = std::thread::spawn(move || {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let app = spawn_app().await;
            write_probe(&app, "doomed").await;
            tx.send(app.namespace.clone()).unwrap();
            panic!("this test fails on purpose");
        })
    })
    .join();
    assert!(failed.is_err(), "the inner test must have panicked");
    let namespace = rx.recv().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let left = runtime
        .block_on(leftovers(&test_settings(&namespace, &[])))
        .unwrap();
    assert_eq!(left, (false, 0, vec![]));
}
