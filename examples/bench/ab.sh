#!/usr/bin/env bash
# Compares two p2pmr binaries, interleaved, on the same machine and data:
#
#   [DAEMONS=N] [RUN_ARGS="..."] examples/bench/ab.sh OLD_BIN NEW_BIN CORPUS [BLOCKS [BIG [TINY]]]
#
# DAEMONS daemons (2 unless set) on 127.0.0.1 hold CORPUS with 2 replicas. Each block restarts
# the daemons with one binary on the same repositories, runs one warm-up tiny job (the daemons
# compile the module), then BIG wordcounts of CORPUS (2 reducers) and TINY wordcounts of its
# first KiB (RUN_ARGS, e.g. "--split-mib 256", added to the big ones), each a fresh `p2pmr run`
# process (--no-mdns, every daemon given with --peer), so process start is included. Blocks
# alternate the binaries (old, new, new, old, ...). Prints one line per run:
# `old|new big|tiny SECONDS REDUCE_SECONDS` (the reduce phase of a big run, from its events as
# they arrive; 0 for tiny ones); the summary at the end gives medians and new/old.
# Every run has its own --arg, so no job is answered from an earlier one's output.
set -euo pipefail
OLD=$1 NEW=$2 CORPUS=$3 BLOCKS=${4:-4} BIG=${5:-2} TINY=${6:-5} DAEMONS=${DAEMONS:-2}
read -r -a RUN_ARGS <<<"${RUN_ARGS:-}"
W=$(mktemp -d); trap 'stop 2>/dev/null || true; rm -rf "$W"' EXIT
PIDS=() PEERS=()
start() { # BIN
    PIDS=() PEERS=()
    local i boot=()
    for i in $(seq "$DAEMONS"); do
        mkdir -p "$W/h$i"
        "$1" --home "$W/h$i" --no-mdns "${boot[@]}" daemon --listen /ip4/127.0.0.1/tcp/0 \
            >"$W/d$i.out" 2>"$W/d$i.err" &
        PIDS+=($!)
        PEERS+=(--peer "$(wait_addr "$W/d$i.out")")
        boot=("${PEERS[@]:0:2}")
    done
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
    kill "${PIDS[@]}"
    wait "${PIDS[@]}" 2>/dev/null || true
}
client() { "$1" --home "$W/c" --no-mdns "${PEERS[@]}" "${@:2}"; }
# reduce_phase: seconds from the `reduce` phase event to the `store` one on stdin (JSON lines),
# timed as they arrive (EPOCHREALTIME: no process per line).
reduce_phase() {
    local line r=0 st=0
    while IFS= read -r line; do
        case $line in
        *'"phase":"reduce"'*) r=$EPOCHREALTIME ;;
        *'"phase":"store"'*) st=$EPOCHREALTIME ;;
        esac
    done
    awk -v r="$r" -v s="$st" 'BEGIN { printf "%.4f", (r > 0 && s > 0) ? s - r : 0 }'
}
timed() { # LABEL BIN ARGS...
    local s e red=0
    s=$(date +%s%N)
    if [[ $1 == *big ]]; then
        red=$(client "${@:2}" | reduce_phase)
    else
        # Tiny runs take tens of milliseconds: nothing in their way.
        client "${@:2}" >/dev/null
    fi
    e=$(date +%s%N)
    echo "$1 $(awk -v n=$((e - s)) 'BEGIN { printf "%.4f", n / 1e9 }') $red"
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
            timed "$which big" "$bin" run --job wordcount --input "$big" --reducers 2 --arg round=$n \
                "${RUN_ARGS[@]}" --json
        done
        for _ in $(seq "$TINY"); do
            n=$((n + 1))
            timed "$which tiny" "$bin" run --job wordcount --input "$tiny" --arg round=$n --json
        done
        stop
    done
done | tee "$W/runs"
median() { # WHICH KIND [COLUMN]
    awk -v w="$1" -v k="$2" -v c="${3:-3}" '$1 == w && $2 == k { print $c }' "$W/runs" | sort -g |
        awk '{ a[NR] = $1 } END { if (NR) print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}
for kind in big tiny; do
    o=$(median old $kind) n=$(median new $kind)
    [[ -n $o && -n $n ]] || continue
    awk -v k=$kind -v o="$o" -v n="$n" \
        'BEGIN { printf "%s: old median %.4f s, new median %.4f s, new/old %.3f\n", k, o, n, n / o }'
done
o=$(median old big 4) n=$(median new big 4)
if [[ -n $o && -n $n ]]; then
    awk -v o="$o" -v n="$n" \
        'BEGIN { printf "big, reduce phase: old median %.4f s, new median %.4f s, new/old %.3f\n", o, n, n / o }'
fi
