#!/usr/bin/env bash
# Compares two p2pmr binaries, interleaved, on the same machine and data:
#
#   examples/bench/ab.sh OLD_BIN NEW_BIN CORPUS [BLOCKS [BIG [TINY]]]
#
# Two daemons on 127.0.0.1 hold CORPUS with 2 replicas. Each block restarts both daemons with
# one binary on the same repositories, runs one warm-up tiny job (the daemons compile the
# module), then BIG wordcounts of CORPUS (2 reducers) and TINY wordcounts of its first KiB,
# each a fresh `p2pmr run` process (--no-mdns, both daemons given with --peer), so process
# start is included. Blocks alternate the binaries (old, new, new, old, ...). Prints one line
# per run: `old|new big|tiny SECONDS`; the summary at the end gives medians and new/old.
# Every run has its own --arg, so no job is answered from an earlier one's output.
set -euo pipefail
OLD=$1 NEW=$2 CORPUS=$3 BLOCKS=${4:-4} BIG=${5:-2} TINY=${6:-5}
W=$(mktemp -d); trap 'stop 2>/dev/null || true; rm -rf "$W"' EXIT
mkdir -p "$W/h1" "$W/h2"
start() { # BIN
    "$1" --home "$W/h1" --no-mdns daemon --listen /ip4/127.0.0.1/tcp/0 >"$W/d1.out" 2>"$W/d1.err" &
    echo $! >"$W/d1.pid"
    P1=$(wait_addr "$W/d1.out")
    "$1" --home "$W/h2" --no-mdns --peer "$P1" daemon --listen /ip4/127.0.0.1/tcp/0 \
        >"$W/d2.out" 2>"$W/d2.err" &
    echo $! >"$W/d2.pid"
    P2=$(wait_addr "$W/d2.out")
    sleep 1
}
wait_addr() {
    for _ in $(seq 200); do
        grep -q "^listening on" "$1" 2>/dev/null && break
        sleep 0.05
    done
    grep -m1 "^listening on" "$1" | awk '{print $3}'
}
stop() {
    kill "$(cat "$W/d1.pid")" "$(cat "$W/d2.pid")"
    wait "$(cat "$W/d1.pid")" "$(cat "$W/d2.pid")" 2>/dev/null || true
}
client() { "$1" --home "$W/c" --no-mdns --peer "$P1" --peer "$P2" "${@:2}"; }
timed() { # LABEL BIN ARGS...
    local s e
    s=$(date +%s%N)
    client "${@:2}" >/dev/null
    e=$(date +%s%N)
    echo "$1 $(awk -v n=$((e - s)) 'BEGIN { printf "%.4f", n / 1e9 }')"
}
start "$NEW"
big=$(client "$NEW" add --replicas 2 "$CORPUS")
head -c 1024 "$CORPUS" >"$W/tiny.txt"
tiny=$(client "$NEW" add --replicas 2 "$W/tiny.txt")
stop
n=0
for b in $(seq "$BLOCKS"); do
    order="old new"
    [[ $((b % 2)) -eq 0 ]] && order="new old"
    for which in $order; do
        bin=$NEW
        [[ $which == old ]] && bin=$OLD
        start "$bin"
        client "$bin" run --job wordcount --input "$tiny" --arg warm="$b$which" --json >/dev/null
        for _ in $(seq "$BIG"); do
            n=$((n + 1))
            timed "$which big" "$bin" run --job wordcount --input "$big" --reducers 2 --arg round=$n --json
        done
        for _ in $(seq "$TINY"); do
            n=$((n + 1))
            timed "$which tiny" "$bin" run --job wordcount --input "$tiny" --arg round=$n --json
        done
        stop
    done
done | tee "$W/runs"
median() { # WHICH KIND
    awk -v w="$1" -v k="$2" '$1 == w && $2 == k { print $3 }' "$W/runs" | sort -g |
        awk '{ a[NR] = $1 } END { if (NR) print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}
for kind in big tiny; do
    o=$(median old $kind) n=$(median new $kind)
    [[ -n $o && -n $n ]] || continue
    awk -v k=$kind -v o="$o" -v n="$n" \
        'BEGIN { printf "%s: old median %.4f s, new median %.4f s, new/old %.3f\n", k, o, n, n / o }'
done
