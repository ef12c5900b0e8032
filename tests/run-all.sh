#!/usr/bin/env bash
# Runs every test tier: formatting and lints, unit and socket tests, docs, a bounded fuzz run,
# the VM tier (a real kernel with iommufd + VFIO cdev under QEMU/TCG, edu DMA), the guest-driver
# tier (the real Linux virtio-iommu driver under QEMU 11 driving the daemon), the end-to-end tier
# (a nested VM on stock QEMU whose passed-through devices DMA through the daemon) and the
# deployment files. The VM tiers install what they need (apt, kernel source, QEMU) and cache their builds.
# Usage: tests/run-all.sh            everything (what CI runs)
#        SKIP_VM=1 tests/run-all.sh  without the VM tier (no root or apt needed)
set -euo pipefail
cd "$(dirname "$0")/.."

# Each step's header says how much disk and memory are free: a step that fails for want of
# either (a linker killed, a full disk) shows it in the log.
step() {
  printf '\n== %s  [free: disk %s, memory %s MiB]\n' "$*" \
    "$(df -h --output=avail . 2>/dev/null | tail -n 1 | tr -d ' ')" \
    "$(awk '/^MemAvailable:/ { print int($2 / 1024) }' /proc/meminfo)"
}
t0=$(date +%s)

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --workspace --all-targets -- -D warnings (the daemon and the guest programs)"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo test (unit, socket, model, CLI tiers; the ioctl crate's request numbers)"
cargo test --all-targets
cargo test -p viommu-uapi

step "cross-VM isolation: VM A's VMM against VM B's daemon, with real uids (root)"
if [ "$(id -u)" = 0 ]; then
  cargo test --test isolation -- --ignored
elif [ -n "${CI:-}" ]; then
  echo "CI runs as root: the isolation test switches uids" >&2; exit 1
else
  printf '\n!!!!!!!! SKIPPED: not root: cross-VM isolation NOT tested\n\n' >&2
fi

step "cargo doc"
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --quiet

step "deployment files: systemd-analyze verify, udev rules"
tests/deploy-verify.sh

step "fuzz smoke: 20 s per target"
fuzz/run.sh "${FUZZ_SECONDS:-20}"

if [ -n "${SKIP_VM:-}" ]; then
  step "VM tier skipped (SKIP_VM is set)"
else
  step "VM tier: setup (packages, QEMU, kernel source)"
  tests/vm/setup.sh
  step "VM tier: intel-iommu"
  tests/vm/run.sh
  step "VM tier: virtio-iommu"
  IOMMU=virtio tests/vm/run.sh
  step "guest-driver tier: the Linux virtio-iommu driver under QEMU 11 drives the daemon"
  tests/guest/run.sh
  step "end-to-end tier: a nested Linux VM on stock QEMU 11; its passed-through edus, NVMe and NIC DMA through the daemon"
  t_e2e=$(date +%s)
  tests/e2e/run.sh
  echo "end-to-end tier wall time: $(( $(date +%s) - t_e2e )) s"
  step "VIOT table from the viot command, disassembled by iasl -d (trixie acpica-tools)"
  viot=$(mktemp -d)/viot.bin
  cargo build --release --quiet
  target/release/vhost-user-iommu viot -o "$viot" --iommu 00:03.0 \
    --endpoint 32=00:04.0 --endpoint 40=00:05.0 --endpoint 48=01:00.0
  IASL=$(tests/guest/setup-iasl.sh) VIOT_IASL_REQUIRE=1 tests/viot_iasl.sh "$viot" true
fi

step "Debian package: built, installed into an empty root, verified there, purged"
tests/package-verify.sh
if [ -n "${SKIP_VM:-}" ]; then
  step "Debian package in a clean Debian root (apt, lintian) skipped (SKIP_VM is set)"
else
  step "Debian package: apt-get install into a clean Debian 12 root, checked there, purged; lintian"
  tests/package-install.sh
fi
echo
echo "all tiers passed in $(( $(date +%s) - t0 )) s"
