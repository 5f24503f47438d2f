#!/usr/bin/env bash
# Every test: unit tests and the end-to-end tests on network namespaces with
# real ztunnel processes, tshark and Envoy. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
# The real kube-apiserver, etcd and istiod for the cluster tests (cached).
bash scripts/peers.sh
# CI builds once: incremental state only costs disk (it reached 18 GB here).
export CARGO_INCREMENTAL=0
export ENVOY_BIN="${ENVOY_BIN:-$(command -v envoy)}"
cargo build --workspace --bins --tests
# The static CNI plugin the istio-cni tests install (testbed::static_plugin).
cargo build -p istio-cni --no-default-features --bin istio-cni --target x86_64-unknown-linux-musl
# Two at a time: each end-to-end test runs two ztunnels on this 2-core machine.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace -- --test-threads=2 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# cargo's last line is a doc-test summary; close with the whole count.
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
[[ "$status" == 0 ]] || exit "$status"
# A short run of every fuzz target (FUZZ_SECS each; the long runs are
# documented in the issue notes): a crash or hang fails the job.
bash scripts/fuzz.sh "${FUZZ_SECS:-10}"
