#!/usr/bin/env bash
# Verifies the shipped host-integration files with the host's own tools:
#   systemd-analyze verify   on systemd/*.service (the per-VM template as vm1, and the exporter;
#                            installed into a temporary root, with a stub
#                            /usr/bin/vhost-user-iommu that execs the freshly built binary),
#   systemd-sysusers --dry-run on systemd/vhost-user-iommu.sysusers,
#   udevadm verify           on udev/*.rules (systemd >= 253 only; Debian 12 has 252).
# A tool that is missing is skipped LOUDLY, never silently. Any warning from a tool fails.
# Usage: tests/deploy-verify.sh   (from anywhere)
set -euo pipefail
cd "$(dirname "$0")/.."

skip() { printf '\n!!!!!!!! SKIPPED: %s\n\n' "$*" >&2; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }

cargo build --quiet --bin vhost-user-iommu
BIN="$(pwd)/target/debug/vhost-user-iommu"

ROOT="$(mktemp -d)"
trap 'rm -rf "$ROOT"' EXIT
mkdir -p "$ROOT/usr/bin" "$ROOT/etc/systemd/system" "$ROOT/usr/lib/systemd/system" \
    "$ROOT/usr/lib/sysusers.d" "$ROOT/etc/vhost-user-iommu"
printf '#!/bin/sh\nexec "%s" "$@"\n' "$BIN" >"$ROOT/usr/bin/vhost-user-iommu"
chmod 755 "$ROOT/usr/bin/vhost-user-iommu"
cp systemd/*.service "$ROOT/etc/systemd/system/"
printf 'socket = "/run/vhost-user-iommu/vm1.sock"\n' >"$ROOT/etc/vhost-user-iommu/vm1.toml"
"$ROOT/usr/bin/vhost-user-iommu" check --config "$ROOT/etc/vhost-user-iommu/vm1.toml" >/dev/null ||
    fail "the stub binary does not run"

if command -v systemd-analyze >/dev/null; then
    # The targets and slices every service depends on by default.
    for u in /usr/lib/systemd/system/*.target /usr/lib/systemd/system/*.slice; do
        [ -e "$u" ] && cp -P "$u" "$ROOT/usr/lib/systemd/system/"
    done
    for f in systemd/*.service; do
        unit="$(basename "$f")"
        [[ $unit == *@.service ]] && unit="${unit%@.service}@vm1.service"
        echo "== systemd-analyze verify $unit"
        out="$(systemd-analyze verify --root="$ROOT" "$unit" 2>&1)" || fail "$unit: $out"
        [ -z "$out" ] || fail "$unit: systemd-analyze warned: $out"
        echo "== systemd-analyze security $unit"
        systemd-analyze security --offline=yes --root="$ROOT" "$unit" 2>&1 | tail -1
    done
else
    skip "systemd-analyze is not installed (apt-get install systemd): unit files NOT verified"
fi

if command -v systemd-sysusers >/dev/null; then
    echo "== systemd-sysusers --dry-run"
    cp systemd/vhost-user-iommu.sysusers "$ROOT/usr/lib/sysusers.d/vhost-user-iommu.conf"
    touch "$ROOT/etc/passwd" "$ROOT/etc/group"
    out="$(systemd-sysusers --root="$ROOT" --dry-run 2>&1)" || fail "sysusers: $out"
    printf '%s\n' "$out"
    grep -q "vhost-user-iommu" <<<"$out" || fail "sysusers would not create vhost-user-iommu"
else
    skip "systemd-sysusers is not installed: systemd/vhost-user-iommu.sysusers NOT verified"
fi

if ! command -v udevadm >/dev/null; then
    skip "udevadm is not installed (apt-get install udev): udev rules NOT verified by udevadm (tests/deploy.rs still parses them)"
elif ! udevadm verify --help >/dev/null 2>&1; then
    # systemd < 253: no `udevadm verify`, but `udevadm test` parses every rules file and names
    # each bad line. Run it in a private mount namespace with only our rules in
    # /etc/udev/rules.d, so the host's udevd never sees them.
    if [ "$(id -u)" = 0 ] && command -v unshare >/dev/null && [ -d /etc/udev/rules.d ] &&
        [ -e /sys/class/net/lo ]; then
        echo "== udevadm $(udevadm --version) test (no 'verify' before systemd 253): parsing the rules"
        out="$(unshare --mount --propagation private sh -c '
            mount -t tmpfs tmpfs /etc/udev/rules.d && cp "$1"/udev/*.rules /etc/udev/rules.d/ &&
            udevadm test --resolve-names=never /sys/class/net/lo' sh "$(pwd)" 2>&1)" ||
            fail "udevadm test: $out"
        for f in udev/*.rules; do
            name="/etc/udev/rules.d/$(basename "$f")"
            grep -qF "Reading rules file: $name" <<<"$out" || fail "udevadm did not read $f"
            bad="$(grep -F "$name:" <<<"$out" |
                grep -vE 'Resolving group name is disabled|User name resolution is disabled' || true)"
            [ -z "$bad" ] || fail "udevadm rejects $f: $bad"
        done
        echo "udev rules parse"
    else
        skip "udevadm $(udevadm --version) has no 'verify' (added in systemd 253) and 'udevadm test' needs root and unshare: udev rules NOT verified by udevadm (tests/deploy.rs still parses them)"
    fi
else
    echo "== udevadm verify"
    udevadm verify --resolve-names=never udev/*.rules
fi

echo "deploy-verify: OK"
