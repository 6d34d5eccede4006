// Command coredns is CoreDNS, pinned by this module's go.mod, compiled with
// the subset of its in-tree plugins that the local cluster's DNS needs
// (cluster.local from the Kubernetes API, forwarding, caching, health,
// readiness and metrics). It is CoreDNS's own main with a shorter plugin list
// (the documented way to build CoreDNS with a custom plugin set); the
// directive order stays CoreDNS's own (core/dnsserver.Directives).
package main

import (
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/forward"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/hosts"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/loadbalance"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/loop"
	_ "github.com/coredns/coredns/plugin/metrics"
	_ "github.com/coredns/coredns/plugin/ready"
	_ "github.com/coredns/coredns/plugin/reload"
	_ "github.com/coredns/coredns/plugin/whoami"

	"github.com/coredns/coredns/coremain"
)

func main() {
	coremain.Run()
}
