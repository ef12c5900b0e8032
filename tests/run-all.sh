#!/usr/bin/env bash
# Runs every test tier that this machine can run: formatting and lints, unit and socket tests.
# Usage: tests/run-all.sh   (from anywhere; exits non-zero on the first failure)
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n== %s\n' "$*"; }

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings

step "cargo test (unit and socket tiers)"
cargo test --all-targets

step "cargo doc"
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --quiet
