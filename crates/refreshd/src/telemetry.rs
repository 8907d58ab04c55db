//! Structured logs: pretty for people (`refreshd dev`), JSON for machines, level from
//! `RUST_LOG` (default `info`).

use tracing_subscriber::EnvFilter;

use crate::settings::LogFormat;

/// Installs the global subscriber. Safe to call twice (the second call does nothing),
/// so tests that build several apps in one process can call it.
pub fn init(format: LogFormat, role_is_dev: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let pretty = match format {
        LogFormat::Pretty => true,
        LogFormat::Json => false,
        LogFormat::Auto => role_is_dev,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _already_set = if pretty {
        builder
            .pretty()
            .with_file(false)
            .with_line_number(false)
            .try_init()
    } else {
        builder
            .json()
            .flatten_event(true)
            // The list of entered spans is on every line, so a worker's lines about
            // a refresh carry its `refresh_id` and `trace_id` (the `refresh` span).
            .with_span_list(true)
            .with_current_span(false)
            .try_init()
    };
}
