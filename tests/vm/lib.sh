# shellcheck shell=bash
# Helpers shared by the VM test tier scripts (sourced, never run).
#
# Everything the tier downloads or builds lives in VM_CACHE, outside the repository:
#   debs/         linux-source-*.deb fetched by setup.sh
#   apt/NAME/     private apt sources lists and package lists (never the host's)
#   src/          extracted kernel trees, one per package version
#   kernel/KEY/   one built kernel per (package version, fragment hash): bzImage, headers/, config
#   target/static cargo target dir of the static builds (daemon and guest programs)
#   run/, logs/   initramfs images and console logs of run.sh

VM_CACHE=${VM_CACHE:-/var/cache/vhost-user-iommu-vm}
VM_KEYRING=${VM_KEYRING:-/usr/share/keyrings/debian-archive-keyring.gpg}

# No silent exits under `set -e`: name the command that failed.
on_err() {
    printf '[vm-tier] ERROR: %s:%s: "%s" failed (status %s)\n' "$3" "$2" "$4" "$1" >&2
}
trap 'on_err $? $LINENO "${BASH_SOURCE[0]}" "$BASH_COMMAND"' ERR

log() { printf '[vm-tier] %s\n' "$*" >&2; }
die() { printf '[vm-tier] ERROR: %s\n' "$*" >&2; exit 1; }

need_cmd() {
    local c
    for c in "$@"; do
        command -v "$c" >/dev/null 2>&1 || die "missing command '$c': run tests/vm/setup.sh"
    done
}

# Static builds from the repository's one Cargo workspace, one target dir for every tier:
# `static_build PROFILE PACKAGE...` (release for the daemon, guest for the guest programs), and
# `static_bin PROFILE NAME` for the binary's path.
STATIC_TARGET=$VM_CACHE/target/static
static_build() {
    local profile=$1 repo_root
    shift
    repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
    local -a pkgs=()
    local p
    for p in "$@"; do pkgs+=(-p "$p"); done
    forget_other_checkout "$repo_root"
    (cd "$repo_root" && CARGO_TARGET_DIR=$STATIC_TARGET RUSTFLAGS="-C target-feature=+crt-static" \
        cargo build --quiet --locked --profile "$profile" --target x86_64-unknown-linux-gnu "${pkgs[@]}")
}
# forget_other_checkout REPO_ROOT: cargo calls a package fresh when its sources are older than
# its last build, and the workspace's packages have the same identity in every checkout: after a
# fresh clone's run (its files all new) built here, an edit made earlier in another checkout
# looked built, and that checkout's tiers ran the clone's binaries (seen: an L2 program without
# the edit). So when the checkout changes, its own packages' build records go (their
# dependencies stay built).
forget_other_checkout() {
    local root=$1 mark=$STATIC_TARGET/.checkout member name
    [ "$(cat "$mark" 2>/dev/null)" = "$root" ] && return 0
    for member in . $(sed -n '/^members = \[/,/^\]/s/^ *"\(.*\)",*$/\1/p' "$root/Cargo.toml"); do
        name=$(sed -n 's/^name = "\(.*\)"$/\1/p' "$root/$member/Cargo.toml" | head -n 1)
        [ -n "$name" ] && rm -rf "$STATIC_TARGET"/x86_64-unknown-linux-gnu/*/.fingerprint/"$name"-*
    done
    mkdir -p "$STATIC_TARGET"
    printf '%s\n' "$root" >"$mark"
}
static_bin() { printf '%s\n' "$STATIC_TARGET/x86_64-unknown-linux-gnu/$1/$2"; }

# Seconds since the epoch with microseconds, for phase timings.
now() { printf '%s' "$EPOCHREALTIME"; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

# Phase timings: `phase_end NAME` records the time since the previous phase ended (or since the
# script sourced this file); `print_timings` logs them and the total. PHASE_WIDTH pads the names.
declare -a timings=()
phase_start=$(now)
t_total=$phase_start
PHASE_WIDTH=${PHASE_WIDTH:-14}
phase_end() {
    local t
    t=$(now)
    timings+=("$(printf '%-*s %6s s' "$PHASE_WIDTH" "$1" "$(elapsed "$phase_start" "$t")")")
    phase_start=$t
}
print_timings() {
    local line
    log "phase timings:"
    for line in "${timings[@]}"; do log "  $line"; done
    log "  $(printf '%-*s %6s s' "$PHASE_WIDTH" total "$(elapsed "$t_total" "$(now)")")"
}

# Installed version of a Debian package according to `apt-cache policy`, or nothing.
installed_version() {
    apt-cache policy "$1" 2>/dev/null | awk '$1 == "Installed:" && $2 != "(none)" { print $2 }'
}

# The packages among "$@" that `apt-cache policy` (one call) reports as not installed.
not_installed() {
    local out
    out=$(apt-cache policy "$@" 2>/dev/null | awk '
        /^[^ ]/ { pkg = $1; sub(/:$/, "", pkg) }
        $1 == "Installed:" && $2 != "(none)" { print pkg }
    ')
    local p
    for p in "$@"; do
        grep -qxF "$p" <<<"$out" || printf '%s\n' "$p"
    done
}

# The Debian mirror URI the host itself uses, read from the `URIs:` line of its deb822 sources
# (/etc/apt/sources.list.d/*.sources, then the one-line /etc/apt/sources.list as a fallback).
# $1 = "archive" (a suite such as bookworm or bookworm-updates) or "security" (*-security).
# No host name is ever written by these scripts: the private lists reuse this URI.
host_mirror_uri() {
    local want=$1 uri=""
    local -a files=()
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -f $f ]] && files+=("$f")
    done
    if ((${#files[@]})); then
        uri=$(awk -v want="$want" '
            function debian_suite(s) {
                return s ~ /^(bullseye|bookworm|trixie|forky|duke|sid|oldstable|stable|testing|unstable)(-updates|-backports|-security|-proposed-updates)?$/
            }
            function flush(   n, i, s, sec) {
                if (uri != "" && found == "" && enabled != "no" && types ~ /(^| )deb( |$)/) {
                    n = split(suites, s, " ")
                    for (i = 1; i <= n; i++) {
                        if (!debian_suite(s[i])) continue
                        sec = (s[i] ~ /-security$/)
                        if ((want == "security") == sec) { found = uri; break }
                    }
                }
                uri = ""; suites = ""; types = ""; enabled = ""
            }
            FNR == 1 { flush() }
            /^[[:space:]]*#/ { next }
            /^[[:space:]]*$/ { flush(); next }
            tolower($1) == "uris:"    { uri = $2 }
            tolower($1) == "suites:"  { $1 = ""; suites = $0 }
            tolower($1) == "types:"   { $1 = ""; types = $0 }
            tolower($1) == "enabled:" { enabled = tolower($2) }
            END { flush(); if (found != "") print found }
        ' "${files[@]}")
    fi
    if [[ -z $uri && -f /etc/apt/sources.list ]]; then
        uri=$(awk -v want="$want" '
            $1 != "deb" { next }
            { i = 2; if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ } }
            { sec = ($(i + 1) ~ /-security$/); if ((want == "security") == sec) { print $i; exit } }
        ' /etc/apt/sources.list)
    fi
    printf '%s' "${uri%/}"
}

# Sets up a private apt configuration NAME holding the given one-line `deb` entries and fills the
# global array APT_PRIV with the apt options that select it. The host's own sources, lists and
# caches are left untouched.
private_apt() {
    local name=$1
    shift
    local dir=$VM_CACHE/apt/$name
    mkdir -p "$dir/lists/partial"
    printf '%s\n' "# generated by tests/vm/setup.sh; mirror URI taken from the host's apt config" \
        "$@" >"$dir/sources.list"
    # shellcheck disable=SC2034 # read by the scripts that source this file
    APT_PRIV=(
        -o "Dir::Etc::SourceList=$dir/sources.list"
        -o "Dir::Etc::SourceParts=/dev/null"
        -o "Dir::State::Lists=$dir/lists"
        -o "Dir::Cache::pkgcache="
        -o "Dir::Cache::srcpkgcache="
    )
}

# Newest linux-source .deb in the cache (by Debian version order), or nothing.
newest_kernel_deb() {
    local f best="" bestv="" v
    for f in "$VM_CACHE"/debs/linux-source-*.deb; do
        [[ -f $f ]] || continue
        v=$(dpkg-deb -f "$f" Version)
        if [[ -z $best ]] || dpkg --compare-versions "$v" gt "$bestv"; then
            best=$f
            bestv=$v
        fi
    done
    printf '%s' "$best"
}
