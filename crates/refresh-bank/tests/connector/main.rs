//! The OBIE and Berlin Group connectors end to end over HTTP: against the real simulator
//! (`refresh-banksim`, on 127.0.0.1 port 0), and against small purpose-built
//! servers for what the simulator never does (foreign or looping links,
//! redirects).

// Test helpers may unwrap like the tests do (clippy.toml allows it only
// inside test functions): a panic is the failure report.
#![allow(clippy::unwrap_used)]

mod berlin_group;
mod odd_banks;
mod simulator;
mod support;
