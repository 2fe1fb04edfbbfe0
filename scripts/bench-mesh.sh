#!/usr/bin/env bash
# Whole-system throughput of a replicated mesh on loopback (release build), until netsim
# bench hosts it: a bootstrap peer and 3 meshd nodes; put SIZE MiB with rep:3 on node 1; then
# start a 4th node that holds nothing and get the object from it. Prints MB/s (put: when it
# returned at the write quorum, and when all three holders had every chunk), CPU-seconds
# per GiB (all meshd processes together) and peak RSS per node.
#
#   scripts/bench-mesh.sh [SIZE_MIB]     (default 1024)
#   GET_PROFILER="perf record -a -g -o get.perf --" scripts/bench-mesh.sh   (profile the get; PUT_PROFILER likewise)
#   BIN_DIR=/tmp/old scripts/bench-mesh.sh   (prebuilt meshd, meshctl, mesh-bootstrap: A/B runs of two builds)
set -euo pipefail
cd "$(dirname "$0")/.."

size_mib="${1:-1024}"
run="$(mktemp -d /tmp/mesh-bench.XXXXXX)"
if [ -n "${BIN_DIR:-}" ]; then
    bin="$BIN_DIR"
else
    cargo build --release --bins >/dev/null
    bin="${CARGO_TARGET_DIR:-$PWD/target}/release"
fi

# shellcheck source=scripts/mesh-common.sh
source scripts/mesh-common.sh

pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    [ -n "${KEEP_RUN:-}" ] || rm -rf "$run"
}
trap cleanup EXIT INT TERM

base=$((20000 + RANDOM % 20000))
start_bootstrap "$run/boot" "$base"

start_node() {
    local i=$1
    "$bin/meshd" --data-dir "$run/n$i" --api-addr "127.0.0.1:$((base + 10 + i))" \
        --listen "/ip4/127.0.0.1/udp/$((base + i))/quic-v1" --bootstrap "$addr" \
        --zone "local/zone-$i/a" 2>"$run/n$i.log" &
    pids+=($!)
    eval "pid_$i=$!"
}
ctl() { local n=$1; shift; "$bin/meshctl" --data-dir "$run/n$n" --api "http://127.0.0.1:$((base + 10 + n))" "$@"; }
cpu_of() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hwm_of() { awk '/VmHWM/ {print int($2 / 1024)}' "/proc/$1/status"; }

for i in 1 2 3; do start_node "$i"; done
wait_peers 1 2
head -c "$((size_mib << 20))" /dev/urandom >"$run/in.bin"
tick=$(getconf CLK_TCK)
cpu0=$(( $(cpu_of "$pid_1") + $(cpu_of "$pid_2") + $(cpu_of "$pid_3") ))
t0=$(date +%s.%N)
id=$(${PUT_PROFILER:-} "$bin/meshctl" --data-dir "$run/n1" --api "http://127.0.0.1:$((base + 11))" --json put --redundancy rep:3 "$run/in.bin" | grep -o '"id": *"[0-9a-f]*"' | grep -o '[0-9a-f]\{64\}')
t1=$(date +%s.%N)
# The put returns at its write quorum (2 of 3); wait for the third holders too.
for _ in $(seq 600); do
    if ctl 1 --json status | grep -q '"objects_completing": *0'; then break; fi
    sleep 0.05
done
t1b=$(date +%s.%N)
cpu1=$(( $(cpu_of "$pid_1") + $(cpu_of "$pid_2") + $(cpu_of "$pid_3") ))

start_node 4
wait_peers 4 3
cpu2=$(( $(cpu_of "$pid_1") + $(cpu_of "$pid_2") + $(cpu_of "$pid_3") + $(cpu_of "$pid_4") ))
t2=$(date +%s.%N)
${GET_PROFILER:-} "$bin/meshctl" --data-dir "$run/n4" --api "http://127.0.0.1:$((base + 14))" get "$id" -o "$run/out.bin"
t3=$(date +%s.%N)
cpu3=$(( $(cpu_of "$pid_1") + $(cpu_of "$pid_2") + $(cpu_of "$pid_3") + $(cpu_of "$pid_4") ))
cmp "$run/in.bin" "$run/out.bin"
hedged=$(curl -s -H "Authorization: Bearer $(cat "$run/n4/api.token")" "http://127.0.0.1:$((base + 14))/metrics" |
    awk '/^mesh_hedged_fetches_total/ {print $2}')

bytes=$((size_mib << 20))
calc() { awk "BEGIN { printf \"%.6f\", $1 }"; }
gib=$(calc "$size_mib / 1024")
printf 'put  %d MiB rep:3 on node 1:   %6.1f MB/s to W=2, %6.1f MB/s to all 3 holders, %5.1f CPU-s/GiB (3 nodes)\n' \
    "$size_mib" "$(calc "$bytes / ($t1 - $t0) / 1000000")" "$(calc "$bytes / ($t1b - $t0) / 1000000")" \
    "$(calc "($cpu1 - $cpu0) / $tick / $gib")"
printf 'get  %d MiB on node 4 (empty): %6.1f MB/s, %5.1f CPU-s/GiB (4 nodes)\n' "$size_mib" \
    "$(calc "$bytes / ($t3 - $t2) / 1000000")" "$(calc "($cpu3 - $cpu2) / $tick / $gib")"
echo "fetches hedged to a second holder during the get: ${hedged:-0}"
for i in 1 2 3 4; do eval "p=\$pid_$i"; echo "peak RSS node $i: $(hwm_of "$p") MiB"; done
