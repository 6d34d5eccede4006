//go:build e2e

package suite

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/amesh-dev/amesh/e2e/internal/kube"
	"github.com/amesh-dev/amesh/e2e/internal/mesh"
	"github.com/amesh-dev/amesh/e2e/internal/wire"
)

// pair is the suite's basic topology: a server Service (sample role
// details, /echo) on the second node and a client on the first, so that
// their traffic crosses the node network.
type pair struct {
	ns             string
	server, client mesh.Workload
}

func newPair(t *testing.T, prefix string, enrol bool) pair {
	t.Helper()
	p := pair{
		ns:     namespace(t, prefix, enrol),
		server: mesh.Workload{Name: "server", Service: true, Node: shared.nodes[1]},
		client: mesh.Workload{Name: "client", Role: "client", Node: shared.nodes[0]},
	}
	deploy(t, p.ns, p.server, p.client)
	return p
}

func (p pair) url(path string) string {
	return fmt.Sprintf("http://server.%s:%d%s", p.ns, mesh.PortApp, path)
}

// TestEnrolledTrafficIsMutualTLS: between two enrolled pods on different
// nodes, everything on the wire is TLS to the HBONE port (a marker sent in
// the request never appears in clear), the server sees the client's own
// address, and both ztunnels report the SPIFFE identities of both ends in
// their metrics and access logs.
func TestEnrolledTrafficIsMutualTLS(t *testing.T) {
	p := newPair(t, "mtls", true)
	ctx := ctxFor(t, 3*time.Minute)
	c := shared.c
	if err := mesh.WaitRedirection(ctx, c, p.ns, "", "enabled", time.Minute); err != nil {
		t.Fatal(err)
	}
	clientPod, serverPod := pod(t, p.ns, p.client), pod(t, p.ns, p.server)
	tool, err := mesh.CaptureNode(ctx, c, p.ns, serverPod.Spec.NodeName)
	if err != nil {
		t.Fatal(err)
	}
	d := driver(t, p.ns, p.client)
	filter := fmt.Sprintf("tcp and host %s and host %s", clientPod.Status.PodIP, serverPod.Status.PodIP)
	capture, err := mesh.StartCapture(ctx, c, p.ns, tool, filter, 2*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	marker := "amesh-marker-" + randSuffix() + randSuffix()
	start := time.Now()
	res, err := d.Run(ctx, url.Values{
		"url": {p.url("/echo?" + marker)}, "n": {"20"}, "newconn": {"true"},
		"h": {"x-amesh-echo: true", "x-marker: " + marker}, "field": {"peer.remoteAddr"},
	})
	if err != nil {
		t.Fatal(err)
	}
	segs, err := capture.Stop(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if res.OK != 20 {
		t.Fatalf("requests through the mesh: %+v", res)
	}

	// On the wire: only TLS, only to 15008, never the marker.
	conns := wire.Conns(segs)
	if len(conns) == 0 {
		t.Fatalf("captured nothing between %s and %s (tcpdump: %s)", clientPod.Status.PodIP, serverPod.Status.PodIP, capture.Stderr())
	}
	records := 0
	for _, cn := range conns {
		if cn.Server.Port() != mesh.PortHBONE {
			t.Errorf("connection %s → %s is not to the HBONE port %d", cn.Client, cn.Server, mesh.PortHBONE)
		}
		for dir, b := range map[string][]byte{"up": cn.Up, "down": cn.Down} {
			if bytes.Contains(b, []byte(marker)) {
				t.Errorf("connection %s → %s (%s): the marker is in clear text", cn.Client, cn.Server, dir)
			}
			n, err := wire.TLSRecords(b)
			if err != nil {
				t.Errorf("connection %s → %s (%s): not TLS: %v", cn.Client, cn.Server, dir, err)
			}
			records += n
		}
	}
	if records == 0 {
		t.Errorf("no TLS records in %d connections", len(conns))
	}
	t.Logf("wire: %d connections, %d TLS records, all to :%d", len(conns), records, mesh.PortHBONE)

	// The server saw the client pod's address (ztunnel keeps the source IP).
	peers := res.Fields["peer.remoteAddr"]
	if len(peers) == 0 {
		t.Errorf("no peer addresses in the answers: %+v", res)
	}
	for addr := range peers {
		if host, _, _ := net.SplitHostPort(addr); host != clientPod.Status.PodIP {
			t.Errorf("server saw client address %s, want the client pod's %s", addr, clientPod.Status.PodIP)
		}
	}

	// Metrics: both ztunnels count the connection with both identities.
	clientID, serverID := mesh.Identity(p.ns, "client"), mesh.Identity(p.ns, "server")
	err = kube.Poll(ctx, time.Second, 30*time.Second, func(ctx2 context.Context) (bool, error) {
		ms, err := mesh.ScrapeAll(ctx2, c, mesh.SystemNamespace, "app=ztunnel", mesh.PortMetrics)
		if err != nil {
			return false, err
		}
		for _, reporter := range []string{"source", "destination"} {
			n := mesh.SumAll(ms, "istio_tcp_connections_opened_total", map[string]string{
				"reporter": reporter, "source_principal": clientID, "destination_principal": serverID,
				"connection_security_policy": "mutual_tls", "destination_workload_namespace": p.ns,
			})
			if n < 20 {
				return false, fmt.Errorf("reporter=%s: %v mutual_tls connections from %s to %s, want ≥ 20", reporter, n, clientID, serverID)
			}
		}
		return true, nil
	})
	if err != nil {
		t.Error(err)
	}

	// Access logs: the destination ztunnel logged inbound HBONE connections
	// with both identities.
	err = kube.Poll(ctx, time.Second, 30*time.Second, func(ctx2 context.Context) (bool, error) {
		logs, err := mesh.ZtunnelAccessLogs(ctx2, c, time.Since(start)+5*time.Second)
		if err != nil {
			return false, err
		}
		in, out := 0, 0
		for _, l := range logs {
			if l.SrcIdentity != clientID || l.DstIdentity != serverID {
				continue
			}
			switch {
			case l.Direction == "inbound" && l.Protocol == "hbone" && strings.HasPrefix(l.DstWorkload, p.ns+"/server-"):
				in++
			case l.Direction == "outbound" && l.Protocol == "hbone" && strings.HasPrefix(l.SrcWorkload, p.ns+"/client-"):
				out++
			}
		}
		if in < 20 || out < 20 {
			return false, fmt.Errorf("access logs %s → %s: %d inbound, %d outbound HBONE records, want ≥ 20 each", clientID, serverID, in, out)
		}
		return true, nil
	})
	if err != nil {
		t.Error(err)
	}
}
