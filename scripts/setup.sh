#!/usr/bin/env bash
# Installs what feedbridge needs, when it is missing, and verifies that what
# is installed actually works (a command on PATH is not enough: Debian's
# protobuf-compiler without libprotobuf-dev has no well-known types, and
# etcd-client's build then fails on google/protobuf/descriptor.proto).
#   scripts/setup.sh --build   only what building needs: protoc with the
#                              well-known types (etcd-client's build script)
#                              and a C++ toolchain (libzmq is built from
#                              source by zmq-sys). The Dockerfile uses this.
#   scripts/setup.sh --package  what building and packaging need: the above,
#                              cargo-deb, and dpkg-dev (dpkg-shlibdeps works
#                              out the package's library dependencies).
#   scripts/setup.sh           also what running and testing need: etcd +
#                              etcdctl, redis-server + redis-cli, openssl (TLS
#                              test certificates), docker-compose (validates
#                              docker-compose.yml without an engine), and
#                              Python's pyzmq + msgpack (Dragonflow interop),
#                              PyYAML (the Kubernetes manifests' test), and
#                              what --package installs (scripts/test.sh
#                              builds and installs the Debian package).
# Idempotent: a machine that has everything installs nothing.
set -euo pipefail

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# protoc must compile a file that imports a well-known type: that is what
# etcd-client's build script asks of it.
protoc_works() {
    command -v protoc >/dev/null || return 1
    local d
    d=$(mktemp -d)
    printf 'syntax = "proto3";\nimport "google/protobuf/descriptor.proto";\nmessage M { google.protobuf.FileDescriptorProto f = 1; }\n' >"$d/probe.proto"
    local ok=0
    protoc --proto_path="$d" --descriptor_set_out="$d/out.pb" "$d/probe.proto" 2>/dev/null || ok=1
    rm -rf "$d"
    return $ok
}

need_apt=()
protoc_works || need_apt+=(protobuf-compiler libprotobuf-dev)
# zmq-sys builds libzmq from source: a C++ compiler that can link.
cxx_works() {
    command -v c++ >/dev/null || return 1
    local d ok=0
    d=$(mktemp -d)
    printf '#include <string>\nint main() { std::string s("ok"); return s.size() == 2 ? 0 : 1; }\n' >"$d/probe.cpp"
    c++ "$d/probe.cpp" -o "$d/probe" 2>/dev/null || ok=1
    rm -rf "$d"
    return $ok
}
cxx_works || need_apt+=(g++)
if [ "${1:-}" != "--build" ]; then
    command -v dpkg-shlibdeps >/dev/null || need_apt+=(dpkg-dev)
fi
if [ "${1:-}" != "--build" ] && [ "${1:-}" != "--package" ]; then
    command -v etcd >/dev/null || need_apt+=(etcd-server)
    command -v etcdctl >/dev/null || need_apt+=(etcd-client)
    command -v redis-server >/dev/null || need_apt+=(redis-server)
    command -v redis-cli >/dev/null || need_apt+=(redis-tools)
    command -v openssl >/dev/null || need_apt+=(openssl)
    command -v docker-compose >/dev/null || need_apt+=(docker-compose)
    command -v python3 >/dev/null || need_apt+=(python3 python3-pip)
    # The systemd unit is checked with systemd-analyze verify.
    command -v systemd-analyze >/dev/null || need_apt+=(systemd)
fi

if [ ${#need_apt[@]} -gt 0 ]; then
    echo "setup: installing ${need_apt[*]} with apt-get" >&2
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

if ! protoc_works; then
    echo "setup: protoc cannot compile a file importing google/protobuf/descriptor.proto;" >&2
    echo "setup: install the protobuf well-known types (Debian: libprotobuf-dev)" >&2
    exit 1
fi

if ! cxx_works; then
    echo "setup: no working C++ compiler (libzmq is built from source); install g++" >&2
    exit 1
fi

if [ "${1:-}" = "--build" ]; then
    exit 0
fi

# cargo-deb, at a version whose [package.metadata.deb] keys Cargo.toml uses
# (sysusers files arrived in 3.x). --no-default-features: no bundled liblzma
# to build; it compresses with the system's xz when asked and gzip/xz in
# Rust otherwise.
cargo_deb_works() {
    local v
    v=$(cargo deb --version 2>/dev/null | cut -d' ' -f2) || return 1
    [ "${v%%.*}" -ge 3 ] 2>/dev/null
}
if ! cargo_deb_works; then
    echo "setup: installing cargo-deb (cargo install)" >&2
    cargo install --quiet --locked --no-default-features cargo-deb@^3
    cargo_deb_works || { echo "setup: cargo-deb >= 3 is not usable after installing it" >&2; exit 1; }
fi
if [ "${1:-}" = "--package" ]; then
    exit 0
fi

# PyYAML: tests/packaging.rs reads the Kubernetes manifests with it.
if [ "${1:-}" != "--build" ] && ! python3 -c 'import yaml' 2>/dev/null; then
    echo "setup: installing PyYAML for python3" >&2
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-yaml >/dev/null
    python3 -c 'import yaml'
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
