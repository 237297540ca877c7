#!/usr/bin/env bash
# The Debian package: target/debian/feedbridge_<version>-1_<arch>.deb.
#   scripts/package.sh          build it (release binary, man page, completions)
#   scripts/package.sh --test   build it, then install it on this machine with
#                               dpkg -i, check what it installed, and purge it
#                               (root; scripts/test.sh runs this)
# Packaging is cargo-deb's ([package.metadata.deb] in Cargo.toml); this
# script adds what must come from the built binary: the man page and the
# completions, generated from the same definition as --help.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh --package
cargo build --release --locked --bin feedbridge
# cargo-deb reads every asset under "target/release/" from the real target
# directory, so the generated files go there too.
target="${CARGO_TARGET_DIR:-target}/release"
mkdir -p "$target/package"
"$target/feedbridge" man | gzip -9n >"$target/package/feedbridge.1.gz"
"$target/feedbridge" completions bash >"$target/package/feedbridge.bash"
"$target/feedbridge" completions zsh >"$target/package/_feedbridge"
"$target/feedbridge" completions fish >"$target/package/feedbridge.fish"
deb=$(cargo deb --no-build --locked --quiet)
echo "package: $deb" >&2

[ "${1:-}" = "--test" ] || exit 0

# --- The install test -------------------------------------------------
fail() { echo "package test: $*" >&2; exit 1; }
if dpkg-query -W -f='${Status}' feedbridge 2>/dev/null | grep -q installed; then
    fail "a feedbridge package is already installed here; not touching it"
fi
trap 'dpkg --purge feedbridge >/dev/null 2>&1 || true' EXIT
dpkg -i "$deb" >/dev/null

[ "$(command -v feedbridge)" = /usr/bin/feedbridge ] || fail "feedbridge is not /usr/bin/feedbridge"
version=$(feedbridge --version)
want="feedbridge $(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)"
[ "$version" = "$want" ] || fail "--version says '$version', expected '$want'"

unit=/lib/systemd/system/feedbridge.service
[ -f "$unit" ] || unit=/usr/lib/systemd/system/feedbridge.service
[ -f "$unit" ] || fail "the unit is not installed"
systemd-analyze verify --man=no "$unit" || fail "the installed unit does not verify"

conf=/etc/feedbridge/feedbridge.toml
dpkg-query -W -f='${Conffiles}\n' feedbridge | grep -q " $conf " || fail "$conf is not a conffile"
getent passwd feedbridge >/dev/null || fail "no feedbridge user"
[ "$(stat -c '%U:%G %a' "$conf")" = "root:feedbridge 640" ] \
    || fail "$conf is $(stat -c '%U:%G %a' "$conf"), expected root:feedbridge 640"
# The installed config is valid, and readable by the user the unit runs as.
setpriv --reuid=feedbridge --regid=feedbridge --init-groups feedbridge check --config "$conf" \
    || fail "feedbridge check on the installed config failed (as the feedbridge user)"

for f in /usr/share/man/man1/feedbridge.1.gz \
    /usr/share/bash-completion/completions/feedbridge \
    /usr/share/zsh/vendor-completions/_feedbridge \
    /usr/share/fish/vendor_completions.d/feedbridge.fish \
    /usr/share/doc/feedbridge/examples/redis-zmq.toml; do
    [ -s "$f" ] || fail "$f is missing or empty"
done
zcat /usr/share/man/man1/feedbridge.1.gz | grep -q '^\.TH feedbridge' || fail "the man page is not roff"
bash -c 'source /usr/share/bash-completion/completions/feedbridge && complete -p feedbridge' >/dev/null \
    || fail "the bash completion does not register"

# An administrator's edit of the conffile and its stat override survive a
# reinstall (dpkg keeps a locally changed conffile the package did not change).
echo '# edited by the package test' >>"$conf"
dpkg -i "$deb" >/dev/null
grep -q '^# edited by the package test$' "$conf" || fail "a reinstall overwrote the edited $conf"
[ "$(stat -c '%U:%G %a' "$conf")" = "root:feedbridge 640" ] || fail "a reinstall changed $conf's owner or mode"

dpkg --purge feedbridge >/dev/null
[ ! -e /usr/bin/feedbridge ] || fail "purge left /usr/bin/feedbridge"
[ ! -e "$conf" ] || fail "purge left $conf"
! dpkg-statoverride --list "$conf" >/dev/null || fail "purge left the stat override"
trap - EXIT
echo "package test: installed, checked and purged $deb" >&2
