#!/bin/bash
# A/B of two `shoal` binaries, one seed to one leecher, alternating: for each round and build,
# a `shoal seed FILE` of that build on 127.0.0.1 and a `shoal get` of the same build from it
# (URL is the file at an origin, which the leecher may probe; the seed has every piece). Prints per run: round,
# build, leecher wall s, user s, system s, peak RSS KiB (GNU time), and the seed's CPU s while
# it served (from /proc). Usage:
#   tests/bench/ab-seed-leecher.sh BEFORE AFTER FILE URL [ROUNDS] [OUT_DIR]
# FILE is best on tmpfs; OUT_DIR (default /dev/shm) receives the leecher's file.
set -euo pipefail
before=$1 after=$2 file=$3 url=$4 rounds=${5:-5} out=${6:-/dev/shm}
b3=$("$before" hash "$file" | awk '/^blake3/ {print $2}')
cpu() { awk '{print ($14 + $15) / 100}' "/proc/$1/stat"; }
for round in $(seq 1 "$rounds"); do
  for build in before after; do
    bin=${!build}
    log=$(mktemp)
    "$bin" seed "$file" --no-mdns --listen /ip4/127.0.0.1/tcp/23001 >"$log" 2>/dev/null &
    seed=$!
    until grep -q "$b3" "$log"; do sleep 0.1; done
    c0=$(cpu "$seed")
    rm -f "$out/ab.bin"
    sync
    /usr/bin/time -o "$log.time" -f "%e %U %S %M" "$bin" get "$url" \
      -o "$out/ab.bin" --blake3 "$b3" --no-mdns --peer /ip4/127.0.0.1/tcp/23001 >/dev/null 2>&1
    c1=$(cpu "$seed")
    kill "$seed"
    wait "$seed" 2>/dev/null || true
    echo "$round $build $(cat "$log.time") seed-cpu $(echo "$c1 - $c0" | bc)"
    rm -f "$log" "$log.time" "$out/ab.bin"
  done
done
