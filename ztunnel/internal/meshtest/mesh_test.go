package meshtest

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"net/netip"
	"strings"
	"syscall"
	"testing"
	"time"

	discoveryv1 "github.com/amesh-dev/amesh/api/discovery/v1"

	"github.com/amesh-dev/amesh/ztunnel/internal/netns"
	"github.com/amesh-dev/amesh/ztunnel/internal/testnet"
)

var (
	vipB = netip.MustParseAddr("10.96.0.10") // service of pod b (node1)
	vipC = netip.MustParseAddr("10.96.0.11") // service of pod c (node2)
)

// marker is the plaintext that must never appear between namespaces.
var marker = []byte("AMESH-PLAINTEXT-MARKER-")

func payload(n int) []byte { return bytes.Repeat(marker, n/len(marker)+1)[:n] }

// world is the standard test mesh: node1 runs enrolled pods a and b and
// an un-enrolled pod u; node2 runs enrolled pod c; the node2 namespace
// runs a server outside the mesh on 9090.
type world struct {
	*Mesh
	n1, n2     *testnet.Node
	a, b, c, u *Pod
}

func newWorld(t *testing.T) *world {
	m := NewMesh(t)
	w := &world{Mesh: m, n1: m.Nodes[0], n2: m.Nodes[1]}
	w.a = m.AddPod(w.n1, "a", true)
	w.b = m.AddPod(w.n1, "b", true)
	w.u = m.AddPod(w.n1, "u", false)
	w.c = m.AddPod(w.n2, "c", true)
	m.Ctl.SetService("svc-b", vipB, w.b)
	m.Ctl.SetService("svc-c", vipC, w.c)
	w.n2.Echo(t, 9090)
	m.StartZtunnel(w.n1)
	m.StartZtunnel(w.n2)
	return w
}

// converse runs one echo conversation and checks bytes, half-close and
// the client address the server saw.
func converse(t testing.TB, from *Pod, to string, wantSeen netip.Addr, size int) {
	t.Helper()
	data := payload(size)
	seen, echoed, err := from.Converse(to, data)
	if err != nil {
		t.Fatalf("%s → %s: %v", from.Name, to, err)
	}
	if seen != wantSeen.String() {
		t.Fatalf("%s → %s: server saw client %s, want %s", from.Name, to, seen, wantSeen)
	}
	if !bytes.Equal(echoed, data) {
		t.Fatalf("%s → %s: echoed %d bytes, want %d identical", from.Name, to, len(echoed), len(data))
	}
}

func noMarker(t *testing.T, what string, pcap []byte) {
	t.Helper()
	if bytes.Contains(pcap, marker) {
		t.Fatalf("%s: plaintext payload captured on the wire", what)
	}
}

func TestMesh(t *testing.T) {
	w := newWorld(t)

	t.Run("same node by service VIP", func(t *testing.T) {
		capB := StartCapture(t, w.n1.NS, w.b.HostIf())
		converse(t, w.a, vipB.String()+":80", w.a.IP, 256<<10)
		pcap := capB.Stop()
		noMarker(t, "veth of b", pcap)
		if n := capB.Count(t, "tcp dst port 15008"); n == 0 {
			t.Fatal("no HBONE packets toward b")
		}
		if n := capB.Count(t, "tcp port 8080"); n != 0 {
			t.Fatalf("%d packets to b's application port crossed the veth", n)
		}
	})

	t.Run("cross node by service VIP", func(t *testing.T) {
		capWire := StartCapture(t, w.n1.NS, "wire")
		converse(t, w.a, vipC.String()+":80", w.a.IP, 256<<10)
		pcap := capWire.Stop()
		noMarker(t, "wire", pcap)
		if n := capWire.Count(t, "tcp dst port 15008"); n == 0 {
			t.Fatal("no HBONE packets on the wire")
		}
	})

	t.Run("by pod IP across nodes", func(t *testing.T) {
		converse(t, w.a, w.c.IP.String()+":8080", w.a.IP, 1<<10)
	})

	t.Run("outside the mesh passes through", func(t *testing.T) {
		capWire := StartCapture(t, w.n1.NS, "wire")
		capA := StartCapture(t, w.n1.NS, w.a.HostIf())
		converse(t, w.a, "10.99.0.2:9090", w.a.IP, 1<<10)
		capWire.Stop()
		capA.Stop()
		// Dialled from a's namespace, straight to the original destination.
		for what, c := range map[string]*Capture{"a's veth": capA, "wire": capWire} {
			if n := c.Count(t, "src host "+w.a.IP.String()+" and tcp dst port 9090"); n == 0 {
				t.Fatalf("%s: no packet from a to the original destination", what)
			}
		}
	})

	t.Run("DENY refuses", func(t *testing.T) {
		w.Ctl.SetPolicy(&discoveryv1.Authorization{
			Name: "deny-a", Namespace: "default", Scope: discoveryv1.Authorization_SCOPE_NAMESPACE,
			Action: discoveryv1.Authorization_ACTION_DENY,
			Rules:  []*discoveryv1.Rule{{From: []*discoveryv1.Source{{Principals: []string{"cluster.local/ns/default/sa/a"}}}}},
		})
		deadline := time.Now().Add(5 * time.Second)
		for {
			_, _, err := w.a.Converse(vipC.String()+":80", []byte("x"))
			if err != nil {
				break
			}
			if time.Now().After(deadline) {
				t.Fatal("a still reaches c after the DENY policy")
			}
			time.Sleep(50 * time.Millisecond)
		}
		// b is not affected.
		converse(t, w.b, vipC.String()+":80", w.b.IP, 1<<10)
		w.Ctl.DeletePolicy("default/deny-a")
		waitOK(t, func() error { _, _, err := w.a.Converse(vipC.String()+":80", []byte("x")); return err })
	})

	t.Run("PERMISSIVE admits and STRICT refuses plaintext from outside the mesh", func(t *testing.T) {
		converse(t, w.u, w.c.IP.String()+":8080", w.u.IP, 64<<10)
		w.Ctl.SetMtls(w.c, discoveryv1.MtlsMode_MTLS_MODE_STRICT)
		waitOK(t, func() error {
			if _, _, err := w.u.Converse(w.c.IP.String()+":8080", []byte("x")); err == nil {
				return errStillOpen
			}
			return nil
		})
		// Mesh clients still get in.
		converse(t, w.a, vipC.String()+":80", w.a.IP, 1<<10)
		w.Ctl.SetMtls(w.c, discoveryv1.MtlsMode_MTLS_MODE_PERMISSIVE)
	})

	t.Run("telemetry and config dump", func(t *testing.T) {
		z1, z2 := w.Zt[w.n1], w.Zt[w.n2]
		_, m1, err := z1.HTTP(15020, "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		for _, want := range []string{
			`istio_tcp_connections_opened_total{connection_security_policy="mutual_tls",destination_app="c"`,
			`reporter="source"`, `source_principal="spiffe://cluster.local/ns/default/sa/a"`,
			`istio_tcp_sent_bytes_total{`, `istio_tcp_received_bytes_total{`, `destination_service="svc-c.default.svc.cluster.local"`,
		} {
			if !strings.Contains(m1, want) {
				t.Errorf("node1 metrics lack %s", want)
			}
		}
		_, m2, err := z2.HTTP(15020, "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(m2, `reporter="destination"`) || !strings.Contains(m2, `connection_security_policy="none"`) {
			t.Errorf("node2 metrics lack destination reports (mTLS and plaintext)")
		}
		code, body, err := z1.HTTP(15000, "/config_dump")
		if err != nil || code != 200 {
			t.Fatalf("config_dump: %d %v", code, err)
		}
		var d struct {
			Workloads    []map[string]any `json:"workloads"`
			Services     []map[string]any `json:"services"`
			Certificates []struct {
				ID       string    `json:"identity"`
				State    string    `json:"state"`
				NotAfter time.Time `json:"expirationTime"`
			} `json:"certificates"`
			Pods []struct{ Name string } `json:"pods"`
		}
		if err := json.Unmarshal([]byte(body), &d); err != nil {
			t.Fatalf("config_dump JSON: %v", err)
		}
		if len(d.Workloads) != 4 || len(d.Services) != 2 || len(d.Pods) != 2 {
			t.Errorf("config_dump: %d workloads, %d services, %d pods", len(d.Workloads), len(d.Services), len(d.Pods))
		}
		ids := map[string]bool{}
		for _, c := range d.Certificates {
			if c.State == "valid" && c.NotAfter.After(time.Now()) {
				ids[c.ID] = true
			}
		}
		if !ids["spiffe://cluster.local/ns/default/sa/a"] || !ids["spiffe://cluster.local/ns/default/sa/b"] || len(ids) != 2 {
			t.Errorf("node1 certificates = %v, want a and b", ids)
		}
		if logs := z1.Logs(); !strings.Contains(logs, `"logger":"access"`) || !strings.Contains(logs, `"dst.service":"svc-c.default.svc.cluster.local"`) {
			t.Errorf("no access log lines in node1's output")
		}
	})
}

type waitErr string

func (e waitErr) Error() string { return string(e) }

const errStillOpen = waitErr("still admitted")

func waitOK(t *testing.T, f func() error) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		err := f()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("condition not reached: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestRestart kills ztunnel on node1 with SIGKILL: while it is gone a's
// connections fail without a byte leaving the pod; after a restart new
// connections succeed within 2 s.
func TestRestart(t *testing.T) {
	w := newWorld(t)
	converse(t, w.a, vipC.String()+":80", w.a.IP, 1<<10)
	capA := StartCapture(t, w.n1.NS, w.a.HostIf())
	w.Zt[w.n1].Kill()
	for i := 0; i < 5; i++ {
		if _, _, err := w.a.Converse(vipC.String()+":80", payload(4<<10)); err == nil {
			t.Fatal("connection succeeded with ztunnel dead")
		}
		if _, _, err := w.a.Converse(w.u.IP.String()+":8080", payload(4<<10)); err == nil {
			t.Fatal("passthrough connection succeeded with ztunnel dead (capture must fail closed)")
		}
	}
	start := time.Now()
	startZtunnel(t, w.dir, w.n1, w.Agent[w.n1].path, ztunnelBin)
	deadline := start.Add(2 * time.Second)
	for {
		_, _, err := w.a.Converse(vipC.String()+":80", payload(1<<10))
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no successful connection within 2 s of the restart: %v", err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Logf("first connection after restart succeeded %s after start", time.Since(start))
	pcap := capA.Stop()
	noMarker(t, "a's veth during the restart", pcap)
	if n := capA.Count(t, "tcp dst port 8080 or tcp dst port 80"); n != 0 {
		t.Fatalf("%d packets left a toward an application port in plaintext:\n%s", n, capA.Dump(t, "tcp dst port 8080 or tcp dst port 80"))
	}
}

// TestGracefulShutdown: on SIGTERM ztunnel stops accepting at once, lets a
// live tunnel carry on until the drain deadline, then exits.
func TestGracefulShutdown(t *testing.T) {
	w := newWorld(t)
	h := w.a.Open(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := h.Dial(ctx, "tcp", vipC.String()+":80", netip.Addr{}, netns.SockOpts{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	r := bufio.NewReader(c)
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if l, err := r.ReadString('\n'); err != nil || !strings.HasPrefix(l, "hello") {
		t.Fatalf("greeting %q %v", l, err)
	}
	z := w.Zt[w.n1]
	start := time.Now()
	if err := z.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	// New connections are refused once the listeners are closed.
	waitOK(t, func() error {
		if _, _, err := w.a.Converse(vipC.String()+":80", []byte("x")); err == nil {
			return errStillOpen
		}
		return nil
	})
	// The live tunnel still works while draining.
	if _, err := c.Write([]byte("ping\n")); err != nil {
		t.Fatal(err)
	}
	if l, err := r.ReadString('\n'); err != nil || l != "ping\n" {
		t.Fatalf("live tunnel while draining: %q %v", l, err)
	}
	select {
	case <-z.done:
	case <-time.After(10 * time.Second):
		t.Fatal("ztunnel did not exit after the drain deadline")
	}
	if el := time.Since(start); el < 2*time.Second || el > 6*time.Second {
		t.Fatalf("ztunnel exited after %s, want about the 2 s drain deadline", el)
	}
	if _, err := r.ReadString('\n'); err == nil {
		t.Fatal("live tunnel survived the process")
	}
	if !strings.Contains(z.Logs(), "draining") {
		t.Fatal("no drain in the log")
	}
}

// TestControllerAway: with the controller gone, ztunnel keeps serving with
// the configuration and certificates it has, and stays ready.
func TestControllerAway(t *testing.T) {
	w := newWorld(t)
	converse(t, w.a, vipC.String()+":80", w.a.IP, 1<<10)
	w.Ctl.Stop()
	time.Sleep(500 * time.Millisecond) // let the clients notice
	for i := range 3 {
		converse(t, w.a, vipC.String()+":80", w.a.IP, 16<<10)
		converse(t, w.u, w.c.IP.String()+":8080", w.u.IP, 1<<10)
		if i == 0 {
			for _, n := range w.Nodes {
				if code, body, err := w.Zt[n].HTTP(15021, "/healthz/ready"); err != nil || code != 200 {
					t.Fatalf("%s not ready without the controller: %d %s %v", nodeName(n), code, body, err)
				}
			}
		}
	}
}
