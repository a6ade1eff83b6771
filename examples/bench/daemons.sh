# Daemon processes and timing helpers for the benchmark scripts, sourced by them. Expects
# `bin` (the p2pmr binary), `work` (a scratch directory) and `pids` (an array the script's
# exit trap kills).

# start_daemon NAME [GLOBAL ARGS...]: a daemon with its repository at $work/NAME, on
# 127.0.0.1 (TCP, or the address in `listen` if set) without mDNS or HTTP API, and the
# daemon options in the array `daemon_args` if set, its output in $work/NAME.out; returns
# once it listens.
start_daemon() {
    local name=$1
    shift
    "$bin" --home "$work/$name" --no-mdns "$@" daemon --listen "${listen:-/ip4/127.0.0.1/tcp/0}" \
        --api off ${daemon_args[@]+"${daemon_args[@]}"} >"$work/$name.out" 2>"$work/$name.err" &
    pids+=($!)
    for _ in $(seq 400); do
        grep -q "^listening on" "$work/$name.out" 2>/dev/null && return
        sleep 0.05
    done
    echo "daemon $name did not start: $(cat "$work/$name.err")" >&2
    exit 1
}

# addr NAME: the first address daemon NAME listens on.
addr() { grep -m1 '^listening on' "$work/$1.out" | awk '{print $3}'; }

# start_chain PREFIX N [GLOBAL ARGS...]: daemons PREFIX1 to PREFIXN, each after the first told
# only of the first (Kademlia finds them the rest).
start_chain() {
    local prefix=$1 n=$2 i
    shift 2
    start_daemon "${prefix}1" "$@"
    for i in $(seq 2 "$n"); do
        start_daemon "$prefix$i" --peer "$(addr "${prefix}1")" "$@"
    done
}

# peer_args PREFIX N: `--peer ADDR` for each of daemons PREFIX1 to PREFIXN, a word a line.
peer_args() {
    local i
    for i in $(seq "$2"); do printf '%s\n' --peer "$(addr "$1$i")"; done
}

# now: nanoseconds; secs START END: the seconds between two of them.
now() { date +%s%N; }
secs() { awk -v n=$(($2 - $1)) 'BEGIN { printf "%.4f", n / 1e9 }'; }

# median_of: the median of the numbers on standard input, one per line.
median_of() {
    sort -g | awk '{ a[NR] = $1 } END { if (NR) print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}
