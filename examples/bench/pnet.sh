#!/usr/bin/env bash
# What a private swarm costs: `p2pmr cat` of CORPUS from a daemon in a private swarm (pnet's
# stream cipher under Noise, TCP) against the same from a daemon without a key (TCP, Noise),
# interleaved, on one binary (build it first: cargo build --release):
#
#   examples/bench/pnet.sh P2PMR_BIN CORPUS [ROUNDS]
#
# Each daemon holds CORPUS in its own repository (added with --local before it starts); each
# round a client with no repository of its own reads it from one daemon and then the other,
# so every block crosses the network. Prints each run and the medians with the
# private/plain time ratio.
set -euo pipefail
bin=$(realpath "$1") corpus=$2 rounds=${3:-5}
work=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
"$bin" swarm-key new "$work/swarm.key" >/dev/null
source "$(dirname "$0")/daemons.sh"
start() { # NAME [global args...]
    "$bin" --home "$work/$1" --no-mdns add --local "$corpus" >"$work/$1.cid"
    start_daemon "$@"
}
start plain
start private --swarm-key "$work/swarm.key"
cid=$(cat "$work/plain.cid")
for r in $(seq "$rounds"); do
    s=$(now)
    "$bin" --home "$work/none" --no-mdns --peer "$(addr plain)" cat "$cid" | cmp - "$corpus"
    echo "plain cat $(secs "$s" "$(now)")"
    s=$(now)
    "$bin" --home "$work/none" --no-mdns --swarm-key "$work/swarm.key" --peer "$(addr private)" \
        cat "$cid" | cmp - "$corpus"
    echo "private cat $(secs "$s" "$(now)")"
done | tee "$work/runs"
median() { awk -v w="$1" '$1 == w { print $3 }' "$work/runs" | median_of; }
mb=$(stat -c %s "$corpus")
p=$(median plain) q=$(median private)
awk -v p="$p" -v q="$q" -v mb="$mb" 'BEGIN {
    printf "cat: plain median %.3f s (%.0f MB/s), private median %.3f s (%.0f MB/s), private/plain time %.2f\n",
        p, mb / 1e6 / p, q, mb / 1e6 / q, q / p }'
