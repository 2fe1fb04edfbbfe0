#!/usr/bin/env bash
# The README's processing example on a loopback mesh of three nodes: two sources with
# different schemas (a CSV export and a JSONL event log) are each mapped into one schema,
# then validated and deduplicated in one job; the result is fetched and checked against what
# the sources say it must be. Exits non-zero if any step fails.
#
#   scripts/jobs-example.sh
set -euo pipefail
cd "$(dirname "$0")/.."

run="${JOBS_EXAMPLE_DIR:-$PWD/.jobs-example}"
[ -n "${JOBS_EXAMPLE_NO_BUILD:-}" ] || cargo build --release --bins
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
for i in 1 2 3; do
    "$bin/meshd" --data-dir "$run/node$i" --api-addr "127.0.0.1:$((base + 10 + i))" \
        --listen "/ip4/127.0.0.1/udp/$((base + i))/quic-v1" --bootstrap "$addr" \
        --zone "local/zone$i" 2>"$run/node$i.log" &
    pids+=($!)
done
echo "waiting for the nodes to find each other..."
wait_peers 1 2

# The CRM export: id, full_name, updated (seconds). Ids 1..20000; one row in 50 has a
# negative age, which the schema refuses.
{
    echo "id,full_name,age,updated"
    for i in $(seq 1 20000); do
        age=$((20 + i % 50))
        [ $((i % 50)) -eq 0 ] && age=-1
        echo "$i,\"Customer $i\",$age,$((1700000000 + i))"
    done
} >"$run/crm.csv"
# The shop's log: customer_id, name, age, ts. Ids 10001..30000, so half overlap the CRM; the
# shop's record is newer for even ids and older for odd ones.
for i in $(seq 10001 30000); do
    if [ $((i % 2)) -eq 0 ]; then ts=$((1800000000 + i)); else ts=$((1600000000 + i)); fi
    echo "{\"customer_id\":$i,\"name\":\"Shopper $i\",\"age\":$((20 + i % 40)),\"ts\":$ts}"
done >"$run/shop.jsonl"
cat >"$run/customer.schema.json" <<'EOF'
{"type": "object", "required": ["id", "name", "ts"],
 "properties": {"id": {"type": "integer"}, "name": {"type": "string"},
                "age": {"type": "integer", "minimum": 0}, "ts": {"type": "integer"}}}
EOF

set -x
A=$(ctl 1 put "$run/crm.csv" --records csv)
B=$(ctl 2 put "$run/shop.jsonl" --records jsonl)
MA=$(ctl 1 job submit --input "$A" --wait --processor map \
    --param spec='{"rename":{"full_name":"name","updated":"ts"},"cast":{"id":"int","age":"int","ts":"int"}}')
MB=$(ctl 2 job submit --input "$B" --wait --processor map \
    --param spec='{"rename":{"customer_id":"id"}}')
JOB=$(ctl 3 job submit --input "$MA" --input "$MB" \
    --processor validate --param schema=@"$run/customer.schema.json" \
    --processor dedup --param key=id --param ts=ts)
OUT=$(ctl 3 job wait "$JOB")
ctl 3 job status "$JOB"
ctl 1 get "$OUT" -o "$run/customers.jsonl"
set +x

# What the result must be: ids 1..30000 except the CRM rows with a negative age that the shop
# does not also have (ids <= 10000 that are multiples of 50); every overlapping id comes from
# the newer source.
expected=$((30000 - 10000 / 50))
got=$(wc -l <"$run/customers.jsonl")
[ "$got" -eq "$expected" ] || { echo "expected $expected customers, got $got" >&2; exit 1; }
shop_wins=$(grep -c '"name":"Shopper' "$run/customers.jsonl")
[ "$shop_wins" -eq 15000 ] || { echo "expected 15000 records from the shop, got $shop_wins" >&2; exit 1; }
echo "ok: $got customers, $shop_wins of them from the newer shop records; output $OUT"
