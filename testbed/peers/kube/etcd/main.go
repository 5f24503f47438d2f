// etcd for the cluster tests, built from the same etcd module kube-apiserver
// is built against, so the two always agree on the wire.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
