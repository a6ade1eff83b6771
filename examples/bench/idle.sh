#!/usr/bin/env bash
# What idle daemons cost: N daemons started on 127.0.0.1 (default settings: mDNS on, the API
# on a free port), left alone for SECS seconds after settling; prints their context switches
# per second and CPU use, summed over all of them (build first: cargo build --release):
#
#   examples/bench/idle.sh P2PMR_BIN [N] [SECS]
set -euo pipefail
bin=$(realpath "$1") n=${2:-16} secs=${3:-10}
work=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
for i in $(seq "$n"); do
    "$bin" --home "$work/d$i" daemon --listen /ip4/127.0.0.1/tcp/0 --api 127.0.0.1:0 \
        >"$work/d$i.out" 2>"$work/d$i.err" &
    pids+=($!)
done
sleep 10 # start, find each other over mDNS, settle
switches() { for p in "${pids[@]}"; do cat /proc/"$p"/task/*/status; done 2>/dev/null |
    awk '/ctxt_switches/ {s += $2} END {print s}'; }
ticks() { for p in "${pids[@]}"; do awk '{print $14 + $15}' "/proc/$p/stat"; done |
    awk '{s += $1} END {print s}'; }
s0=$(switches) t0=$(ticks)
sleep "$secs"
s1=$(switches) t1=$(ticks)
hz=$(getconf CLK_TCK)
echo "$n idle daemons over $secs s: $(((s1 - s0) / secs)) context switches/s in all," \
    "CPU $(awk -v t=$((t1 - t0)) -v hz="$hz" -v s="$secs" 'BEGIN {printf "%.2f", 100 * t / hz / s}')% of one core"
