# Sourced by L1's /init (l1-init.sh for the end-to-end tier, l1-peers.sh for the peer comparison):
# what both do to L1 the same way. Expects pass NAME [NOTE], fail NAME WHY and finish (which
# does not return) from the caller, by the time a function here runs.

# l1_boot: /dev, /proc, /sys mounted, stdio on the console, busybox's applets on PATH.
l1_boot() {
    /bin/busybox mkdir -p /dev /proc /sys /tmp /run
    /bin/busybox mount -t devtmpfs devtmpfs /dev
    exec </dev/console >/dev/console 2>&1
    /bin/busybox --install -s /bin
    export PATH=/bin:/usr/bin
    mount -t proc proc /proc
    mount -t sysfs sysfs /sys
}

# bind_devices: both edus, the NVMe controller and the igb NIC to vfio-pci. BDF and vendor:device
# as L0 emulates them. L1's kernel leaves the NVMe controller alone (initcall_blacklist on L1's
# command line); its igb driver takes both 82576s at boot (it runs the second, whose VF L2 gets):
# a device already bound is unbound first, as an operator's udev rule or driverctl would.
bind_devices() {
    for dev_id in 0000:00:04.0=0x1234:0x11e8 0000:00:05.0=0x1234:0x11e8 0000:00:06.0=0x1b36:0x0010 0000:00:07.0=0x8086:0x10c9; do
        bdf=${dev_id%%=*}
        dev=/sys/bus/pci/devices/$bdf
        if [ "$(cat $dev/vendor 2>/dev/null):$(cat $dev/device 2>/dev/null)" != "${dev_id#*=}" ]; then
            fail "device ${dev_id#*=} at $bdf" "not there: $(ls /sys/bus/pci/devices)"
            finish
        fi
        if to_vfio "$bdf"; then
            pass "${dev_id#*=} at $bdf bound to vfio-pci ($(vfio_of "$bdf"))"
        else
            fail "${dev_id#*=} at $bdf bound to vfio-pci" "driver: $(readlink $dev/driver)"
            finish
        fi
    done
}

# to_vfio BDF: binds the device to vfio-pci (unbound from its driver first, if any); whether it is.
to_vfio() {
    local dev=/sys/bus/pci/devices/$1
    [ -e "$dev/driver" ] && echo "$1" >"$dev/driver/unbind"
    echo vfio-pci >"$dev/driver_override"
    echo "$1" >/sys/bus/pci/drivers_probe
    [ "$(basename "$(readlink $dev/driver)")" = vfio-pci ]
}
# vfio_of BDF: "vfioN, IOMMU group G" of a device bound to vfio-pci.
vfio_of() { echo "$(ls /sys/bus/pci/devices/$1/vfio-dev), IOMMU group $(basename "$(readlink /sys/bus/pci/devices/$1/iommu_group)")"; }

# start_nic_peer: L1's own e1000e on L0's network hub, with a TCP echo server on port 5000. The
# hub has no host backend, so nothing leaves the emulated machines; the addresses are from the
# documentation range (RFC 5737). L2 (192.0.2.2) streams through its igb to the echo server, and
# (198.51.100.2) through its SR-IOV VF.
start_nic_peer() {
    peer=$(ls /sys/bus/pci/devices/0000:00:08.0/net 2>/dev/null | head -n 1)
    if [ -n "$peer" ] && ip addr add 192.0.2.1/24 dev "$peer" &&
        ip addr add 198.51.100.1/24 dev "$peer" && ip link set "$peer" up; then
        nc -ll -p 5000 -e cat &
        pass "NIC peer: L1's $peer at 192.0.2.1/24 and 198.51.100.1/24 (the SR-IOV VF's subnet) with an echo server on port 5000"
    else
        fail "NIC peer" "no interface for 0000:00:08.0 or it cannot be configured: $(ls /sys/bus/pci/devices/0000:00:08.0/)"
    fi
}

# start_vf BDF: one SR-IOV virtual function of L0's second 82576 (00:09.0, run by L1's igb
# driver, its link up), bound to vfio-pci for the daemon, as an operator passes a NIC's VF
# through: the PF makes it (sriov_numvfs) and keeps it from the host's igbvf driver
# (sriov_drivers_autoprobe = 0). BDF is where the config says the VF is.
start_vf() {
    pf=/sys/bus/pci/devices/0000:00:09.0
    pfnet=$(ls $pf/net 2>/dev/null | head -n 1)
    if [ -z "$pfnet" ] || ! ip link set "$pfnet" up; then
        fail "SR-IOV PF" "no interface of L1's igb driver for 0000:00:09.0: driver $(readlink $pf/driver)"
        return 1
    fi
    echo 0 >$pf/sriov_drivers_autoprobe
    if ! echo 1 >$pf/sriov_numvfs; then
        fail "SR-IOV VF" "cannot enable a VF on 0000:00:09.0 (sriov_totalvfs $(cat $pf/sriov_totalvfs 2>/dev/null))"
        return 1
    fi
    vf=$(basename "$(readlink -f $pf/virtfn0)")
    if [ "$vf" != "$1" ]; then
        fail "SR-IOV VF" "its VF is $vf, the config names $1"
        return 1
    fi
    dev=/sys/bus/pci/devices/$vf
    if to_vfio "$vf"; then
        pass "SR-IOV: $pfnet (0000:00:09.0, igb) made VF $vf ($(cat $dev/vendor):$(cat $dev/device)), bound to vfio-pci ($(vfio_of "$vf"))"
    else
        fail "SR-IOV VF $vf bound to vfio-pci" "driver: $(readlink $dev/driver)"
        return 1
    fi
}

# l2_dir DIR: a fresh directory for one L2 run: sets $d and $log (its empty console log), makes
# the control line's fifos and drains what L2 writes back on it.
l2_dir() {
    d=$1
    mkdir -p "$d"
    log=$d/console.log
    : >"$log"
    mkfifo "$d/ctl.in" "$d/ctl.out"
    cat "$d/ctl.out" >/dev/null &
}

# The L2 VM with the daemon. The lines from `qemu-system-x86_64` to the one before `"$@"` are the
# README's "Using it with QEMU" command line, verbatim (tests/e2e/run.sh checks it). Called in a
# background subshell, which `exec` turns into QEMU itself: $! is QEMU's pid, so a kill reaches
# QEMU and not just the subshell.
start_vm() {
    exec qemu-system-x86_64 -M q35,memory-backend=mem -m 256M \
        -object memory-backend-memfd,id=mem,size=256M,share=on \
        -chardev socket,id=viommu,path=/run/vhost-user-iommu/vm1.sock \
        -device vhost-user-test-device-pci,chardev=viommu,virtio-id=23,num_vqs=2,vq_size=256,config_size=40,addr=03.0 \
        -acpitable file=/run/vhost-user-iommu/vm1-viot.bin \
        -device '{"driver":"vfio-user-pci","socket":{"type":"unix","path":"/run/vhost-user-iommu/vm1-32.sock"},"addr":"04.0"}' \
        -device '{"driver":"vfio-user-pci","socket":{"type":"unix","path":"/run/vhost-user-iommu/vm1-40.sock"},"addr":"05.0"}' \
        -device '{"driver":"vfio-user-pci","socket":{"type":"unix","path":"/run/vhost-user-iommu/vm1-48.sock"},"addr":"06.0"}' \
        -device '{"driver":"vfio-user-pci","socket":{"type":"unix","path":"/run/vhost-user-iommu/vm1-56.sock"},"addr":"07.0"}' \
        "$@"
}
