//! The refresh domain of refreshd, free of I/O.
//!
//! Everything in this crate is a pure function of its arguments: no network,
//! no files, no clock, no randomness, no async runtime. The current time
//! (`now`) and fresh ids (refresh and event UUIDs) are made by the adapters and
//! passed in; answers come back as values (a consent refusal, a [`Problem`], a
//! [`MergePlan`], a [`CloudEvent`]) that the adapter crates carry out. So the
//! rules of the product (admission refusals and their exact texts, quota
//! windows, the stagger spacing, the refresh lifecycle, the fetch window, the transaction merge)
//! are decided in one place, identically in every process, and tested in
//! milliseconds.
//!
//! Each module's items are also re-exported here.

pub mod admission;
pub mod autosync;
mod error_chain;
pub mod event;
pub mod gate_model;
pub mod ids;
pub mod job;
pub mod merge;
pub mod outcome;
pub mod parse;
pub mod problem;
pub mod quota;
pub mod record;
pub mod requested_by;
pub mod settings;
pub mod stagger;
pub mod stagger_model;
pub mod status;
pub mod time;
pub mod trace;
pub mod window;

pub use admission::*;
pub use autosync::*;
pub use error_chain::error_chain;
pub use event::*;
pub use ids::*;
pub use job::{Job, JobError};
pub use merge::*;
pub use outcome::Outcome;
pub use parse::UnknownValue;
pub use problem::*;
pub use quota::*;
pub use record::*;
pub use requested_by::*;
pub use settings::settings_warnings;
pub use stagger::*;
pub use status::*;
pub use trace::{TraceContext, TraceParseError};
pub use window::*;

/// The crate's purity is an absence, so it is tested: no I/O crate in the
/// manifest, no clock or randomness call in the sources.
#[cfg(test)]
mod purity {
    const MANIFEST: &str = include_str!("../Cargo.toml");

    /// Every module; a new module belongs here too.
    const SOURCES: &[(&str, &str)] = &[
        ("admission.rs", include_str!("admission.rs")),
        ("autosync.rs", include_str!("autosync.rs")),
        ("event.rs", include_str!("event.rs")),
        ("ids.rs", include_str!("ids.rs")),
        ("job.rs", include_str!("job.rs")),
        ("lib.rs", include_str!("lib.rs")),
        ("merge.rs", include_str!("merge.rs")),
        ("outcome.rs", include_str!("outcome.rs")),
        ("parse.rs", include_str!("parse.rs")),
        ("problem.rs", include_str!("problem.rs")),
        ("quota.rs", include_str!("quota.rs")),
        ("record.rs", include_str!("record.rs")),
        ("requested_by.rs", include_str!("requested_by.rs")),
        ("settings.rs", include_str!("settings.rs")),
        ("stagger.rs", include_str!("stagger.rs")),
        ("stagger_model.rs", include_str!("stagger_model.rs")),
        ("gate_model.rs", include_str!("gate_model.rs")),
        ("status.rs", include_str!("status.rs")),
        ("window.rs", include_str!("window.rs")),
        ("time.rs", include_str!("time.rs")),
        ("trace.rs", include_str!("trace.rs")),
    ];

    #[test]
    fn manifest_lists_only_pure_dependencies() {
        let allowed = [
            "serde",
            "serde_json",
            "uuid",
            "chrono",
            "chrono-tz",
            "thiserror",
            // Optional, for the OpenAPI schemas: a pure library.
            "utoipa",
        ];
        let deps = MANIFEST
            .split("[dependencies]")
            .nth(1)
            .expect("the manifest has a [dependencies] table")
            .split("\n[")
            .next()
            .unwrap_or_default();
        for line in deps
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            let name = line.split(['.', '=', ' ']).next().unwrap_or_default();
            assert!(
                allowed.contains(&name),
                "refresh-core must stay pure, but depends on {name:?}"
            );
        }
    }

    #[test]
    fn sources_do_not_read_the_clock_or_make_ids() {
        // Spelled in pieces so this file does not match itself.
        let forbidden = [
            concat!("Utc", "::now"),
            concat!("Local", "::now"),
            concat!("Instant", "::now"),
            concat!("System", "Time"),
            concat!("now", "_v7"),
            concat!("new", "_v4"),
            concat!("std", "::fs"),
            concat!("std", "::net"),
            concat!("std", "::env"),
            concat!("tok", "io"),
            concat!("ra", "nd::"),
        ];
        for (file, text) in SOURCES {
            for needle in forbidden {
                assert!(!text.contains(needle), "{file} contains {needle:?}");
            }
        }
    }
}
