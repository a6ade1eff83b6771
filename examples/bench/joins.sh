#!/usr/bin/env bash
# Daemons that join a swarm get their share of its data. CORPUS is added with 2 replicas to 3
# daemons; then 3 more join, and the keepers move the copies the placement rule now puts on
# them (at most 128 blocks a second). Prints how long until every daemon holds a share and no
# block is held more than twice, what each daemon holds before and after, and a wordcount on
# the 6 daemons: the share of map input read locally and the map tasks each daemon ran.
#
#   examples/bench/joins.sh P2PMR_BIN CORPUS
set -euo pipefail
bin=$(realpath "$1") corpus=$2
work=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
source "$(dirname "$0")/daemons.sh"
# A short grace period, so the keepers start looking soon after the joins.
daemon_args=(--grace-secs 2)
start_chain d 3
client() {
    # shellcheck disable=SC2046
    "$bin" --home "$work/client" --no-mdns $(peer_args d "$n") "$@"
}
held() {
    local i
    for i in $(seq "$n"); do du -sm "$work/d$i" | cut -f1; done | paste -sd' '
}
n=3
cid=$(client add --quiet --replicas 2 "$corpus")
echo "added to 3 daemons, MiB held each: $(held)"
for i in 4 5 6; do start_daemon "d$i" --peer "$(addr d1)"; done
n=6
joined=$(now)
# Moved once every daemon holds part of it and every block is on exactly 2 daemons again.
while :; do
    stat=$(client stat "$cid")
    holding=$(grep '^holder:' <<<"$stat" | awk '$3 > 0' | wc -l)
    if [ "$holding" -eq 6 ] && ! grep '^copies:' <<<"$stat" | grep -qv 'on 2 daemon'; then
        break
    fi
    [ $(( ($(now) - joined) / 1000000000 )) -lt 300 ] || { echo "not moved: $stat" >&2; exit 1; }
    sleep 0.5
done
echo "moved in $(secs "$joined" "$(now)") s; MiB held each: $(held)"
client stat "$cid"
# Each daemon's address (its peer id) and MiB held, to check the candidates by hand.
for i in $(seq "$n"); do echo "d$i $(addr "d$i") $(du -sm "$work/d$i" | cut -f1)"; done
client run --job wordcount --input "$cid" --reducers 2 --json | python3 -c 'import json,sys,collections
maps = collections.Counter()
for l in sys.stdin:
    e = json.loads(l)
    if e.get("event") == "task_started" and e.get("kind") == "map":
        maps[e["peer"][-6:]] += 1
    if e.get("event") == "completed":
        c = e["counters"]
        print("wordcount on 6 daemons: %.1f%% of map input local; map tasks per daemon: %s" % (
            100 * c["local_map_bytes"] / max(1, c["local_map_bytes"] + c["remote_map_bytes"]),
            " ".join(str(v) for v in sorted(maps.values(), reverse=True))))'
