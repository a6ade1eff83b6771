#!/usr/bin/env bash
# LAN test: p2pmr peers that find each other by mDNS alone.
#
# Six network namespaces hang off one bridge (itself inside a seventh, "switch" namespace),
# with addresses 10.77.0.1-6 that exist only inside them. Daemons run in namespaces 1-4 with
# default settings and no --peer. From namespace 5 a 64 MiB file is added with 2 replicas;
# one daemon is then killed with SIGKILL, and the file is read back bit-exact from namespace 6.
# Everything is removed on every exit path.
#
# Needs root and iproute2. Usage: examples/lan/run.sh [path/to/p2pmr]
set -euo pipefail

source "$(dirname "$0")/netns.sh"
# Namespaces "p2pmr-lan-$$-1".."-6" at 10.77.0.1-6, host-side links "p2pmr$$h1"...
lan_start p2pmr-lan-$$ p2pmr$$h 10.77.0 6 "${1:-}"
lan_daemons 4
echo "lan: 4 daemons up: $(grep -h '^peer id' "$work"/d*.out | cut -d' ' -f3 | tr '\n' ' ')"

head -c $((64 << 20)) /dev/urandom >"$work/file"
# The clients have no repository and no --peer: mDNS is all they have.
seen=$(in_ns 5 "$bin" --home "$work/none" peers | wc -l)
[[ $seen -eq 4 ]] || { echo "peers from namespace 5 saw $seen daemons, not 4" >&2; exit 1; }
cid=$(in_ns 5 "$bin" --home "$work/none" add --replicas 2 "$work/file")
echo "lan: added 64 MiB from namespace 5 as $cid"
in_ns 5 "$bin" --home "$work/none" stat "$cid"

kill -9 "${pids[0]}"
wait "${pids[0]}" 2>/dev/null || true
if kill -0 "${pids[0]}" 2>/dev/null || pgrep -f -- "--home $work/d1 daemon" >/dev/null; then
    echo "the daemon in namespace 1 is still running" >&2; exit 1
fi
echo "lan: killed the daemon in namespace 1"
in_ns 6 "$bin" --home "$work/none" cat "$cid" | cmp - "$work/file"
[[ ! -e $work/none ]] || { echo "a client created a repository" >&2; exit 1; }
echo "lan: read back bit-exact from namespace 6 with one daemon dead: ok"
