# Shared by the end-to-end tier (run.sh) and the peer comparison (peers.sh): prerequisites,
# the static programs, both initramfs images and L0's QEMU command line. Sourced with `here` and
# `repo` set; defines qemu, bzimage, daemon, l2_init, out, timings and the helpers below.
# shellcheck source=../vm/lib.sh
. "$here/../vm/lib.sh"

need_cmd cargo timeout gzip cpio readelf tee
out=$VM_CACHE/run/${E2E_RUN_NAME:-e2e}
mkdir -p "$out"

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
    CONFIG_VFIO_DEVICE_CDEV CONFIG_VFIO_PCI CONFIG_PROC_PAGE_MONITOR CONFIG_BLK_DEV_NVME CONFIG_IGB CONFIG_E1000E; do
    grep -qx "$opt=y" "$kconfig" || die "the kernel lacks $opt=y ($kconfig)"
done
phase_end setup

# --- static programs: the daemon (L1) and l2-dma (L2's /init) -----------------------------------
log "building the daemon and l2-dma (static)"
static_build release vhost-user-iommu || die "static cargo build of vhost-user-iommu failed"
daemon=$(static_bin release vhost-user-iommu)
static_build guest l2-dma unit || die "static cargo build of tests/e2e/l2-dma and tests/e2e/unit failed"
l2_init=$(static_bin guest l2-dma)
unit=$(static_bin guest unit)
for b in "$daemon" "$l2_init" "$unit"; do is_static "$b" || die "$b is not statically linked"; done
phase_end programs

pack() { # DIR OUT: a gzip'd newc cpio of DIR, reproducible (sorted, owned by root)
    (cd "$1" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet -R 0:0) |
        gzip -1 >"$2.tmp"
    mv "$2.tmp" "$2"
}

# e2e_pack L1_INIT: L2's initramfs (l2-dma as /init) and L1's (busybox, the daemon, QEMU 11, L2's
# kernel and initramfs, L1_INIT as /init beside /e2e/l1-lib.sh); sets l2_initrd and l1_initrd.
e2e_pack() {
    local l2root l1root f lib
    l2root=$(mktemp -d)
    l1root=$(mktemp -d)
    mkdir -p "$l2root"/{dev,proc,sys}
    cp "$l2_init" "$l2root/init"
    l2_initrd=$out/l2-initrd.cpio.gz
    pack "$l2root" "$l2_initrd"

    mkdir -p "$l1root"/{bin,dev,proc,sys,tmp,run,usr/bin,etc/vhost-user-iommu,e2e} \
        "$l1root"/opt/qemu/{bin,lib,share/qemu,share/seabios}
    cp /bin/busybox "$l1root/bin/busybox"
    is_static "$l1root/bin/busybox" || die "/bin/busybox is not static (install busybox-static)"
    cp "$1" "$l1root/init"
    chmod 755 "$l1root/init"
    cp "$here/l1-lib.sh" "$l1root/e2e/l1-lib.sh"
    cp "$daemon" "$l1root/usr/bin/vhost-user-iommu"
    cp "$unit" "$l1root/usr/bin/unit"
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
    rm -rf "$l2root" "$l1root"
}

# e2e_l0_cmd L1_APPEND: sets `cmd`, L0's QEMU command line (q35 with VT-d, two edus, an NVMe
# controller on a fresh empty disk image $nvme_img, an igb NIC and its e1000e peer on an isolated
# network hub, and a second igb whose SR-IOV VF L1 serves), with L1_APPEND added to L1's kernel
# command line; sets console.
e2e_l0_cmd() {
    console=$out/console.log
    # The NVMe controller's disk starts empty each run; L2 writes its areas (l2-dma/src/nvme.rs).
    nvme_img=$out/nvme.img
    rm -f "$nvme_img"
    truncate -s 56M "$nvme_img"
    cmd=(
        "$qemu" -M q35 -accel tcg,tb-size=128 -cpu max -m 2G -smp 2 -nodefaults -display none
        -serial stdio -no-reboot
        -device intel-iommu,intremap=on,caching-mode=on -device edu,addr=04.0 -device edu,addr=05.0
        -drive "if=none,id=nvm,file=$nvme_img,format=raw" -device nvme,drive=nvm,serial=e2e-nvme,addr=06.0
        -netdev hubport,id=nic,hubid=0 -device igb,netdev=nic,addr=07.0
        -netdev hubport,id=peer,hubid=0 -device e1000e,netdev=peer,addr=08.0
        -netdev hubport,id=sriov,hubid=0 -device igb,netdev=sriov,addr=09.0
        -kernel "$bzimage" -initrd "$l1_initrd"
        -append "console=ttyS0 panic=-1 intel_iommu=on iommu.strict=1 initcall_blacklist=nvme_init $1"
    )
}
