#!/usr/bin/env bash
# The standalone demo: build, then run a two-node mesh from examples/mesh.yaml
# on network namespaces, send traffic, show the result, clean up. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
cargo build --release -p ztunnel -p istio-cni -p waypoint -p testbed
exec ./target/release/mesh-demo --config "${1:-examples/mesh.yaml}" --ztunnel target/release/ztunnel \
  --agent target/release/istio-cni-agent --plugin target/release/istio-cni \
  --waypoint target/release/waypoint
