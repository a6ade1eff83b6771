#!/usr/bin/env bash
# What finding daemons by lookup costs a client: DAEMONS daemons (8 by default), each
# connecting by itself to at most MESH others (4 by default; `--mesh`), and two clients
# interleaved over ROUNDS rounds, each a new process: one told of every daemon (it knows them
# all and ranks them), one told of the first only with `--mesh 1` (it finds each placement
# group's daemons with Kademlia lookups). Each adds CORPUS with 2 replicas and reads it back:
#
#   examples/bench/mesh.sh P2PMR_BIN CORPUS [DAEMONS] [MESH] [ROUNDS]
#
# Prints each run's times and the medians; every read is checked against CORPUS.
set -euo pipefail
bin=$(realpath "$1") corpus=$2 daemons=${3:-8} mesh=${4:-4} rounds=${5:-5}
work=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
source "$(dirname "$0")/daemons.sh"
start_chain d "$daemons" --mesh "$mesh"
mapfile -t all < <(peer_args d "$daemons")
declare -A args=([all]="${all[*]}" [lookup]="--peer $(addr d1) --mesh 1")
want=$(sha256sum <"$corpus" | cut -c1-16)
sleep 2
for r in $(seq "$rounds"); do
    for who in all lookup; do
        # shellcheck disable=SC2086
        client() { "$bin" --home "$work/$who" --no-mdns -q ${args[$who]} "$@"; }
        s=$(now)
        cid=$(client add --replicas 2 "$corpus")
        a=$(secs "$s" "$(now)")
        s=$(now)
        got=$(client cat "$cid" | sha256sum | cut -c1-16)
        c=$(secs "$s" "$(now)")
        [ "$got" = "$want" ] || { echo "$who, round $r: cat differs" >&2; exit 1; }
        echo "$who add $a cat $c"
    done
done | tee "$work/runs"
median() { awk -v w="$1" -v f="$2" '$1 == w { print $f }' "$work/runs" | median_of; }
echo "medians: add $(median all 3) s told of all, $(median lookup 3) s by lookup; cat $(median all 5) s told of all, $(median lookup 5) s by lookup"
