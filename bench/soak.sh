#!/usr/bin/env bash
# A bounded soak (SOAK_SECS, default 300) at a steady rate through the
# waypoint and through ztunnel: errors, p99 and RSS per window. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
cargo build --release -p ztunnel -p waypoint -p bench
SOAK_SECS="${SOAK_SECS:-300}" exec ./target/release/waypoint-bench
