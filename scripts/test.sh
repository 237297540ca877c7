#!/usr/bin/env bash
# The whole test suite: installs prerequisites, checks formatting and lints,
# then runs every unit and integration test. The tests start their own etcd
# and Redis servers on free ports in temp dirs.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
cargo fmt --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --locked --no-fail-fast "$@"
