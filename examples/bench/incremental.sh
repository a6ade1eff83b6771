#!/usr/bin/env bash
# Incremental jobs: wordcount of CORPUS added with `--chunker buzhash` on 2 fresh daemons; then
# the corpus with 1 KiB of new text inserted in the middle and 1 MiB appended, added the same
# way and counted again, when the daemons remember the first run's task outputs; then the
# edited corpus once more with `--no-memo` (every task runs). Same binary (build it first:
# cargo build --release):
#
#   examples/bench/incremental.sh P2PMR_BIN CORPUS [ROUNDS] [RUN ARGS...]
#
# Each round starts new daemons (nothing remembered). Prints each round's three times and the
# map tasks the rerun ran and reused, then the medians and the rerun/first time ratio. The
# rerun's output must equal the --no-memo run's and `p2pmr run-local`'s over the edited file.
set -euo pipefail
bin=$(realpath "$1") corpus=$2 rounds=${3:-3}
shift $(($# < 3 ? $# : 3))
extra=("$@")
work=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
source "$(dirname "$0")/daemons.sh"

# The edited corpus, streamed: 1 KiB of new lines at the first line start past the middle,
# 1 MiB of new lines at the end.
python3 - "$corpus" "$work/edited" <<'EOF'
import shutil, sys
src, dst = sys.argv[1], sys.argv[2]
def lines(tag, size):
    out, n = bytearray(), 0
    while len(out) < size:
        out += b"%s line %d tells of incremental jobs and content addressed splits\n" % (tag, n)
        n += 1
    return bytes(out[:size - 1]) + b"\n"
with open(src, "rb") as i, open(dst, "wb") as o:
    size = i.seek(0, 2)
    i.seek(0)
    left = size // 2
    while left > 0:
        chunk = i.read(min(left, 1 << 20))
        o.write(chunk)
        left -= len(chunk)
    rest = i.read(1 << 16)
    cut = rest.find(b"\n") + 1
    o.write(rest[:cut])
    o.write(lines(b"inserted", 1024))
    o.write(rest[cut:])
    shutil.copyfileobj(i, o, 1 << 20)
    o.write(lines(b"appended", 1 << 20))
EOF
"$bin" run-local --job wordcount --reducers 2 --input "$work/edited" --output "$work/local" >/dev/null
want=$(cat "$work"/local/part-* | sort | sha256sum | cut -c1-16)

# tasks: from --json events on stdin, "MAPS_PLANNED MAPS_RUN MAPS_REUSED OUTPUT".
tasks() {
    python3 -c 'import json,sys
planned, run, reused, out = 0, set(), 0, ""
for l in sys.stdin:
    e = json.loads(l)
    k = e.get("event")
    if k == "planned": planned = e["maps"]
    elif k == "task_started" and e["kind"] == "map": run.add(e["task"])
    elif k == "reused": reused += e["maps"]
    elif k == "completed": out = e["output"]
print(planned, len(run), reused, out)'
}
for r in $(seq "$rounds"); do
    start_chain "r$r-" 2
    peers=$(peer_args "r$r-" 2 | tr '\n' ' ')
    # shellcheck disable=SC2086
    client() { "$bin" --home "$work/client$r" --no-mdns $peers "$@"; }
    first_cid=$(client add --quiet --replicas 2 --chunker buzhash "$corpus")
    edited_cid=$(client add --quiet --replicas 2 --chunker buzhash "$work/edited")
    timed() {
        local s
        s=$(now)
        read -r planned ran reused out < <(client run --job wordcount --reducers 2 --json "$@" | tasks)
        echo "$(secs "$s" "$(now)") $planned $ran $reused $out"
    }
    read -r first _ <<<"$(timed --input "$first_cid" "${extra[@]}")"
    read -r rerun planned ran reused out <<<"$(timed --input "$edited_cid" "${extra[@]}")"
    read -r full _ _ _ full_out <<<"$(timed --input "$edited_cid" --no-memo "${extra[@]}")"
    for o in "$out" "$full_out"; do
        got=$(client cat "$o" | sort | sha256sum | cut -c1-16)
        [ "$got" = "$want" ] || { echo "round $r: output $o differs from run-local" >&2; exit 1; }
    done
    echo "round $r first $first rerun $rerun full $full maps $planned ran $ran reused $reused"
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    pids=()
done | tee "$work/runs"
median() { awk -v f="$1" '{ print $f }' "$work/runs" | median_of; }
first=$(median 4) rerun=$(median 6) full=$(median 8)
awk -v a="$first" -v b="$rerun" -v c="$full" 'BEGIN {
    printf "wordcount: first run median %.3f s, after the edit %.3f s with the memo (%.2f of the first), %.3f s without\n",
        a, b, b / a, c }'
