//go:build tools

// Pins a real node's components into this module (kubelet, the scheduler and
// controllers that put pods on it, kube-proxy for Service IPs, kubectl for
// the user's install command), resolved against the replace lines of go.mod:
// the same k8s.io/kubernetes as the API server in ../kube.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
