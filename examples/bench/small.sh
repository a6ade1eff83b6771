#!/usr/bin/env bash
# Fixed costs a user meets: `p2pmr run` of a job over a 1 KiB file (grep, with a pattern new
# each time, so each run is a new job and nothing is reused) and `p2pmr cat` of the file,
# each a new process told of 3 daemons on this machine with --peer and otherwise default
# settings (mDNS on), interleaved with the same commands with --no-mdns (build first: cargo
# build --release):
#
#   examples/bench/small.sh P2PMR_BIN [ROUNDS]
#
# Prints the median wall time of each, in milliseconds.
set -euo pipefail
bin=$(realpath "$1") rounds=${2:-15}
work=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
first=()
for i in 1 2 3; do
    # Each told of the first: mDNS may find nothing on this machine's loopback.
    "$bin" --home "$work/d$i" "${first[@]}" daemon --listen /ip4/127.0.0.1/tcp/0 --api off \
        >"$work/d$i.out" 2>"$work/d$i.err" &
    pids+=($!)
    for _ in $(seq 200); do
        grep -q "^listening on" "$work/d$i.out" 2>/dev/null && break
        sleep 0.05
    done
    [ "$i" = 1 ] && first=(--peer "$(awk '/^listening on/ {print $3; exit}' "$work/d1.out")")
done
sleep 3 # the daemons find each other
peers=()
for i in 1 2 3; do peers+=(--peer "$(awk '/^listening on/ {print $3; exit}' "$work/d$i.out")"); done
head -c 1024 /dev/urandom | base64 >"$work/small.txt"
cid=$("$bin" --home "$work/c" "${peers[@]}" add "$work/small.txt")
ms() { # COMMAND...: wall milliseconds of one run, which must succeed
    local t0 t1
    t0=$(date +%s%N)
    "$@" >/dev/null 2>"$work/err" || { cat "$work/err" >&2; exit 1; }
    t1=$(date +%s%N)
    echo $(((t1 - t0) / 1000000))
}
declare -A times
for r in $(seq "$rounds"); do
    times[run_default]+="$(ms "$bin" --home "$work/c" "${peers[@]}" run --job grep --arg "pattern=a$r" --input "$cid") "
    times[run_peers]+="$(ms "$bin" --home "$work/c" --no-mdns "${peers[@]}" run --job grep --arg "pattern=b$r" --input "$cid") "
    times[cat_default]+="$(ms "$bin" --home "$work/c" "${peers[@]}" cat "$cid") "
    times[cat_peers]+="$(ms "$bin" --home "$work/c" --no-mdns "${peers[@]}" cat "$cid") "
done
median() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}'; }
for k in run_default run_peers cat_default cat_peers; do
    echo "$k: median $(echo "${times[$k]}" | median) ms ($rounds runs: ${times[$k]})"
done
