#!/usr/bin/env bash
# Whole-node benchmark: `meshctl put` and `meshctl get` of a random file through one release
# meshd, plus meshd's peak RSS and CPU time. Usage:
#   scripts/bench-node.sh [SIZE_MIB=1024] [RSS_SIZE_MIB=4096]
# The first size is timed for put and get; the second is a put only, to measure peak RSS on a
# large upload. Prints a markdown table. Needs ~2x the sizes in free space under $TMPDIR.
# The node is alone, so its puts are `rep:1`: the node's default policy (rep:3) would need
# two other holders for its write quorum.
set -euo pipefail
cd "$(dirname "$0")/.."
size_mib=${1:-1024}
rss_mib=${2:-4096}

cargo build --release --locked --bins >&2
target=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
meshd="$target/release/meshd"
meshctl="$target/release/meshctl"

work=$(mktemp -d "${TMPDIR:-/tmp}/mesh-bench.XXXXXX")
meshd_pid=
cleanup() {
    [ -n "$meshd_pid" ] && kill "$meshd_pid" 2>/dev/null && wait "$meshd_pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
api="http://127.0.0.1:$port"
MESH_LOG=warn "$meshd" --data-dir "$work/data" --api-addr "127.0.0.1:$port" 2>"$work/meshd.log" &
meshd_pid=$!
for _ in $(seq 1 200); do curl -fs "$api/health" >/dev/null 2>&1 && break; sleep 0.05; done
ctl() { "$meshctl" --api "$api" --data-dir "$work/data" "$@"; }

cpu_secs() { awk '{printf "%.2f", ($14 + $15) / 100}' "/proc/$meshd_pid/stat"; }
peak_rss_mib() { awk '/VmHWM/ {printf "%.0f", $2 / 1024}' "/proc/$meshd_pid/status"; }
now() { date +%s.%N; }
rate() { python3 -c "print(f'{$1 / ($3 - $2):.0f}')"; }

head -c "$((size_mib << 20))" /dev/urandom >"$work/in.bin"
sync

cpu0=$(cpu_secs); t0=$(now)
id=$(ctl put --redundancy rep:1 "$work/in.bin")
t1=$(now); cpu1=$(cpu_secs)
ctl get "$id" -o "$work/out.bin" >/dev/null
t2=$(now); cpu2=$(cpu_secs)
cmp "$work/in.bin" "$work/out.bin"
rm -f "$work/out.bin"
rss_small=$(peak_rss_mib)

put_mbs=$(rate "$size_mib * 1.048576" "$t0" "$t1")
get_mbs=$(rate "$size_mib * 1.048576" "$t1" "$t2")
put_cpu=$(python3 -c "print(f'{($cpu1 - $cpu0) * 1024 / $size_mib:.2f}')")
get_cpu=$(python3 -c "print(f'{($cpu2 - $cpu1) * 1024 / $size_mib:.2f}')")
ctl rm "$id" >/dev/null
rm -f "$work/in.bin"

rss_line=""
if [ "$rss_mib" -gt 0 ]; then
    t3=$(now)
    head -c "$((rss_mib << 20))" /dev/urandom | ctl put --redundancy rep:1 --name big - >/dev/null
    t4=$(now)
    big_mbs=$(rate "$rss_mib * 1.048576" "$t3" "$t4")
    rss_line="| put $((rss_mib / 1024)) GiB from stdin | $big_mbs MB/s | | $(peak_rss_mib) MiB |"
fi

echo "| operation | throughput | meshd CPU-s per GiB | meshd peak RSS |"
echo "|---|---|---|---|"
echo "| put $size_mib MiB | $put_mbs MB/s | $put_cpu | $rss_small MiB |"
echo "| get $size_mib MiB | $get_mbs MB/s | $get_cpu | $rss_small MiB |"
[ -n "$rss_line" ] && echo "$rss_line"
echo
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -r); $(date -u +%Y-%m-%d)"
