#!/usr/bin/env bash
# Interop checks against independent IPFS implementations from npm (run by .ci/run):
#   CAR: a DAG p2pmr exports is read and verified by @ipld/car; a CAR @ipld/car writes is
#   imported by p2pmr and read back bit-exact.
#   HTTP: kubo-rpc-client adds, cats, reads blocks, exports and imports a CAR and lists peers
#   against a daemon's API.
# Usage: interop/run.sh [P2PMR_BIN]   (installs the npm packages from the lockfile if needed)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bin=$(realpath "${1:-$here/../target/debug/p2pmr}")
[[ -d $here/node_modules/kubo-rpc-client ]] || (cd "$here" && npm ci --no-audit --no-fund --silent)
work=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
p2pmr() { "$bin" --home "$work/$1" --no-mdns "${@:2}"; }

# A file of three levels of DAG would need 174*174 leaves; two levels (175 leaves, 44 MiB)
# cover inner nodes and raw leaves alike: 176 leaves, 2 nodes of links and the root.
head -c $((175 * 262144 + 12345)) /dev/urandom >"$work/file"
cid=$(p2pmr a add --local "$work/file")
p2pmr a dag export "$cid" >"$work/out.car"
got=$(node "$here/car.mjs" check "$work/out.car")
want="{\"version\":1,\"roots\":[\"$cid\"],\"blocks\":179,\"bytes\":"
[[ $got == "$want"* ]] || { echo "interop: @ipld/car read back $got, expected $want..." >&2; exit 1; }
echo "interop: @ipld/car reads p2pmr's CAR of $cid: $got"

node "$here/car.mjs" write "$work/in.car" "$work/file" >"$work/roots"
p2pmr b dag import --local "$work/in.car" >"$work/imported"
cmp "$work/roots" "$work/imported"
first=$(head -n 1 "$work/roots")
p2pmr b cat "$first" | cmp - <(head -c 262144 "$work/file")
echo "interop: p2pmr imports @ipld/car's CAR ($(wc -l <"$work/roots") roots), bit-exact"

# Two daemons; the client speaks to the first one's API.
start() { # NAME [PEER]
    local out=$work/$1.out
    p2pmr "$1" ${2:+--peer "$2"} daemon --listen /ip4/127.0.0.1/tcp/0 --api 127.0.0.1:0 >"$out" 2>"$work/$1.err" &
    pids+=($!)
    for _ in $(seq 200); do
        grep -q "^listening on" "$out" 2>/dev/null && break
        sleep 0.05
    done
    grep -q "^listening on" "$out" || { echo "interop: daemon $1 did not start" >&2; cat "$work/$1.err" >&2; exit 1; }
}
start d1
start d2 "$(grep -m1 '^listening on' "$work/d1.out" | awk '{print $3}')"
api=$(grep -m1 '^api listening on' "$work/d1.out" | awk '{print $4}')
head -c $((3 * 262144 + 4321)) /dev/urandom >"$work/small"
expected=$(p2pmr c add -n "$work/small")
echo "interop: kubo-rpc-client against $api: $(node "$here/kubo.mjs" "$api" "$work/small" "$expected")"
