#!/usr/bin/env bash
# The fault-tolerance acceptance run: 5 `p2pmr daemon` processes on 127.0.0.1, a 200 MiB
# corpus added with 3 replicas, wordcount with 4 reducers once without faults and once while
# a daemon is killed (SIGKILL) every 3 s and restarted, never more than 2 down at once, and
# one is frozen (SIGSTOP) for 20 s. Fails unless both runs give the same output CID. Then,
# with every daemon back, no block may be missing; one daemon is killed for good and every
# block must be back to 3 copies within the grace period (10 s here) plus 120 s.
#
#   examples/chaos/run.sh            # debug build (what .ci/run uses)
#   examples/chaos/run.sh --release  # release build
# Further arguments go to `p2pmr-bench chaos` (see its --help: --seed, --mib, ...).
set -euo pipefail
cd "$(dirname "$0")/../.."
profile=debug
if [[ "${1:-}" == "--release" ]]; then
    profile=release
    shift
fi
if [[ $profile == release ]]; then
    cargo build -q --release --workspace --bins
else
    cargo build -q --workspace --bins
fi
exec "target/$profile/p2pmr-bench" chaos "$@"
