#!/usr/bin/env bash
# Builds the Debian package (packaging/deb/build.sh) and installs it into an empty root the way
# dpkg does for another root (`dpkg --root --force-script-chrootless`, maintainer scripts honour
# DPKG_ROOT), then checks what an operator relies on, with the installed files themselves:
#   every file in its place; `systemd-analyze verify` of the installed unit; `udevadm test` of
#   the installed rule; the postinst's system user; `check` with the installed binary against
#   the installed example config; `--print-capabilities` through the installed QEMU
#   descriptor's "binary"; the man page and completions; and that `dpkg --purge` leaves nothing
#   of the package behind (the system user stays, as Debian does it).
# Usage: tests/package-verify.sh   (root; a Debian host with dpkg)
set -euo pipefail
cd "$(dirname "$0")/.."

fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }
skip() { printf '\n!!!!!!!! SKIPPED: %s\n\n' "$*" >&2; exit 0; }
command -v dpkg-deb >/dev/null || skip "no dpkg-deb: the Debian package is NOT built or verified"
[ "$(id -u)" = 0 ] || skip "not root: the Debian package is NOT installed and verified"

deb=$(packaging/deb/build.sh)
echo "== built $deb ($(du -h "$deb" | cut -f1))"
R=$(mktemp -d)
trap 'rm -rf "$R"' EXIT
mkdir -p "$R/var/lib/dpkg/info" "$R/var/lib/dpkg/updates" "$R/etc" "$R/usr/lib/systemd/system"
touch "$R/var/lib/dpkg/status" "$R/var/lib/dpkg/available" "$R/etc/passwd" "$R/etc/group"
# The targets and slices every service depends on by default (for systemd-analyze).
for u in /usr/lib/systemd/system/*.target /usr/lib/systemd/system/*.slice; do
    [ -e "$u" ] && cp -P "$u" "$R/usr/lib/systemd/system/"
done
before=$(cd "$R" && find . -path ./var/lib/dpkg -prune -o -print | sort)
dpkg_root() { dpkg --root="$R" --force-script-chrootless --force-depends --log=/dev/null "$@"; }

echo "== dpkg --root install"
dpkg_root -i "$deb" >/dev/null 2>"$R.err" || { cat "$R.err" >&2; fail "dpkg -i"; }
for f in usr/libexec/vhost-user-iommu usr/bin/vhost-user-iommu \
    usr/lib/systemd/system/vhost-user-iommu@.service usr/lib/udev/rules.d/90-vhost-user-iommu.rules \
    usr/lib/systemd/system/vhost-user-iommu-exporter.service \
    usr/lib/sysusers.d/vhost-user-iommu.conf usr/lib/tmpfiles.d/vhost-user-iommu.conf \
    usr/share/qemu/vhost-user/50-vhost-user-iommu.json usr/share/man/man1/vhost-user-iommu.1.gz \
    usr/share/bash-completion/completions/vhost-user-iommu \
    usr/share/zsh/vendor-completions/_vhost-user-iommu \
    usr/share/fish/vendor_completions.d/vhost-user-iommu.fish \
    usr/share/doc/vhost-user-iommu/deploying.md usr/share/doc/vhost-user-iommu/examples/vm.toml; do
    [ -e "$R/$f" ] || fail "not installed: /$f"
done
[ "$(readlink "$R/usr/bin/vhost-user-iommu")" = ../libexec/vhost-user-iommu ] ||
    fail "/usr/bin/vhost-user-iommu is not the link to /usr/libexec"
[ -d "$R/etc/vhost-user-iommu" ] || fail "no /etc/vhost-user-iommu"
grep -q '^vhost-user-iommu:' "$R/etc/passwd" || fail "the postinst created no system user"
echo "installed files in place; system user $(grep '^vhost-user-iommu:' "$R/etc/passwd")"

if command -v systemd-analyze >/dev/null; then
    echo "== systemd-analyze verify (installed unit)"
    mkdir -p "$R/etc/vhost-user-iommu"
    cp "$R/usr/share/doc/vhost-user-iommu/examples/vm.toml" "$R/etc/vhost-user-iommu/vm1.toml"
    for unit in vhost-user-iommu@vm1.service vhost-user-iommu-exporter.service; do
        out=$(systemd-analyze verify --root="$R" "$unit" 2>&1) || fail "systemd-analyze $unit: $out"
        [ -z "$out" ] || fail "systemd-analyze warned on $unit: $out"
    done
    rm "$R/etc/vhost-user-iommu/vm1.toml"
else
    printf '\n!!!!!!!! SKIPPED: systemd-analyze missing: the installed unit is NOT verified\n\n' >&2
fi

# udevadm: the host's, or Debian's udev package unpacked (not installed: no udevd starts).
udevadm=$(command -v udevadm || true)
if [ -z "$udevadm" ]; then
    cache="${VM_CACHE:-/var/cache/vhost-user-iommu-vm}/udevadm"
    if [ ! -x "$cache/x/bin/udevadm" ]; then
        mkdir -p "$cache"
        (cd "$cache" && rm -f udev_*.deb && apt-get download udev >"$cache/download.log" 2>&1 &&
            dpkg-deb -x udev_*.deb x) || true
    fi
    [ -x "$cache/x/bin/udevadm" ] && udevadm="$cache/x/bin/udevadm"
fi
if [ -n "$udevadm" ] && command -v unshare >/dev/null && [ -e /sys/class/net/lo ]; then
    echo "== udevadm $("$udevadm" --version) test (installed rule, in a private mount namespace)"
    # A private tmpfs on /run holds the rule: the host's udev never sees it.
    out=$(unshare --mount --propagation private sh -c '
        mount -t tmpfs tmpfs /run && mkdir -p /run/udev/rules.d &&
        cp "$1"/usr/lib/udev/rules.d/*.rules /run/udev/rules.d/ &&
        "$2" test --resolve-names=never /sys/class/net/lo' sh "$R" "$udevadm" 2>&1) ||
        fail "udevadm test: $out"
    grep -qF "Reading rules file: /run/udev/rules.d/90-vhost-user-iommu.rules" <<<"$out" ||
        fail "udevadm did not read the installed rule"
    bad=$(grep -F "90-vhost-user-iommu.rules:" <<<"$out" |
        grep -vE 'Resolving group name is disabled|User name resolution is disabled' || true)
    [ -z "$bad" ] || fail "udevadm rejects the installed rule: $bad"
    echo "the installed rule parses"
else
    printf '\n!!!!!!!! SKIPPED: no udevadm (nor apt-get download udev) or no unshare: the installed rule is NOT parsed\n\n' >&2
fi

echo "== check with the installed binary and example config"
"$R/usr/libexec/vhost-user-iommu" check --config "$R/usr/share/doc/vhost-user-iommu/examples/vm.toml" ||
    fail "check refuses the shipped example config"

echo "== --print-capabilities through the installed QEMU descriptor"
binary=$(sed -n 's/.*"binary": *"\([^"]*\)".*/\1/p' "$R/usr/share/qemu/vhost-user/50-vhost-user-iommu.json")
[ "$binary" = /usr/libexec/vhost-user-iommu ] || fail "the descriptor names $binary"
caps=$("$R$binary" --print-capabilities)
grep -q '"type": "iommu"' <<<"$caps" || fail "capabilities: $caps"

echo "== man page and completions"
zcat "$R/usr/share/man/man1/vhost-user-iommu.1.gz" | grep -q '^\.TH vhost-user-iommu 1' ||
    fail "the man page has no .TH header"
grep -q -- '--control-socket' "$R/usr/share/bash-completion/completions/vhost-user-iommu" ||
    fail "the bash completion does not know --control-socket"

echo "== dpkg --purge"
printf 'socket = "/run/vhost-user-iommu/vm9.sock"\n' >"$R/etc/vhost-user-iommu/vm9.toml"
dpkg_root --purge vhost-user-iommu >/dev/null 2>"$R.err" || { cat "$R.err" >&2; fail "dpkg --purge"; }
after=$(cd "$R" && find . -path ./var/lib/dpkg -prune -o -print | sort |
    grep -vxE '\./etc/((passwd|group|shadow|gshadow)-?|\.pwd\.lock)' || true)
left=$(comm -13 <(printf '%s\n' "$before") <(printf '%s\n' "$after"))
[ -z "$left" ] || fail "left behind after purge: $left"
echo "purge left nothing behind (the system user stays in /etc/passwd, as Debian does it)"
echo "package verified: $deb"
