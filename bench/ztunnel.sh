#!/usr/bin/env bash
# ztunnel vs direct pod-to-pod, one run, prints a table. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
cargo build --release -p ztunnel -p bench
exec ./target/release/ztunnel-bench target/release/ztunnel
