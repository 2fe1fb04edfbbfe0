# Sourced by local-mesh.sh and bench-mesh.sh: the parts of a loopback mesh they share. The
# caller defines `bin` (the release binaries), the `pids` array its cleanup kills, and
# `ctl N ARGS...` (meshctl against node N).

# start_bootstrap DIR PORT: starts mesh-bootstrap on 127.0.0.1:PORT (logging to DIR.log) and
# sets `addr` to the address nodes pass to --bootstrap.
start_bootstrap() {
    local dir=$1 port=$2
    "$bin/mesh-bootstrap" --data-dir "$dir" --listen "/ip4/127.0.0.1/udp/$port/quic-v1" 2>"$dir.log" &
    pids+=($!)
    addr=""
    for _ in $(seq 100); do
        addr=$(grep -o -- '--bootstrap /ip4/[^ ]*' "$dir.log" | head -1 | cut -d' ' -f2 || true)
        [ -n "$addr" ] && return
        sleep 0.1
    done
    echo "bootstrap peer did not start; see $dir.log" >&2
    exit 1
}

# wait_peers N WANT: waits (up to a minute) until node N sees WANT peers alive.
wait_peers() {
    local n=$1 want=$2
    for _ in $(seq 300); do
        if [ "$(ctl "$n" peers --json 2>/dev/null | grep -o '"liveness": *"alive"' | wc -l)" -ge "$want" ]; then return; fi
        sleep 0.2
    done
    echo "node $n did not see $want peers alive" >&2
    exit 1
}
