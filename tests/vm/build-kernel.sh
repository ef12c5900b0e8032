#!/usr/bin/env bash
# Builds the guest kernel of the VM test tier from the Debian linux-source package that setup.sh
# downloaded: tinyconfig + tests/vm/kernel-fragment.config, then bzImage and the uAPI headers.
#
# The result is cached in $VM_CACHE/kernel/KEY, KEY = package version + sha256 of the fragment;
# with a warm cache this returns in well under a second. stdout: the bzImage path (one line);
# progress and the make log tail on failure go to stderr. The kernel's exported uAPI headers are
# in the same directory, under headers/include.
#
# Environment: VM_CACHE, VM_FRAGMENT (default: kernel-fragment.config beside this script),
# VM_JOBS (make -j, default: number of CPUs).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$here/lib.sh"

frag=$(readlink -f "${VM_FRAGMENT:-$here/kernel-fragment.config}")
[[ -f $frag ]] || die "kernel config fragment $frag not found"
need_cmd dpkg-deb sha256sum tar xz make gcc flex bison bc flock rsync

deb=$(newest_kernel_deb)
[[ -n $deb ]] || die "no linux-source-*.deb in $VM_CACHE/debs: run tests/vm/setup.sh first"
pkg=$(dpkg-deb -f "$deb" Package)
ver=$(dpkg-deb -f "$deb" Version)
frag_sha=$(sha256sum "$frag" | cut -c1-16)
key="${pkg#linux-source-}_${ver//[^A-Za-z0-9.+~-]/_}_$frag_sha"
out=$VM_CACHE/kernel/$key
bzimage=$out/bzImage

if [[ -f $out/.done ]]; then
    log "kernel cached: $bzimage ($pkg $ver, fragment $frag_sha)"
    printf '%s\n' "$bzimage"
    exit 0
fi

mkdir -p "$VM_CACHE/kernel" "$VM_CACHE/src"
# One builder at a time per cache; a second caller waits, then finds the result cached.
exec 9>"$VM_CACHE/kernel/.lock"
flock 9
if [[ -f $out/.done ]]; then
    printf '%s\n' "$bzimage"
    exit 0
fi

t_start=$(now)
src=$VM_CACHE/src/${pkg}_${ver//[^A-Za-z0-9.+~-]/_}
if [[ ! -f $src/.extracted ]]; then
    log "extracting $(basename "$deb") into $src"
    rm -rf "$src" "$src.tmp"
    mkdir -p "$src.tmp"
    tarball=$(dpkg-deb -c "$deb" | awk '{ print $NF }' | grep -E '^\./usr/src/linux-source-[^/]+\.tar\.(xz|bz2|gz)$' | head -n 1)
    [[ -n $tarball ]] || die "$deb holds no usr/src/linux-source-*.tar.*"
    case $tarball in
        *.xz) unpack=(xz -dc -T0) ;;
        *.bz2) unpack=(bzip2 -dc) ;;
        *) unpack=(gzip -dc) ;;
    esac
    dpkg-deb --fsys-tarfile "$deb" | tar -xO "$tarball" | "${unpack[@]}" |
        tar -x -C "$src.tmp" --strip-components=1
    [[ -f $src.tmp/Makefile && -x $src.tmp/scripts/kconfig/merge_config.sh ]] ||
        die "extracted tree $src.tmp has no Makefile or scripts/kconfig/merge_config.sh"
    mv "$src.tmp" "$src"
    touch "$src/.extracted"
    log "extracted in $(elapsed "$t_start" "$(now)") s"
fi

# The object dir is kept across failed attempts: it belongs to this key alone (same source, same
# fragment), so a retry only rebuilds what is missing.
obj=$out/obj
mkdir -p "$obj"
rm -rf "$out/headers" "$bzimage"
blog=$out/build.log
: >"$blog"
kmake() {
    make -C "$src" O="$obj" ARCH=x86_64 "$@" >>"$blog" 2>&1 ||
        { tail -n 40 "$blog" >&2; die "make $* failed (full log: $blog)"; }
}

log "configuring: tinyconfig + $(basename "$frag")"
kmake tinyconfig
(cd "$obj" && "$src/scripts/kconfig/merge_config.sh" -m .config "$frag") >>"$blog" 2>&1 ||
    { tail -n 40 "$blog" >&2; die "merge_config.sh failed (full log: $blog)"; }
kmake olddefconfig

# Every option the fragment asks for must have survived olddefconfig: Kconfig silently drops an
# option whose dependencies are unmet, which would otherwise surface much later as an odd test
# failure in the guest.
lost=()
while IFS= read -r line; do
    grep -qxF "$line" "$obj/.config" || lost+=("$line")
done < <(grep -E '^CONFIG_[A-Za-z0-9_]+=y$' "$frag")
while IFS= read -r sym; do
    grep -qE "^$sym=[ym]$" "$obj/.config" && lost+=("# $sym is not set (but is =y)")
done < <(sed -nE 's/^# (CONFIG_[A-Za-z0-9_]+) is not set$/\1/p' "$frag")
# A symbol this kernel does not define at all (renamed, or newer than this kernel) is reported
# and skipped; a defined one that did not end up =y is an error.
if ((${#lost[@]})); then
    absent=()
    kept=()
    for line in "${lost[@]}"; do
        sym=${line%%=*}
        sym=${sym#\# }
        sym=${sym%% *}
        if grep -rqsE --include='Kconfig*' "^[[:space:]]*(menu)?config ${sym#CONFIG_}\$" "$src"; then
            kept+=("$line")
        else
            absent+=("$sym")
        fi
    done
    ((${#absent[@]} == 0)) ||
        log "not defined by $pkg $ver (skipped): ${absent[*]}"
    lost=("${kept[@]}")
fi
if ((${#lost[@]})); then
    printf '[vm-tier]   missing after olddefconfig: %s\n' "${lost[@]}" >&2
    die "${#lost[@]} requested kernel option(s) did not survive olddefconfig (unmet dependencies, or not in $pkg $ver); fix $frag"
fi
log "requested options verified: $(grep -cE '^CONFIG_[A-Za-z0-9_]+=y$' "$frag") =y lines in $(basename "$frag")"

t_build=$(now)
jobs=${VM_JOBS:-$(nproc)}
log "building bzImage with -j$jobs (cold build: minutes; log: $blog)"
kmake -j"$jobs" bzImage
kmake headers_install INSTALL_HDR_PATH="$out/headers"
cp "$obj/arch/x86/boot/bzImage" "$bzimage"
cp "$obj/.config" "$out/config"
printf 'package=%s\nversion=%s\nfragment_sha256=%s\nbuild_seconds=%s\n' "$pkg" "$ver" \
    "$(sha256sum "$frag" | cut -d' ' -f1)" "$(elapsed "$t_build" "$(now)")" >"$out/info"
touch "$out/.done"
log "built $bzimage ($(du -h "$bzimage" | cut -f1)) in $(elapsed "$t_start" "$(now)") s; headers: $out/headers/include"
printf '%s\n' "$bzimage"
