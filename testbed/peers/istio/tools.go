//go:build tools

// Pins istiod (pilot-discovery) and istioctl into this module; scripts/peers.sh
// builds them with `go build istio.io/istio/pilot/cmd/pilot-discovery` and
// `go build istio.io/istio/istioctl/cmd/istioctl` from here.
package tools

import (
	_ "istio.io/istio/istioctl/cmd/istioctl"
	_ "istio.io/istio/pilot/cmd/pilot-discovery"
)
