#!/usr/bin/env bash
# Cross-checks the VIOT table that src/viot.rs generates against ACPICA, an
# implementation we did not write: `iasl -d` must decode it without errors or
# warnings, show one virtio-pci IOMMU node and PCI range nodes, and compiling
# the disassembly back must give the same bytes.
#
# Usage: tests/viot_iasl.sh OUT.bin [COMMAND [ARGS...]]
#   COMMAND runs with VIOT_OUT=OUT.bin in its environment and must write the
#   table there. Default: the crate's `write_table_to_viot_out_for_iasl` unit
#   test. To check a table that already exists, pass `true` as COMMAND.
#
# Environment:
#   IASL               iasl binary to use (default: `iasl` on PATH; installed
#                      from Debian's acpica-tools with apt-get if missing).
#   VIOT_IASL_REQUIRE  if 1, an iasl too old to know VIOT is a failure instead
#                      of a skip.
#
# Exit status: 0 pass, 1 fail, 77 skipped (iasl predates VIOT support, which
# ACPICA added in 2021; Debian 12 ships 20200925).
set -euo pipefail

die() {
    echo "viot_iasl: FAIL: $*" >&2
    exit 1
}

[ $# -ge 1 ] || die "usage: $0 OUT.bin [COMMAND [ARGS...]]"
out=$1
shift
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ $# -eq 0 ]; then
    set -- cargo test --quiet --manifest-path "$repo/Cargo.toml" --lib \
        viot::tests::write_table_to_viot_out_for_iasl -- --exact --ignored
fi

iasl=${IASL:-iasl}
if ! command -v "$iasl" >/dev/null 2>&1; then
    [ -z "${IASL:-}" ] || die "IASL=$IASL is not executable"
    echo "viot_iasl: iasl not found, installing acpica-tools" >&2
    sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null 2>&1 || die "iasl missing and not root to apt-get install acpica-tools"
        sudo=(sudo)
    fi
    "${sudo[@]}" apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q acpica-tools >/dev/null
    command -v iasl >/dev/null 2>&1 || die "acpica-tools installed but iasl still missing"
fi

# Generate afresh, so a stale file from an earlier run cannot pass for new;
# only the explicit `true` command means "check the file as it is".
if ! { [ $# -eq 1 ] && [ "$1" = true ]; }; then
    rm -f -- "$out"
fi
VIOT_OUT=$out "$@" || die "generator command failed: $*"
[ -s "$out" ] || die "generator command did not write $out"

work=$(mktemp -d)
trap 'rm -rf -- "$work"' EXIT
cp -- "$out" "$work/viot.dat"

# iasl exits 0 even for checksum or truncation problems; it reports them as
# text in its output and in the .dsl, so both are searched.
status=0
(cd "$work" && "$iasl" -d viot.dat) >"$work/disasm.log" 2>&1 || status=$?
[ "$status" -eq 0 ] || { cat "$work/disasm.log" >&2; die "iasl -d exited $status"; }
[ -f "$work/viot.dsl" ] || { cat "$work/disasm.log" >&2; die "iasl -d wrote no viot.dsl"; }

if grep -q "Unknown ACPI table signature" "$work/disasm.log" "$work/viot.dsl"; then
    version=$("$iasl" -v 2>&1 | grep -o 'version [0-9]*' | head -n1 || true)
    msg="iasl ($version) does not know the VIOT table; set IASL to a newer build"
    if [ "${VIOT_IASL_REQUIRE:-0}" = 1 ]; then
        die "$msg"
    fi
    echo "viot_iasl: SKIP: $msg" >&2
    exit 77
fi

if grep -n -i -E 'error|warning|incorrect|invalid|unknown|terminates in the middle' \
    "$work/disasm.log" "$work/viot.dsl" >"$work/problems"; then
    cat "$work/problems" >&2
    die "iasl reported problems decoding $out"
fi

dsl=$work/viot.dsl
iommu_nodes=$(grep -c -i 'Type : 03 \[VirtIO-PCI IOMMU\]' "$dsl" || true)
range_nodes=$(grep -c 'Type : 01 \[PCI Range\]' "$dsl" || true)
[ "$iommu_nodes" -eq 1 ] || die "expected 1 Virtio-PCI IOMMU node in the disassembly, found $iommu_nodes"
[ "$range_nodes" -ge 1 ] || die "expected at least one PCI Range node in the disassembly, found none"
node_count=$(sed -n 's/.*Node count : \([0-9A-Fa-f]*\).*/\1/p' "$dsl")
[ $((16#${node_count:-0})) -eq $((iommu_nodes + range_nodes)) ] ||
    die "Node count $node_count does not match the $((iommu_nodes + range_nodes)) nodes decoded"

# Compile the disassembly back. iasl stamps its own compiler id and revision
# (bytes 28..35) and so a new checksum (byte 9); everything else must match.
status=0
(cd "$work" && "$iasl" -p recompiled viot.dsl) >"$work/compile.log" 2>&1 || status=$?
[ "$status" -eq 0 ] || { cat "$work/compile.log" >&2; die "iasl could not recompile the disassembly"; }
grep -q '0 Errors, 0 Warnings' "$work/compile.log" ||
    { cat "$work/compile.log" >&2; die "recompiling the disassembly gave errors or warnings"; }
[ "$(stat -c %s "$work/recompiled.aml")" -eq "$(stat -c %s "$out")" ] ||
    die "recompiled table length differs from $out"
# cmp -l prints 1-based offsets: 10 is the checksum, 29..36 the creator fields.
diffs=$(cmp -l -- "$work/recompiled.aml" "$out" | awk '$1 != 10 && ($1 < 29 || $1 > 36)' || true)
[ -z "$diffs" ] || die "recompiled table differs from $out at (1-based offset, octal bytes): $diffs"

echo "viot_iasl: iasl decoded $out: $iommu_nodes Virtio-PCI IOMMU node, $range_nodes PCI Range node(s)"
grep -E 'Signature|Node count|Type :|PCI BDF|Endpoint start|Output node' "$dsl"
echo "viot_iasl: PASS"
