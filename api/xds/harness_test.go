package xds_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"maps"
	"net"
	"slices"
	"sync"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/amesh-dev/amesh/api/bearer"
	"github.com/amesh-dev/amesh/api/ca"
	discoveryv1 "github.com/amesh-dev/amesh/api/discovery/v1"
	"github.com/amesh-dev/amesh/api/xds"
	"github.com/amesh-dev/amesh/api/xds/xdsclient"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

const (
	wlType  = discoveryv1.WorkloadType
	svcType = discoveryv1.ServiceType
	wpType  = discoveryv1.WaypointServiceType
)

const serverName = "amesh-controller.amesh-system.svc"

// pki is a CA and serving certificate for the test servers.
type pki struct {
	roots *x509.CertPool
	cert  tls.Certificate
}

func newPKI(t testing.TB) *pki {
	t.Helper()
	a, err := ca.NewRoot(spiffeid.RequireTrustDomainFromString("cluster.local"), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	chain, err := a.SignServer(key.Public(), []string{serverName}, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	p := &pki{roots: x509.NewCertPool(), cert: tls.Certificate{PrivateKey: key, Leaf: chain[0]}}
	for _, c := range chain {
		p.cert.Certificate = append(p.cert.Certificate, c.Raw)
	}
	p.roots.AddCert(a.Certificate())
	return p
}

// testSub sees unscoped resources and those whose Scope it holds; its view
// can change at run time.
type testSub struct {
	id     string
	mu     sync.Mutex
	scopes map[string]bool
}

func (s *testSub) ID() string { return s.id }

func (s *testSub) Visible(_ string, r *xds.Resource) bool {
	if r.Scope == "" {
		return true
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.scopes[r.Scope]
}

func (s *testSub) allow(scope string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.scopes[scope] = true
}

// authenticator maps bearer tokens to subscribers; a token "scope:<x>"
// subscribes with scope <x>.
type authenticator struct {
	mu    sync.Mutex
	subs  map[string]*testSub
	nodes []*corev3.Node
}

func newAuthenticator() *authenticator { return &authenticator{subs: map[string]*testSub{}} }

func (a *authenticator) authenticate(ctx context.Context, node *corev3.Node) (xds.Subscriber, error) {
	tok, err := bearer.FromIncoming(ctx)
	if err != nil {
		return nil, err
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	a.nodes = append(a.nodes, node)
	if tok == "denied" {
		return nil, status.Error(codes.PermissionDenied, "not a mesh component")
	}
	if s, ok := a.subs[tok]; ok {
		return s, nil
	}
	s := &testSub{id: tok, scopes: map[string]bool{}}
	var scope string
	if _, err := fmt.Sscanf(tok, "scope:%s", &scope); err == nil {
		s.scopes[scope] = true
	}
	a.subs[tok] = s
	return s, nil
}

func (a *authenticator) sub(tok string) *testSub {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.subs[tok]
}

// testServer is an xds.Server behind real gRPC + TLS on loopback.
type testServer struct {
	*xds.Server
	addr string
	g    *grpc.Server
	done chan struct{}
}

// startServer serves srv (and anything register adds) on addr, with
// xds.Codec as in production.
func startServer(t testing.TB, p *pki, srv *xds.Server, addr string, register ...func(*grpc.Server)) *testServer {
	t.Helper()
	return startServerCodec(t, p, srv, addr, true, register...)
}

// startServerCodec is startServer, with or without xds.Codec.
func startServerCodec(t testing.TB, p *pki, srv *xds.Server, addr string, withCodec bool, register ...func(*grpc.Server)) *testServer {
	t.Helper()
	var ln net.Listener
	var err error
	for i := 0; i < 50; i++ { // a restarted server reuses its port
		if ln, err = net.Listen("tcp", addr); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		t.Fatal(err)
	}
	opts := []grpc.ServerOption{grpc.Creds(credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{p.cert}, MinVersion: tls.VersionTLS13}))}
	if withCodec {
		opts = append(opts, xds.Codec())
	}
	g := grpc.NewServer(opts...)
	if srv != nil {
		srv.Register(g)
	}
	for _, r := range register {
		r(g)
	}
	ts := &testServer{Server: srv, addr: ln.Addr().String(), g: g, done: make(chan struct{})}
	go func() { defer close(ts.done); _ = g.Serve(ln) }()
	t.Cleanup(ts.stop)
	return ts
}

func (ts *testServer) stop() {
	ts.g.Stop()
	<-ts.done
}

func dial(t testing.TB, p *pki, addr, token string) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient(addr,
		grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{RootCAs: p.roots, ServerName: serverName, MinVersion: tls.VersionTLS13})),
		grpc.WithPerRPCCredentials(bearer.PerRPC(func(context.Context) (string, error) { return token, nil })),
	)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return conn
}

// store is a Handler that keeps what it was given and every call.
type store struct {
	mu     sync.Mutex
	res    map[string]map[string]*xds.Resource
	calls  []call
	reject func(typeURL string, r *xds.Resource) error
	// partial: apply the resources reject accepts and report the others
	// in an *xdsclient.RejectedError, instead of rejecting the whole response.
	partial bool
	changed chan struct{}
}

type call struct {
	typeURL string
	upserts []string // name@version
	removes []string
}

func newStore() *store {
	return &store{res: map[string]map[string]*xds.Resource{}, changed: make(chan struct{}, 1)}
}

func (s *store) Apply(typeURL string, upserts []*xds.Resource, removes []string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	c := call{typeURL: typeURL, removes: slices.Clone(removes)}
	var rejected map[string]error
	kept := upserts[:0:0]
	for _, r := range upserts {
		if s.reject != nil {
			if err := s.reject(typeURL, r); err != nil {
				if !s.partial {
					return err
				}
				if rejected == nil {
					rejected = map[string]error{}
				}
				rejected[r.Name] = err
				continue
			}
		}
		kept = append(kept, r)
		c.upserts = append(c.upserts, r.Name+"@"+r.Version)
	}
	upserts = kept
	s.calls = append(s.calls, c)
	m := s.res[typeURL]
	if m == nil {
		m = map[string]*xds.Resource{}
		s.res[typeURL] = m
	}
	for _, r := range upserts {
		m[r.Name] = r
	}
	for _, n := range removes {
		delete(m, n)
	}
	select {
	case s.changed <- struct{}{}:
	default:
	}
	if rejected != nil {
		return &xdsclient.RejectedError{Rejected: rejected}
	}
	return nil
}

func (s *store) names(typeURL string) []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Sorted(maps.Keys(s.res[typeURL]))
}

func (s *store) get(typeURL, name string) *xds.Resource {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.res[typeURL][name]
}

func (s *store) callsSince(n int) []call {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.calls[min(n, len(s.calls)):])
}

func (s *store) ncalls() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.calls)
}

// runClient starts a client; it stops at test cleanup.
func runClient(t testing.TB, conn grpc.ClientConnInterface, h xdsclient.Handler, types ...string) *xdsclient.Client {
	t.Helper()
	return runClientOpts(t, xdsclient.Options{Conn: conn, TypeURLs: types, Handler: h})
}

// runClientOpts starts a client with opts (node and quick backoffs filled
// in); it stops at test cleanup.
func runClientOpts(t testing.TB, opts xdsclient.Options) *xdsclient.Client {
	t.Helper()
	opts.Node = node("pod-" + fmt.Sprint(time.Now().UnixNano()))
	opts.InitialBackoff, opts.MaxBackoff = 20*time.Millisecond, 200*time.Millisecond
	c := xdsclient.New(opts)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Client.Run: %v", err)
		}
	})
	return c
}

func node(pod string) *xdsclient.Node {
	md, _ := structpb.NewStruct(map[string]any{"kind": "ztunnel", "node": "node-1", "namespace": "amesh-system", "pod": pod})
	return &xdsclient.Node{ID: pod, Metadata: md}
}

// rawNode is node for the tests' raw clients (go-control-plane's messages).
func rawNode(pod string) *corev3.Node {
	n := node(pod)
	return &corev3.Node{Id: n.ID, Metadata: n.Metadata}
}

func waitSynced(t testing.TB, c *xdsclient.Client) {
	t.Helper()
	select {
	case <-c.Synced():
	case <-time.After(10 * time.Second):
		t.Fatal("client did not sync within 10s")
	}
}

// eventually polls cond until it holds or 10 s pass.
func eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// quiet asserts that cond stays false for a while (nothing more arrives).
func quiet(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(300 * time.Millisecond)
	for time.Now().Before(deadline) {
		if cond() {
			t.Fatalf("unexpected: %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func wl(name, scope string, extra ...string) *xds.Resource {
	w := &discoveryv1.Workload{Uid: name, Name: name, Namespace: "default"}
	if len(extra) > 0 {
		w.ServiceAccount = extra[0]
	}
	return &xds.Resource{Name: name, Body: w, Scope: scope}
}

func svc(name string) *xds.Resource {
	return &xds.Resource{Name: name, Body: &discoveryv1.Service{Name: name, Namespace: "default", Hostname: name + ".default.svc.cluster.local"}}
}

func sameBody(a, b proto.Message) bool { return proto.Equal(a, b) }
