//go:build tools

// Pins istiod (pilot-discovery), istioctl and helm into this module; scripts/peers.sh
// builds them with `go build istio.io/istio/pilot/cmd/pilot-discovery` and
// `go build istio.io/istio/istioctl/cmd/istioctl` (and helm.sh/helm/v4/cmd/helm, and
// Istio's sample ext_authz server) from here.
package tools

import (
	_ "helm.sh/helm/v4/cmd/helm"
	_ "istio.io/istio/istioctl/cmd/istioctl"
	_ "istio.io/istio/pilot/cmd/pilot-discovery"
	_ "istio.io/istio/samples/extauthz/cmd/extauthz"
)
