#!/bin/busybox sh
# /init of L1 in the peer comparison (tests/e2e/peers.sh): the same L2 kernel, devices and
# workloads (tests/e2e/l2-dma/src/bench.rs) under four vIOMMU configurations of L1's stock QEMU:
#   a  no vIOMMU: the devices as plain vfio-pci (iommufd backend) — the ceiling
#   b  QEMU's own virtio-iommu-pci + vfio-pci (iommufd backend)
#   c  QEMU's own intel-iommu (caching mode) + vfio-pci (iommufd backend)
#   d  this daemon: the README's command line (vhost-user virtio-iommu + vfio-user devices)
#   dN the daemon as d, with its polling window set to N µs (`poll_us = N` in its config)
#   dirq the daemon as d, polling after its devices' interrupts (`poll_after_irq = true`)
# Rounds interleave the configurations (the order rotates each round) so that drift and noise
# show in the spread of the results. L2's BENCH lines reach this console prefixed `L2| `.
# bind_devices, start_nic_peer, start_vm (the README's command line), l1_boot: shared with
# the other L1 /init (l1-lib.sh).
. /e2e/l1-lib.sh
l1_boot
echo "PEERS-L1: kernel $(uname -r), cmdline: $(cat /proc/cmdline)"
rounds=2
secs=3
configs="a b c d"
busy=0
for w in $(cat /proc/cmdline); do
    case $w in
        PEERS_ROUNDS=*) rounds=${w#*=} ;;
        PEERS_SECS=*) secs=${w#*=} ;;
        PEERS_CONFIGS=*) configs=$(echo "${w#*=}" | tr , ' ') ;;
        PEERS_BUSY=*) busy=${w#*=} ;;
    esac
done
cfg=/etc/vhost-user-iommu/vm1.toml
run=/run/vhost-user-iommu
t() { cut -d' ' -f1 /proc/uptime; }
# cpu_s PID: user + system CPU seconds the process has used so far.
cpu_s() { awk '{ printf "%.1f", ($14 + $15) / 100 }' "/proc/$1/stat" 2>/dev/null; }
bye() {
    echo "PEERS-L1: done at $(t) s"
    sync
    poweroff -f
    sleep 10
}

# pass/fail/finish as l1-lib.sh expects them: only failures are worth a line here.
pass() { :; }
fail() { echo "PEERS-L1: FAIL: $1: $2"; }
finish() { bye; }
bind_devices
start_nic_peer
# The config (shared with the end-to-end tier) serves the VF too; L2 here leaves it alone.
start_vf 0000:00:19.0
mkdir -p $run /run/peers
vhost-user-iommu viot --config $cfg -o $run/vm1-viot.bin || { echo "PEERS-L1: FAIL: viot"; bye; }

# Configuration d: start_vm, the README's command line (l1-lib.sh).
# Configurations a-c: the same machine, RAM backend and guest addresses, QEMU's own vfio-pci.
start_peer() {
    viommu=$1
    shift
    exec qemu-system-x86_64 -M q35,memory-backend=mem -m 256M \
        -object memory-backend-memfd,id=mem,size=256M,share=on \
        -object iommufd,id=ifd $viommu \
        -device vfio-pci,host=0000:00:04.0,iommufd=ifd,addr=04.0 \
        -device vfio-pci,host=0000:00:05.0,iommufd=ifd,addr=05.0 \
        -device vfio-pci,host=0000:00:06.0,iommufd=ifd,addr=06.0 \
        -device vfio-pci,host=0000:00:07.0,iommufd=ifd,addr=07.0 \
        "$@"
}

# one CONFIG ROUND: boots L2 under CONFIG, waits for its bench to end, powers it off.
one() {
    c=$1
    l2_dir /run/peers/$c-$2
    daemon=
    case $c in d*)
        conf=$cfg
        if [ "$c" = dirq ]; then
            conf=$d/vm1.toml
            { echo "poll_after_irq = true"; cat $cfg; } >"$conf"
        elif [ "$c" != d ]; then
            conf=$d/vm1.toml
            { echo "poll_us = ${c#d}"; cat $cfg; } >"$conf"
        fi
        vhost-user-iommu --config "$conf" --control-socket "$d/ctl.sock" >"$d/daemon.log" 2>&1 &
        daemon=$!
        i=0
        until [ -S $run/vm1.sock ] && [ -S $run/vm1-56.sock ]; do
            i=$((i + 1))
            [ $i -gt 200 ] && { echo "PEERS-L1: FAIL: daemon: $(tail -n 5 "$d/daemon.log")"; return; }
            sleep 0.1
        done
        ;;
    esac
    started=$(t)
    echo "PEERS-L1: round $2 config $c starts at $started s"
    common="-accel tcg,tb-size=64 -cpu max -smp 1 -nodefaults -display none -serial file:$log -chardev pipe,id=ctl,path=$d/ctl -serial chardev:ctl -kernel /e2e/bzImage -initrd /e2e/l2-initrd.cpio.gz"
    # --busy-main-loop: L2's QEMU main loop also serves a monitor that is asked for the flattened
    # memory map (`info mtree -f`) ten times a second, from before L2 starts until it powers
    # off: work that runs in the main loop (under the big QEMU lock), as other devices' handlers,
    # block jobs and management queries do. Without the pause it starves L2 altogether (seen:
    # L2's boot 20 times slower). QEMU's own virtio-iommu (b) answers in that loop; intel-iommu
    # (c) in the vCPU thread, the daemon (d) in its own process.
    hammer=
    if [ "$busy" = 1 ]; then
        mkfifo "$d/mon.in" "$d/mon.out"
        cat "$d/mon.out" >/dev/null &
        common="$common -chardev pipe,id=mon,path=$d/mon -mon chardev=mon,mode=readline"
        (while :; do echo 'info mtree -f'; usleep 100000; done >"$d/mon.in") 2>/dev/null &
        hammer=$!
    fi
    append="console=ttyS0 panic=-1 iommu.strict=1 nvme.write_queues=1 iommufd.allow_unsafe_interrupts=1 vfio_iommu_type1.allow_unsafe_interrupts=1 e2e.bench=$c e2e.secs=$secs"
    case $c in
        a) (start_peer "" $common -append "$append") </dev/null >"$d/qemu.log" 2>&1 & ;;
        b) (start_peer "-device virtio-iommu-pci,addr=03.0" $common -append "$append") </dev/null >"$d/qemu.log" 2>&1 & ;;
        c) (start_peer "-device intel-iommu,caching-mode=on" $common -append "$append intel_iommu=on") </dev/null >"$d/qemu.log" 2>&1 & ;;
        d*) (start_vm $common -append "$append") </dev/null >"$d/qemu.log" 2>&1 & ;;
    esac
    qemu=$!
    { tail -f "$log" & echo $! >"$d/tail.pid"; wait; } | sed 's/^/L2| /' &
    i=0
    until grep -aq 'E2E-L2: END' "$log"; do
        i=$((i + 1))
        if ! kill -0 $qemu 2>/dev/null || [ $i -gt 3000 ]; then
            echo "PEERS-L1: FAIL: config $c round $2: L2 ended early or hung: $(tail -n 5 "$d/qemu.log")"
            break
        fi
        sleep 0.2
    done
    # What the run cost in L1 CPU time (the vIOMMU of b and c runs inside QEMU, the daemon's
    # apart), and how the daemon's requests went: served from its polling window or after a
    # wake-up, its own mean service time, and the time its iommufd ioctls took within it.
    echo "PEERS-L1: config $c round $2 cpu: qemu $(cpu_s $qemu) s${daemon:+, daemon $(cpu_s $daemon) s} over $(echo "$(t) $started" | awk '{ printf "%.1f", $1 - $2 }') s"
    if [ -n "$daemon" ]; then
        echo "PEERS-L1: config $c round $2 daemon: $(vhost-user-iommu ctl --control-socket "$d/ctl.sock" metrics |
            awk '$1 ~ /^viommu_(poll_hits_total|wakeups_total|irq_poll_hits_total|irq_wakes_total|irq_polls_total)$/ { printf "%s=%s ", $1, $2 }
                 $1 ~ /^viommu_request_latency_seconds_sum[{]/ { sum += $2 }
                 $1 ~ /^viommu_request_latency_seconds_count[{]/ { n += $2 }
                 $1 ~ /^viommu_backend_ioctl_seconds_sum[{]/ { io += $2 }
                 $1 ~ /^viommu_backend_ioctl_seconds_count[{]/ { ion += $2 }
                 END { printf "viommu_request_latency_seconds_sum=%s viommu_request_latency_seconds_count=%s ", sum, n
                       printf "viommu_backend_ioctl_seconds_sum=%s viommu_backend_ioctl_seconds_count=%s ", io, ion }')"
    fi
    [ -n "$hammer" ] && kill $hammer 2>/dev/null
    echo poweroff >"$d/ctl.in"
    i=0
    while kill -0 $qemu 2>/dev/null && [ $i -lt 600 ]; do i=$((i + 1)); sleep 0.1; done
    kill -9 $qemu 2>/dev/null
    wait $qemu
    kill "$(cat "$d/tail.pid")" 2>/dev/null
    if [ -n "$daemon" ]; then
        kill -TERM $daemon
        wait $daemon
    fi
    echo "PEERS-L1: round $2 config $c ends at $(t) s"
}

r=1
while [ $r -le "$rounds" ]; do
    # Rotate the order each round: a b c d, b c d a, ...
    order=$configs
    k=1
    while [ $k -lt $r ]; do
        set -- $order
        first=$1
        shift
        order="$* $first"
        k=$((k + 1))
    done
    for c in $order; do one "$c" "$r"; done
    r=$((r + 1))
done
bye
