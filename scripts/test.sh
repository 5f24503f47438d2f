#!/usr/bin/env bash
# Every test: unit tests and the end-to-end tests on network namespaces with
# real ztunnel processes, tshark and Envoy. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
export ENVOY_BIN="${ENVOY_BIN:-$(command -v envoy)}"
cargo build --workspace --tests
# Two at a time: each end-to-end test runs two ztunnels on this 2-core machine.
cargo test --workspace -- --test-threads=2
