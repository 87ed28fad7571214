#!/usr/bin/env bash
# Installs a Shoal package on this machine, checks what it set up, runs its daemon, then
# removes and purges it and checks that nothing is left running or behind. Needs root and
# iproute2; meant for CI's fresh Debian machine (it installs the package system-wide).
#
#   packaging/deb/test.sh target/debian/shoal_VERSION_ARCH.deb
set -euo pipefail
deb="$1"
fail() { echo "packaging/deb/test.sh: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || fail "needs root"

dpkg -i "$deb"
getent group shoal >/dev/null || fail "no shoal group"
if getent passwd _apt >/dev/null; then
  id -nG _apt | tr ' ' '\n' | grep -qx shoal || fail "_apt is not in group shoal"
fi
[ "$(stat -c %a /var/lib/shoal)" = 700 ] || fail "/var/lib/shoal is not 0700"
[ "$(stat -c %G /var/cache/shoal)" = shoal ] || fail "/var/cache/shoal is not group shoal"
grep -q '^dir = "/var/cache/shoal"' /etc/shoal/shoal.toml || fail "the cache is not in /var/cache/shoal"
grep -qx /etc/shoal/shoal.toml /var/lib/dpkg/info/shoal.conffiles || fail "shoal.toml is no conffile"
# The man pages and completions came with it, and match the binary.
[ -s /usr/share/man/man1/shoal.1.gz ] || fail "no man page shoal.1"
[ -s /usr/share/man/man1/shoal-job-set.1.gz ] || fail "no man page shoal-job-set.1"
zcat /usr/share/man/man1/shoal-job-set.1.gz | grep -q 'proxy' || fail "shoal-job-set.1 lacks the proxy options"
grep -q '_shoal' /usr/share/bash-completion/completions/shoal || fail "no bash completion"
# apt's methods, under both names, answer as apt expects.
for m in shoal+http shoal+https; do
  /usr/lib/apt/methods/$m < /dev/null | head -1 | grep -qx '100 Capabilities' \
    || fail "/usr/lib/apt/methods/$m does not answer"
done

# The daemon as an admin without systemd starts it, in a network namespace of its own (only
# `lo`), so that the default mDNS never reaches this machine's network.
ns="shoal-pkg-$$"
ip netns add "$ns"
trap 'ip netns del "$ns" 2>/dev/null || true' EXIT
ip -n "$ns" link set lo up
if [ -d /run/systemd/system ]; then
  systemctl stop shoal.service
fi
ip netns exec "$ns" /usr/bin/shoal daemon --config /etc/shoal/shoal.toml \
  > /tmp/shoal-pkg-daemon.log 2>&1 &
for _ in $(seq 200); do
  [ -S /run/shoal/shoal.sock ] && break
  sleep 0.1
done
[ -S /run/shoal/shoal.sock ] || { cat /tmp/shoal-pkg-daemon.log >&2; fail "the daemon made no socket"; }
[ "$(stat -c %G /run/shoal/shoal.sock)" = shoal ] || fail "the socket is not group shoal"
/usr/bin/shoal status >/dev/null || fail "shoal status (root) fails"
if getent passwd _apt >/dev/null; then
  runuser -u _apt -- /usr/bin/shoal status >/dev/null || fail "_apt cannot use the daemon"
fi

dpkg -r shoal
if pgrep -f 'shoal daemon' >/dev/null; then fail "a daemon still runs after dpkg -r"; fi
[ ! -e /usr/bin/shoal ] || fail "/usr/bin/shoal is left"
[ ! -e /usr/lib/apt/methods/shoal+http ] || fail "the apt method is left"
[ -e /etc/shoal/shoal.toml ] || fail "dpkg -r removed the conffile (only purge should)"
dpkg -P shoal
for p in /etc/shoal /var/lib/shoal /var/cache/shoal; do
  [ ! -e "$p" ] || fail "$p is left after purge"
done
echo "packaging/deb/test.sh: $deb installs, serves, removes and purges cleanly"
