#!/usr/bin/env bash
# The replica keepers after a restart: 2 daemons on 127.0.0.1 hold CORPUS with 2 replicas;
# both are stopped and started again on the same repositories, and the CPU they use is summed
# per 10 s for SECS seconds (past the keepers' first grace period, 60 s by default). Once per
# binary given, ROUNDS times, the binaries alternating (build first: cargo build --release):
#
#   examples/bench/keeper.sh CORPUS SECS ROUNDS P2PMR_BIN [P2PMR_BIN...]
set -euo pipefail
corpus=$1 secs=$2 rounds=$3
shift 3
bins=("$@")
work=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
bin=$(realpath "${bins[0]}")
source "$(dirname "$0")/daemons.sh"

start_pair() {
    start_daemon k1
    start_daemon k2 --peer "$(addr k1)"
}
stop_pair() {
    kill "${pids[@]}"
    wait "${pids[@]}" 2>/dev/null || true
    pids=()
}
ticks() {
    for p in "${pids[@]}"; do awk '{print $14 + $15}' "/proc/$p/stat"; done |
        awk '{s += $1} END {print s}'
}
seconds() { awk -v t="$1" -v hz="$(getconf CLK_TCK)" 'BEGIN {printf "%.2f", t / hz}'; }

start_pair
"$bin" --home "$work/client" --no-mdns --peer "$(addr k1)" --peer "$(addr k2)" \
    add -q --replicas 2 "$corpus" >/dev/null
stop_pair
for round in $(seq "$rounds"); do
    for b in "${bins[@]}"; do
        bin=$(realpath "$b")
        start_pair
        first=$(ticks) last=$first windows=""
        for _ in $(seq $((secs / 10))); do
            sleep 10
            now=$(ticks)
            windows="$windows $(seconds $((now - last)))"
            last=$now
        done
        echo "$b round $round: CPU s per 10 s:$windows; in all $(seconds $((last - first)))"
        stop_pair
    done
done
