# Network namespaces on one bridge, for the LAN scripts (sourced by run.sh and cut.sh).
#
# `lan_start TAG VETH SUBNET COUNT [BIN]` sets everything up: `lan_up` makes namespaces
# "$tag-1".."$tag-$count" with addresses $subnet.1..$subnet.$count/24, joined by a bridge
# that lives in a namespace of its own ("$tag-sw"), so nothing touches the host's network
# (VETH names the host-side interfaces: short, as names are at most 15 bytes); `work` is a
# scratch directory and `pids` the processes to kill; `lan_cleanup`, installed as the EXIT
# trap, kills them and removes it all. `lan_bin` finds the binary and `lan_daemons` starts
# daemons in the first namespaces.

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

lan_start() {
    tag=$1 veth=$2 subnet=$3 count=$4
    work=$(mktemp -d)
    pids=()
    lan_up
    lan_bin "${5:-}"
    export RUST_LOG=${RUST_LOG:-warn}
}

lan_cleanup() {
    local status=$?
    for pid in "${pids[@]}"; do
        kill -9 "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    for i in $(seq "$count"); do ip netns del "$tag-$i" 2>/dev/null || true; done
    ip netns del "$tag-sw" 2>/dev/null || true
    rm -rf "$work"
    if [[ $status -ne 0 ]]; then echo "$(basename "$0"): FAILED" >&2; fi
    exit $status
}

lan_up() {
    trap lan_cleanup EXIT INT TERM
    ip netns add "$tag-sw"
    ip -n "$tag-sw" link add br0 type bridge
    ip -n "$tag-sw" link set br0 up
    for i in $(seq "$count"); do
        ip netns add "$tag-$i"
        ip link add "$veth$i" type veth peer name eth0 netns "$tag-$i"
        ip link set "$veth$i" netns "$tag-sw"
        ip -n "$tag-sw" link set "$veth$i" master br0 up
        ip -n "$tag-$i" addr add "$subnet.$i/24" dev eth0
        ip -n "$tag-$i" link set eth0 up
        ip -n "$tag-$i" link set lo up
    done
}

# Runs a command in namespace N.
in_ns() { local ns=$1; shift; ip netns exec "$tag-$ns" "$@"; }

# Sets namespace N's link on the bridge up or down (a cable plugged in or pulled).
lan_link() { ip -n "$tag-sw" link set "$veth$1" "$2"; }

# Sets bin: the given p2pmr binary, else $P2PMR_BIN, else the debug build (built if missing).
lan_bin() {
    bin=${1:-${P2PMR_BIN:-$root/target/debug/p2pmr}}
    if [[ ! -x $bin ]]; then
        cargo build --quiet --manifest-path "$root/Cargo.toml" -p p2pmr
    fi
    bin=$(realpath "$bin")
}

# Starts a daemon in each of namespaces 1..N (extra arguments go to `p2pmr daemon`), with
# homes and logs under $work, and waits until each listens on its namespace's address.
lan_daemons() {
    local n=$1 i
    shift
    for i in $(seq "$n"); do
        # Not through in_ns: a backgrounded function is a subshell, and killing it would leave
        # the daemon running. `ip netns exec` execs the daemon, so $! is the daemon itself.
        ip netns exec "$tag-$i" "$bin" --home "$work/d$i" daemon "$@" \
            >"$work/d$i.out" 2>"$work/d$i.err" &
        pids+=($!)
    done
    for i in $(seq "$n"); do
        for _ in $(seq 100); do
            grep -q "^listening on /ip4/$subnet.$i/" "$work/d$i.out" && break
            sleep 0.1
        done
        grep -q "^listening on /ip4/$subnet.$i/" "$work/d$i.out" || {
            echo "daemon $i did not start:" >&2; cat "$work/d$i.out" "$work/d$i.err" >&2; exit 1; }
    done
}
