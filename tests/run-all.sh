#!/usr/bin/env bash
# Runs every test tier: formatting and lints, unit and socket tests, docs, a bounded fuzz run,
# and the VM tier (a real kernel with iommufd + VFIO cdev under QEMU/TCG, edu DMA). The VM tier
# installs what it needs (apt, kernel source) and caches the kernel build.
# Usage: tests/run-all.sh            everything (what CI runs)
#        SKIP_VM=1 tests/run-all.sh  without the VM tier (no root or apt needed)
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n== %s\n' "$*"; }
t0=$(date +%s)

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings

step "cargo test (unit, socket, model, CLI tiers)"
cargo test --all-targets

step "cargo doc"
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --quiet

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
fi
echo
echo "all tiers passed in $(( $(date +%s) - t0 )) s"
