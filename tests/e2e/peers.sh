#!/usr/bin/env bash
# The peer comparison: the same nested L2 guest, devices and workloads under
#   (a) no vIOMMU (L1's QEMU with plain vfio-pci: the ceiling),
#   (b) QEMU's own virtio-iommu-pci + vfio-pci (iommufd backend),
#   (c) QEMU's own intel-iommu (caching mode) + vfio-pci (iommufd backend),
#   (d) this daemon (the README's command line: vhost-user virtio-iommu + vfio-user devices),
# interleaved over several rounds in one L0 boot (tests/e2e/l1-peers.sh), with the workloads of
# tests/e2e/l2-dma/src/bench.rs (NVMe 4 KiB random reads at QD1 and QD32 and 128 KiB sequential
# reads through the guest's nvme driver, a TCP stream through its igb driver, strict and lazy;
# L2 userspace IOAS_MAP+UNMAP). A benchmark, not a CI gate.
#
# Usage: tests/e2e/peers.sh [--rounds N] [--secs S] [--configs a,b,c,d] [--l1-append ARGS]
#                           [--busy-main-loop] [--out PREFIX]
#   --configs also takes dN: the daemon as in d with a polling window of N µs (`poll_us`), and
#   dirq: the daemon as in d, polling after its devices' interrupts (`poll_after_irq = true`).
#   --l1-append adds ARGS to L1's kernel command line, e.g. `idle=poll` (L1's idle vCPUs spin
#   instead of halting, as KVM's halt polling makes hosts behave).
#   --busy-main-loop keeps L2's QEMU main loop busy throughout every configuration (a monitor
#   asked for `info mtree -f` ten times a second): the case an in-process vIOMMU that answers in
#   that loop is worst at.
#   writes PREFIX.md (the table) and PREFIX.svg (the plot); default PREFIX:
#   $VM_CACHE/run/peers/peers. The whole L1 console is $VM_CACHE/run/peers/console.log.
# Environment: VM_CACHE, PEERS_TIMEOUT (the L0 run, default 5400 s).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
rounds=2
secs=3
configs=a,b,c,d
l1_append=
prefix=
busy=0
while (($#)); do
    case $1 in
        --rounds) rounds=$2; shift 2 ;;
        --secs) secs=$2; shift 2 ;;
        --configs) configs=$2; shift 2 ;;
        --l1-append) l1_append=$2; shift 2 ;;
        --out) prefix=$2; shift 2 ;;
        --busy-main-loop) busy=1; shift ;;
        *) echo "usage: $0 [--rounds N] [--secs S] [--configs a,b,c,d] [--l1-append ARGS] [--busy-main-loop] [--out PREFIX]" >&2; exit 2 ;;
    esac
done
export E2E_RUN_NAME=peers
# shellcheck source=lib.sh
. "$here/lib.sh"
prefix=${prefix:-$out/peers}
e2e_pack "$here/l1-peers.sh"
phase_end initramfs

e2e_l0_cmd "PEERS_ROUNDS=$rounds PEERS_SECS=$secs PEERS_CONFIGS=$configs PEERS_BUSY=$busy $l1_append"
log "peer comparison: configurations $configs, $rounds rounds, $secs s per workload, L1 append '$l1_append', busy main loop $busy; console $console"
set +e
timeout -k 5 "${PEERS_TIMEOUT:-5400}" "${cmd[@]}" </dev/null 2>"$out/qemu-l0.stderr" |
    tee "$console" | grep -a --line-buffered -E 'PEERS-L1|BENCH'
status=("${PIPESTATUS[@]}")
set -e
phase_end "L0 run"
print_timings
((status[0] == 0)) || die "L0 QEMU exited ${status[0]}: $(tail -n 5 "$out/qemu-l0.stderr"); log: $console"
grep -aq 'PEERS-L1: FAIL' "$console" && log "some runs failed: $(grep -a 'PEERS-L1: FAIL' "$console")"
python3 "$here/peers-report.py" "$console" --out "$prefix"
log "table: $prefix.md, plot: $prefix.svg"
