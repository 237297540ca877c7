#!/usr/bin/env bash
# A nemesis run (tests/nemesis.rs): random faults from a seed against real
# etcd, Redis, Redis Cluster and bridge processes under writes, then a
# checker of what every subscriber delivered. Prints the faults injected
# and, per subscriber, updates delivered, syncs, lost, order violations,
# stale rows. Two configurations, one after the other, N minutes each:
# an etcd source (HA pair, ZeroMQ and etcd bridges) and a Redis Cluster.
#   scripts/nemesis.sh [--minutes N] [--seed S]     (default: 2 minutes, seed 1)
set -euo pipefail
cd "$(dirname "$0")/.."
minutes=2
seed=1
while [ $# -gt 0 ]; do
    case "$1" in
        --minutes) minutes="$2"; shift 2 ;;
        --seed) seed="$2"; shift 2 ;;
        *) echo "usage: scripts/nemesis.sh [--minutes N] [--seed S]" >&2; exit 2 ;;
    esac
done
scripts/setup.sh
NEMESIS_SECONDS=$((minutes * 60)) NEMESIS_SEED="$seed" \
    cargo test --locked --features bench --test nemesis -- --ignored --nocapture --test-threads 1
