//go:build tools

// Pins istiod (pilot-discovery) into this module; the cluster tests build it with
// `go build istio.io/istio/pilot/cmd/pilot-discovery` from here.
package tools

import _ "istio.io/istio/pilot/cmd/pilot-discovery"
