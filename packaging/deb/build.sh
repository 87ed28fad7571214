#!/usr/bin/env bash
# Builds shoal_VERSION_ARCH.deb with Debian's own tools (dpkg-shlibdeps, dpkg-deb).
#
#   packaging/deb/build.sh [--debug] [--out DIR]
#
# --debug packages the debug build the tests use (what CI installs to test the package,
# without a release build); the default is the release build. The .deb goes to DIR (default
# target/debian).
# Contents: /usr/bin/shoal; the apt method /usr/lib/shoal/shoal-apt with its links
# /usr/lib/apt/methods/shoal+http and shoal+https; the systemd unit; /etc/shoal/shoal.toml (a
# conffile); and the maintainer scripts beside this file, which create the `shoal` group (with
# `_apt` in it), /var/lib/shoal and /var/cache/shoal. See docs/apt.md.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
profile=release
out="$root/target/debian"
while [ $# -gt 0 ]; do
  case "$1" in
    --debug) profile=debug ;;
    --out) out="$2"; shift ;;
    *) echo "build.sh: unknown argument $1 (use --debug, --out DIR)" >&2; exit 2 ;;
  esac
  shift
done

cd "$root"
if [ "$profile" = release ]; then
  cargo build --release --locked -p shoal-node --bins
else
  # The binaries the test suite builds and runs (`cargo test --workspace` builds the bins its
  # tests call, with the workspace's features unified): after the tests this builds nothing,
  # where `cargo build -p shoal-node --bins` rebuilt a third of the tree with fewer features
  # (3 min 21 s of a cold CI run).
  cargo test --workspace --locked --no-run
fi
bin="${CARGO_TARGET_DIR:-$root/target}/$profile"
version="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)"
arch="$(dpkg --print-architecture)"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
stage="$work/shoal"
install -D -m 0755 "$bin/shoal" "$stage/usr/bin/shoal"
install -D -m 0755 "$bin/shoal-apt" "$stage/usr/lib/shoal/shoal-apt"
install -d "$stage/usr/lib/apt/methods"
ln -s ../../shoal/shoal-apt "$stage/usr/lib/apt/methods/shoal+http"
ln -s ../../shoal/shoal-apt "$stage/usr/lib/apt/methods/shoal+https"
# The unit runs the packaged binary.
install -d "$stage/lib/systemd/system"
sed 's|/usr/local/bin/shoal|/usr/bin/shoal|g' configs/shoal.service \
  > "$stage/lib/systemd/system/shoal.service"
chmod 0644 "$stage/lib/systemd/system/shoal.service"
# The default configuration, with the cache in /var/cache/shoal.
install -d "$stage/etc/shoal"
sed 's|^# dir = "/var/cache/shoal"|dir = "/var/cache/shoal"|' configs/shoal.toml \
  > "$stage/etc/shoal/shoal.toml"
chmod 0644 "$stage/etc/shoal/shoal.toml"
grep -q '^dir = "/var/cache/shoal"' "$stage/etc/shoal/shoal.toml" \
  || { echo "build.sh: configs/shoal.toml has no cache dir line to set" >&2; exit 1; }
# Man pages (clap_mangen) and shell completions (clap_complete), made by the binary itself
# from its command-line definition, so that they always match it.
"$bin/shoal" man --out "$work/man"
install -d "$stage/usr/share/man/man1"
for page in "$work"/man/*.1; do
  gzip -9n < "$page" > "$stage/usr/share/man/man1/$(basename "$page").gz"
done
install -d "$stage/usr/share/bash-completion/completions" \
  "$stage/usr/share/zsh/vendor-completions" "$stage/usr/share/fish/vendor_completions.d"
"$bin/shoal" completions bash > "$stage/usr/share/bash-completion/completions/shoal"
"$bin/shoal" completions zsh > "$stage/usr/share/zsh/vendor-completions/_shoal"
"$bin/shoal" completions fish > "$stage/usr/share/fish/vendor_completions.d/shoal.fish"
install -D -m 0644 README.md "$stage/usr/share/doc/shoal/README.md"
install -D -m 0644 docs/apt.md "$stage/usr/share/doc/shoal/apt.md"
cat > "$stage/usr/share/doc/shoal/copyright" <<COPY
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: shoal
License: MIT OR Apache-2.0
COPY

# Dependencies from the binaries' shared libraries, by Debian's own tool.
mkdir -p "$work/debian"
printf 'Source: shoal\nMaintainer: Shoal developers <shoal@localhost>\n\nPackage: shoal\nArchitecture: any\n' \
  > "$work/debian/control"
depends="$(cd "$work" && dpkg-shlibdeps -O -e shoal/usr/bin/shoal -e shoal/usr/lib/shoal/shoal-apt \
  2>/dev/null | sed -n 's/^shlibs:Depends=//p')"
size="$(du -sk "$stage" | cut -f1)"

install -d "$stage/DEBIAN"
cat > "$stage/DEBIAN/control" <<CONTROL
Package: shoal
Version: $version
Architecture: $arch
Maintainer: Shoal developers <shoal@localhost>
Installed-Size: $size
Depends: $depends, adduser, passwd
Recommends: apt
Section: net
Priority: optional
Description: peer-to-peer delivery optimization node (BITS and Delivery Optimization)
 Shoal fetches files in pieces from LAN peers, cache nodes and the origin,
 verifies every piece and every file, and falls back to the origin when a
 peer serves bad data. This package holds the node and daemon (shoal), its
 systemd unit, and apt's shoal+http and shoal+https methods.
CONTROL
echo /etc/shoal/shoal.toml > "$stage/DEBIAN/conffiles"
for s in postinst prerm postrm; do
  install -m 0755 "$here/$s" "$stage/DEBIAN/$s"
done

mkdir -p "$out"
deb="$out/shoal_${version}_${arch}.deb"
# A debug package is only for tests: not compressed, so it builds in seconds.
compress=-Zxz
[ "$profile" = release ] || compress=-Znone
dpkg-deb --root-owner-group "$compress" --build "$stage" "$deb" >/dev/null
echo "$deb"
