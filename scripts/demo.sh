#!/usr/bin/env bash
# Runs the bridge end to end on this machine: etcd -> feedbridge -> ZeroMQ ->
# `feedbridge tail`. Installs what is missing, starts etcd in a temp dir when
# none answers on 127.0.0.1:2379, writes /lport/p1 (create, set, delete) and
# shows what the subscriber printed. KEEP_RUNNING=1 leaves the bridge and
# tail running until Ctrl-C so you can try your own `etcdctl put`.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
cargo build --locked --bin feedbridge
bin=target/debug/feedbridge
work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT INT TERM

export ETCDCTL_API=3
endpoint=http://127.0.0.1:2379
if ! etcdctl --endpoints=$endpoint endpoint health >/dev/null 2>&1; then
    echo "demo: starting etcd in $work/etcd" >&2
    etcd --data-dir "$work/etcd" --listen-client-urls $endpoint --advertise-client-urls $endpoint \
        --listen-peer-urls http://127.0.0.1:2380 --log-level error --logger zap >"$work/etcd.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 100); do
        etcdctl --endpoints=$endpoint endpoint health >/dev/null 2>&1 && break
        sleep 0.1
    done
fi

"$bin" check --config config/feedbridge.toml
"$bin" run --config config/feedbridge.toml 2>"$work/bridge.log" &
pids+=($!)
"$bin" tail --connect tcp://127.0.0.1:8866 >"$work/tail.out" 2>"$work/tail.log" &
pids+=($!)

# ZeroMQ subscribers join a moment after connecting: probe until one arrives.
for i in $(seq 100); do
    etcdctl --endpoints=$endpoint put /demo/probe "$i" >/dev/null
    grep -q probe "$work/tail.out" && break
    sleep 0.2
done
grep -q probe "$work/tail.out" || { echo "demo: nothing reached the subscriber; bridge log:" >&2; cat "$work/bridge.log" >&2; exit 1; }

echo '$ etcdctl put /lport/p1 {"id":"p1","topic":"tenant1"}'
etcdctl --endpoints=$endpoint put /lport/p1 '{"id":"p1","topic":"tenant1"}' >/dev/null
etcdctl --endpoints=$endpoint put /lport/p1 '{"id":"p1","topic":"tenant1","admin_state":"up"}' >/dev/null
etcdctl --endpoints=$endpoint del /lport/p1 >/dev/null
for _ in $(seq 100); do
    grep -q '"action":"delete"' "$work/tail.out" && break
    sleep 0.1
done
echo "feedbridge tail printed:"
grep -v probe "$work/tail.out"
grep -q '"table":"lport","key":"p1","action":"create"' "$work/tail.out"

if [ "${KEEP_RUNNING:-0}" = 1 ]; then
    echo "demo: bridge and tail keep running; try: etcdctl put /lswitch/s1 hello ; Ctrl-C to stop" >&2
    tail -f "$work/tail.out"
fi
