#!/usr/bin/env bash
# The guest-driver tier: the real Linux virtio-iommu driver drives the daemon.
#
# Builds (cached) the daemon, QEMU 11 (setup-qemu.sh), the guest kernel (tests/vm/build-kernel.sh),
# the guest program (guest-traffic/) and an initramfs (tests/vm/mkinitramfs.sh), then for each
# mode boots a q35 VM under TCG whose only IOMMU is the daemon, fronted by QEMU's
# vhost-user-test-device-pci at 00:03.0, with two edu devices behind it (VIOT written by the
# daemon's `viot` subcommand). The guest maps and unmaps buffers through its own iommufd and
# stops at each checkpoint; host-ctl.py compares the daemon's state (control socket) with what the
# guest did. Every check prints `PASS: name` or `FAIL: name: why`; exit 1 on any FAIL.
#
# Modes (GUEST_MODES, default all three):
#   dma-strict   default DMA domains, iommu.strict=1
#   dma-lazy     default DMA domains, iommu.strict=0
#   passthrough  iommu.passthrough=1: endpoints boot in the bypass domain (BYPASS_CONFIG)
#
# Environment: VM_CACHE (default /var/cache/vhost-user-iommu-vm), VM_TIMEOUT (per boot, default
# 180 s), GUEST_MODES, GUEST_DAEMON_ARGS (extra daemon arguments, e.g. "--threads 2").
# A cold run needs root once (debootstrap for QEMU 11, tests/vm/setup.sh for the kernel source).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
# shellcheck source=../vm/lib.sh
. "$here/../vm/lib.sh"

timeout_s=${VM_TIMEOUT:-180}
read -r -a modes <<<"${GUEST_MODES:-dma-strict dma-lazy passthrough}"
read -r -a daemon_extra <<<"${GUEST_DAEMON_ARGS:-}"
# Where the guest sees the IOMMU and its endpoints (endpoint ids are ours to choose: VIOT).
iommu_addr=00:03.0
endpoints=("32=00:04.0" "40=00:05.0")

need_cmd cargo python3 timeout gzip cpio
out=$VM_CACHE/run/guest
mkdir -p "$out"

declare -a pids=()
fails=0
passes=0
PHASE_WIDTH=22
pass() { passes=$((passes + 1)); printf 'PASS: %s\n' "$1"; }
fail() { fails=$((fails + 1)); printf 'FAIL: %s: %s\n' "$1" "$2"; }
check() { # check NAME WHY-IF-FAILED COMMAND...
    local name=$1 why=$2
    shift 2
    if "$@"; then pass "$name"; else fail "$name" "$why"; fi
}

# Kills what this script started (by pid), on every exit path.
stop_all() {
    local p
    for p in "${pids[@]}"; do
        kill -TERM "$p" 2>/dev/null || true
    done
    for p in "${pids[@]}"; do
        wait "$p" 2>/dev/null || true
    done
    pids=()
}
trap 'stop_all' EXIT
trap 'exit 130' INT TERM

# Waits up to SECONDS for PID to exit, then kills it; its exit status (143 if killed).
wait_or_kill() { # PID SECONDS
    local i
    for ((i = 0; i < $2 * 20; i++)); do
        kill -0 "$1" 2>/dev/null || break
        sleep 0.05
    done
    kill -TERM "$1" 2>/dev/null || true
    local rc=0
    wait "$1" || rc=$?
    return "$rc"
}

wait_for_socket() { # PATH SECONDS PID
    local i
    for ((i = 0; i < $2 * 20; i++)); do
        [[ -S $1 ]] && return 0
        kill -0 "$3" 2>/dev/null || return 1
        sleep 0.05
    done
    return 1
}

# --- prerequisites -------------------------------------------------------------------------------
if [[ -z $(newest_kernel_deb) ]] || ! command -v flex >/dev/null || [[ ! -x /bin/busybox ]]; then
    [[ $(id -u) -eq 0 ]] || die "kernel source or build tools missing: run tests/vm/setup.sh as root"
    "$here/../vm/setup.sh"
fi
phase_end setup

# --- the daemon ------------------------------------------------------------------------------------
log "building the daemon (cargo build --release)"
(cd "$repo" && cargo build --quiet --release --locked) || die "cargo build --release failed"
daemon=$repo/target/release/vhost-user-iommu
[[ -x $daemon ]] || die "$daemon not built"
phase_end daemon

# --- QEMU 11 -------------------------------------------------------------------------------------
qemu=$("$here/setup-qemu.sh" | tail -n 1)
[[ -x $qemu ]] || die "setup-qemu.sh returned no QEMU wrapper"
log "QEMU: $("$qemu" --version | head -n 1)"
phase_end qemu

# --- kernel --------------------------------------------------------------------------------------
bzimage=$("$here/../vm/build-kernel.sh" | tail -n 1)
[[ -f $bzimage ]] || die "tests/vm/build-kernel.sh returned no bzImage"
kconfig=$(dirname "$bzimage")/config
for opt in CONFIG_VIRTIO_IOMMU CONFIG_ACPI_VIOT CONFIG_IOMMUFD CONFIG_VFIO_DEVICE_CDEV CONFIG_VFIO_PCI CONFIG_PROC_PAGE_MONITOR CONFIG_HUGETLBFS; do
    grep -qx "$opt=y" "$kconfig" || die "the guest kernel lacks $opt=y ($kconfig)"
done
phase_end kernel

# --- guest program -------------------------------------------------------------------------------
log "building guest-traffic (static)"
static_build guest guest-traffic || die "static cargo build of tests/guest/guest-traffic failed"
guest_bin=$(static_bin guest guest-traffic)
phase_end guest-program

# --- initramfs + VIOT ------------------------------------------------------------------------------
initrd=$out/initramfs.cpio.gz
"$here/../vm/mkinitramfs.sh" "$initrd" "$guest_bin"
viot=$out/viot.bin
viot_args=()
for e in "${endpoints[@]}"; do viot_args+=(--endpoint "$e"); done
"$daemon" viot -o "$viot" --iommu "$iommu_addr" "${viot_args[@]}"
log "VIOT $viot: $(stat -c %s "$viot") bytes, IOMMU at $iommu_addr, endpoints ${endpoints[*]}"
phase_end initramfs+viot

# --- one boot per mode -----------------------------------------------------------------------------
boot() {
    local mode=$1 append boot_kind policy
    case $mode in
        dma-strict) append="iommu.strict=1" boot_kind=Paging policy=strict ;;
        dma-lazy) append="iommu.strict=0" boot_kind=Paging policy=lazy ;;
        passthrough) append="iommu.passthrough=1" boot_kind=Bypass policy=any ;;
        *) die "unknown mode $mode (expected dma-strict, dma-lazy or passthrough)" ;;
    esac
    local d=$out/$mode
    rm -rf "$d"
    mkdir -p "$d"
    local vu=$d/vhost-user.sock ctl=$d/control.sock ser=$d/serial1.sock
    local ep_args=() ctl_args=() e
    for e in "${endpoints[@]}"; do
        ep_args+=(--endpoint "${e%%=*}")
        ctl_args+=(--endpoint "${e#*=}=${e%%=*}")
    done

    "$daemon" --socket-path "$vu" --control-socket "$ctl" --backend soft "${ep_args[@]}" \
        ${daemon_extra[@]+"${daemon_extra[@]}"} -vv >"$d/daemon.log" 2>&1 &
    local daemon_pid=$!
    pids+=("$daemon_pid")
    if ! wait_for_socket "$vu" 10 "$daemon_pid" || ! wait_for_socket "$ctl" 10 "$daemon_pid"; then
        fail "$mode: daemon listening" "no sockets after 10 s: $(tail -n 5 "$d/daemon.log")"
        return
    fi

    python3 "$here/host-ctl.py" --listen "$ser" --control "$ctl" "${ctl_args[@]}" \
        --boot "$boot_kind" --policy "$policy" --name "$mode" --timeout "$timeout_s" \
        >"$d/host-ctl.log" 2>&1 &
    local ctl_pid=$!
    pids+=("$ctl_pid")
    wait_for_socket "$ser" 10 "$ctl_pid" || { fail "$mode: host-ctl listening" "$(cat "$d/host-ctl.log")"; return; }

    local t0
    t0=$(now)
    timeout "$timeout_s" "$qemu" \
        -M q35,memory-backend=mem -accel tcg -cpu max -m 512M -nodefaults -display none -no-reboot \
        -object memory-backend-memfd,id=mem,size=512M,share=on \
        -chardev socket,id=viommu,path="$vu" \
        -device vhost-user-test-device-pci,chardev=viommu,virtio-id=23,num_vqs=2,vq_size=256,config_size=40,addr=03.0 \
        -device edu,addr=04.0 -device edu,addr=05.0 \
        -acpitable file="$viot" \
        -serial stdio -chardev socket,id=ctl,path="$ser" -serial chardev:ctl \
        -kernel "$bzimage" -initrd "$initrd" \
        -append "console=ttyS0 panic=-1 iommufd.allow_unsafe_interrupts=1 $append" \
        </dev/null >"$d/console.log" 2>"$d/qemu.stderr" &
    local qemu_pid=$! qemu_rc=0 ctl_rc=0
    pids+=("$qemu_pid")
    wait "$qemu_pid" || qemu_rc=$?
    local t1
    t1=$(now)
    # host-ctl ends at the guest's END, or on EOF when QEMU is gone; never wait on it for long.
    wait_or_kill "$ctl_pid" 10 || ctl_rc=$?
    local daemon_rc=0
    wait_or_kill "$daemon_pid" 0 || daemon_rc=$?
    pids=()

    # host-ctl's own PASS/FAIL lines (the daemon-side checks).
    local line
    while IFS= read -r line; do
        case $line in
            PASS:*) passes=$((passes + 1)); printf '%s\n' "$line" ;;
            FAIL:*) fails=$((fails + 1)); printf '%s\n' "$line" ;;
            *) printf '%s\n' "$line" ;;
        esac
    done <"$d/host-ctl.log"
    check "$mode: host-ctl finished cleanly" "exit status $ctl_rc" test "$ctl_rc" -eq 0
    # The guest's own checks (its ioctls), re-printed with the mode.
    local gp gf
    gp=$(grep -ac 'PASS: ' "$d/console.log" || true)
    gf=$(grep -a 'FAIL: ' "$d/console.log" | sed 's/^.*FAIL: //' || true)
    check "$mode: guest-side checks ($gp passed)" "$gf" test -z "$gf"
    check "$mode: guest verdict VM-TIER: PASS" "no VM-TIER: PASS in $d/console.log" \
        grep -aq 'VM-TIER: PASS' "$d/console.log"
    check "$mode: QEMU exited 0" "exit status $qemu_rc (124 = timeout); stderr: $(tail -n 5 "$d/qemu.stderr")" \
        test "$qemu_rc" -eq 0
    local qerr
    qerr=$(grep -aiE 'vhost|error|fail' "$d/qemu.stderr" | head -n 5 || true)
    check "$mode: QEMU reported no vhost-user error" "$qerr" test -z "$qerr"
    # (The one expected warning: the soft backend translates no host device DMA.)
    local dwarn
    dwarn=$(grep -aE '^\[[^]]* (WARN|ERROR) ' "$d/daemon.log" |
        grep -av 'using the software translation backend' | head -n 10 || true)
    check "$mode: daemon logged no warning or error (-vv)" "$dwarn" test -z "$dwarn"
    check "$mode: daemon exited 0 on SIGTERM" "exit status $daemon_rc" test "$daemon_rc" -eq 0
    log "$mode: boot to poweroff $(elapsed "$t0" "$t1") s; logs in $d"
}

for mode in "${modes[@]}"; do
    boot "$mode"
    phase_end "boot $mode"
done

print_timings
if ((fails)); then
    log "guest-driver tier: FAIL ($passes passed, $fails failed)"
    exit 1
fi
log "guest-driver tier: PASS ($passes checks)"
