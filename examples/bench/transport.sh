#!/usr/bin/env bash
# Block transfer and the replicated add over several builds or transports, interleaved in one
# run:
#
#   examples/bench/transport.sh CORPUS ROUNDS NAME=BIN[@quic] NAME=BIN[@quic] ...
#
# e.g. `noise=/tmp/p2pmr-noise tls=target/release/p2pmr quic=target/release/p2pmr@quic`: the
# first is the baseline. `@quic` has the daemons listen on QUIC only (TCP otherwise). Each round,
# for each variant in a rotating order: three fresh daemons on 127.0.0.1, `p2pmr add --replicas 2
# CORPUS` from a client process, then `p2pmr cat` of it twice from a fresh client (the first reads
# the blocks the add just wrote from disk; the second, the one timed, from the page cache),
# checked bit-exact. Prints one line per measurement and, at the end, medians and each variant's
# speed relative to the baseline (baseline time / its time).
set -euo pipefail
CORPUS=$1 ROUNDS=$2
shift 2
names=() bins=() listens=()
for v in "$@"; do
    name=${v%%=*} rest=${v#*=}
    names+=("$name")
    if [[ $rest == *@quic ]]; then
        bins+=("${rest%@quic}") listens+=(/ip4/127.0.0.1/udp/0/quic-v1)
    else
        bins+=("$rest") listens+=(/ip4/127.0.0.1/tcp/0)
    fi
done
work=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT
source "$(dirname "$0")/daemons.sh"
want=$(sha256sum <"$CORPUS" | cut -d' ' -f1)
bytes=$(stat -c %s "$CORPUS")

one() { # INDEX
    local i=$1 s e cid got
    bin=${bins[$i]} listen=${listens[$i]}
    rm -rf "$work"/d* "$work"/c
    start_daemon d1
    start_daemon d2 --peer "$(addr d1)"
    start_daemon d3 --peer "$(addr d1)"
    mapfile -t peers < <(peer_args d 3)
    sleep 1
    s=$(now)
    cid=$("$bin" --home "$work/c" --no-mdns "${peers[@]}" add --replicas 2 -q "$CORPUS")
    e=$(now)
    echo "${names[$i]} add $(secs "$s" "$e")"
    rm -rf "$work/c"
    "$bin" --home "$work/c" --no-mdns "${peers[@]}" cat "$cid" >/dev/null
    s=$(now)
    got=$("$bin" --home "$work/c" --no-mdns "${peers[@]}" cat "$cid" | sha256sum | cut -d' ' -f1)
    e=$(now)
    [[ $got == "$want" ]] || { echo "${names[$i]}: cat returned other bytes" >&2; exit 1; }
    echo "${names[$i]} cat $(secs "$s" "$e")"
    kill "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
    pids=()
}

n=${#names[@]}
for r in $(seq "$ROUNDS"); do
    for k in $(seq 0 $((n - 1))); do
        one $(((r + k) % n))
    done
done | tee "$work/runs"

for kind in add cat; do
    base=$(awk -v v="${names[0]}" -v k=$kind '$1 == v && $2 == k { print $3 }' "$work/runs" | median_of)
    for v in "${names[@]}"; do
        m=$(awk -v v="$v" -v k=$kind '$1 == v && $2 == k { print $3 }' "$work/runs" | median_of)
        awk -v v="$v" -v k=$kind -v m="$m" -v b="$base" -v n="$bytes" \
            'BEGIN { printf "%s %-8s median %.3f s, %4.0f MB/s, speed relative to the first %.2f\n", k, v, m, n / m / 1e6, b / m }'
    done
done
