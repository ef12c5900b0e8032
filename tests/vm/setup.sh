#!/usr/bin/env bash
# Installs what the VM test tier needs. Idempotent: anything already satisfied is skipped.
#
#   - host build tools for the guest kernel and initramfs (bookworm, the host's own apt config);
#   - qemu-system-x86 >= 10 from bookworm-backports (QEMU 7.2's edu aborts on a DMA that ends
#     exactly at its buffer end);
#   - the Debian kernel source package, downloaded (not installed) into $VM_CACHE/debs: the newest
#     linux-source-7.* of trixie-backports, else linux-source-6.12 of bookworm-backports.
#
# Suites the host lacks are reached through PRIVATE sources lists under $VM_CACHE/apt whose
# mirror URI is read from the host's own apt config; the host's sources and lists stay as they are.
#
# Environment: VM_CACHE (default /var/cache/vhost-user-iommu-vm), VM_REFRESH_KERNEL=1 to resolve
# and download the kernel source again even if one is cached.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$here/lib.sh"

[[ $(id -u) -eq 0 ]] || die "setup.sh installs packages: run it as root"
need_cmd apt-get apt-cache dpkg dpkg-deb
[[ -f $VM_KEYRING ]] || die "Debian archive keyring $VM_KEYRING missing (package debian-archive-keyring)"

export DEBIAN_FRONTEND=noninteractive
mkdir -p "$VM_CACHE"

# --- 1. host packages --------------------------------------------------------------------------
# (rsync: `make headers_install` copies the uAPI headers with it)
host_pkgs=(flex bison libelf-dev bc cpio busybox-static gcc make libc6-dev xz-utils binutils rsync)
mapfile -t missing < <(not_installed "${host_pkgs[@]}")
if ((${#missing[@]})); then
    log "installing host packages: ${missing[*]}"
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
    log "host packages already installed: ${host_pkgs[*]}"
fi

archive_uri=$(host_mirror_uri archive)
[[ -n $archive_uri ]] ||
    die "no Debian archive URI in /etc/apt/sources.list.d/*.sources (URIs: line) or /etc/apt/sources.list"
security_uri=$(host_mirror_uri security)

# --- 2. QEMU >= 10 from bookworm-backports -------------------------------------------------------
qemu_ver=$(installed_version qemu-system-x86)
if [[ -n $qemu_ver ]] && dpkg --compare-versions "$qemu_ver" ge 1:10 &&
    command -v qemu-system-x86_64 >/dev/null; then
    log "qemu-system-x86 $qemu_ver already installed"
else
    log "installing qemu-system-x86 from bookworm-backports (installed: ${qemu_ver:-none})"
    entries=(
        "deb [signed-by=$VM_KEYRING] $archive_uri bookworm main"
        "deb [signed-by=$VM_KEYRING] $archive_uri bookworm-updates main"
        "deb [signed-by=$VM_KEYRING] $archive_uri bookworm-backports main"
    )
    if [[ -n $security_uri ]]; then
        entries+=("deb [signed-by=$VM_KEYRING] $security_uri bookworm-security main")
    else
        log "warning: the host has no *-security source; installing without bookworm-security"
    fi
    private_apt bookworm-backports "${entries[@]}"
    apt-get "${APT_PRIV[@]}" update -qq
    apt-get "${APT_PRIV[@]}" install -y -qq --no-install-recommends -t bookworm-backports qemu-system-x86
    qemu_ver=$(installed_version qemu-system-x86)
    dpkg --compare-versions "${qemu_ver:-0}" ge 1:10 ||
        die "qemu-system-x86 ${qemu_ver:-none} installed, but >= 10 is needed"
fi

# --- 3. kernel source package --------------------------------------------------------------------
deb=$(newest_kernel_deb)
if [[ -n $deb && ${VM_REFRESH_KERNEL:-0} != 1 ]]; then
    log "kernel source already cached: $deb"
else
    pkg=""
    private_apt trixie-backports "deb [signed-by=$VM_KEYRING] $archive_uri trixie-backports main"
    apt-get "${APT_PRIV[@]}" update -qq
    pkg=$(apt-cache "${APT_PRIV[@]}" pkgnames linux-source-7. | grep -E '^linux-source-7\.[0-9]+$' |
        sort -V | tail -n 1 || true)
    if [[ -z $pkg ]]; then
        log "no linux-source-7.* in trixie-backports; falling back to linux-source-6.12 (bookworm-backports)"
        private_apt bookworm-backports-src "deb [signed-by=$VM_KEYRING] $archive_uri bookworm-backports main"
        apt-get "${APT_PRIV[@]}" update -qq
        pkg=linux-source-6.12
    fi
    log "downloading $pkg"
    mkdir -p "$VM_CACHE/debs"
    dl=$(mktemp -d "$VM_CACHE/debs/.download.XXXXXX")
    # apt drops to the _apt user for downloads; let it write there.
    if id _apt >/dev/null 2>&1; then chown _apt "$dl"; fi
    (cd "$dl" && apt-get "${APT_PRIV[@]}" download -qq "$pkg") ||
        { rm -rf "$dl"; die "apt-get download $pkg failed"; }
    for f in "$dl"/*.deb; do
        [[ -f $f ]] || die "apt-get download $pkg produced no .deb"
        mv -f "$f" "$VM_CACHE/debs/"
        deb=$VM_CACHE/debs/$(basename "$f")
    done
    rm -rf "$dl"
    log "kernel source: $deb"
fi

# --- 4. Rust toolchain for the guest programs (not installed here: checked) ----------------------
if ! command -v cargo >/dev/null; then
    die "cargo not found: the guest programs need a Rust toolchain (rustup, target x86_64-unknown-linux-gnu)"
fi
if command -v rustup >/dev/null && ! rustup target list --installed | grep -qx x86_64-unknown-linux-gnu; then
    die "rust target x86_64-unknown-linux-gnu not installed: rustup target add x86_64-unknown-linux-gnu"
fi

log "setup complete: $(qemu-system-x86_64 --version | head -n 1); kernel source $(basename "$deb")"
