#!/usr/bin/env bash
# Builds the real peers the tests run against (kube-apiserver, etcd, istiod,
# istioctl, helm, the CNI reference plugins, Istio's sample ext_authz server,
# a node's kubelet and its companions) from their Go modules, pinned by
# testbed/peers/*/go.mod. Builds are cached in $MESH_PEERS_DIR keyed by the
# go.sum they came from, so a second run is free.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${MESH_PEERS_DIR:-/var/cache/mesh-peers}"
mkdir -p "$out/bin"
export PATH="$PATH:/usr/local/go/bin"

build() { # module-dir stamp-name packages...   (into $BUILD_TO, default bin/)
  local dir="$1" stamp="$out/$2.stamp" to="${BUILD_TO:-$out/bin}"; shift 2
  local want; want="$(sha256sum "$dir/go.mod" "$dir/go.sum" | sha256sum | cut -c1-16)"
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then return; fi
  echo "peers: building $* (first run takes several minutes)" >&2
  mkdir -p "$to"
  (cd "$dir" && go build -trimpath -o "$to/" "$@")
  echo "$want" > "$stamp"
}

build "$root/testbed/peers/kube" kube k8s.io/kubernetes/cmd/kube-apiserver ./etcd
build "$root/testbed/peers/istio" istio istio.io/istio/pilot/cmd/pilot-discovery
# istioctl reads our ztunnel's /config_dump (ztunnel/tests/istioctl.rs). Its own
# stamp: the istio stamp already matches caches built before istioctl was added.
# Same module and Go build cache as istiod, so only istioctl's own packages
# compile on top of it.
build "$root/testbed/peers/istio" istioctl istio.io/istio/istioctl/cmd/istioctl
# helm renders Istio's own ztunnel and cni charts with our images; the version
# is the one istio's module requires, so the charts meet the helm they ship with.
build "$root/testbed/peers/istio" helm helm.sh/helm/v4/cmd/helm
# Istio's sample external authorizer (HTTP and gRPC v3 Check; allows a
# request carrying `x-ext-authz: allow`): the waypoint's CUSTOM policy tests
# run it as a mesh workload. Same module as istiod, its own stamp.
build "$root/testbed/peers/istio" extauthz istio.io/istio/samples/extauthz/cmd/extauthz
# A real node (testbed/src/cluster/node.rs): kubelet, the scheduler and controllers that
# put pods on it, kube-proxy for Service IPs and kubectl for the install
# command, from the same k8s.io/kubernetes as the API server (most packages
# are already in the Go build cache from it). Their own module and stamp.
# The version is stamped in as a release build would, so the node reports it.
GOFLAGS="-buildvcs=false -ldflags=-X=k8s.io/component-base/version.gitVersion=v1.36.3" \
  build "$root/testbed/peers/node" node \
  k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-scheduler \
  k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kube-proxy \
  k8s.io/kubernetes/cmd/kubectl
# The CNI reference plugins at a version that speaks CNI 1.1.0 (Debian's
# package stops at 1.0.0): istio-cni's tests chain ours with them. Their own
# dir, so they never shadow anything in bin/.
BUILD_TO="$out/cni-plugins" build "$root/testbed/peers/cni" cni-plugins \
  github.com/containernetworking/plugins/plugins/main/bridge \
  github.com/containernetworking/plugins/plugins/main/loopback \
  github.com/containernetworking/plugins/plugins/ipam/host-local
# A real OIDC provider (oauth2-proxy/mockoidc behind a tiny main) for the
# waypoint's RequestAuthentication tests: JWKS over HTTPS, tokens minted and
# keys rotated on a control port. Its own main is part of its stamp.
oidc_main="$(sha256sum "$root/testbed/peers/oidc/main.go" | cut -c1-12)"
build "$root/testbed/peers/oidc" "oidc-$oidc_main" .
# The CRDs istiod watches ship inside the modules it was built from.
mkdir -p "$out/crds"
istio_dir="$(cd "$root/testbed/peers/istio" && go list -m -f '{{.Dir}}' istio.io/istio)"
gw_dir="$(cd "$root/testbed/peers/istio" && go list -m -f '{{.Dir}}' sigs.k8s.io/gateway-api)"
cat "$istio_dir/manifests/charts/base/files/crd-all.gen.yaml" > "$out/crds/istio.yaml"
for f in "$gw_dir"/config/crd/standard/gateway.networking.k8s.io_*.yaml; do
  echo "---"; cat "$f"
done > "$out/crds/gateway-api.yaml"
# Istio's own Grafana dashboards: the dashboard test checks that every series
# and label they query is one our proxies export.
mkdir -p "$out/dashboards"
cp "$istio_dir"/manifests/addons/dashboards/*.json "$out/dashboards/"
ls "$out/bin" "$out/crds" "$out/dashboards" "$out/cni-plugins"
