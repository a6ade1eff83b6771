#!/usr/bin/env bash
# Interop checks against independent IPFS implementations from npm (run by .ci/run):
#   CAR: a DAG p2pmr exports is read and verified by @ipld/car; a CAR @ipld/car writes is
#   imported by p2pmr and read back bit-exact.
#   HTTP: kubo-rpc-client adds, cats, reads blocks, exports and imports a CAR and lists peers
#   against a daemon's API.
#   Gateway: @helia/verified-fetch, with a daemon's gateway as its only source, fetches a
#   two-level file bit-exact (every block checked against its CID) and refuses an unknown CID.
#   Bitswap: a Helia node (js-libp2p, TCP + Noise + Yamux) dials a daemon and reads a 20 MiB
#   file and the two-level one over Bitswap 1.2.0, bit-exact; and the reverse: daemons told of
#   a Helia node run wordcount over a CID only it holds and pin another, fetched over Bitswap.
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

# The reverse: a Helia node adds files with kubo's settings (their CIDs must be what
# `p2pmr add -n` prints) and holds them alone; daemons told of it fetch them over Bitswap.
awk 'BEGIN { split("the of and a to in is was that for on with as by at from his her it", w, " ");
             srand(11); while (n < 46137344) { l = ""; for (j = 0; j < 12; j++) l = l w[int(rand() * 20) + 1] " ";
             print l; n += length(l) + 1 } }' >"$work/text"
mkfifo "$work/helia.in"
node "$here/bitswap-serve.mjs" "$work/text" "$work/file" <"$work/helia.in" >"$work/helia.json" \
    2>"$work/helia.err" &
pids+=($!)
exec 9>"$work/helia.in" # Helia serves until this script exits
for _ in $(seq 600); do [[ -s $work/helia.json ]] && break; sleep 0.1; done
[[ -s $work/helia.json ]] || { echo "interop: Helia did not start: $(cat "$work/helia.err")" >&2; exit 1; }
helia=$(node -e 'console.log(JSON.parse(require("fs").readFileSync(process.argv[1])).addr)' "$work/helia.json")
read -r text_cid file_cid < <(node -e 'console.log(JSON.parse(require("fs").readFileSync(process.argv[1])).cids.join(" "))' "$work/helia.json")
[[ $text_cid == "$(p2pmr c add -n "$work/text")" && $file_cid == "$(p2pmr c add -n "$work/file")" ]] ||
    { echo "interop: Helia's CIDs $text_cid $file_cid differ from p2pmr add -n's" >&2; exit 1; }
start d3 "$helia"
# (One --peer per place: given both before and after `daemon`, the later one wins.)
P2PMR_PEERS="$(listening d3),$helia" start d4
for _ in $(seq 20); do
    [[ $(p2pmr e peers --peer "$(listening d3)" | grep -c 12D3) -ge 2 ]] && break
    sleep 0.2
done
# wordcount over a CID no daemon holds: fetched from Helia first, then run; exact output.
out=$(p2pmr e run --peer "$(listening d3)" --job wordcount --input "$text_cid" 2>"$work/run.err") ||
    { echo "interop: wordcount over Helia's CID failed: $(cat "$work/run.err")" >&2; exit 1; }
grep -q "^fetched $text_cid: " "$work/run.err" ||
    { echo "interop: no fetch phase in: $(cat "$work/run.err")" >&2; exit 1; }
p2pmr e get --peer "$(listening d3)" -o "$work/counted" "$out"
cat "$work/counted"/part-* | cmp - <(p2pmr e run-local --job wordcount --input "$work/text") ||
    { echo "interop: wordcount over Helia's CID differs from run-local's" >&2; exit 1; }
# A daemon's API and gateway read what only Helia holds (fetched block by block, not kept).
curl -sf -X POST "$(api d3)/api/v0/cat?arg=$file_cid" | cmp - "$work/file" ||
    { echo "interop: cat through d3's API of Helia's CID is not bit-exact" >&2; exit 1; }
curl -sf "$(api d4)/ipfs/$file_cid" | cmp - "$work/file" ||
    { echo "interop: d4's gateway of Helia's CID is not bit-exact" >&2; exit 1; }
# pin add: the two-level random file, kept on both daemons, then read back bit-exact.
p2pmr e pin add --peer "$(listening d3)" --replicas 2 "$file_cid" >"$work/pinned" 2>"$work/pin.err" ||
    { echo "interop: pin add failed: $(cat "$work/pin.err")" >&2; exit 1; }
[[ $(cat "$work/pinned") == "$file_cid" ]]
stat=$(p2pmr e stat --peer "$(listening d3)" "$file_cid")
grep -q "179 blocks on 2 daemon" <<<"$stat" ||
    { echo "interop: the pinned file is not on 2 daemons: $stat" >&2; exit 1; }
p2pmr f cat --peer "$(listening d4)" "$file_cid" | cmp - "$work/file"
# A CID neither the daemons nor Helia hold: one clear error, soon (Helia says it does not have it).
missing=$(p2pmr c add -n <(head -c 1000 /dev/urandom))
if p2pmr e pin add --peer "$(listening d3)" "$missing" 2>"$work/missing.err"; then
    echo "interop: pin add of a CID nobody holds succeeded" >&2; exit 1
fi
grep -q "none of 1 IPFS peer(s) has $missing" "$work/missing.err" ||
    { echo "interop: unexpected error for a missing CID: $(cat "$work/missing.err")" >&2; exit 1; }
echo "interop: daemons fetch from Helia over Bitswap: wordcount over $text_cid exact, $file_cid read through the API and the gateway and pinned on 2 daemons, bit-exact, a missing CID refused"

"$here/dashboard.sh" "$bin" 8
