#!/usr/bin/env bash
# The waypoint against Envoy configured as a waypoint (same hops) and as a
# plain L7 proxy (same route, retries, metrics, cores, load). Needs root, wrk, h2load and envoy (scripts/deps.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
# Each proxy on its own, as its Dockerfile builds it (one build would unify
# the crates' features across them and measure binaries we do not ship).
cargo build --release -p ztunnel
cargo build --release -p waypoint
cargo build --release -p bench --bin waypoint-bench
exec ./target/release/waypoint-bench
