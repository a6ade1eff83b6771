# Shared by the interop scripts (sourced): installs what they need, gives each run a temporary
# directory, and starts daemons on 127.0.0.1 that stop when the script exits.

# setup P2PMR_BIN: the npm packages from the lockfile (again whenever the lockfile is newer
# than what npm last installed) and Debian's chromium, if missing.
setup() {
    bin=$(realpath "$1")
    [[ $here/node_modules/.package-lock.json -nt $here/package-lock.json ]] ||
        (cd "$here" && npm ci --no-audit --no-fund --silent)
    if ! command -v chromium >/dev/null; then
        apt-get install -y -q chromium >/dev/null
    fi
    work=$(mktemp -d)
    pids=()
    trap 'kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
}

# p2pmr HOME ARGS...: the CLI on the repository $work/HOME, without mDNS.
p2pmr() { "$bin" --home "$work/$1" --no-mdns "${@:2}"; }

# start NAME [PEER [DAEMON ARGS...]]: a daemon on $work/NAME with its API on a free port, once
# it listens.
start() {
    local out=$work/$1.out
    # The binary itself in the background (not the p2pmr function, whose subshell would be
    # what $! names and the exit trap kills, leaving the daemon running).
    "$bin" --home "$work/$1" --no-mdns ${2:+--peer "$2"} daemon --listen /ip4/127.0.0.1/tcp/0 \
        --api 127.0.0.1:0 "${@:3}" >"$out" 2>"$work/$1.err" &
    pids+=($!)
    for _ in $(seq 200); do
        grep -q "^listening on" "$out" 2>/dev/null && break
        sleep 0.05
    done
    grep -q "^listening on" "$out" || { echo "interop: daemon $1 did not start" >&2; cat "$work/$1.err" >&2; exit 1; }
}

# listening NAME: daemon NAME's first listen address.
listening() { grep -m1 '^listening on' "$work/$1.out" | awk '{print $3}'; }

# api NAME: daemon NAME's API URL.
api() { grep -m1 '^api listening on' "$work/$1.out" | awk '{print $4}'; }
