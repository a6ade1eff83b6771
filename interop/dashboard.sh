#!/usr/bin/env bash
# The web dashboard in headless chromium (Debian's package, installed if missing): three
# daemons on 127.0.0.1 that let one client peer run jobs (--allow-jobs), a text corpus of MIB
# MiB on all three, a stranger's job refused, and a wordcount run from the page's form. The
# page must show the three daemons up, the stranger turned away, and the job reaching
# `completed` with the output CID the allowed client gets for the same job. Prints the events latency (a task finishing
# at its coordinator to the page showing it, beside a plain client of the same stream) and
# saves a screenshot to target/dashboard.png.
# Usage: interop/dashboard.sh [P2PMR_BIN] [MIB] [REDUCERS]   (run by interop/run.sh)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/lib.sh"
setup "${1:-$here/../target/debug/p2pmr}"
mib=${2:-8}
reducers=${3:-2}

# Only the client "c" (and the daemons, the page's own among them) may run jobs here.
friend=$(p2pmr c id)
start d1 "" --allow-jobs "$friend"
start d2 "$(listening d1)" --allow-jobs "$friend"
start d3 "$(listening d1)" --allow-jobs "$friend"
corpus=$here/../../shared/bench/make-corpus.sh
[[ -x $corpus ]] || { echo "dashboard: $corpus is missing" >&2; exit 1; }
"$corpus" "$work/text" "$mib" >/dev/null 2>&1
text=$(p2pmr c add --peer "$(listening d1)" --replicas 3 "$work/text")
# A stranger is turned away; the page must show it.
stranger=$(p2pmr s id)
if p2pmr s run --peer "$(listening d1)" --job wordcount --input "$text" 2>"$work/s.err"; then
    echo "dashboard: a peer not on --allow-jobs ran a job" >&2; exit 1
fi
grep -q "not allowed to run jobs on this network" "$work/s.err" || {
    echo "dashboard: the stranger was not told why:" >&2; cat "$work/s.err" >&2; exit 1; }
shot=$here/../target/dashboard.png
mkdir -p "$(dirname "$shot")"
seen=$(node "$here/dashboard.mjs" "$(api d1)" 3 "$text" "$reducers" "$shot" "$stranger")
shown=$(sed -E 's/.*"output":"([^"]+)".*/\1/' <<<"$seen")
cli=$(p2pmr c run --peer "$(listening d1)" --job wordcount --input "$text" --reducers "$reducers" 2>/dev/null | tail -n 1)
[[ $shown == "$cli" ]] || { echo "dashboard: the page showed $shown, the CLI got $cli" >&2; exit 1; }
echo "interop: the dashboard in chromium: $seen (screenshot: target/dashboard.png)"
