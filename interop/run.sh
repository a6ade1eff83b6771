#!/usr/bin/env bash
# Interop checks against independent IPFS implementations from npm (run by .ci/run):
#   CAR: a DAG p2pmr exports is read and verified by @ipld/car; a CAR @ipld/car writes is
#   imported by p2pmr and read back bit-exact.
#   HTTP: kubo-rpc-client adds, cats, reads blocks, exports and imports a CAR and lists peers
#   against a daemon's API.
#   Gateway: @helia/verified-fetch, with a daemon's gateway as its only source, fetches a
#   two-level file bit-exact (every block checked against its CID) and refuses an unknown CID.
#   Bitswap: a Helia node (js-libp2p, TCP + Noise + Yamux) dials a daemon and reads a 20 MiB
#   file and the two-level one over Bitswap 1.2.0, bit-exact.
#   Dashboard: interop/dashboard.sh, in headless chromium.
# Usage: interop/run.sh [P2PMR_BIN]   (installs the npm packages from the lockfile if needed)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/lib.sh"
setup "${1:-$here/../target/debug/p2pmr}"

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
start d1
start d2 "$(listening d1)"
api=$(api d1)
head -c $((3 * 262144 + 4321)) /dev/urandom >"$work/small"
expected=$(p2pmr c add -n "$work/small")
spoken=$(node "$here/kubo.mjs" "$api" "$work/small" "$expected")
echo "interop: kubo-rpc-client against $api: $spoken"

# The file of two levels, added to the network and fetched through the other daemon's gateway.
big=$(p2pmr c add --peer "$(listening d1)" --replicas 1 "$work/file")
fetched=$(node "$here/verified-fetch.mjs" "$(api d2)" "$work/file" "$big")
echo "interop: @helia/verified-fetch through $(api d2): $fetched"

# Both files on both daemons (so the one Helia dials holds every block), read over Bitswap.
head -c $((20 << 20)) /dev/urandom >"$work/twenty"
twenty=$(p2pmr c add --peer "$(listening d1)" --replicas 2 "$work/twenty")
both=$(p2pmr c add --peer "$(listening d1)" --replicas 2 "$work/file")
swapped=$(node "$here/bitswap.mjs" "$(listening d1)" "$work/twenty" "$twenty" "$work/file" "$both")
echo "interop: Helia over Bitswap from $(listening d1): $swapped"

"$here/dashboard.sh" "$bin" 8
