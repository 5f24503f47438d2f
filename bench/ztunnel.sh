#!/usr/bin/env bash
# ztunnel vs direct pod-to-pod, one run, prints a table. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
# ztunnel on its own, as docker/ztunnel.Dockerfile builds it: built with
# the bench (which pulls kube), cargo would unify kube's features into
# ztunnel's crates and measure a larger binary than we ship.
cargo build --release -p ztunnel
cargo build --release -p bench --bin ztunnel-bench
exec ./target/release/ztunnel-bench target/release/ztunnel
