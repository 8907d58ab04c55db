#!/usr/bin/env bash
# `make run`: builds refreshd, migrates the dev namespace and runs every role in one
# process (`refreshd dev`) against the local services.
set -euo pipefail
cd "$(dirname "$0")/../.."
export REFRESHD_ENV=${REFRESHD_ENV:-dev}
cargo build --quiet -p refreshd --bins
target/debug/refreshd migrate
exec target/debug/refreshd dev
