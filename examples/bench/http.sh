#!/usr/bin/env bash
# add and cat through the HTTP API against the same through the CLI, interleaved, on one
# binary (build it first: cargo build --release):
#
#   examples/bench/http.sh P2PMR_BIN CORPUS [ROUNDS]
#
# Two daemons on 127.0.0.1; the first serves the API. Each round adds CORPUS with a distinct
# first line (so no round finds its blocks already stored) through `p2pmr add --replicas 1`
# (a client process pushing over the network) and through `POST /api/v0/add` (curl, streamed
# multipart; the daemon stages the upload and keeps it), then reads the first added file back
# with `p2pmr cat` and with `POST /api/v0/cat` (curl). Prints each run and the medians with
# the API/CLI time ratios (below 1: the API is faster).
set -euo pipefail
bin=$(realpath "$1") corpus=$2 rounds=${3:-5}
work=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
start() { # NAME [PEER]
    "$bin" --home "$work/$1" --no-mdns ${2:+--peer "$2"} daemon --listen /ip4/127.0.0.1/tcp/0 \
        --api 127.0.0.1:0 >"$work/$1.out" 2>"$work/$1.err" &
    pids+=($!)
    for _ in $(seq 200); do
        grep -q "^listening on" "$work/$1.out" 2>/dev/null && break
        sleep 0.05
    done
}
start d1
p1=$(grep -m1 '^listening on' "$work/d1.out" | awk '{print $3}')
start d2 "$p1"
p2=$(grep -m1 '^listening on' "$work/d2.out" | awk '{print $3}')
api=$(grep -m1 '^api listening on' "$work/d1.out" | awk '{print $4}')
sleep 1
client() { "$bin" --home "$work/c" --no-mdns --peer "$p1" --peer "$p2" "$@"; }
now() { date +%s%N; }
secs() { awk -v n=$(($2 - $1)) 'BEGIN { printf "%.4f", n / 1e9 }'; }
first=""
for r in $(seq "$rounds"); do
    s=$(now)
    cid=$( { echo "cli round $r"; cat "$corpus"; } | client add --replicas 1 -)
    echo "cli add $(secs "$s" "$(now)")"
    first=${first:-$cid}
    s=$(now)
    { echo "api round $r"; cat "$corpus"; } |
        curl -sf -X POST -F file=@- "$api/api/v0/add" >/dev/null
    echo "api add $(secs "$s" "$(now)")"
    s=$(now)
    client cat "$first" >/dev/null
    echo "cli cat $(secs "$s" "$(now)")"
    s=$(now)
    curl -sf -X POST "$api/api/v0/cat?arg=$first" >/dev/null
    echo "api cat $(secs "$s" "$(now)")"
done | tee "$work/runs"
median() {
    awk -v w="$1" -v k="$2" '$1 == w && $2 == k { print $3 }' "$work/runs" | sort -g |
        awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}
mb=$(stat -c %s "$corpus")
for op in add cat; do
    c=$(median cli $op) a=$(median api $op)
    awk -v op=$op -v c="$c" -v a="$a" -v mb="$mb" 'BEGIN {
        printf "%s: CLI median %.3f s (%.0f MB/s), API median %.3f s (%.0f MB/s), API/CLI time %.2f\n",
            op, c, mb / 1e6 / c, a, mb / 1e6 / a, a / c }'
done
