#!/usr/bin/env bash
# The waypoint against Envoy configured as a waypoint (same hops) and as a
# plain L7 proxy (same route, retries, metrics, cores, load). Needs root, wrk, h2load and envoy (scripts/deps.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
cargo build --release -p ztunnel -p waypoint -p bench
exec ./target/release/waypoint-bench
