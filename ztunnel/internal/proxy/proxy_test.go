package proxy

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/amesh-dev/amesh/api/ca"
	"github.com/amesh-dev/amesh/api/capture"
	discoveryv1 "github.com/amesh-dev/amesh/api/discovery/v1"
	"github.com/amesh-dev/amesh/api/hbone"
	"github.com/amesh-dev/amesh/api/identity"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.uber.org/zap/zaptest"

	"github.com/amesh-dev/amesh/ztunnel/internal/agent"
	"github.com/amesh-dev/amesh/ztunnel/internal/netns"
	"github.com/amesh-dev/amesh/ztunnel/internal/route"
	"github.com/amesh-dev/amesh/ztunnel/internal/store"
	"github.com/amesh-dev/amesh/ztunnel/internal/telemetry"
	"github.com/amesh-dev/amesh/ztunnel/internal/testnet"
)

// env is one node with a proxy serving in-process.
type env struct {
	t      *testing.T
	node   *testnet.Node
	store  *store.Store
	proxy  *Proxy
	pods   map[string]*testnet.Pod
	certs  *identity.Store
	bundle *identity.Bundle
	// stop stops the proxy and the certificate store and waits for both
	// Runs to return (idempotent; also called at cleanup).
	stop func()
}

func enroll(t *testing.T, p *testnet.Pod) {
	t.Helper()
	h := p.Open(t)
	if err := h.Do(func() error { return capture.Install(capture.Config{}) }); err != nil {
		t.Fatalf("capture rules in %s: %v", p.Name, err)
	}
}

func workloadOf(p *testnet.Pod, captured bool) store.Resource {
	w := &discoveryv1.Workload{
		Uid: p.Name, Name: p.Name, Namespace: "default", ServiceAccount: p.Name,
		Addresses: [][]byte{p.IP.AsSlice(), p.IP6.AsSlice()}, Node: fmt.Sprintf("node%d", p.Node.Index),
	}
	if captured {
		w.TunnelProtocol = discoveryv1.TunnelProtocol_TUNNEL_PROTOCOL_HBONE
	}
	return store.Resource{Name: p.Name, Body: w}
}

func newEnv(t *testing.T) *env { return newEnvWith(t, nil) }

// newEnvWith builds an env whose proxy gets its certificates through
// wrap(the certificate store) when wrap is not nil.
func newEnvWith(t *testing.T, wrap func(Certs) Certs) *env {
	testnet.RequireRoot(t)
	e := &env{t: t, node: testnet.NewNode(t, 1), store: store.New("cluster.local"), pods: map[string]*testnet.Pod{}}
	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	root, err := ca.NewRoot(td, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	bundle := identity.NewBundle()
	bundle.Set(td, root.Roots())
	certs := identity.NewStore(issuer{root}, identity.StoreOptions{TTL: time.Hour})
	e.certs, e.bundle = certs, bundle
	var pc Certs = certs
	if wrap != nil {
		pc = wrap(certs)
	}
	e.proxy = New(Config{
		Store: e.store, Router: route.New(e.store), Metrics: telemetry.NewMetrics(prometheus.NewRegistry()),
		Certs: pc, Bundle: bundle,
		Logger: zaptest.NewLogger(t), AccessLog: zaptest.NewLogger(t).Named("access"),
		TrustDomain: "cluster.local", Mark: capture.Mark, DrainTimeout: 2 * time.Second,
	})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 2)
	go func() { done <- e.proxy.Run(ctx) }()
	go func() { done <- certs.Run(ctx) }()
	var once sync.Once
	e.stop = func() {
		once.Do(func() {
			cancel()
			for range 2 {
				if err := <-done; err != nil {
					t.Errorf("Run: %v", err)
				}
			}
		})
	}
	t.Cleanup(e.stop)
	return e
}

// issuer signs workload certificates with an in-process CA.
type issuer struct{ a *ca.Authority }

func (i issuer) Issue(_ context.Context, id spiffeid.ID, csr []byte, ttl time.Duration) ([]*x509.Certificate, error) {
	return i.a.Sign(csr, id, ttl)
}

// pod adds a pod running the echo app on 8080; enrolled pods get capture
// rules and are handed to the proxy, with service account name.
func (e *env) pod(name string, enrolled bool) *testnet.Pod {
	p := e.node.AddPod(e.t, name)
	p.Echo(e.t, 8080)
	e.pods[name] = p
	if enrolled {
		enroll(e.t, p)
		if err := e.addPod(p, name); err != nil {
			e.t.Fatal(err)
		}
	}
	return p
}

// addPod hands an enrolled pod to the proxy, running as service account sa.
func (e *env) addPod(p *testnet.Pod, sa string) error {
	h, err := netns.Open(p.Path) // owned by the proxy
	if err != nil {
		return err
	}
	return e.proxy.AddPod(p.Name, agent.PodInfo{
		Name: p.Name, Namespace: "default", ServiceAccount: sa, IPs: []netip.Addr{p.IP, p.IP6}, Node: "node1",
	}, h)
}

func (e *env) apply(typeURL string, rs ...store.Resource) {
	e.t.Helper()
	if err := e.store.Apply(typeURL, rs, nil); err != nil {
		e.t.Fatal(err)
	}
}

// rechecked waits until the proxy has re-checked its live connections
// against the store as it is now.
func (e *env) rechecked() {
	e.t.Helper()
	v := e.store.Version()
	deadline := time.Now().Add(10 * time.Second)
	for e.proxy.rechecked.Load() < v {
		if time.Now().After(deadline) {
			e.t.Fatalf("live connections not re-checked for store version %d within 10s", v)
		}
		time.Sleep(time.Millisecond)
	}
}

// TestPassthroughAndPlaintext covers the paths that need no HBONE:
// outbound passthrough to workloads outside the mesh and to unknown
// addresses, and plaintext inbound under PERMISSIVE and STRICT.
func TestPassthroughAndPlaintext(t *testing.T) {
	e := newEnv(t)
	a := e.pod("a", true)
	b := e.pod("b", true)
	u := e.pod("u", false) // not enrolled
	e.node.Echo(t, 9090)   // a server outside the mesh, on the node
	e.apply(discoveryv1.WorkloadType, workloadOf(a, true), workloadOf(b, true), workloadOf(u, false))
	payload := bytes.Repeat([]byte("0123456789abcdef"), 64<<10) // 1 MiB

	t.Run("to an un-enrolled pod passes through", func(t *testing.T) {
		seen, echoed, err := a.Converse(u.IP.String()+":8080", payload)
		if err != nil {
			t.Fatal(err)
		}
		if seen != a.IP.String() || !bytes.Equal(echoed, payload) {
			t.Fatalf("server saw %s (want %s), echoed %d bytes (want %d)", seen, a.IP, len(echoed), len(payload))
		}
	})
	t.Run("to an unknown address passes through", func(t *testing.T) {
		seen, echoed, err := a.Converse(e.node.Gateway().String()+":9090", []byte("x"))
		if err != nil || seen != a.IP.String() || string(echoed) != "x" {
			t.Fatalf("seen %s echoed %q err %v", seen, echoed, err)
		}
	})
	t.Run("plaintext into an enrolled pod under PERMISSIVE keeps the client address", func(t *testing.T) {
		seen, echoed, err := u.Converse(b.IP.String()+":8080", payload)
		if err != nil {
			t.Fatal(err)
		}
		if seen != u.IP.String() || !bytes.Equal(echoed, payload) {
			t.Fatalf("app saw %s (want %s), echoed %d bytes", seen, u.IP, len(echoed))
		}
	})
	t.Run("plaintext under STRICT is refused", func(t *testing.T) {
		strict := workloadOf(b, true)
		strict.Body.(*discoveryv1.Workload).MtlsMode = discoveryv1.MtlsMode_MTLS_MODE_STRICT
		e.apply(discoveryv1.WorkloadType, strict)
		defer e.apply(discoveryv1.WorkloadType, workloadOf(b, true))
		if seen, _, err := u.Converse(b.IP.String()+":8080", []byte("x")); err == nil {
			t.Fatalf("plaintext got through under STRICT (app saw %s)", seen)
		}
	})
	t.Run("DENY policy refuses and closes live connections", func(t *testing.T) {
		// A live connection first.
		h := u.Open(t)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		c, err := h.Dial(ctx, "tcp", b.IP.String()+":8080", netip.Addr{}, netnsOpts())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		buf := make([]byte, 64)
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		if n, err := c.Read(buf); err != nil || !strings.HasPrefix(string(buf[:n]), "hello") {
			t.Fatalf("greeting %q, %v", buf[:n], err)
		}
		e.apply(discoveryv1.AuthorizationType, store.Resource{Name: "default/deny-u", Body: &discoveryv1.Authorization{
			Name: "deny-u", Namespace: "default", Scope: discoveryv1.Authorization_SCOPE_NAMESPACE,
			Action: discoveryv1.Authorization_ACTION_DENY,
			Rules:  []*discoveryv1.Rule{{From: []*discoveryv1.Source{{IpBlocks: []string{u.IP.String()}}}}},
		}})
		defer func() {
			if err := e.store.Apply(discoveryv1.AuthorizationType, nil, []string{"default/deny-u"}); err != nil {
				t.Error(err)
			}
		}()
		// The live connection is closed by the re-check.
		if n, err := c.Read(buf); err == nil {
			t.Fatalf("live connection still open after DENY (read %q)", buf[:n])
		}
		if _, _, err := u.Converse(b.IP.String()+":8080", []byte("x")); err == nil {
			t.Fatal("new connection allowed despite DENY")
		}
		// Other clients are unaffected.
		if _, _, err := e.node.NS.Converse(b.IP.String()+":8080", []byte("x")); err != nil {
			t.Fatalf("node client refused: %v", err)
		}
	})
	t.Run("outbound to the pod's own outbound port is refused", func(t *testing.T) {
		if _, _, err := a.Converse("127.0.0.1:15001", []byte("x")); err == nil {
			t.Fatal("direct connection to 15001 was forwarded")
		}
	})
}

// TestRemovePodDrains checks that a removed pod stops accepting at once
// while its live connection completes.
func TestRemovePodDrains(t *testing.T) {
	e := newEnv(t)
	a := e.pod("a", true)
	u := e.pod("u", false)
	e.apply(discoveryv1.WorkloadType, workloadOf(a, true), workloadOf(u, false))
	h := a.Open(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := h.Dial(ctx, "tcp", u.IP.String()+":8080", netip.Addr{}, netnsOpts())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	buf := make([]byte, 64)
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Read(buf); err != nil {
		t.Fatal(err)
	}
	e.proxy.RemovePod("a")
	if e.proxy.HasPod("a") {
		t.Fatal("pod still held")
	}
	// New connections are refused (nothing listens on 15001 any more).
	if _, _, err := a.Converse(u.IP.String()+":8080", []byte("x")); err == nil {
		t.Fatal("new connection accepted after removal")
	}
	// The live one still works.
	if _, err := c.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	if n, err := c.Read(buf); err != nil || string(buf[:n]) != "ping" {
		t.Fatalf("live connection: %q %v", buf[:n], err)
	}
	// After the drain deadline it is closed.
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Read(buf); err == nil {
		t.Fatal("connection survived the drain deadline")
	}
}

func netnsOpts() netns.SockOpts { return netns.SockOpts{} }

// TestHBONE runs mTLS tunnels between two pods of one node in-process (so
// the race detector sees the whole data path).
func TestHBONE(t *testing.T) {
	e := newEnv(t)
	a := e.pod("a", true)
	b := e.pod("b", true)
	const svc = "default/svc-b.default.svc.cluster.local"
	vip := netip.MustParseAddr("10.96.0.10")
	wb := workloadOf(b, true)
	wb.Body.(*discoveryv1.Workload).Services = map[string]*discoveryv1.PortList{svc: {Ports: []*discoveryv1.Port{{ServicePort: 80, TargetPort: 8080}}}}
	e.apply(discoveryv1.WorkloadType, workloadOf(a, true), wb)
	e.apply(discoveryv1.ServiceType, store.Resource{Name: svc, Body: &discoveryv1.Service{
		Name: "svc-b", Namespace: "default", Hostname: "svc-b.default.svc.cluster.local",
		Addresses: [][]byte{vip.AsSlice()}, Ports: []*discoveryv1.ServicePort{{ServicePort: 80, TargetPort: 8080}},
	}})
	payload := bytes.Repeat([]byte("hbone-payload-"), 50000)

	t.Run("service VIP through HBONE keeps the client address", func(t *testing.T) {
		seen, echoed, err := a.Converse(vip.String()+":80", payload)
		if err != nil {
			t.Fatal(err)
		}
		if seen != a.IP.String() || !bytes.Equal(echoed, payload) {
			t.Fatalf("app saw %s, echoed %d of %d bytes", seen, len(echoed), len(payload))
		}
	})
	t.Run("many concurrent connections share the pool", func(t *testing.T) {
		errs := make(chan error, 32)
		for range 32 {
			go func() {
				_, echoed, err := a.Converse(vip.String()+":80", payload[:4096])
				if err == nil && !bytes.Equal(echoed, payload[:4096]) {
					err = fmt.Errorf("echo mismatch")
				}
				errs <- err
			}()
		}
		for range 32 {
			if err := <-errs; err != nil {
				t.Fatal(err)
			}
		}
	})
	t.Run("ALLOW-nothing refuses; the bound waypoint's identity is admitted", func(t *testing.T) {
		e.apply(discoveryv1.AuthorizationType, store.Resource{Name: "default/nothing", Body: &discoveryv1.Authorization{
			Name: "nothing", Namespace: "default", Scope: discoveryv1.Authorization_SCOPE_WORKLOAD,
		}})
		wb2 := workloadOf(b, true)
		wb2.Body.(*discoveryv1.Workload).Services = wb.Body.(*discoveryv1.Workload).Services
		wb2.Body.(*discoveryv1.Workload).AuthorizationPolicies = []string{"default/nothing"}
		e.apply(discoveryv1.WorkloadType, wb2)
		if _, _, err := a.Converse(vip.String()+":80", []byte("x")); err == nil {
			t.Fatal("ALLOW-nothing policy let a in")
		}
		// Make a the waypoint b is bound to: its identity is now admitted.
		wa := workloadOf(a, true)
		wa.Body.(*discoveryv1.Workload).WaypointForGateway = "default/wp"
		wb2.Body.(*discoveryv1.Workload).Waypoint = &discoveryv1.GatewayAddress{Gateway: "default/wp", Service: "default/wp.default.svc.cluster.local", HbonePort: 15008}
		e.apply(discoveryv1.WorkloadType, wa, wb2)
		if seen, _, err := a.Converse(b.IP.String()+":8080", []byte("x")); err != nil || seen != a.IP.String() {
			t.Fatalf("waypoint identity refused: %v (seen %s)", err, seen)
		}
		e.apply(discoveryv1.WorkloadType, workloadOf(a, true), wb)
		if err := e.store.Apply(discoveryv1.AuthorizationType, nil, []string{"default/nothing"}); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("DENY closes a live tunnel", func(t *testing.T) {
		h := a.Open(t)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		c, err := h.Dial(ctx, "tcp", vip.String()+":80", netip.Addr{}, netnsOpts())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		buf := make([]byte, 64)
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		if n, err := c.Read(buf); err != nil || !strings.HasPrefix(string(buf[:n]), "hello") {
			t.Fatalf("greeting %q, %v", buf[:n], err)
		}
		e.apply(discoveryv1.AuthorizationType, store.Resource{Name: "default/deny-a", Body: &discoveryv1.Authorization{
			Name: "deny-a", Namespace: "default", Scope: discoveryv1.Authorization_SCOPE_GLOBAL,
			Action: discoveryv1.Authorization_ACTION_DENY,
			Rules:  []*discoveryv1.Rule{{From: []*discoveryv1.Source{{Principals: []string{"cluster.local/ns/default/sa/a"}}}}},
		}})
		if n, err := c.Read(buf); err == nil {
			t.Fatalf("live tunnel still open after DENY (read %q)", buf[:n])
		}
		if _, _, err := a.Converse(vip.String()+":80", []byte("x")); err == nil {
			t.Fatal("new tunnel allowed despite DENY")
		}
		if err := e.store.Apply(discoveryv1.AuthorizationType, nil, []string{"default/deny-a"}); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("unreachable application port", func(t *testing.T) {
		if _, _, err := a.Converse(b.IP.String()+":8081", []byte("x")); err == nil {
			t.Fatal("connection to a closed port succeeded")
		}
	})
}

// TestAddPodIdempotent: adding a held pod again with the same namespace
// changes nothing; with another namespace the pod moves there.
func TestAddPodIdempotent(t *testing.T) {
	e := newEnv(t)
	a := e.pod("a", true)
	u := e.pod("u", false)
	e.apply(discoveryv1.WorkloadType, workloadOf(a, true), workloadOf(u, false))
	info := agent.PodInfo{Name: "a", Namespace: "default", ServiceAccount: "a", IPs: []netip.Addr{a.IP}, Node: "node1"}
	h, err := netns.Open(a.Path)
	if err != nil {
		t.Fatal(err)
	}
	if err := e.proxy.AddPod("a", info, h); err != nil {
		t.Fatalf("re-adding with the same namespace: %v", err)
	}
	if got := e.proxy.PodUIDs(); len(got) != 1 {
		t.Fatalf("pods = %v", got)
	}
	if _, _, err := a.Converse(u.IP.String()+":8080", []byte("x")); err != nil {
		t.Fatalf("pod broken after idempotent add: %v", err)
	}
	// The "same" pod now lives in another namespace (a sandbox restart).
	a2 := e.node.AddPod(t, "a2")
	enroll(t, a2)
	info.IPs = []netip.Addr{a2.IP}
	h2, err := netns.Open(a2.Path)
	if err != nil {
		t.Fatal(err)
	}
	if err := e.proxy.AddPod("a", info, h2); err != nil {
		t.Fatal(err)
	}
	if _, _, err := a2.Converse(u.IP.String()+":8080", []byte("x")); err != nil {
		t.Fatalf("new namespace not served: %v", err)
	}
	if _, _, err := a.Converse(u.IP.String()+":8080", []byte("x")); err == nil {
		t.Fatal("old namespace still served")
	}
}

// TestRetryOtherEndpoint: when the picked endpoint refuses the connection,
// the proxy retries once on another endpoint of the service.
func TestRetryOtherEndpoint(t *testing.T) {
	e := newEnv(t)
	a := e.pod("a", true)
	b := e.pod("b", true)
	dead := e.node.AddPod(t, "dead") // in discovery as captured, but nothing serves it
	const svc = "default/svc.default.svc.cluster.local"
	vip := netip.MustParseAddr("10.96.0.12")
	var ws []store.Resource
	for _, p := range []*testnet.Pod{b, dead} {
		w := workloadOf(p, true)
		w.Body.(*discoveryv1.Workload).Services = map[string]*discoveryv1.PortList{svc: {Ports: []*discoveryv1.Port{{ServicePort: 80, TargetPort: 8080}}}}
		ws = append(ws, w)
	}
	e.apply(discoveryv1.WorkloadType, append(ws, workloadOf(a, true))...)
	e.apply(discoveryv1.ServiceType, store.Resource{Name: svc, Body: &discoveryv1.Service{
		Name: "svc", Namespace: "default", Hostname: "svc.default.svc.cluster.local",
		Addresses: [][]byte{vip.AsSlice()}, Ports: []*discoveryv1.ServicePort{{ServicePort: 80, TargetPort: 8080}},
	}})
	for i := range 4 { // round robin starts on each endpoint twice
		if _, _, err := a.Converse(vip.String()+":80", []byte("x")); err != nil {
			t.Fatalf("connection %d: %v", i, err)
		}
	}
}

// TestIPv6 runs the three paths over IPv6: HBONE between enrolled pods,
// passthrough to a pod outside the mesh, plaintext into an enrolled pod.
func TestIPv6(t *testing.T) {
	e := newEnv(t)
	a := e.pod("a", true)
	b := e.pod("b", true)
	u := e.pod("u", false)
	e.apply(discoveryv1.WorkloadType, workloadOf(a, true), workloadOf(b, true), workloadOf(u, false))
	data := bytes.Repeat([]byte("v6-"), 10000)
	tests := []struct {
		name     string
		from, to *testnet.Pod
	}{
		{"passthrough", a, u},
		{"hbone", a, b},
		{"plaintext inbound", u, b},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			seen, echoed, err := tt.from.Converse(netip.AddrPortFrom(tt.to.IP6, 8080).String(), data)
			if err != nil {
				t.Fatal(err)
			}
			if seen != tt.from.IP6.String() || !bytes.Equal(echoed, data) {
				t.Fatalf("server saw %s (want %s), echoed %d of %d bytes", seen, tt.from.IP6, len(echoed), len(data))
			}
		})
	}
}

// TestPolicyChangeWhileAdmitting: a policy change that lands right after a
// new inbound connection was authorized, before it is connected, still
// applies to it — for HBONE (401) and plaintext alike. The change is made
// from the proxy's post-authorization hook, and the test waits for the
// re-check of live connections to complete before letting the connection
// go on: before the fix, the connection was not registered for re-checks
// yet and got through under the old policy.
func TestPolicyChangeWhileAdmitting(t *testing.T) {
	e := newEnv(t)
	a := e.pod("a", true)
	b := e.pod("b", true)
	u := e.pod("u", false)
	e.apply(discoveryv1.WorkloadType, workloadOf(a, true), workloadOf(b, true), workloadOf(u, false))
	tests := []struct {
		name   string
		client *testnet.Pod
		change func() store.Resource
	}{
		{"hbone DENY", a, func() store.Resource {
			return store.Resource{Name: "default/deny-a", Body: &discoveryv1.Authorization{
				Name: "deny-a", Namespace: "default", Scope: discoveryv1.Authorization_SCOPE_NAMESPACE,
				Action: discoveryv1.Authorization_ACTION_DENY,
				Rules:  []*discoveryv1.Rule{{From: []*discoveryv1.Source{{Principals: []string{"cluster.local/ns/default/sa/a"}}}}},
			}}
		}},
		{"plaintext DENY", u, func() store.Resource {
			return store.Resource{Name: "default/deny-u", Body: &discoveryv1.Authorization{
				Name: "deny-u", Namespace: "default", Scope: discoveryv1.Authorization_SCOPE_NAMESPACE,
				Action: discoveryv1.Authorization_ACTION_DENY,
				Rules:  []*discoveryv1.Rule{{From: []*discoveryv1.Source{{IpBlocks: []string{u.IP.String()}}}}},
			}}
		}},
		{"plaintext switched to STRICT", u, func() store.Resource {
			w := workloadOf(b, true)
			w.Body.(*discoveryv1.Workload).MtlsMode = discoveryv1.MtlsMode_MTLS_MODE_STRICT
			return w
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			// Allowed before the change.
			if _, _, err := tt.client.Converse(b.IP.String()+":8080", []byte("x")); err != nil {
				t.Fatalf("before the change: %v", err)
			}
			change := tt.change()
			typeURL := discoveryv1.AuthorizationType
			if _, ok := change.Body.(*discoveryv1.Workload); ok {
				typeURL = discoveryv1.WorkloadType
			}
			var once sync.Once
			hook := func() {
				once.Do(func() {
					e.apply(typeURL, change)
					e.rechecked()
				})
			}
			e.proxy.authorized.Store(&hook)
			defer func() {
				e.proxy.authorized.Store(nil)
				if typeURL == discoveryv1.WorkloadType {
					e.apply(discoveryv1.WorkloadType, workloadOf(b, true))
				} else if err := e.store.Apply(typeURL, nil, []string{change.Name}); err != nil {
					t.Error(err)
				}
			}()
			if seen, _, err := tt.client.Converse(b.IP.String()+":8080", []byte("x")); err == nil {
				t.Fatalf("connection admitted under the old policy survived the change (app saw %s)", seen)
			}
		})
	}
}

// stallRelease holds up the release of one identity until unblocked.
type stallRelease struct {
	Certs
	target    spiffeid.ID
	armed     atomic.Bool
	stalled   atomic.Bool
	releasing chan struct{}
	unblock   chan struct{}
	fetched   atomic.Int64 // Certificate calls for target returned
}

func (s *stallRelease) Certificate(ctx context.Context, id spiffeid.ID) (*tls.Certificate, error) {
	c, err := s.Certs.Certificate(ctx, id)
	if id == s.target {
		s.fetched.Add(1)
	}
	return c, err
}

func (s *stallRelease) Release(id spiffeid.ID) {
	if id == s.target && s.armed.Load() && s.stalled.CompareAndSwap(false, true) {
		close(s.releasing)
		<-s.unblock
	}
	s.Certs.Release(id)
}

// held reports whether the certificate store holds an entry for id.
func (e *env) held(id spiffeid.ID) bool {
	for _, c := range e.certs.Snapshot() {
		if c.ID == id {
			return true
		}
	}
	return false
}

// TestReleaseRace: when the last pod of a service account goes while a
// new pod of the same service account arrives, the new pod's prefetched
// certificate is not dropped by the old pod's release. The release is
// held up at Certs.Release, which is where the old code had already
// given up its lock: the new pod was then added and its certificate
// prefetched, and dropped right after. The test gives AddPod a second to
// get in that way before letting the release go on.
func TestReleaseRace(t *testing.T) {
	id := spiffeid.RequireFromString("spiffe://cluster.local/ns/default/sa/shared")
	sr := &stallRelease{target: id, releasing: make(chan struct{}), unblock: make(chan struct{})}
	e := newEnvWith(t, func(c Certs) Certs { sr.Certs = c; return sr })
	p1 := e.node.AddPod(t, "p1")
	p2 := e.node.AddPod(t, "p2")
	enroll(t, p1)
	enroll(t, p2)
	if err := e.addPod(p1, "shared"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "p1's certificate prefetch", func() bool { return sr.fetched.Load() == 1 })
	if !e.held(id) {
		t.Fatal("p1's certificate is not held")
	}

	sr.armed.Store(true)
	e.proxy.RemovePod("p1")
	select {
	case <-sr.releasing:
	case <-time.After(10 * time.Second):
		t.Fatal("p1's identity was not released")
	}
	added := make(chan error, 1)
	go func() { added <- e.addPod(p2, "shared") }()
	// The old code adds p2 and prefetches its certificate now.
	deadline := time.Now().Add(time.Second)
	for sr.fetched.Load() == 1 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	close(sr.unblock)
	if err := <-added; err != nil {
		t.Fatal(err)
	}
	waitFor(t, "p2's certificate prefetch", func() bool { return sr.fetched.Load() > 1 })
	if !e.held(id) {
		t.Fatal("p2's prefetched certificate was dropped by p1's release")
	}
}

// stallCertificate makes the certificate fetch of one identity outlive
// its context until finish is closed.
type stallCertificate struct {
	Certs
	target   spiffeid.ID
	entered  chan struct{}
	once     sync.Once
	finish   chan struct{}
	finished atomic.Bool
}

func (s *stallCertificate) Certificate(ctx context.Context, id spiffeid.ID) (*tls.Certificate, error) {
	if id != s.target {
		return s.Certs.Certificate(ctx, id)
	}
	s.once.Do(func() { close(s.entered) })
	<-ctx.Done()
	<-s.finish
	s.finished.Store(true)
	return nil, ctx.Err()
}

// TestRunWaitsForPrefetch: Run returns only after the certificate
// prefetch AddPod started has ended. The prefetch is held up past Run's
// end; the test gives Run a second to return early (the old code did, the
// prefetch goroutine was not tracked) before letting the prefetch end.
func TestRunWaitsForPrefetch(t *testing.T) {
	id := spiffeid.RequireFromString("spiffe://cluster.local/ns/default/sa/slow")
	sc := &stallCertificate{target: id, entered: make(chan struct{}), finish: make(chan struct{})}
	e := newEnvWith(t, func(c Certs) Certs { sc.Certs = c; return sc })
	p := e.node.AddPod(t, "slow")
	enroll(t, p)
	if err := e.addPod(p, "slow"); err != nil {
		t.Fatal(err)
	}
	select {
	case <-sc.entered:
	case <-time.After(10 * time.Second):
		t.Fatal("no certificate prefetch")
	}
	returned := make(chan bool, 1)
	go func() {
		e.stop()
		returned <- sc.finished.Load()
	}()
	select {
	case finished := <-returned:
		close(sc.finish)
		if !finished {
			t.Fatal("Run returned while the certificate prefetch was still running")
		}
		return
	case <-time.After(time.Second):
	}
	close(sc.finish)
	if finished := <-returned; !finished {
		t.Fatal("Run returned while the certificate prefetch was still running")
	}
}

// waitFor polls cond for up to 10 s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestInboundStatus drives the inbound HBONE handler with a real HBONE
// client (from the node, with its own mesh identity) and checks the CONNECT
// answers of DESIGN.md §4: 200 with the app's bytes flowing; 400 for an
// authority that is not the pod's address, or that is one of ztunnel's own
// ports; 401 on an L4 DENY; 503 when the application port refuses.
func TestInboundStatus(t *testing.T) {
	e := newEnv(t)
	b := e.pod("b", true)
	c := e.pod("c", false)
	e.apply(discoveryv1.WorkloadType, workloadOf(b, true), workloadOf(c, false))
	h := e.node.Open(t)
	cl := hbone.NewClient(hbone.ClientConfig{
		Certificates: e.certs.Certificate, Bundle: e.bundle,
		Dial: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return h.Dial(ctx, network, addr, netip.Addr{}, netns.SockOpts{})
		},
		Logger: zaptest.NewLogger(t).Named("client"),
	})
	defer cl.Close()
	src := spiffeid.RequireFromString("spiffe://cluster.local/ns/default/sa/client")
	bID := spiffeid.RequireFromString("spiffe://cluster.local/ns/default/sa/b")
	denyClient := store.Resource{Name: "default/deny-client", Body: &discoveryv1.Authorization{
		Name: "deny-client", Namespace: "default", Scope: discoveryv1.Authorization_SCOPE_NAMESPACE,
		Action: discoveryv1.Authorization_ACTION_DENY,
		Rules:  []*discoveryv1.Rule{{From: []*discoveryv1.Source{{Principals: []string{"cluster.local/ns/default/sa/client"}}}}},
	}}
	at := func(a netip.Addr, port uint16) netip.AddrPort { return netip.AddrPortFrom(a, port) }
	tests := []struct {
		name   string
		target netip.AddrPort
		policy *store.Resource
		want   int
	}{
		{"the pod's app port", at(b.IP, 8080), nil, http.StatusOK},
		{"the pod's app port over IPv6", at(b.IP6, 8080), nil, http.StatusOK},
		{"another pod's address", at(c.IP, 8080), nil, http.StatusBadRequest},
		{"the node's address", at(e.node.Gateway(), 8080), nil, http.StatusBadRequest},
		{"ztunnel's HBONE port", at(b.IP, HBONEPort), nil, http.StatusBadRequest},
		{"ztunnel's plaintext port", at(b.IP, PlaintextPort), nil, http.StatusBadRequest},
		{"ztunnel's outbound port", at(b.IP, OutboundPort), nil, http.StatusBadRequest},
		{"L4 DENY", at(b.IP, 8080), &denyClient, http.StatusUnauthorized},
		{"the app port refuses", at(b.IP, 8081), nil, http.StatusServiceUnavailable},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.policy != nil {
				e.apply(discoveryv1.AuthorizationType, *tt.policy)
				defer func() {
					if err := e.store.Apply(discoveryv1.AuthorizationType, nil, []string{tt.policy.Name}); err != nil {
						t.Error(err)
					}
				}()
			}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			proxy := at(b.IP, HBONEPort)
			if tt.target.Addr().Is6() {
				proxy = at(b.IP6, HBONEPort)
			}
			conn, err := cl.Dial(ctx, hbone.DialRequest{
				Source: src, Expected: []spiffeid.ID{bID}, Proxy: proxy, Target: tt.target,
			})
			if tt.want != http.StatusOK {
				var se *hbone.StatusError
				if !errors.As(err, &se) || se.Code != tt.want {
					if conn != nil {
						conn.Close()
					}
					t.Fatalf("CONNECT %s: error %v, want status %d", tt.target, err, tt.want)
				}
				return
			}
			if err != nil {
				t.Fatalf("CONNECT %s: %v", tt.target, err)
			}
			defer conn.Close()
			_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
			line, err := bufio.NewReader(conn).ReadString('\n')
			want := "hello " + e.node.Gateway().String() + "\n"
			if tt.target.Addr().Is6() {
				want = "hello " + e.node.Gateway6().String() + "\n"
			}
			if err != nil || line != want {
				t.Fatalf("greeting %q, %v; want %q (the app sees the client's address)", line, err, want)
			}
		})
	}
}

// TestStrictClosesLivePlaintext: switching a destination from PERMISSIVE
// to STRICT closes its live plaintext connections, and leaves its HBONE
// ones alone.
func TestStrictClosesLivePlaintext(t *testing.T) {
	e := newEnv(t)
	a := e.pod("a", true)
	b := e.pod("b", true)
	u := e.pod("u", false)
	e.apply(discoveryv1.WorkloadType, workloadOf(a, true), workloadOf(b, true), workloadOf(u, false))
	open := func(from *testnet.Pod) (net.Conn, *bufio.Reader) {
		t.Helper()
		h := from.Open(t)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		c, err := h.Dial(ctx, "tcp", b.IP.String()+":8080", netip.Addr{}, netnsOpts())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		r := bufio.NewReader(c)
		if line, err := r.ReadString('\n'); err != nil || !strings.HasPrefix(line, "hello "+from.IP.String()) {
			t.Fatalf("greeting %q, %v", line, err)
		}
		return c, r
	}
	plain, plainR := open(u)
	tunneled, tunneledR := open(a)

	strict := workloadOf(b, true)
	strict.Body.(*discoveryv1.Workload).MtlsMode = discoveryv1.MtlsMode_MTLS_MODE_STRICT
	e.apply(discoveryv1.WorkloadType, strict)
	e.rechecked()

	if _, err := plain.Write([]byte("ping\n")); err == nil {
		if line, err := plainR.ReadString('\n'); err == nil {
			t.Fatalf("live plaintext connection still open under STRICT (echoed %q)", line)
		}
	}
	if _, err := tunneled.Write([]byte("ping\n")); err != nil {
		t.Fatalf("HBONE connection broken by STRICT: %v", err)
	}
	if line, err := tunneledR.ReadString('\n'); err != nil || line != "ping\n" {
		t.Fatalf("HBONE connection after STRICT: %q, %v", line, err)
	}
}
