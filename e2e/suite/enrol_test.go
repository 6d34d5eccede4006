//go:build e2e

package suite

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/amesh-dev/amesh/e2e/internal/kube"
	"github.com/amesh-dev/amesh/e2e/internal/mesh"
	"github.com/amesh-dev/amesh/e2e/internal/wire"
	"github.com/amesh-dev/amesh/e2e/sample"
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
	start := time.Now()
	w := loadWithCapture(t, p, 20)
	w.assertMTLS(t)
	t.Logf("wire: %d connections, all TLS to :%d", len(w.conns), mesh.PortHBONE)

	// Metrics: both ztunnels count the connection with both identities.
	clientID, serverID := mesh.Identity(p.ns, "client"), mesh.Identity(p.ns, "server")
	err := kube.Poll(ctx, time.Second, 30*time.Second, func(ctx2 context.Context) (bool, error) {
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

// wireResult is what a load with a capture saw.
type wireResult struct {
	conns   []*wire.Conn
	marker  string
	peers   map[string]int64
	ok      int64
	records int
}

// loadWithCapture sends n requests (a new connection each) from the
// client to the server's /echo carrying a marker, with tcpdump running on
// the server's node, and returns what the wire and the server saw.
func loadWithCapture(t *testing.T, p pair, n int) wireResult {
	t.Helper()
	ctx := ctxFor(t, 2*time.Minute)
	c := shared.c
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
	res, err := d.Run(ctx, url.Values{
		"url": {p.url("/echo?" + marker)}, "n": {fmt.Sprint(n)}, "newconn": {"true"},
		"h": {"x-marker: " + marker}, "field": {"peer.remoteAddr"},
	})
	segs, cerr := capture.Stop(ctx)
	if dir := os.Getenv("AMESH_E2E_PCAP_DIR"); dir != "" {
		f := filepath.Join(dir, t.Name()+"-"+randSuffix()+".pcap")
		if err := os.WriteFile(f, capture.Pcap(), 0o644); err == nil {
			t.Logf("capture saved in %s (%d segments; tcpdump: %s)", f, len(segs), capture.Stderr())
		}
	}
	if err != nil {
		t.Fatal(err)
	}
	if cerr != nil {
		t.Fatal(cerr)
	}
	if res.OK != int64(n) {
		t.Fatalf("%d of %d requests OK: codes %v, errors %v", res.OK, n, res.Codes, res.Errors)
	}
	w := wireResult{conns: wire.Conns(segs), marker: marker, peers: res.Fields["peer.remoteAddr"], ok: res.OK}
	if len(w.conns) == 0 {
		t.Fatalf("captured nothing between %s and %s (tcpdump: %s)", clientPod.Status.PodIP, serverPod.Status.PodIP, capture.Stderr())
	}
	for addr := range w.peers {
		if host, _, _ := net.SplitHostPort(addr); host != clientPod.Status.PodIP {
			t.Errorf("server saw client address %s, want the client pod's %s", addr, clientPod.Status.PodIP)
		}
	}
	return w
}

// assertMTLS fails unless every captured connection is TLS to the HBONE
// port and the marker never shows.
func (w wireResult) assertMTLS(t *testing.T) {
	t.Helper()
	for _, cn := range w.conns {
		if cn.Server.Port() != mesh.PortHBONE {
			t.Errorf("connection %s → %s is not to the HBONE port %d", cn.Client, cn.Server, mesh.PortHBONE)
		}
		for dir, b := range map[string][]byte{"up": cn.Up, "down": cn.Down} {
			if bytes.Contains(b, []byte(w.marker)) {
				t.Errorf("connection %s → %s (%s): the marker is in clear text", cn.Client, cn.Server, dir)
			}
			n, err := wire.TLSConn(cn, b)
			if err != nil {
				t.Errorf("connection %s → %s (%s, %d segments, SYN seen %t, gaps %t): not TLS: %v", cn.Client, cn.Server, dir, cn.Segments, cn.Handshake, cn.Gaps, err)
			}
			w.records += n
		}
	}
	if w.records == 0 {
		t.Errorf("no TLS records in %d connections", len(w.conns))
	}
}

// assertDirect fails unless the traffic went straight to the app port in
// clear text (no mesh in the path).
func (w wireResult) assertDirect(t *testing.T) {
	t.Helper()
	plain := 0
	for _, cn := range w.conns {
		if cn.Server.Port() == mesh.PortHBONE {
			t.Errorf("connection %s → %s goes to the HBONE port: still in the mesh", cn.Client, cn.Server)
		}
		if cn.Server.Port() == mesh.PortApp && bytes.Contains(cn.Up, []byte(w.marker)) {
			plain++
		}
	}
	if plain == 0 {
		t.Errorf("no plaintext connection to :%d carrying the marker among %d connections", mesh.PortApp, len(w.conns))
	}
}

// TestEnrolRunningPodsAndUnenrol: pods that run before their namespace is
// labelled are redirected once it is (same pods, no restart: the node
// agent enrols them and annotates them), and removing the label restores
// direct plaintext traffic.
func TestEnrolRunningPodsAndUnenrol(t *testing.T) {
	p := newPair(t, "relabel", false)
	ctx := ctxFor(t, 5*time.Minute)
	c := shared.c
	before := map[string]string{}
	for _, w := range []mesh.Workload{p.client, p.server} {
		pd := pod(t, p.ns, w)
		before[w.Name] = string(pd.UID)
		if a := pd.Annotations[mesh.AnnotRedirection]; a != "" {
			t.Fatalf("pod %s of an unlabelled namespace has %s=%q", pd.Name, mesh.AnnotRedirection, a)
		}
	}
	t.Log("before labelling: direct")
	loadWithCapture(t, p, 5).assertDirect(t)

	if err := mesh.Enrol(ctx, c, p.ns, true); err != nil {
		t.Fatal(err)
	}
	if err := mesh.WaitRedirection(ctx, c, p.ns, "", "enabled", time.Minute); err != nil {
		t.Fatal(err)
	}
	for _, w := range []mesh.Workload{p.client, p.server} {
		if uid := string(pod(t, p.ns, w).UID); uid != before[w.Name] {
			t.Errorf("%s was restarted by enrolment (uid %s → %s)", w.Name, before[w.Name], uid)
		}
	}
	t.Log("after labelling: mTLS")
	loadWithCapture(t, p, 10).assertMTLS(t)

	if err := mesh.Enrol(ctx, c, p.ns, false); err != nil {
		t.Fatal(err)
	}
	if err := mesh.WaitRedirection(ctx, c, p.ns, "", "", time.Minute); err != nil {
		t.Fatal(err)
	}
	t.Log("after un-labelling: direct again")
	loadWithCapture(t, p, 5).assertDirect(t)
}

// TestEnrolmentKeepsOpenConnections: labelling a namespace does not break
// connections its pods already have open (they keep their path until they
// close; new ones are captured), as ambient enrolment is transparent to
// running applications.
func TestEnrolmentKeepsOpenConnections(t *testing.T) {
	knownGap(t)
	p := newPair(t, "keepconn", false)
	ctx := ctxFor(t, 3*time.Minute)
	d := driver(t, p.ns, p.client)
	expectReachable(ctx, t, d, p.url("/echo"), true, 30*time.Second)
	done := make(chan struct{})
	var r sample.LoadResult
	var err error
	go func() {
		defer close(done)
		// One keep-alive connection for the whole run, idle for 3s
		// between requests (so that enrolment happens between two).
		r, err = d.Run(ctx, url.Values{"url": {p.url("/echo")}, "duration": {"13s"}, "qps": {"0.33"}, "c": {"1"}, "timeout": {"2s"}, "field": {"peer.remoteAddr"}})
	}()
	time.Sleep(time.Second)
	if err := mesh.Enrol(ctx, shared.c, p.ns, true); err != nil {
		t.Fatal(err)
	}
	if err := mesh.WaitRedirection(ctx, shared.c, p.ns, "", "enabled", time.Minute); err != nil {
		t.Fatal(err)
	}
	<-done
	if err != nil {
		t.Fatal(err)
	}
	if r.OK != r.Requests || r.Requests < 4 {
		t.Errorf("%d of %d requests on a connection opened before enrolment failed: codes %v, errors %v", r.Requests-r.OK, r.Requests, r.Codes, r.Errors)
	}
	// Go's HTTP client silently retries a request whose reused connection
	// was reset, so the server's view is what tells: one connection (one
	// client address and port) throughout.
	if peers := r.Fields["peer.remoteAddr"]; len(peers) != 1 {
		t.Errorf("the server saw %d client connections %v, want the one opened before enrolment", len(peers), peers)
	}
}

// TestUnenrolmentDrainsOpenConnections: removing the label while a
// request is in flight through ztunnel does not cut it, nor let it out in
// clear text: the pods' capture rules stay until the connection is over
// (ztunnel drains it), so the answer, sent after un-labelling, still
// travels as TLS to the HBONE port — a marker in it never shows on the
// wire — and arrives.
func TestUnenrolmentDrainsOpenConnections(t *testing.T) {
	p := newPair(t, "unenrolopen", true)
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
	expectReachable(ctx, t, d, p.url("/echo"), true, 30*time.Second)
	capture, err := mesh.StartCapture(ctx, c, p.ns, tool,
		fmt.Sprintf("tcp and host %s and host %s", clientPod.Status.PodIP, serverPod.Status.PodIP), 2*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	marker := "amesh-marker-" + randSuffix() + randSuffix()
	type result struct {
		r   sample.LoadResult
		err error
	}
	done := make(chan result, 1)
	go func() {
		// The server echoes the query (the marker) in its answer, 6s late.
		r, err := d.Run(ctx, url.Values{"url": {p.url("/echo?" + marker)}, "n": {"1"}, "newconn": {"true"},
			"timeout": {"30s"}, "h": {"x-amesh-delay: 6s"}})
		done <- result{r, err}
	}()
	time.Sleep(2 * time.Second)
	if err := mesh.Enrol(ctx, c, p.ns, false); err != nil {
		t.Fatal(err)
	}
	if err := mesh.WaitRedirection(ctx, c, p.ns, "", "", time.Minute); err != nil {
		t.Fatal(err)
	}
	res := <-done
	segs, err := capture.Stop(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if res.err != nil || res.r.OK != 1 {
		t.Errorf("request in flight while un-labelling: %v, codes %v, errors %v", res.err, res.r.Codes, res.r.Errors)
	}
	hbone := 0
	for _, cn := range wire.Conns(segs) {
		for dir, b := range map[string][]byte{"up": cn.Up, "down": cn.Down} {
			if bytes.Contains(b, []byte(marker)) {
				t.Errorf("connection %s → %s (%s): the marker is in clear text", cn.Client, cn.Server, dir)
			}
		}
		if cn.Server.Port() == mesh.PortHBONE {
			hbone++
			for dir, b := range map[string][]byte{"up": cn.Up, "down": cn.Down} {
				if _, err := wire.TLSConn(cn, b); err != nil {
					t.Errorf("connection %s → %s (%s): not TLS: %v", cn.Client, cn.Server, dir, err)
				}
			}
		}
	}
	if hbone == 0 {
		t.Error("captured no connection to the HBONE port: where did the request go?")
	}
}
