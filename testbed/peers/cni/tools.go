//go:build tools

// Pins the CNI reference plugins (bridge, host-local, loopback) the istio-cni
// tests chain ours with; scripts/peers.sh builds them from here. Debian's
// package stops at CNI 1.0.0; these speak 1.1.0 as well.
package tools

import (
	_ "github.com/containernetworking/plugins/plugins/ipam/host-local"
	_ "github.com/containernetworking/plugins/plugins/main/bridge"
	_ "github.com/containernetworking/plugins/plugins/main/loopback"
)
