#!/usr/bin/env bash
# Installs what feedbridge needs to build, run and test, when it is missing:
# protoc (etcd-client's build), etcd + etcdctl, redis-server + redis-cli,
# and Python's pyzmq + msgpack (the Dragonflow interop tests).
# Idempotent: a machine that has everything installs nothing.
set -euo pipefail

need_apt=()
command -v protoc >/dev/null || need_apt+=(protobuf-compiler)
command -v etcd >/dev/null || need_apt+=(etcd-server)
command -v etcdctl >/dev/null || need_apt+=(etcd-client)
command -v redis-server >/dev/null || need_apt+=(redis-server)
command -v redis-cli >/dev/null || need_apt+=(redis-tools)
command -v python3 >/dev/null || need_apt+=(python3 python3-pip)

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

if [ ${#need_apt[@]} -gt 0 ]; then
    echo "setup: installing ${need_apt[*]} with apt-get" >&2
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

if ! python3 -c 'import zmq, msgpack' 2>/dev/null; then
    echo "setup: installing pyzmq and msgpack for python3" >&2
    python3 -m pip install --quiet --disable-pip-version-check pyzmq msgpack 2>/dev/null \
        || python3 -m pip install --quiet --disable-pip-version-check --break-system-packages pyzmq msgpack 2>/dev/null \
        || { as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-zmq python3-msgpack >/dev/null; }
    python3 -c 'import zmq, msgpack'
fi

# The systemd units Debian installs are not needed: tests and the demo
# start their own servers on their own ports.
echo "setup: protoc $(protoc --version | cut -d' ' -f2), $(etcd --version | head -1), $(redis-server --version | cut -d' ' -f3)" >&2
