//go:build tools

// Pins kube-apiserver into this module so `go build k8s.io/kubernetes/cmd/kube-apiserver`
// resolves against the replace lines above.
package tools

import _ "k8s.io/kubernetes/cmd/kube-apiserver"
