#!/usr/bin/env bash
# The whole test suite: installs prerequisites, checks formatting and lints,
# validates the container files, runs the benchmark harness in smoke mode
# (so it cannot rot; no timing is asserted), then every unit and
# integration test, then a one-minute nemesis of each configuration
# (FEEDBRIDGE_SKIP_NEMESIS=1 skips it). Tests start their own etcd and
# Redis servers on free ports in temp dirs.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
cargo fmt --check
cargo clippy --all-targets --all-features --locked -- -D warnings
docker-compose -f docker-compose.yml config -q
# The systemd unit, against the binary just built (and no man page yet).
cargo build --locked --quiet
unit="$(mktemp -d)/feedbridge.service"
sed "s#/usr/bin/feedbridge#$PWD/target/debug/feedbridge#g" deploy/systemd/feedbridge.service >"$unit"
systemd-analyze verify --man=no "$unit"
rm -rf "$(dirname "$unit")"
# The Debian package: built, installed with dpkg -i, checked, purged.
if [ "$(id -u)" -eq 0 ]; then
    scripts/package.sh --test
else
    scripts/package.sh
    echo "test: the package was built but not installed (dpkg -i needs root)" >&2
fi
plot="$(mktemp --suffix=.svg)"
trap 'rm -f "$plot"' EXIT
cargo run --locked --quiet --features bench --bin feedbridge-bench -- --smoke --plot "$plot"
grep -q '<svg' "$plot" || { echo "the benchmark drew no plot" >&2; exit 1; }
# The resume benchmark too: a bridge restart under two subscribers.
cargo run --locked --quiet --features bench --bin feedbridge-bench -- --resume 2 --preload 100
# And the publisher service beside its floor, one short point.
cargo run --locked --quiet --features bench --bin feedbridge-bench -- --service 1000 --duration 1s
# A fixed-rate row beside its floor, and a fan-out over subscriber processes.
cargo run --locked --quiet --features bench --bin feedbridge-bench -- --rates 500 --duration 1s
cargo run --locked --quiet --features bench --bin feedbridge-bench -- --fanout 6 --subscriber-processes 2 --duration 1s --plot "$plot"
grep -q '<svg' "$plot" || { echo "the benchmark drew no fan-out plot" >&2; exit 1; }
# `bench` also builds the benchmark's own unit tests.
cargo test --locked --no-fail-fast --features bench "$@"
# The nemesis smoke: one minute of each configuration (etcd, Redis
# Cluster) with a fixed seed; scripts/nemesis.sh runs longer ones.
if [ -z "${FEEDBRIDGE_SKIP_NEMESIS:-}" ]; then
    scripts/nemesis.sh --minutes 1 --seed 1
fi
