#!/usr/bin/env bash
# What Bitswap costs against p2pmr's own block protocol: a 256 MiB file (or CORPUS) read from
# one daemon by a Helia node over Bitswap 1.2.0 (interop/bitswap.mjs, js-libp2p over TCP +
# Noise + Yamux; its read time, Helia's start excluded) and by `p2pmr cat` from a client with
# no repository of its own (/mapreduce/block over TCP + Noise + Yamux; wall time of the
# command), interleaved (build first: cargo build --release; npm ci in interop/):
#
#   examples/bench/bitswap.sh P2PMR_BIN CORPUS [ROUNDS]
#
# Prints each run and the medians with the Bitswap/own time ratio.
set -euo pipefail
bin=$(realpath "$1") corpus=$(realpath "$2") rounds=${3:-5}
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
cid=$("$bin" --home "$work/d" --no-mdns add --local "$corpus")
"$bin" --home "$work/d" --no-mdns daemon --listen /ip4/127.0.0.1/tcp/0 --api off \
    >"$work/d.out" 2>"$work/d.err" &
pids+=($!)
for _ in $(seq 200); do
    grep -q "^listening on" "$work/d.out" 2>/dev/null && break
    sleep 0.05
done
addr=$(awk '/^listening on/ {print $3; exit}' "$work/d.out")
own=() swap=()
for r in $(seq "$rounds"); do
    t0=$(date +%s%N)
    "$bin" --home "$work/c$r" --no-mdns --peer "$addr" cat "$cid" | cmp - "$corpus"
    t1=$(date +%s%N)
    own+=($(((t1 - t0) / 1000000)))
    ms=$(cd "$here/../../interop" && node bitswap.mjs "$addr" "$corpus" "$cid" |
        sed 's/.*"ms":\([0-9]*\).*/\1/')
    swap+=("$ms")
    echo "round $r: p2pmr cat ${own[-1]} ms, Helia over Bitswap $ms ms"
done
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}'; }
mo=$(median "${own[@]}") ms=$(median "${swap[@]}")
mib=$(($(stat -c %s "$corpus") >> 20))
echo "medians over $mib MiB: p2pmr cat $mo ms ($((mib * 1000 / mo)) MiB/s), Helia over Bitswap $ms ms" \
    "($((mib * 1000 / ms)) MiB/s); Bitswap/own time $(awk -v a="$ms" -v b="$mo" 'BEGIN {printf "%.2f", a / b}')"
