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
# shellcheck source=lib.sh
. "$here/lib.sh"
timeout_s=${E2E_TIMEOUT:-1800}

# --- the README shows the command line L1 runs ---------------------------------------------------
# The lines of start_vm() in l1-lib.sh, from `qemu-system-x86_64` up to `"$@"`, must appear in
# README.md verbatim (leading blanks and start_vm's `exec` aside).
mapfile -t qemu_lines < <(sed -n '/^start_vm() {/,/"\$@"/p' "$here/l1-lib.sh" | sed '1d;$d' | sed 's/^ *//; s/^exec //')
((${#qemu_lines[@]} >= 5)) || die "cannot find start_vm() in $here/l1-lib.sh"
readme_block=$(sed 's/^ *//' "$repo/README.md")
missing=()
for l in "${qemu_lines[@]}"; do grep -qxF -- "$l" <<<"$readme_block" || missing+=("$l"); done
((${#missing[@]} == 0)) ||
    die "README.md's \"Using it with QEMU\" differs from the command line this tier runs; missing: ${missing[*]}"
log "README.md shows the L2 QEMU command line of l1-lib.sh (${#qemu_lines[@]} lines)"

e2e_pack "$here/l1-init.sh"
phase_end initramfs

# --- L0: boot L1 ---------------------------------------------------------------------------------
e2e_l0_cmd "E2E_L2_TIMEOUT=${E2E_L2_TIMEOUT:-600}"
log "booting L1 (timeout ${timeout_s}s, console log $console)"
log "  ${cmd[*]}"
set +e
timeout -k 5 "$timeout_s" "${cmd[@]}" </dev/null 2>"$out/qemu-l0.stderr" | tee "$console"
status=("${PIPESTATUS[@]}")
set -e
phase_end "L0 run"
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
# What L2's runs wrote through the NVMe controller is in its backing file, byte for byte.
"$l2_init" verify-nvme-image "$nvme_img" || die "end-to-end tier: FAIL: the NVMe disk image lacks what L2 wrote"
log "end-to-end tier: PASS (L1 $l1_pass checks, L2 $l2_pass checks) in $(elapsed "$t_total" "$(now)") s"
