#!/usr/bin/env bash
# What verified execution costs: `p2pmr run --job wordcount` on CORPUS with `--verify 2`
# against the same job without it, interleaved, on the same daemons and binary (build it first:
# cargo build --release):
#
#   examples/bench/verify.sh P2PMR_BIN CORPUS [ROUNDS] [DAEMONS]
#
# DAEMONS (3 by default) daemons on 127.0.0.1 hold CORPUS with 2 replicas. Every run has its
# own --arg, so no job is answered from an earlier one's output. Prints each run and the
# medians with the verified/plain time ratio; every run's output is checked against the first
# plain run's.
set -euo pipefail
bin=$(realpath "$1") corpus=$2 rounds=${3:-3} daemons=${4:-3}
work=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
source "$(dirname "$0")/daemons.sh"
start_chain d "$daemons"
mapfile -t all < <(peer_args d "$daemons")
client() { "$bin" --home "$work/client" --no-mdns "${all[@]}" "$@"; }
cid=$(client add --replicas 2 "$corpus" 2>/dev/null)
# The output's lines, whatever the partitioning: the same for every run of the same input.
lines() { client cat "$1" | sort | sha256sum | cut -c1-16; }
client run --job wordcount --input "$cid" --reducers 2 --arg warm=1 --json >/dev/null
want=""
for r in $(seq "$rounds"); do
    for which in plain verified; do
        extra=()
        [ "$which" = verified ] && extra=(--verify 2)
        s=$(now)
        out=$(client run --job wordcount --input "$cid" --reducers 2 --arg round="$r" \
            "${extra[@]}" 2>/dev/null | tail -1)
        t=$(secs "$s" "$(now)")
        got=$(lines "$out")
        [ -n "$want" ] || want=$got
        [ "$got" = "$want" ] || { echo "$which run $r: output differs" >&2; exit 1; }
        echo "$which run $t"
    done
done | tee "$work/runs"
median() { awk -v w="$1" '$1 == w { print $3 }' "$work/runs" | median_of; }
mb=$(stat -c %s "$corpus")
p=$(median plain) q=$(median verified)
awk -v p="$p" -v q="$q" -v mb="$mb" -v n="$daemons" 'BEGIN {
    printf "wordcount on %d daemons: plain median %.3f s (%.0f MB/s), --verify 2 median %.3f s (%.0f MB/s), verified/plain time %.2f\n",
        n, p, mb / 1e6 / p, q, mb / 1e6 / q, q / p }'
