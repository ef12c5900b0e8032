#!/usr/bin/env bash
# Runs the VM test tier: builds (cached) the guest kernel, the guest programs and the initramfs,
# boots them in QEMU q35 under TCG with an emulated IOMMU and two edu devices, and turns the
# guest's verdict line into this script's exit status (QEMU itself exits 0 whatever the guest
# did). Prints the wall time of every phase.
#
# Environment:
#   IOMMU=intel|virtio   emulated IOMMU: intel-iommu,intremap=on (default) or virtio-iommu-pci
#   VM_CACHE             cache dir (default /var/cache/vhost-user-iommu-vm)
#   VM_TIMEOUT           seconds before QEMU is killed (default 300)
#   VM_GUEST_BINS        extra static guest programs (space separated paths) run after guest-smoke
#   VM_DAEMON_DMA=0      skip the daemon-dma guest program (built and run by default)
#   VM_BENCH_IOMMUFD=0   skip the bench-iommufd guest program (built and run by default; prints
#                        the iommufd map-path table, fails only on errors, never on timing)
#   VM_VFIO_USER=0       skip the vfio-user-edu guest program (built and run by default; embeds a
#                        static build of the daemon binary itself)
#   VM_MEMLOCK=0         skip the memlock guest program (built and run by default; RLIMIT_MEMLOCK
#                        exhaustion without CAP_IPC_LOCK is refused clearly and recovers)
#   VM_UNPLUG=0          skip the unplug guest program (built and run by default; a device
#                        unbound from vfio-pci while the daemon runs is released and replugged)
#   VM_INITRD            initramfs path (default $VM_CACHE/run/initramfs-$IOMMU.cpio.gz)
#   VM_IOMMU_DEVICE      replaces the IOMMU's -device argument (same IOMMU kind), e.g. a narrower
#                        IOVA space: intel-iommu,intremap=on,aw-bits=39
#   VM_LOG               console log (default $VM_CACHE/logs/console-$IOMMU.log)
#   VM_QEMU_ARGS         extra QEMU arguments (word-split)
#   VM_APPEND            extra kernel command line
# Run tests/vm/setup.sh once first (as root) to install QEMU and fetch the kernel source.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$here/lib.sh"

iommu=${IOMMU:-intel}
timeout_s=${VM_TIMEOUT:-300}
qemu=${VM_QEMU:-qemu-system-x86_64}
need_cmd "$qemu" timeout tee cargo

qemu_ver=$("$qemu" --version | sed -nE '1s/^QEMU emulator version ([0-9]+)\..*/\1/p')
[[ -n $qemu_ver ]] || die "cannot read the version of $qemu"
((qemu_ver >= 10)) ||
    die "$qemu is version $qemu_ver; the tier needs >= 10 (7.2's edu aborts on a DMA ending at its buffer end): run tests/vm/setup.sh"

case $iommu in
    intel)
        iommu_dev=(-device "${VM_IOMMU_DEVICE:-intel-iommu,intremap=on}")
        append="intel_iommu=on"
        ;;
    virtio)
        iommu_dev=(-device "${VM_IOMMU_DEVICE:-virtio-iommu-pci}")
        # virtio-iommu offers no interrupt remapping: without this iommufd refuses to bind.
        append="iommufd.allow_unsafe_interrupts=1"
        ;;
    *) die "IOMMU=$iommu: expected intel or virtio" ;;
esac

PHASE_WIDTH=10

# --- kernel ----------------------------------------------------------------------------------
bzimage=$("$here/build-kernel.sh" | tail -n 1)
[[ -f $bzimage ]] || die "build-kernel.sh returned no bzImage"
phase_end kernel

# --- guest programs --------------------------------------------------------------------------
# guest-smoke: raw iommufd + VFIO cdev + edu DMA; then, each unless switched off:
# daemon-dma (VM_DAEMON_DMA): the real daemon with its iommufd backend over both edu cdevs,
#   driven by the crate's TestVm;
# bench-iommufd (VM_BENCH_IOMMUFD): raw IOAS_MAP / MAP_FILE / staging+COPY loops vs the daemon
#   path (BENCHMARKS.md; pairs per row: BENCH_PAIRS_4K / BENCH_PAIRS_2M in the guest
#   environment, defaults 256 / 32), connect cost against RAM size, and per-request cost
#   against live mappings (BENCH_STATE_SIZES, default 1,1000,10000; the full sweep:
#   VM_APPEND="BENCH_STATE_SIZES=1,1000,10000,100000");
# vfio-user-edu (VM_VFIO_USER): the daemon binary (built static first, embedded in the program)
#   serves both edus over vfio-user to a client written from the protocol document;
# memlock (VM_MEMLOCK): RLIMIT_MEMLOCK exhaustion (issue 7): the daemon without CAP_IPC_LOCK under
#   a low soft limit refuses the memory table / a MAP with the limit named, pins nothing, and
#   recovers once the limit is raised;
# unplug (VM_UNPLUG): host hot-unplug and replug (issue 10): endpoint 1's edu is unbound from
#   vfio-pci while the daemon holds it, the unbind completes, endpoint 2 keeps working, and the
#   rebound device is served again.
# One cargo build of the workspace's guest packages (the daemon crate is compiled once for all).
programs=(guest-smoke)
[[ ${VM_DAEMON_DMA:-1} != 0 ]] && programs+=(daemon-dma)
[[ ${VM_BENCH_IOMMUFD:-1} != 0 ]] && programs+=(bench-iommufd)
[[ ${VM_VFIO_USER:-1} != 0 ]] && programs+=(vfio-user-edu)
[[ ${VM_MEMLOCK:-1} != 0 ]] && programs+=(memlock)
[[ ${VM_UNPLUG:-1} != 0 ]] && programs+=(unplug)
if [[ " ${programs[*]} " == *" vfio-user-edu "* ]]; then
    log "building vhost-user-iommu (static, for vfio-user-edu)"
    static_build release vhost-user-iommu || die "static cargo build of vhost-user-iommu failed"
    export VFIO_USER_EDU_DAEMON
    VFIO_USER_EDU_DAEMON=$(static_bin release vhost-user-iommu)
fi
log "building ${programs[*]} (static)"
static_build guest "${programs[@]}" || die "static cargo build of ${programs[*]} failed"
bins=()
for p in "${programs[@]}"; do bins+=("$(static_bin guest "$p")"); done
read -r -a extra <<<"${VM_GUEST_BINS:-}"
bins+=(${extra[@]+"${extra[@]}"})
phase_end guest

# --- initramfs -------------------------------------------------------------------------------
initrd=${VM_INITRD:-$VM_CACHE/run/initramfs-$iommu.cpio.gz}
"$here/mkinitramfs.sh" "$initrd" "${bins[@]}"
phase_end initramfs

# --- boot ------------------------------------------------------------------------------------
vm_log=${VM_LOG:-$VM_CACHE/logs/console-$iommu.log}
mkdir -p "$(dirname "$vm_log")"
read -r -a qemu_extra <<<"${VM_QEMU_ARGS:-}"
cmd=(
    "$qemu" -M q35 -accel tcg -cpu max -m 512M -nodefaults -display none -serial stdio -no-reboot
    "${iommu_dev[@]}" -device edu -device edu
    ${qemu_extra[@]+"${qemu_extra[@]}"}
    -kernel "$bzimage" -initrd "$initrd"
    -append "console=ttyS0 panic=-1 iommu.strict=1 $append ${VM_APPEND:-}"
)
log "booting (IOMMU=$iommu, timeout ${timeout_s}s, console log $vm_log)"
log "  ${cmd[*]}"
set +e
timeout -k 5 "$timeout_s" "${cmd[@]}" </dev/null 2>&1 | tee "$vm_log"
status=("${PIPESTATUS[@]}")
set -e
phase_end boot

qemu_rc=${status[0]}
# Kernel messages can land in the middle of a guest line on the shared serial console, so match
# the markers anywhere in a line rather than anchored.
verdict=$(grep -aoE 'VM-TIER: (PASS|FAIL)\b' "$vm_log" | tail -n 1 | cut -d' ' -f2 || true)
checks_pass=$({ grep -aoE '(^|[^A-Z-])PASS: ' "$vm_log" || true; } | wc -l)
checks_fail=$({ grep -aoE '(^|[^A-Z-])FAIL: ' "$vm_log" || true; } | wc -l)
print_timings
if ((qemu_rc == 124 || qemu_rc == 137)); then
    die "QEMU killed after ${timeout_s}s without finishing (verdict: ${verdict:-none}); log: $vm_log"
fi
((qemu_rc == 0)) || die "QEMU exited with status $qemu_rc (verdict: ${verdict:-none}); log: $vm_log"
case $verdict in
    PASS)
        ((checks_fail == 0)) ||
            die "VM tier (IOMMU=$iommu): verdict PASS but $checks_fail FAIL line(s) in $vm_log"
        log "VM tier (IOMMU=$iommu): PASS ($checks_pass checks passed, $checks_fail failed)"
        ;;
    FAIL)
        die "VM tier (IOMMU=$iommu): FAIL ($checks_pass checks passed, $checks_fail failed); log: $vm_log"
        ;;
    *)
        die "VM tier (IOMMU=$iommu): no verdict line from the guest (kernel panic or hang?); log: $vm_log"
        ;;
esac
