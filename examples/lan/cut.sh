#!/usr/bin/env bash
# LAN fault test: a daemon's link is cut in the middle of a job and healed later.
#
# Seven network namespaces on one bridge (in an eighth, "switch" namespace), addresses
# 10.78.0.1-7 that exist only inside them. Daemons in namespaces 1-5 find each other by mDNS
# alone (--liveness-secs 2, --grace-secs 5). From namespace 6 a 48 MiB text corpus is added
# with 3 replicas and wordcount runs once without faults. It runs again while daemon 3's link
# is down (its veth on the bridge set down 1 s into the job, up again 12 s later): the output
# must have the same CID, and once the link is back no block of the corpus may be missing.
# Everything is removed on every exit path.
#
# Needs root and iproute2. Usage: examples/lan/cut.sh [path/to/p2pmr]
set -euo pipefail

source "$(dirname "$0")/netns.sh"
# Namespaces "p2pmr-cut-$$-1".."-7" at 10.78.0.1-7, host-side links "p2c$$h1"...
lan_start p2pmr-cut-$$ p2c$$h 10.78.0 7 "${1:-}"
lan_daemons 5 --slots 1 --liveness-secs 2 --grace-secs 5

# Text for wordcount: the shared generator when it is there, else words from a fixed list.
corpus="$work/corpus.txt"
if [[ -f $root/../shared/bench/make-corpus.sh ]]; then
    bash "$root/../shared/bench/make-corpus.sh" "$corpus" 48 >/dev/null 2>&1
else
    awk 'BEGIN { split("the of and a to in is was that for on with as by at from his her it", w, " ");
                 srand(7); while (n < 50331648) { l = ""; for (j = 0; j < 12; j++) l = l w[int(rand() * 20) + 1] " ";
                 print l; n += length(l) + 1 } }' >"$corpus"
fi
client() { in_ns 6 "$bin" --home "$work/none" "$@"; }
for _ in $(seq 50); do [[ $(client peers | wc -l) -eq 5 ]] && break; sleep 0.2; done
cid=$(client add --replicas 3 "$corpus")
echo "cut: added $(du -m "$corpus" | cut -f1) MiB from namespace 6 with 3 replicas as $cid"
run() {
    client run --job wordcount --reducers 4 --split-mib 1 --input "corpus=$cid" --arg "run=$1" \
        2>>"$work/run-$1.err" | tail -n1
}
start=$(date +%s.%N)
clean=$(run clean)
echo "cut: fault-free output $clean in $(echo "$(date +%s.%N) - $start" | bc) s"

start=$(date +%s.%N)
( sleep 1; lan_link 3 down; echo "cut: daemon 3's link is down"
  sleep 12; lan_link 3 up; echo "cut: daemon 3's link is up again" ) &
cutter=$!
cut=$(run cut)
wait "$cutter"
echo "cut: with the cut, output $cut in $(echo "$(date +%s.%N) - $start" | bc) s"
[[ $cut == "$clean" ]] || { echo "outputs differ" >&2; cat "$work/run-cut.err" >&2; exit 1; }

# With the link back, every block of the corpus is still somewhere.
for _ in $(seq 50); do [[ $(client peers | wc -l) -eq 5 ]] && break; sleep 0.2; done
stat=$(client stat "$cid")
echo "$stat" | grep '^copies'
if echo "$stat" | grep -q "blocks on 0 daemon"; then
    echo "blocks were lost" >&2; exit 1
fi
echo "cut: same output as the fault-free run, no block lost: ok"
