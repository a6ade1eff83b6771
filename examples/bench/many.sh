#!/usr/bin/env bash
# Many daemons on one machine: DAEMONS daemon processes (64 by default; each told only of the
# first, finding the rest through Kademlia), CORPUS added with 2 replicas, wordcount with 4
# reducers (build first: cargo build --release):
#
#   examples/bench/many.sh P2PMR_BIN CORPUS [DAEMONS] [MIN_LOCAL_PERCENT] [MESH]
#
# With MESH, every daemon connects by itself to at most MESH others (`--mesh`), and the client
# is told only of the first daemon and connects to no more than it: no peer knows every
# daemon, and placement, planning and reads go through Kademlia lookups.
#
# Checks the job's output equals `p2pmr run-local`'s on the same file (and, if given, that at
# least MIN_LOCAL_PERCENT of the map input was read locally), and prints the job's
# wall time, the share of map input its tasks read from their own daemon (the `completed`
# event's counters), how many daemons ran map tasks, and the daemons' peak RSS (VmHWM): idle
# before the add, and at the end, summed over all of them and the largest.
set -euo pipefail
bin=$(realpath "$1") corpus=$2 daemons=${3:-64} min_local=${4:-0} mesh=${5:-}
work=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
ulimit -n 65536 2>/dev/null || true
source "$(dirname "$0")/daemons.sh"
if [ -n "$mesh" ]; then
    start_chain d "$daemons" --mesh "$mesh"
    all=(--peer "$(addr d1)" --mesh 1)
    want=$mesh
else
    start_chain d "$daemons"
    mapfile -t all < <(peer_args d "$daemons")
    want=$daemons
fi
client() { "$bin" --home "$work/client" --no-mdns -q "${all[@]}" "$@"; }
# Without a mesh size, every daemon must know every other before the job is planned (the
# coordinator schedules over the daemons it knows); a daemon's own view is what `peers`
# through it alone shows. With one, the first and last must have met at least that many.
for i in 1 "$daemons"; do
    for _ in $(seq 120); do
        n=$("$bin" --home "$work/probe" --no-mdns --peer "$(addr "d$i")" peers | wc -l)
        [ "$n" -ge "$want" ] && break
        sleep 1
    done
done
census() { # each daemon's open TCP connections: least, mean, most
    local p
    for p in "${pids[@]}"; do ss -tnpH state established | grep -c "pid=$p," || true; done |
        awk '{ s += $1; if (NR == 1 || $1 < m) m = $1; if ($1 > x) x = $1 } END { printf "%d / %.1f / %d", m, s / NR, x }'
}
[ -n "$mesh" ] && echo "mesh $mesh: TCP connections of each daemon (least / mean / most) before the add: $(census)"

rss() { # sum and max of the daemons' VmHWM, MiB
    for p in "${pids[@]}"; do awk '/^VmHWM:/ { print $2 }' "/proc/$p/status"; done |
        awk '{ s += $1; if ($1 > m) m = $1 } END { printf "%d MiB in all, %d MiB the largest", s / 1024, m / 1024 }'
}
idle=$(rss)
cid=$(client add --replicas 2 "$corpus")
"$bin" run-local --job wordcount --reducers 4 --input "$corpus" | sort >"$work/want"
s=$(date +%s%N)
client run --job wordcount --input "$cid" --reducers 4 --json >"$work/events"
t=$(awk -v n=$(($(date +%s%N) - s)) 'BEGIN { printf "%.2f", n / 1e9 }')
out=$(python3 -c 'import json,sys
for l in open(sys.argv[1]):
    e = json.loads(l)
    if e["event"] == "completed": print(e["output"])' "$work/events")
client cat "$out" | sort | cmp - "$work/want" || { echo "the output differs from run-local's" >&2; exit 1; }
python3 -c 'import json,sys
mappers = set()
for l in open(sys.argv[1]):
    e = json.loads(l)
    if e["event"] == "task_started" and e["kind"] == "map":
        mappers.add(e["peer"])
    if e["event"] == "planned":
        maps = e["maps"]
    if e["event"] == "completed":
        c = e["counters"]
        local = c["local_map_bytes"] / max(1, c["local_map_bytes"] + c["remote_map_bytes"])
print("%s daemons, %d MiB, 2 replicas: wordcount in %s s, output equals run-local, %.1f%% of map input read locally, %d map tasks on %d daemons" % (sys.argv[2], int(sys.argv[3]) >> 20, sys.argv[4], local * 100, maps, len(mappers)))
if local * 100 < float(sys.argv[5]):
    sys.exit("less than %s%% of the map input was read locally" % sys.argv[5])' \
    "$work/events" "$daemons" "$(stat -c %s "$corpus")" "$t" "$min_local"
echo "daemon peak RSS: idle $idle; after the add and the job $(rss)"
if [ -n "$mesh" ]; then
    echo "mesh $mesh: TCP connections of each daemon (least / mean / most) after the job: $(census)"
    # Connections nothing uses close after libp2p's idle timeout (60 s).
    sleep 75
    echo "mesh $mesh: TCP connections of each daemon (least / mean / most) 75 s later: $(census)"
fi
exit 0
