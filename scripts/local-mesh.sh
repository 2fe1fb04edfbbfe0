#!/usr/bin/env bash
# A small local mesh on loopback: one mesh-bootstrap peer and three meshd nodes in three
# zones, a put of a random file on node 1 with rep:3, and a get of it from node 3 that is
# checked byte for byte. The mesh keeps running until Ctrl-C; try `meshctl` against it:
#
#   scripts/local-mesh.sh [SIZE_MIB]        (default 64)
#   then, in another shell:  target/release/meshctl --data-dir .local-mesh/node1 peers
set -euo pipefail
cd "$(dirname "$0")/.."

size_mib="${1:-64}"
# Not MESH_*: meshd reads every MESH_ variable as configuration and refuses unknown ones.
run="${LOCAL_MESH_DIR:-$PWD/.local-mesh}"
cargo build --release --bins
bin="${CARGO_TARGET_DIR:-$PWD/target}/release"

# shellcheck source=scripts/mesh-common.sh
source scripts/mesh-common.sh
ctl() { local n=$1; shift; "$bin/meshctl" --data-dir "$run/node$n" --api "http://127.0.0.1:$((base + 10 + n))" "$@"; }

pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

rm -rf "$run"
mkdir -p "$run"
base=$((20000 + RANDOM % 20000))

start_bootstrap "$run/bootstrap" "$base"
echo "bootstrap peer: $addr"

zones=(aws/us-east-1/a gcp/us-central1/a azure/westeurope/a)
for i in 1 2 3; do
    "$bin/meshd" --data-dir "$run/node$i" --api-addr "127.0.0.1:$((base + 10 + i))" \
        --listen "/ip4/127.0.0.1/udp/$((base + i))/quic-v1" --bootstrap "$addr" \
        --zone "${zones[$((i - 1))]}" 2>"$run/node$i.log" &
    pids+=($!)
done

echo "waiting for the nodes to find each other..."
wait_peers 1 2
ctl 1 peers

head -c "$((size_mib << 20))" /dev/urandom >"$run/sample.bin"
start=$(date +%s.%N)
id=$(ctl 1 --json put "$run/sample.bin" | grep -o '"id": *"[0-9a-f]*"' | grep -o '[0-9a-f]\{64\}')
mid=$(date +%s.%N)
ctl 3 get "$id" -o "$run/sample.out"
end=$(date +%s.%N)
cmp "$run/sample.bin" "$run/sample.out"
calc() { awk "BEGIN { printf \"%.2f\", $1 }"; }
echo "put ${size_mib} MiB on node 1 (rep:3): $(calc "$mid - $start") s; get on node 3: $(calc "$end - $mid") s; bytes match"
ctl 1 stat "$id" | head -20
echo "the mesh is running (logs in $run); Ctrl-C stops it"
wait
