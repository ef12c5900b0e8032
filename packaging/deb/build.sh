#!/usr/bin/env bash
# Builds the Debian package: target/debian/vhost-user-iommu_VERSION_ARCH.deb.
#
# With dpkg-deb, Debian's own tool (already on every Debian host, nothing else to install or
# trust; the tree is small and every file's place is written below). Layout:
#   /usr/libexec/vhost-user-iommu                      the daemon (QEMU's vhost-user backend place)
#   /usr/bin/vhost-user-iommu -> ../libexec/...        for operators: check, ctl, viot (the unit
#                                                      and the udev rule run it by this path too)
#   /usr/share/qemu/vhost-user/50-vhost-user-iommu.json  the descriptor, naming /usr/libexec
#   /usr/lib/systemd/system/vhost-user-iommu@.service  the template unit
#   /usr/lib/systemd/system/vhost-user-iommu-exporter.service  every VM's metrics over HTTP
#   /usr/lib/udev/rules.d/90-vhost-user-iommu.rules    device -> VM, VFIO cdev ownership
#   /usr/lib/sysusers.d/vhost-user-iommu.conf          the system user and group
#   /usr/lib/tmpfiles.d/vhost-user-iommu.conf          /run/vhost-user-iommu
#   /usr/share/man/man1/vhost-user-iommu.1.gz          generated from the command line (clap)
#   bash, zsh and fish completions                     generated from the command line
#   /usr/share/doc/vhost-user-iommu/                   deploying.md, README, SECURITY, an example
#   /etc/vhost-user-iommu/                             per-VM configs (the administrator's)
# Usage: packaging/deb/build.sh [OUTPUT_DIR]   (prints the .deb's path)
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-target/debian}
name=vhost-user-iommu
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
arch=$(dpkg --print-architecture)
[[ -n $version ]] || { echo "no version in Cargo.toml" >&2; exit 1; }

cargo build --release --quiet --bin "$name"
bin=target/release/$name

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
p=$stage/$name
doc=$p/usr/share/doc/$name
install -D -m 755 "$bin" "$p/usr/libexec/$name"
strip --strip-unneeded --remove-section=.comment "$p/usr/libexec/$name" 2>/dev/null || true
install -d "$p/usr/bin" "$p/etc/$name"
ln -s "../libexec/$name" "$p/usr/bin/$name"
install -d "$p/usr/share/qemu/vhost-user"
sed "s|\"binary\": \"/usr/bin/$name\"|\"binary\": \"/usr/libexec/$name\"|" \
    docs/qemu/50-vhost-user-iommu.json >"$p/usr/share/qemu/vhost-user/50-vhost-user-iommu.json"
grep -q "\"/usr/libexec/$name\"" "$p/usr/share/qemu/vhost-user/50-vhost-user-iommu.json" ||
    { echo "the descriptor's binary path was not rewritten" >&2; exit 1; }
install -D -m 644 "systemd/$name@.service" "$p/usr/lib/systemd/system/$name@.service"
install -D -m 644 "systemd/$name-exporter.service" "$p/usr/lib/systemd/system/$name-exporter.service"
install -D -m 644 "udev/90-$name.rules" "$p/usr/lib/udev/rules.d/90-$name.rules"
install -D -m 644 "systemd/$name.sysusers" "$p/usr/lib/sysusers.d/$name.conf"
install -D -m 644 "packaging/$name.tmpfiles" "$p/usr/lib/tmpfiles.d/$name.conf"
assets=$stage/assets
"$bin" assets --out "$assets"
install -D -m 644 "$assets/$name.1" "$p/usr/share/man/man1/$name.1"
gzip -9n "$p/usr/share/man/man1/$name.1"
install -D -m 644 "$assets/$name.bash" "$p/usr/share/bash-completion/completions/$name"
install -D -m 644 "$assets/_$name" "$p/usr/share/zsh/vendor-completions/_$name"
install -D -m 644 "$assets/$name.fish" "$p/usr/share/fish/vendor_completions.d/$name.fish"
install -D -m 644 docs/deploying.md "$doc/deploying.md"
install -m 644 README.md SECURITY.md "$doc/"
install -D -m 644 packaging/example-vm.toml "$doc/examples/vm.toml"
# The maintainer: DEBFULLNAME/DEBEMAIL (Debian's tools read the same), else a placeholder in
# the reserved .invalid domain (RFC 2606), which says plainly that nobody answers there.
maintainer="${DEBFULLNAME:-the $name authors} <${DEBEMAIL:-$name@packages.invalid}>"
date=$(date -R -d "@$(git log -1 --format=%ct 2>/dev/null || date +%s)")
# A native package: its changelog.gz is in Debian's format and points to the project's own.
gzip -9nc CHANGELOG.md >"$doc/CHANGELOG.md.gz"
gzip -9n >"$doc/changelog.gz" <<CHANGES
$name ($version) unstable; urgency=medium

  * Built from the $name repository at $(git rev-parse --short HEAD 2>/dev/null || echo unknown);
    what changed is in /usr/share/doc/$name/CHANGELOG.md.gz.

 -- $maintainer  $date
CHANGES
cat >"$doc/copyright" <<COPYRIGHT
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: $name
License: Apache-2.0 or BSD-3-Clause

Files: *
Copyright: 2026 the $name authors
License: Apache-2.0 or BSD-3-Clause

License: Apache-2.0
 On Debian systems the full text of the Apache License 2.0 is in
 /usr/share/common-licenses/Apache-2.0.

License: BSD-3-Clause
 Redistribution and use in source and binary forms, with or without modification, are
 permitted provided that the following conditions are met:
 .
 1. Redistributions of source code must retain the above copyright notice, this list of
    conditions and the following disclaimer.
 .
 2. Redistributions in binary form must reproduce the above copyright notice, this list of
    conditions and the following disclaimer in the documentation and/or other materials
    provided with the distribution.
 .
 3. Neither the name of the copyright holder nor the names of its contributors may be used to
    endorse or promote products derived from this software without specific prior written
    permission.
 .
 THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS "AS IS" AND ANY EXPRESS
 OR IMPLIED WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE IMPLIED WARRANTIES OF
 MERCHANTABILITY AND FITNESS FOR A PARTICULAR PURPOSE ARE DISCLAIMED. IN NO EVENT SHALL THE
 COPYRIGHT HOLDER OR CONTRIBUTORS BE LIABLE FOR ANY DIRECT, INDIRECT, INCIDENTAL, SPECIAL,
 EXEMPLARY, OR CONSEQUENTIAL DAMAGES (INCLUDING, BUT NOT LIMITED TO, PROCUREMENT OF SUBSTITUTE
 GOODS OR SERVICES; LOSS OF USE, DATA, OR PROFITS; OR BUSINESS INTERRUPTION) HOWEVER CAUSED AND
 ON ANY THEORY OF LIABILITY, WHETHER IN CONTRACT, STRICT LIABILITY, OR TORT (INCLUDING
 NEGLIGENCE OR OTHERWISE) ARISING IN ANY WAY OUT OF THE USE OF THIS SOFTWARE, EVEN IF ADVISED
 OF THE POSSIBILITY OF SUCH DAMAGE.
COPYRIGHT

install -d "$p/DEBIAN"
install -m 755 packaging/deb/postinst packaging/deb/prerm packaging/deb/postrm "$p/DEBIAN/"
(cd "$p" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z |
    xargs -0 md5sum >DEBIAN/md5sums)
size=$(du -sk --exclude=DEBIAN "$p" | cut -f1)
cat >"$p/DEBIAN/control" <<CONTROL
Package: $name
Version: $version
Architecture: $arch
Maintainer: $maintainer
Installed-Size: $size
Depends: libc6 (>= 2.34), adduser
Recommends: systemd, udev
Suggests: qemu-system-x86
Section: admin
Priority: optional
Description: virtio-iommu device over vhost-user, backed by iommufd
 One daemon per VM serves a virtio-iommu device to the VM over
 vhost-user, turns the guest driver's ATTACH/DETACH/MAP/UNMAP/PROBE
 requests into iommufd operations, and serves each passed-through
 device to the VMM over vfio-user, so stock QEMU runs the VM unpatched.
CONTROL
mkdir -p "$out"
deb="$out/${name}_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zxz --build "$p" "$deb" >/dev/null
printf '%s\n' "$deb"
