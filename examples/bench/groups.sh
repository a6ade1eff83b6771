#!/usr/bin/env bash
# Placement groups at work: wordcount of CORPUS on 2 daemons and on 4, each cluster holding it
# with 2 replicas, interleaved, same binary (build it first: cargo build --release):
#
#   examples/bench/groups.sh P2PMR_BIN CORPUS [ROUNDS]
#
# Prints each run's time, the share of map input its tasks read from their own daemon and the
# CPU time its cluster's daemons used during it (from /proc), the medians, and the
# 4-daemon/2-daemon time ratio (under 1: four daemons are faster). Every run
# has its own --arg, so no job is answered from an earlier one's output; every output is
# checked against the first.
set -euo pipefail
bin=$(realpath "$1") corpus=$2 rounds=${3:-3}
work=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
source "$(dirname "$0")/daemons.sh"
declare -A peers daemon_pids
for n in 2 4; do
    start_chain "c$n-" "$n"
    peers[$n]=$(peer_args "c$n-" "$n" | tr '\n' ' ')
    daemon_pids[$n]="${pids[*]: -$n}"
done
# cpu N: CPU seconds the daemons of cluster N have used so far.
cpu() {
    local p
    # shellcheck disable=SC2086
    for p in ${daemon_pids[$1]}; do awk '{ print $14 + $15 }' "/proc/$p/stat"; done |
        awk -v hz="$(getconf CLK_TCK)" '{ s += $1 } END { printf "%.2f", s / hz }'
}
# shellcheck disable=SC2086
client() { local n=$1; shift; "$bin" --home "$work/client$n" --no-mdns ${peers[$n]} "$@"; }
declare -A cid
for n in 2 4; do
    cid[$n]=$(client "$n" add --quiet --replicas 2 "$corpus")
    client "$n" run --job wordcount --input "${cid[$n]}" --reducers 2 --arg warm=1 --json >/dev/null
done
lines() { client "$1" cat "$2" | sort | sha256sum | cut -c1-16; }
local_share() {
    python3 -c 'import json,sys
for l in sys.stdin:
    e = json.loads(l)
    if e.get("event") == "completed":
        c = e["counters"]
        print("%.3f %s" % (c["local_map_bytes"] / max(1, c["local_map_bytes"] + c["remote_map_bytes"]), e["output"]))'
}
want=""
for r in $(seq "$rounds"); do
    for n in 2 4; do
        c=$(cpu "$n")
        s=$(now)
        read -r share out < <(client "$n" run --job wordcount --input "${cid[$n]}" --reducers 2 \
            --arg round="$r" --json 2>/dev/null | local_share)
        t=$(secs "$s" "$(now)")
        c=$(awk -v a="$c" -v b="$(cpu "$n")" 'BEGIN { printf "%.2f", b - a }')
        got=$(lines "$n" "$out")
        [ -n "$want" ] || want=$got
        [ "$got" = "$want" ] || { echo "$n daemons, run $r: output differs" >&2; exit 1; }
        echo "daemons $n $t local $share cpu $c"
    done
done | tee "$work/runs"
median() { awk -v n="$1" -v f="$2" '$2 == n { print $f }' "$work/runs" | median_of; }
mb=$(stat -c %s "$corpus")
two=$(median 2 3) four=$(median 4 3) l2=$(median 2 5) l4=$(median 4 5) c2=$(median 2 7) c4=$(median 4 7)
awk -v a="$two" -v b="$four" -v mb="$mb" -v l2="$l2" -v l4="$l4" -v c2="$c2" -v c4="$c4" 'BEGIN {
    printf "wordcount, 2 replicas: 2 daemons median %.3f s (%.0f MB/s, %.0f%% local, %.2f CPU s), 4 daemons median %.3f s (%.0f MB/s, %.0f%% local, %.2f CPU s), 4/2 time %.2f\n",
        a, mb / 1e6 / a, l2 * 100, c2, b, mb / 1e6 / b, l4 * 100, c4, b / a }'
