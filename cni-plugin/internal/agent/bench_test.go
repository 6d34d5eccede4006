package agent

import (
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/plugins/pkg/testutils"
)

// BenchmarkChainAdd measures a pod's CNI ADD through the real chain:
// primary-only (bridge + host-local, the baseline) against the same chain
// with amesh-cni for a pod outside the mesh and for an enrolled pod
// (agent lookup, netns entry, capture rules, ZDS hand-off and ack).
// Netns creation and DEL are not timed.
func BenchmarkChainAdd(b *testing.B) {
	h := newHarness(b)
	h.startAgent()
	h.ztunnel()
	primary := h.list()
	var plugins []*libcni.PluginConfig
	for _, p := range primary.Plugins {
		if p.Network.Type != "amesh-cni" {
			plugins = append(plugins, p)
		}
	}
	primaryOnly := &libcni.NetworkConfigList{Name: primary.Name, CNIVersion: primary.CNIVersion, Plugins: plugins}
	if len(plugins) == len(primary.Plugins) {
		b.Fatal("amesh-cni is not chained")
	}
	enrolled := h.namespace("bench-mesh", true)
	plain := h.namespace("bench-plain", false)

	run := func(b *testing.B, list *libcni.NetworkConfigList, namespace string) {
		pod := h.pod(namespace, fmt.Sprintf("p%d-%d", b.N, rand.Uint32()), nil)
		for i := 0; i < b.N; i++ {
			b.StopTimer()
			n, err := testutils.NewNS()
			if err != nil {
				b.Fatal(err)
			}
			pod.netns = n
			pod.containerID = fmt.Sprintf("bench%d", i)
			b.StartTimer()
			if err := h.inNode(func() error {
				_, err := h.cni.AddNetworkList(b.Context(), list, h.rt(pod))
				return err
			}); err != nil {
				b.Fatal(err)
			}
			b.StopTimer()
			if err := h.inNode(func() error { return h.cni.DelNetworkList(b.Context(), list, h.rt(pod)) }); err != nil {
				b.Fatal(err)
			}
			n.Close()
			if err := testutils.UnmountNS(n); err != nil {
				b.Fatal(err)
			}
			b.StartTimer()
		}
	}
	b.Run("primary-only", func(b *testing.B) { run(b, primaryOnly, plain) })
	b.Run("amesh-plain-pod", func(b *testing.B) { run(b, h.list(), plain) })
	b.Run("amesh-enrolled-pod", func(b *testing.B) { run(b, h.list(), enrolled) })
}
