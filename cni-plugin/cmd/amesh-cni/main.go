// Command amesh-cni is the chained CNI plugin that hands enrolled pods to
// the amesh node agent for traffic redirection. It links no Kubernetes
// client.
package main

import (
	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/amesh-dev/amesh/cni-plugin/internal/plugin"
)

func main() {
	skel.PluginMainFuncs(plugin.Funcs(), version.PluginSupports(plugin.SupportedVersions()...), plugin.About)
}
