#!/usr/bin/env bash
# LAN test of a private swarm: peers that hold the swarm key find each other by mDNS alone,
# and a peer without it is refused.
#
# Five network namespaces on one bridge (in a sixth, "switch" namespace), addresses
# 10.79.0.1-5 that exist only inside them. Daemons in namespaces 1-3 share a new swarm key
# (in their repositories, as kubo keeps it) and no --peer. From namespace 4, with the key, a
# client sees the three, adds a 16 MiB file with 2 replicas and reads it back bit-exact. From
# namespace 5, without the key, a client finds no one it can talk to and says why in one line.
# Everything is removed on every exit path.
#
# Needs root and iproute2. Usage: examples/lan/private.sh [path/to/p2pmr]
set -euo pipefail

source "$(dirname "$0")/netns.sh"
# Namespaces "p2pmr-pnet-$$-1".."-5" at 10.79.0.1-5, host-side links "p2p$$h1"...
lan_start p2pmr-pnet-$$ p2p$$h 10.79.0 5 "${1:-}"
"$bin" swarm-key new "$work/swarm.key" >/dev/null
for i in 1 2 3; do
    mkdir -p "$work/d$i"
    cp "$work/swarm.key" "$work/d$i/swarm.key"
done
lan_daemons 3
if grep -q "/quic" "$work"/d*.out; then
    echo "a daemon of a private swarm listens on QUIC:" >&2; cat "$work"/d*.out >&2; exit 1
fi
echo "lan: 3 daemons of a private swarm up, TCP only"

member=(--home "$work/none" --swarm-key "$work/swarm.key")
seen=$(in_ns 4 "$bin" "${member[@]}" peers | wc -l)
[[ $seen -eq 3 ]] || { echo "a member in namespace 4 saw $seen daemons, not 3" >&2; exit 1; }
head -c $((16 << 20)) /dev/urandom >"$work/file"
cid=$(in_ns 4 "$bin" "${member[@]}" add --replicas 2 "$work/file")
in_ns 4 "$bin" "${member[@]}" cat "$cid" | cmp - "$work/file"
echo "lan: a member found the 3 by mDNS, added and read back 16 MiB as $cid"

if in_ns 5 "$bin" --home "$work/none" peers >"$work/stranger.out" 2>"$work/stranger.err"; then
    echo "a peer without the key was let in:" >&2; cat "$work/stranger.out" >&2; exit 1
fi
grep -q "handshake failed: wrong or missing swarm key?" "$work/stranger.err" || {
    echo "a peer without the key was not told why:" >&2; cat "$work/stranger.err" >&2; exit 1; }
[[ $(wc -l <"$work/stranger.err") -eq 1 ]] || {
    echo "more than one line for a peer without the key:" >&2; cat "$work/stranger.err" >&2; exit 1; }
echo "lan: a peer without the key in namespace 5 was refused: $(cat "$work/stranger.err")"
