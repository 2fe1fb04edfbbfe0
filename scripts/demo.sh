#!/usr/bin/env bash
# The README's first command: builds what the demo needs (release meshd, meshctl,
# mesh-bootstrap and netsim), then runs `netsim demo`: a mesh in three emulated clouds, a
# put from aws, where the replicas went, a killed holder, a get from gcp checked by BLAKE3,
# and a clean teardown. As root it runs behind the emulated WAN (network namespaces and
# netsim's router); otherwise on loopback, without latency, and it says so.
#
#   scripts/demo.sh [netsim demo options]      e.g. --size-mib 64, --loopback
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bins
bin="${CARGO_TARGET_DIR:-$PWD/target}/release"
exec "$bin/netsim" demo --bin-dir "$bin" "$@"
