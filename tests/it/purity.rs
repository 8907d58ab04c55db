//! Architecture invariant: the core crate does no I/O. An absence deserves a test.

#[test]
fn the_core_crate_depends_on_no_io_crate() {
    let manifest =
        std::fs::read_to_string(refresh_tests::repo_root().join("crates/refresh-core/Cargo.toml"))
            .unwrap();
    let manifest: toml::Table = manifest.parse().unwrap();
    let deps: Vec<&String> = ["dependencies", "dev-dependencies"]
        .iter()
        .filter_map(|section| manifest.get(*section).and_then(|d| d.as_table()))
        .flat_map(|table| table.keys())
        .collect();
    const IO_CRATES: &[&str] = &[
        "tokio",
        "tokio-util",
        "lapin",
        "redis",
        "sqlx",
        "axum",
        "reqwest",
        "hyper",
        "rand",
        "getrandom",
        "tracing-subscriber",
        "config",
        "async-std",
        "mio",
        "socket2",
    ];
    let offenders: Vec<&&String> = deps
        .iter()
        .filter(|d| IO_CRATES.contains(&d.as_str()))
        .collect();
    assert!(
        offenders.is_empty(),
        "refresh-core must stay pure, but depends on {offenders:?}"
    );
    assert!(!deps.is_empty(), "the manifest was read");
}
