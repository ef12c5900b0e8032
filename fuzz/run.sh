#!/usr/bin/env bash
# Builds the fuzz targets with libFuzzer coverage instrumentation (stable Rust, no cargo-fuzz
# needed) and runs each for a bounded time. Any crash fails the script.
#   fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]     (default 30 s, all targets)
# Corpora live in fuzz/corpus/TARGET (kept), crashes in fuzz/artifacts/TARGET.
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-30}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(decode domain_model chains vfio_user vhost_user vhost_user_wire)
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
 -Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
# --target keeps the instrumentation out of build scripts.
cargo build --release --quiet --bins --target x86_64-unknown-linux-gnu
bin=target/x86_64-unknown-linux-gnu/release
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "artifacts/$t"
  echo "== fuzz $t for ${secs}s"
  # The hostile-VMM targets read their inputs as message sequences: let them be long from the
  # start instead of growing from a few bytes over minutes.
  extra=()
  case $t in vhost_user | vhost_user_wire | vfio_user) extra=(-len_control=0 -max_len=512) ;; esac
  "$bin/$t" -max_total_time="$secs" -print_final_stats=1 "${extra[@]}" \
    -artifact_prefix="artifacts/$t/" "corpus/$t" 2>&1 | grep -E "^(#[0-9]+.*DONE|stat::number_of_executed_units|stat::peak_rss|==|SUMMARY|thread|panicked)" || true
  if ls "artifacts/$t"/crash-* >/dev/null 2>&1; then
    echo "FAIL: $t crashed; reproduce with: fuzz/$bin/$t artifacts/$t/crash-..." >&2
    exit 1
  fi
done
echo "fuzz: no crash"
