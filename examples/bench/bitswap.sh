#!/usr/bin/env bash
# What Bitswap costs against p2pmr's own block protocol, both ways, on a 256 MiB file (or
# CORPUS), interleaved rounds (build first: cargo build --release; npm ci in interop/):
#   read: a Helia node reading it from one daemon over Bitswap 1.2.0 (interop/bitswap.mjs,
#   js-libp2p over TCP + Noise + Yamux; its read time, Helia's start excluded) against
#   `p2pmr cat` from a client with no repository of its own (/mapreduce/block over TCP +
#   Noise + Yamux; wall time of the command);
#   fetch: a new daemon pinning it (`p2pmr pin add --replicas 1`, wall time) from a Helia node
#   that holds it (interop/bitswap-serve.mjs) against from a daemon that holds it.
#
#   examples/bench/bitswap.sh P2PMR_BIN CORPUS [ROUNDS]
#
# Prints each run and the medians with the Bitswap/own time ratios.
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
# A Helia node holding the same file, serving it until this script exits.
mkfifo "$work/helia.in"
(cd "$here/../../interop" && exec node bitswap-serve.mjs "$corpus") <"$work/helia.in" \
    >"$work/helia.json" 2>"$work/helia.err" &
pids+=($!)
exec 9>"$work/helia.in"
for _ in $(seq 1200); do [[ -s $work/helia.json ]] && break; sleep 0.1; done
helia=$(sed 's/.*"addr":"\([^"]*\)".*/\1/' "$work/helia.json")
grep -q "\"$cid\"" "$work/helia.json" || { echo "Helia's CID differs: $(cat "$work/helia.json")" >&2; exit 1; }
source "$here/daemons.sh"
# pin NAME PEER: wall time in ms of a new daemon NAME, told only of PEER, pinning the file.
pin() {
    start_daemon "$1" --peer "$2"
    local id t0 t1
    id=$(awk '/^peer id:/ {print $3; exit}' "$work/$1.out")
    t0=$(date +%s%N)
    "$bin" --home "$work/c$1" --no-mdns --peer "$(addr "$1")" pin add --replicas 1 \
        --daemon "$id" "$cid" >/dev/null 2>"$work/$1.pin"
    t1=$(date +%s%N)
    "$bin" --home "$work/$1" --no-mdns cat "$cid" | cmp - "$corpus"
    kill "${pids[-1]}"
    echo $(((t1 - t0) / 1000000))
}
own=() swap=() own_fetch=() swap_fetch=()
for r in $(seq "$rounds"); do
    t0=$(date +%s%N)
    "$bin" --home "$work/c$r" --no-mdns --peer "$addr" cat "$cid" | cmp - "$corpus"
    t1=$(date +%s%N)
    own+=($(((t1 - t0) / 1000000)))
    ms=$(cd "$here/../../interop" && node bitswap.mjs "$addr" "$corpus" "$cid" |
        sed 's/.*"ms":\([0-9]*\).*/\1/')
    swap+=("$ms")
    own_fetch+=("$(pin "f$r" "$addr")")
    swap_fetch+=("$(pin "h$r" "$helia")")
    echo "round $r: p2pmr cat ${own[-1]} ms, Helia over Bitswap $ms ms;" \
        "pin from a daemon ${own_fetch[-1]} ms, from Helia ${swap_fetch[-1]} ms"
done
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a / b}'; }
mib=$(($(stat -c %s "$corpus") >> 20))
mo=$(median "${own[@]}") ms=$(median "${swap[@]}")
fo=$(median "${own_fetch[@]}") fs=$(median "${swap_fetch[@]}")
echo "medians over $mib MiB: p2pmr cat $mo ms ($((mib * 1000 / mo)) MiB/s), Helia over Bitswap $ms ms" \
    "($((mib * 1000 / ms)) MiB/s); Bitswap/own time $(ratio "$ms" "$mo")"
echo "medians over $mib MiB: a daemon pinning from a daemon $fo ms ($((mib * 1000 / fo)) MiB/s)," \
    "from Helia over Bitswap $fs ms ($((mib * 1000 / fs)) MiB/s); Bitswap/own time $(ratio "$fs" "$fo")"
