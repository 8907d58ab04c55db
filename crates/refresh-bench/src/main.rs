//! `make bench`: the load scenarios of issue 6, each on its own namespace of the real
//! local services (the integration harness's `spawn_app`, removed at the end).
//!
//! Progress goes to stderr (`bench: admission 2000/10000 …`), the summary table to
//! stdout, and every figure with the machine to `target/bench/results.json`.
//!
//! `refresh-bench [SCENARIO…]` runs the named scenarios only (`admission`,
//! `upstream`, `worker`, `merge`, `scaleout`, `e2e`, `rebuild`, `rekey`); none named runs
//! them all. `refresh-bench soak` (`make soak`) runs the soak alone: minutes of steady
//! mixed load with a table row per minute, `target/bench/soak.json`, and a non-zero exit
//! when a series grows steadily (see `soak.rs`); it is never part of the default list.

#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "a benchmark driver reports on the terminal"
)]
#![allow(
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "figures are statistics, not exact counts"
)]

mod admission;
mod cpu;
mod e2e;
mod machine;
mod merge;
mod rebuild;
mod rekey;
mod report;
mod roles;
mod scaleout;
mod soak;
mod stats;
mod workers;

use std::path::PathBuf;
use std::time::Duration;

use report::Report;

/// Settings every scenario shares: the stagger relaxed so nothing is refused or
/// delayed much (1 ms between start slots per bucket, one bucket per tenant, an hour
/// of backlog), and the rest as in the dev environment.
pub(crate) const RELAXED: &[(&str, &str)] = &[
    ("stagger.limit", "1000000"),
    ("stagger.period_secs", "60"),
    ("stagger.max_delay_secs", "3600"),
    ("stagger.scope", "tenant"),
];

/// Prints a progress line on stderr.
pub(crate) fn progress(line: &str) {
    eprintln!("bench: {line}");
}

const SCENARIOS: &[&str] = &[
    "admission",
    "upstream",
    "merge",
    "worker",
    "scaleout",
    "e2e",
    "rebuild",
    "rekey",
];

/// Where the JSON documents go: `target/bench/` of the workspace.
fn bench_dir() -> anyhow::Result<PathBuf> {
    let path = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/bench"));
    std::fs::create_dir_all(&path)?;
    Ok(path)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if args.iter().any(|a| a == soak::NAME) {
        anyhow::ensure!(
            args.len() == 1,
            "the soak runs alone: `refresh-bench {}`",
            soak::NAME
        );
        let minutes = soak::minutes_from_env()?;
        return runtime.block_on(soak::run(minutes, &bench_dir()?));
    }
    for arg in &args {
        if !SCENARIOS.contains(&arg.as_str()) {
            anyhow::bail!(
                "unknown scenario {arg:?}; known: {}, and {} (alone)",
                SCENARIOS.join(", "),
                soak::NAME
            );
        }
    }
    let wanted = |name: &str| args.is_empty() || args.iter().any(|a| a == name);
    let mut report = Report::new(machine::describe());
    runtime.block_on(async {
        let started = std::time::Instant::now();
        if wanted("admission") || wanted("upstream") {
            let outcome =
                admission::run(&mut report, wanted("admission"), wanted("upstream")).await;
            report.failed_if("admission", outcome);
        }
        if wanted("merge") {
            let outcome = merge::run(&mut report).await;
            report.failed_if("merge", outcome);
        }
        if wanted("worker") {
            let outcome = workers::run(&mut report).await;
            report.failed_if("worker", outcome);
        }
        if wanted("scaleout") {
            let outcome = scaleout::run(&mut report).await;
            report.failed_if("scaleout", outcome);
        }
        if wanted("e2e") {
            let outcome = e2e::run(&mut report, Duration::from_secs(12)).await;
            report.failed_if("e2e", outcome);
        }
        if wanted("rebuild") {
            let outcome = rebuild::run(&mut report).await;
            report.failed_if("rebuild", outcome);
        }
        if wanted("rekey") {
            let outcome = rekey::run(&mut report).await;
            report.failed_if("rekey", outcome);
        }
        report.set_total(started.elapsed());
    });
    for name in SCENARIOS {
        if !wanted(name) {
            report.not_measured(name, "not selected on the command line");
        }
    }
    report.judge();
    print!("{}", report.table());
    let file = bench_dir()?.join("results.json");
    std::fs::write(&file, serde_json::to_string_pretty(&report.json())?)?;
    progress(&format!("results written to {}", file.display()));
    Ok(())
}

/// Stops the roles a scenario started, then removes its namespace (on drop).
pub(crate) async fn stop(app: refresh_tests::TestApp, api: refresh_tests::Api) {
    halt(&app).await;
    drop(api);
    drop(app);
}

/// [`stop`] for a scenario that started no in-process ingress.
pub(crate) async fn stop_app(app: refresh_tests::TestApp) {
    halt(&app).await;
    drop(app);
}

async fn halt(app: &refresh_tests::TestApp) {
    app.shutdown.cancel();
    app.tracker.close();
    let _ = tokio::time::timeout(Duration::from_secs(10), app.tracker.wait()).await;
}
