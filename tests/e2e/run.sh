#!/usr/bin/env bash
# The end-to-end tier: an unmodified Linux guest on stock QEMU, with passed-through devices whose
# DMA the daemon translates.
#
#   L0 (this host): QEMU 11 under TCG, q35 with VT-d (intel-iommu) and two edu devices.
#   L1 (the product's host): the VM-tier kernel; its /init (tests/e2e/l1-init.sh) binds both edus
#      to vfio-pci, runs the daemon from tests/e2e/vm1.toml (iommufd backend, vfio-user sockets)
#      and starts stock QEMU 11 for L2 with the README's command line.
#   L2 (the user's VM): the same kernel; the real virtio-iommu driver finds the daemon through the
#      VIOT; /init (tests/e2e/l2-dma) binds the edus to vfio-pci in L2, maps pages through L2's own
#      iommufd and has the edus DMA through them.
#
# Every check prints `PASS: L1: ...`/`PASS: L2: ...` or `FAIL: <level>: <check>: <why>`; on a
# failure this script prints the failing lines and the end of the log of that level, and exits 1.
# Builds are cached like the other VM tiers (kernel, QEMU 11 root, static binaries).
#
# Environment: VM_CACHE (default /var/cache/vhost-user-iommu-vm), E2E_TIMEOUT (whole L0 run,
# default 1800 s), E2E_L2_TIMEOUT (per L2 boot inside L1, default 600 s).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
# shellcheck source=../vm/lib.sh
. "$here/../vm/lib.sh"

timeout_s=${E2E_TIMEOUT:-1800}
need_cmd cargo timeout gzip cpio readelf tee
out=$VM_CACHE/run/e2e
mkdir -p "$out"

declare -a timings=()
phase_start=$(now)
t_total=$phase_start
phase_end() {
    local t
    t=$(now)
    timings+=("$(printf '%-14s %6s s' "$1" "$(elapsed "$phase_start" "$t")")")
    phase_start=$t
}
print_timings() {
    local line
    log "phase timings:"
    for line in "${timings[@]}"; do log "  $line"; done
}
is_static() { ! readelf -lW "$1" 2>/dev/null | grep -q 'Requesting program interpreter'; }

# --- prerequisites, QEMU 11, kernel --------------------------------------------------------------
if [[ -z $(newest_kernel_deb) ]] || ! command -v flex >/dev/null || [[ ! -x /bin/busybox ]]; then
    [[ $(id -u) -eq 0 ]] || die "kernel source or build tools missing: run tests/vm/setup.sh as root"
    "$here/../vm/setup.sh"
fi
qemu=$("$here/../guest/setup-qemu.sh" | tail -n 1)
[[ -x $qemu ]] || die "setup-qemu.sh returned no QEMU wrapper"
qroot=$VM_CACHE/qemu11/root
qlib=$qroot/usr/lib/x86_64-linux-gnu
bzimage=$("$here/../vm/build-kernel.sh" | tail -n 1)
[[ -f $bzimage ]] || die "tests/vm/build-kernel.sh returned no bzImage"
kconfig=$(dirname "$bzimage")/config
for opt in CONFIG_INTEL_IOMMU CONFIG_IRQ_REMAP CONFIG_VIRTIO_IOMMU CONFIG_ACPI_VIOT CONFIG_IOMMUFD \
    CONFIG_VFIO_DEVICE_CDEV CONFIG_VFIO_PCI CONFIG_PROC_PAGE_MONITOR; do
    grep -qx "$opt=y" "$kconfig" || die "the kernel lacks $opt=y ($kconfig)"
done
phase_end setup

# --- static programs: the daemon (L1) and l2-dma (L2's /init) -----------------------------------
static_build() { # DIR TARGET_DIR [cargo args...]
    local dir=$1 target=$2
    shift 2
    (cd "$dir" && CARGO_TARGET_DIR=$target RUSTFLAGS="-C target-feature=+crt-static" \
        cargo build --quiet --release --locked --target x86_64-unknown-linux-gnu "$@")
}
log "building the daemon and l2-dma (static)"
static_build "$repo" "$VM_CACHE/target/vhost-user-iommu" --bin vhost-user-iommu ||
    die "static cargo build of vhost-user-iommu failed"
daemon=$VM_CACHE/target/vhost-user-iommu/x86_64-unknown-linux-gnu/release/vhost-user-iommu
static_build "$here/l2-dma" "$VM_CACHE/target/l2-dma" || die "cargo build of tests/e2e/l2-dma failed"
l2_init=$VM_CACHE/target/l2-dma/x86_64-unknown-linux-gnu/release/l2-dma
for b in "$daemon" "$l2_init"; do is_static "$b" || die "$b is not statically linked"; done
phase_end programs

# --- the README shows the command line L1 runs ---------------------------------------------------
# The lines of start_vm() in l1-init.sh, from `qemu-system-x86_64` up to `"$@"`, must appear in
# README.md verbatim (leading blanks and start_vm's `exec` aside).
mapfile -t qemu_lines < <(sed -n '/^start_vm() {/,/"\$@"/p' "$here/l1-init.sh" | sed '1d;$d' | sed 's/^ *//; s/^exec //')
((${#qemu_lines[@]} >= 5)) || die "cannot find start_vm() in $here/l1-init.sh"
readme_block=$(sed 's/^ *//' "$repo/README.md")
missing=()
for l in "${qemu_lines[@]}"; do grep -qxF -- "$l" <<<"$readme_block" || missing+=("$l"); done
((${#missing[@]} == 0)) ||
    die "README.md's \"Using it with QEMU\" differs from the command line this tier runs; missing: ${missing[*]}"
log "README.md shows the L2 QEMU command line of l1-init.sh (${#qemu_lines[@]} lines)"

# --- L2's initramfs: l2-dma as /init ---------------------------------------------------------------
pack() { # DIR OUT
    (cd "$1" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet -R 0:0) |
        gzip -1 >"$2.tmp"
    mv "$2.tmp" "$2"
}
l2root=$(mktemp -d)
l1root=$(mktemp -d)
trap 'rm -rf "$l2root" "$l1root"' EXIT
mkdir -p "$l2root"/{dev,proc,sys}
cp "$l2_init" "$l2root/init"
l2_initrd=$out/l2-initrd.cpio.gz
pack "$l2root" "$l2_initrd"

# --- L1's initramfs: busybox, the daemon, QEMU 11, L2's kernel and initramfs -------------------
mkdir -p "$l1root"/{bin,dev,proc,sys,tmp,run,usr/bin,etc/vhost-user-iommu,e2e} \
    "$l1root"/opt/qemu/{bin,lib,share/qemu,share/seabios}
cp /bin/busybox "$l1root/bin/busybox"
is_static "$l1root/bin/busybox" || die "/bin/busybox is not static (install busybox-static)"
cp "$here/l1-init.sh" "$l1root/init"
chmod 755 "$l1root/init"
cp "$daemon" "$l1root/usr/bin/vhost-user-iommu"
cp "$here/vm1.toml" "$l1root/etc/vhost-user-iommu/vm1.toml"
cp "$bzimage" "$l1root/e2e/bzImage"
cp "$l2_initrd" "$l1root/e2e/l2-initrd.cpio.gz"
# QEMU: the trixie binary, its library closure and loader, the firmware a -kernel boot loads.
cp "$qroot/usr/bin/qemu-system-x86_64" "$l1root/opt/qemu/bin/"
cp -L "$qlib/ld-linux-x86-64.so.2" "$l1root/opt/qemu/lib/"
"$qlib/ld-linux-x86-64.so.2" --library-path "$qlib" --list "$qroot/usr/bin/qemu-system-x86_64" |
    awk '$2 == "=>" && $3 ~ /^\// { print $3 }' | while read -r lib; do cp -L "$lib" "$l1root/opt/qemu/lib/"; done
for f in kvmvapic.bin linuxboot_dma.bin multiboot_dma.bin pvh.bin; do
    cp -L "$qroot/usr/share/qemu/$f" "$l1root/opt/qemu/share/qemu/"
done
cp -L "$qroot"/usr/share/seabios/bios*.bin "$l1root/opt/qemu/share/seabios/"
cat >"$l1root/usr/bin/qemu-system-x86_64" <<'EOF'
#!/bin/sh
# Stock QEMU (Debian trixie-backports) run with its own loader and libraries.
L=/opt/qemu/lib
QEMU_MODULE_DIR=$L/qemu
export QEMU_MODULE_DIR
exec "$L/ld-linux-x86-64.so.2" --library-path "$L" /opt/qemu/bin/qemu-system-x86_64 \
    -L /opt/qemu/share/qemu -L /opt/qemu/share/seabios "$@"
EOF
chmod 755 "$l1root/usr/bin/qemu-system-x86_64"
l1_initrd=$out/l1-initrd.cpio.gz
pack "$l1root" "$l1_initrd"
log "initramfs: L2 $(du -h "$l2_initrd" | cut -f1), L1 $(du -h "$l1_initrd" | cut -f1) ($(ls "$l1root/opt/qemu/lib" | wc -l) QEMU libraries)"
phase_end initramfs

# --- L0: boot L1 ---------------------------------------------------------------------------------
console=$out/console.log
cmd=(
    "$qemu" -M q35 -accel tcg,tb-size=128 -cpu max -m 2G -smp 2 -nodefaults -display none
    -serial stdio -no-reboot
    -device intel-iommu,intremap=on,caching-mode=on -device edu,addr=04.0 -device edu,addr=05.0
    -kernel "$bzimage" -initrd "$l1_initrd"
    -append "console=ttyS0 panic=-1 intel_iommu=on iommu.strict=1 E2E_L2_TIMEOUT=${E2E_L2_TIMEOUT:-600}"
)
log "booting L1 (timeout ${timeout_s}s, console log $console)"
log "  ${cmd[*]}"
set +e
timeout -k 5 "$timeout_s" "${cmd[@]}" </dev/null 2>"$out/qemu-l0.stderr" | tee "$console"
status=("${PIPESTATUS[@]}")
set -e
phase_end "L0 run"
timings+=("$(printf '%-14s %6s s' total "$(elapsed "$t_total" "$(now)")")")
print_timings

qemu_rc=${status[0]}
verdict=$(grep -aoE 'E2E-L1: (PASS|FAIL)\b' "$console" | tail -n 1 | cut -d' ' -f2 || true)
l1_pass=$({ grep -aoE 'PASS: L1: ' "$console" || true; } | wc -l)
l2_pass=$({ grep -aoE 'PASS: L2: ' "$console" || true; } | wc -l)
mapfile -t failures < <(grep -aE 'FAIL: L[12]: ' "$console" | sed 's/^.*FAIL: /FAIL: /' || true)
if ((${#failures[@]})); then
    log "failed checks:"
    printf '  %s\n' "${failures[@]}" >&2
    if grep -aq 'FAIL: L2: ' "$console"; then
        log "L2 log excerpt (last 25 L2 lines):"
        grep -a '^L2| ' "$console" | tail -n 25 | sed 's/^/    /' >&2
    fi
    log "L1 log excerpt (last 15 L1 lines):"
    grep -av '^L2| ' "$console" | tail -n 15 | sed 's/^/    /' >&2
fi
((qemu_rc != 124 && qemu_rc != 137)) ||
    die "L0 QEMU killed after ${timeout_s}s (verdict: ${verdict:-none}); log: $console"
((qemu_rc == 0)) || die "L0 QEMU exited $qemu_rc: $(tail -n 5 "$out/qemu-l0.stderr"); log: $console"
[[ $verdict == PASS && ${#failures[@]} -eq 0 ]] ||
    die "end-to-end tier: FAIL (L1 ${l1_pass} passed, L2 ${l2_pass} passed, ${#failures[@]} failed; verdict ${verdict:-none}); log: $console"
((l2_pass > 0)) || die "end-to-end tier: no L2 check ran; log: $console"
log "end-to-end tier: PASS (L1 $l1_pass checks, L2 $l2_pass checks) in $(elapsed "$t_total" "$(now)") s"
