# Daemon processes for the benchmark scripts, sourced by them. Expects `bin` (the p2pmr
# binary), `work` (a scratch directory) and `pids` (an array the script's exit trap kills).

# start_daemon NAME [GLOBAL ARGS...]: a daemon with its repository at $work/NAME, on
# 127.0.0.1 without mDNS or HTTP API, its output in $work/NAME.out; returns once it listens.
start_daemon() {
    local name=$1
    shift
    "$bin" --home "$work/$name" --no-mdns "$@" daemon --listen /ip4/127.0.0.1/tcp/0 \
        --api off >"$work/$name.out" 2>"$work/$name.err" &
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
