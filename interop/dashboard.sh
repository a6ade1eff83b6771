#!/usr/bin/env bash
# The web dashboard in headless chromium (Debian's package, installed if missing): three
# daemons on 127.0.0.1, a text corpus of MIB MiB on all three, and a wordcount run from the
# page's form. The page must show the three daemons up and the job reaching `completed` with
# the output CID the CLI gets for the same job. Prints the events latency (a task finishing
# at its coordinator to the page showing it, beside a plain client of the same stream) and
# saves a screenshot to target/dashboard.png.
# Usage: interop/dashboard.sh [P2PMR_BIN] [MIB] [REDUCERS]   (run by interop/run.sh)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/lib.sh"
setup "${1:-$here/../target/debug/p2pmr}"
mib=${2:-8}
reducers=${3:-2}

start d1
start d2 "$(listening d1)"
start d3 "$(listening d1)"
corpus=$here/../../shared/bench/make-corpus.sh
[[ -x $corpus ]] || { echo "dashboard: $corpus is missing" >&2; exit 1; }
"$corpus" "$work/text" "$mib" >/dev/null 2>&1
text=$(p2pmr c add --peer "$(listening d1)" --replicas 3 "$work/text")
shot=$here/../target/dashboard.png
mkdir -p "$(dirname "$shot")"
seen=$(node "$here/dashboard.mjs" "$(api d1)" 3 "$text" "$reducers" "$shot")
shown=$(sed -E 's/.*"output":"([^"]+)".*/\1/' <<<"$seen")
cli=$(p2pmr c run --peer "$(listening d1)" --job wordcount --input "$text" --reducers "$reducers" 2>/dev/null | tail -n 1)
[[ $shown == "$cli" ]] || { echo "dashboard: the page showed $shown, the CLI got $cli" >&2; exit 1; }
echo "interop: the dashboard in chromium: $seen (screenshot: target/dashboard.png)"
