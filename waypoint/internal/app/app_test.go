package app

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/amesh-dev/amesh/api/bearer"
	"github.com/amesh-dev/amesh/api/ca"
	discoveryv1 "github.com/amesh-dev/amesh/api/discovery/v1"
	"github.com/amesh-dev/amesh/api/hbone"
	"github.com/amesh-dev/amesh/api/identity"
	"github.com/amesh-dev/amesh/api/xds"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	jose "github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.uber.org/zap/zaptest"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
)

const td = "cluster.local"

// controller is an in-process fake controller built from api's real CA
// and xDS servers, served over TLS on loopback.
type controller struct {
	t         *testing.T
	authority *ca.Authority
	xds       *xds.Server
	addr      string
	rootFile  string
	tokenFile string
	mu        sync.Mutex
	tokens    []string // bearer tokens seen
}

type allVisible struct{ id string }

func (s allVisible) ID() string                         { return s.id }
func (s allVisible) Visible(string, *xds.Resource) bool { return true }

func newController(t *testing.T) *controller {
	t.Helper()
	return newControllerWith(t, controllerOptions{})
}

// controllerOptions adjust the fake controller.
type controllerOptions struct {
	// maxResponseResources bounds the resources per xDS response (0: the
	// server's default).
	maxResponseResources int
	// grpc are extra options of its gRPC server (interceptors).
	grpc []grpc.ServerOption
}

func newControllerWith(t *testing.T, opts controllerOptions) *controller {
	t.Helper()
	tdID := spiffeid.RequireTrustDomainFromString(td)
	auth, err := ca.NewRoot(tdID, 24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	c := &controller{t: t, authority: auth}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	chain, err := auth.SignServer(key.Public(), []string{"controller.amesh-system.svc"}, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	var cert tls.Certificate
	for _, c := range chain {
		cert.Certificate = append(cert.Certificate, c.Raw)
	}
	cert.PrivateKey = key
	g := grpc.NewServer(append([]grpc.ServerOption{grpc.Creds(credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS13}))},
		opts.grpc...)...)
	ca.NewServer(auth, ca.AuthorizerFunc(func(ctx context.Context, id spiffeid.ID) error {
		tok, err := bearer.FromIncoming(ctx)
		if err != nil {
			return err
		}
		c.mu.Lock()
		c.tokens = append(c.tokens, tok)
		c.mu.Unlock()
		if tok != "waypoint-token" {
			return status.Error(codes.PermissionDenied, "bad token")
		}
		return nil
	}), ca.ServerOptions{}).Register(g)
	c.xds = xds.NewServer(xds.ServerOptions{MaxResponseResources: opts.maxResponseResources, Authenticate: func(ctx context.Context, node *corev3.Node) (xds.Subscriber, error) {
		if _, err := bearer.FromIncoming(ctx); err != nil {
			return nil, err
		}
		if node.GetMetadata().GetFields()["kind"].GetStringValue() != "waypoint" {
			return nil, status.Error(codes.PermissionDenied, "not a waypoint")
		}
		return allVisible{node.GetId()}, nil
	}})
	c.xds.Register(g)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = g.Serve(ln) }()
	t.Cleanup(g.Stop)
	c.addr = ln.Addr().String()
	dir := t.TempDir()
	c.rootFile = filepath.Join(dir, "root.pem")
	c.tokenFile = filepath.Join(dir, "token")
	if err := os.WriteFile(c.rootFile, auth.RootsPEM(), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(c.tokenFile, []byte("waypoint-token\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	c.set(discoveryv1.TrustBundleType, &discoveryv1.TrustBundle{TrustDomain: td, RootsPem: []string{string(auth.RootsPEM())}})
	return c
}

func name(m proto.Message) string {
	switch r := m.(type) {
	case *discoveryv1.Workload:
		return r.GetUid()
	case *discoveryv1.Service:
		return r.GetNamespace() + "/" + r.GetHostname()
	case *discoveryv1.WaypointService:
		return r.GetService()
	case *discoveryv1.WaypointGateway:
		return r.GetGateway()
	case *discoveryv1.TrustBundle:
		return r.GetTrustDomain()
	}
	panic(fmt.Sprintf("%T", m))
}

// set publishes the full set of one type.
func (c *controller) set(typeURL string, ms ...proto.Message) {
	c.t.Helper()
	var rs []*xds.Resource
	for _, m := range ms {
		rs = append(rs, &xds.Resource{Name: name(m), Body: m})
	}
	if err := c.xds.Set(typeURL, rs); err != nil {
		c.t.Fatal(err)
	}
}

// certFor issues a workload certificate from the controller's CA.
func (c *controller) certFor(ns, sa string) (*tls.Certificate, spiffeid.ID) {
	c.t.Helper()
	id, err := identity.ID(td, ns, sa)
	if err != nil {
		c.t.Fatal(err)
	}
	key, err := identity.NewKey()
	if err != nil {
		c.t.Fatal(err)
	}
	csr, err := identity.NewCSR(key, id)
	if err != nil {
		c.t.Fatal(err)
	}
	chain, err := c.authority.Sign(csr, id, time.Hour)
	if err != nil {
		c.t.Fatal(err)
	}
	cert := &tls.Certificate{PrivateKey: key, Leaf: chain[0]}
	for _, x := range chain {
		cert.Certificate = append(cert.Certificate, x.Raw)
	}
	return cert, id
}

func (c *controller) bundle() *identity.Bundle {
	b := identity.NewBundle()
	b.Set(spiffeid.RequireTrustDomainFromString(td), c.authority.Roots())
	return b
}

// pod is a destination workload: an app server on podIP:appPort behind an
// HBONE server (its "ztunnel") on podIP:hbonePort that admits only the
// waypoint's identity and connects to the app.
type pod struct {
	ip       netip.Addr
	appPort  uint16
	peers    chan spiffeid.ID
	workload *discoveryv1.Workload
}

var podN struct {
	sync.Mutex
	n int
}

// loopbackBase is a per-process random 127.x.y.0/24-ish range so that
// concurrent test runs on the shared machine do not collide.
var loopbackBase = func() [2]byte {
	n, _ := rand.Int(rand.Reader, big.NewInt(200))
	m, _ := rand.Int(rand.Reader, big.NewInt(250))
	return [2]byte{byte(20 + n.Int64()), byte(m.Int64())}
}()

func nextIP() netip.Addr {
	podN.Lock()
	defer podN.Unlock()
	podN.n++
	return netip.AddrFrom4([4]byte{127, loopbackBase[0], loopbackBase[1], byte(podN.n)})
}

func startPod(t *testing.T, c *controller, hbonePort uint16, waypoint spiffeid.ID, svcKey string, svcPort uint32, sa string, app http.Handler, grpcApp *grpc.Server) *pod {
	t.Helper()
	p := &pod{ip: nextIP(), peers: make(chan spiffeid.ID, 100)}
	appLn, err := net.Listen("tcp", netip.AddrPortFrom(p.ip, 0).String())
	if err != nil {
		t.Fatal(err)
	}
	p.appPort = uint16(appLn.Addr().(*net.TCPAddr).Port)
	if grpcApp != nil {
		go func() { _ = grpcApp.Serve(appLn) }()
		t.Cleanup(grpcApp.Stop)
	} else {
		var prot http.Protocols
		prot.SetHTTP1(true)
		prot.SetUnencryptedHTTP2(true)
		hs := &http.Server{Handler: app, Protocols: &prot}
		go func() { _ = hs.Serve(appLn) }()
		t.Cleanup(func() { hs.Close() })
	}
	cert, _ := c.certFor("default", sa)
	hsrv := hbone.NewServer(hbone.ServerConfig{
		Certificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return cert, nil },
		Bundle:      c.bundle(), TrustDomain: spiffeid.RequireTrustDomainFromString(td),
		Handler: func(ctx context.Context, r *hbone.Request) (func(net.Conn), error) {
			select {
			case p.peers <- r.Peer:
			default:
			}
			if r.Peer != waypoint {
				return nil, hbone.ErrDenied
			}
			if r.Authority.Addr() != p.ip {
				return nil, hbone.ErrBadTarget
			}
			var d net.Dialer
			up, err := d.DialContext(ctx, "tcp", r.Authority.String())
			if err != nil {
				return nil, fmt.Errorf("%w: %v", hbone.ErrUnreachable, err)
			}
			return func(s net.Conn) { _, _, _ = hbone.Splice(s, up) }, nil
		},
	})
	hln, err := net.Listen("tcp", netip.AddrPortFrom(p.ip, hbonePort).String())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { _ = hsrv.Serve(ctx, hln); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	a4 := p.ip.As4()
	p.workload = &discoveryv1.Workload{Uid: "pod-" + p.ip.String(), Name: "pod-" + p.ip.String(), Namespace: "default",
		Addresses: [][]byte{a4[:]}, ServiceAccount: sa, TrustDomain: td, WorkloadName: sa, CanonicalName: sa, CanonicalRevision: "v1",
		TunnelProtocol: discoveryv1.TunnelProtocol_TUNNEL_PROTOCOL_HBONE,
		Services:       map[string]*discoveryv1.PortList{svcKey: {Ports: []*discoveryv1.Port{{ServicePort: svcPort, TargetPort: uint32(p.appPort)}}}}}
	return p
}

func freePortOn(t *testing.T, ip netip.Addr) uint16 {
	ln, err := net.Listen("tcp", netip.AddrPortFrom(ip, 0).String())
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return uint16(ln.Addr().(*net.TCPAddr).Port)
}

type running struct {
	app    *App
	hbone  netip.AddrPort
	admin  string
	metric string
	ready  string
	stop   func() error
}

func startWaypoint(t *testing.T, c *controller, hbonePort uint16) *running {
	t.Helper()
	rw := launchWaypoint(t, c, hbonePort)
	rw.waitReady(t)
	return rw
}

// waitReady waits for /healthz/ready to answer 200.
func (rw *running) waitReady(t *testing.T) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		resp, err := http.Get("http://" + rw.ready + "/healthz/ready")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("waypoint never ready (last: %v %v)", resp, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// launchWaypoint starts a waypoint without waiting for it to be ready.
func launchWaypoint(t *testing.T, c *controller, hbonePort uint16) *running {
	t.Helper()
	cfg := DefaultConfig()
	cfg.Namespace, cfg.ServiceAccount = "default", "waypoint"
	cfg.PodName, cfg.NodeName, cfg.Gateway = "waypoint-0", "node-1", "default/waypoint"
	cfg.ControllerAddr, cfg.ControllerServerName = c.addr, "controller.amesh-system.svc"
	cfg.RootCertFile, cfg.TokenFile = c.rootFile, c.tokenFile
	cfg.HBONEAddr, cfg.AdminAddr, cfg.MetricsAddr, cfg.ReadyAddr = "127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:0"
	cfg.DrainTimeout = 5 * time.Second
	cfg.AccessLog = false
	cfg.TraceSampling = 1
	cfg.UpstreamHBONEPort = hbonePort
	ctx, cancel := context.WithCancel(context.Background())
	a, err := New(ctx, cfg, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	h, ad, m, r := a.Addrs()
	var once sync.Once
	var runErr error
	stop := func() error {
		once.Do(func() {
			cancel()
			select {
			case runErr = <-done:
			case <-time.After(30 * time.Second):
				runErr = errors.New("Run did not return")
			}
		})
		return runErr
	}
	t.Cleanup(func() {
		if err := stop(); err != nil {
			t.Error(err)
		}
	})
	return &running{app: a, hbone: netip.MustParseAddrPort(h), admin: ad, metric: m, ready: r, stop: stop}
}

// client tunnels to the waypoint with its own identity, as the source
// ztunnel would.
type client struct {
	hc     *hbone.Client
	id     spiffeid.ID
	wp     spiffeid.ID
	wpAddr netip.AddrPort
}

func newClient(t *testing.T, c *controller, wp *running) *client {
	cert, id := c.certFor("frontend", "web")
	hc := hbone.NewClient(hbone.ClientConfig{
		Certificates: func(context.Context, spiffeid.ID) (*tls.Certificate, error) { return cert, nil },
		Bundle:       c.bundle(),
	})
	t.Cleanup(func() { hc.Close() })
	return &client{hc: hc, id: id, wp: wp.app.Identity(), wpAddr: wp.hbone}
}

func (cl *client) dial(target netip.AddrPort) func(ctx context.Context, _, _ string) (net.Conn, error) {
	return func(ctx context.Context, _, _ string) (net.Conn, error) {
		return cl.hc.Dial(ctx, hbone.DialRequest{Source: cl.id, Expected: []spiffeid.ID{cl.wp}, Proxy: cl.wpAddr, Target: target,
			Header: http.Header{"Forwarded": {"for=10.244.1.7"}}})
	}
}

func (cl *client) http1(target netip.AddrPort) *http.Client {
	return &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DialContext: cl.dial(target)}}
}

func (cl *client) h2c(target netip.AddrPort) *http.Client {
	var p http.Protocols
	p.SetUnencryptedHTTP2(true)
	return &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{Protocols: &p, DialContext: cl.dial(target)}}
}

func service(name string, vip netip.Addr, port uint32, proto string) *discoveryv1.Service {
	a := vip.As4()
	return &discoveryv1.Service{Name: name, Namespace: "default", Hostname: name + ".default.svc.cluster.local",
		Addresses: [][]byte{a[:]}, Ports: []*discoveryv1.ServicePort{{Name: "p", ServicePort: port, AppProtocol: proto}},
		Waypoint: &discoveryv1.GatewayAddress{Gateway: "default/waypoint", HbonePort: 15008}}
}

func key(name string) string { return "default/" + name + ".default.svc.cluster.local" }

func TestEndToEndThroughHBONE(t *testing.T) {
	c := newController(t)
	hbonePort := freePortOn(t, netip.MustParseAddr("127.0.0.1"))
	wpID, _ := identity.ID(td, "default", "waypoint")

	echo := func(name string) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("X-Pod", name)
			fmt.Fprintf(w, "%s %s %s traceparent=%t", name, r.Proto, r.URL.Path, r.Header.Get("Traceparent") != "")
		})
	}
	v1 := startPod(t, c, hbonePort, wpID, key("reviews"), 9080, "reviews", echo("v1"), nil)
	v2 := startPod(t, c, hbonePort, wpID, key("reviews-v2"), 9080, "reviews", echo("v2"), nil)
	gs := grpc.NewServer()
	hsrv := health.NewServer()
	hsrv.SetServingStatus("ratings", healthpb.HealthCheckResponse_SERVING)
	healthpb.RegisterHealthServer(gs, hsrv)
	rpod := startPod(t, c, hbonePort, wpID, key("ratings"), 9090, "ratings", nil, gs)
	db := startPod(t, c, hbonePort, wpID, key("db"), 5432, "db", echo("db"), nil) // spoken to as raw TCP
	// v1 is also bound to the waypoint for traffic addressed to its own IP.
	v1.workload.Waypoint = &discoveryv1.GatewayAddress{Gateway: "default/waypoint", HbonePort: 15008}

	reviewsVIP := netip.MustParseAddr("10.96.0.10")
	c.set(discoveryv1.ServiceType,
		service("reviews", reviewsVIP, 9080, "http"),
		service("reviews-v2", netip.MustParseAddr("10.96.0.11"), 9080, "http"),
		service("ratings", netip.MustParseAddr("10.96.0.12"), 9090, "grpc"),
		service("db", netip.MustParseAddr("10.96.0.13"), 5432, "tcp"))
	c.set(discoveryv1.WorkloadType, v1.workload, v2.workload, rpod.workload, db.workload)
	c.set(discoveryv1.WaypointServiceType,
		&discoveryv1.WaypointService{Service: key("reviews"), Gateway: "default/waypoint",
			HttpRoutes: []*discoveryv1.HTTPRoute{{Namespace: "default", Name: "reviews", Rules: []*discoveryv1.HTTPRouteRule{
				{Matches: []*discoveryv1.HTTPRouteMatch{{Headers: []*discoveryv1.HeaderMatch{{Name: "x-canary", Value: "1"}}}},
					Backends: []*discoveryv1.BackendRef{{Service: key("reviews-v2"), Port: 9080, Weight: 1}}},
				{Matches: []*discoveryv1.HTTPRouteMatch{{Path: &discoveryv1.PathMatch{Value: "/"}}},
					Filters: []*discoveryv1.HTTPFilter{{Kind: &discoveryv1.HTTPFilter_ResponseHeaderModifier{ResponseHeaderModifier: &discoveryv1.HeaderModifier{
						Set: []*discoveryv1.Header{{Name: "x-routed", Value: "default"}}}}}},
					Backends: []*discoveryv1.BackendRef{{Service: key("reviews"), Port: 9080, Weight: 1}}},
			}}},
			Authorizations: []*discoveryv1.Authorization{{Namespace: "default", Name: "no-admin", Action: discoveryv1.Authorization_ACTION_DENY,
				Rules: []*discoveryv1.Rule{{To: []*discoveryv1.Operation{{Paths: []string{"/admin*"}}}}}}}},
		&discoveryv1.WaypointService{Service: key("ratings"), Gateway: "default/waypoint"},
		&discoveryv1.WaypointService{Service: key("db"), Gateway: "default/waypoint",
			Authorizations: []*discoveryv1.Authorization{{Namespace: "default", Name: "db-frontend-only",
				Rules: []*discoveryv1.Rule{{From: []*discoveryv1.Source{{Namespaces: []string{"frontend"}}}}}}}},
	)
	// Gateway-targeted policy: applies to workload-addressed traffic.
	c.set(discoveryv1.WaypointGatewayType, &discoveryv1.WaypointGateway{Gateway: "default/waypoint",
		Authorizations: []*discoveryv1.Authorization{{Namespace: "default", Name: "gw-no-internal", Action: discoveryv1.Authorization_ACTION_DENY,
			Rules: []*discoveryv1.Rule{{To: []*discoveryv1.Operation{{Paths: []string{"/internal*"}}}}}}}})
	wp := startWaypoint(t, c, hbonePort)
	cl := newClient(t, c, wp)
	reviews := netip.AddrPortFrom(reviewsVIP, 9080)

	t.Run("http1 default rule", func(t *testing.T) {
		resp, err := cl.http1(reviews).Get("http://reviews:9080/books")
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || string(b) != "v1 HTTP/1.1 /books traceparent=true" || resp.Header.Get("X-Routed") != "default" {
			t.Fatalf("%d %q %v", resp.StatusCode, b, resp.Header)
		}
		select {
		case peer := <-v1.peers:
			if peer != wpID {
				t.Fatalf("destination saw peer %s, want the waypoint %s", peer, wpID)
			}
		default:
			t.Fatal("destination HBONE server saw no tunnel")
		}
	})
	t.Run("h2c header route", func(t *testing.T) {
		req, _ := http.NewRequest("GET", "http://reviews:9080/x", nil)
		req.Header.Set("x-canary", "1")
		resp, err := cl.h2c(reviews).Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.Proto != "HTTP/2.0" || !strings.HasPrefix(string(b), "v2 HTTP/1.1 /x") {
			t.Fatalf("%s %q", resp.Proto, b)
		}
	})
	t.Run("authz deny", func(t *testing.T) {
		resp, err := cl.http1(reviews).Get("http://reviews:9080/admin/users")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 403 {
			t.Fatalf("status %d", resp.StatusCode)
		}
	})
	t.Run("grpc", func(t *testing.T) {
		cc, err := grpc.NewClient("passthrough:///ratings", grpc.WithTransportCredentials(insecure.NewCredentials()),
			grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
				return cl.dial(netip.AddrPortFrom(netip.MustParseAddr("10.96.0.12"), 9090))(ctx, "", "")
			}))
		if err != nil {
			t.Fatal(err)
		}
		defer cc.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		r, err := healthpb.NewHealthClient(cc).Check(ctx, &healthpb.HealthCheckRequest{Service: "ratings"})
		if err != nil || r.GetStatus() != healthpb.HealthCheckResponse_SERVING {
			t.Fatalf("%v %v", r, err)
		}
	})
	t.Run("l4 passthrough with policy", func(t *testing.T) {
		conn, err := cl.dial(netip.AddrPortFrom(netip.MustParseAddr("10.96.0.13"), 5432))(context.Background(), "", "")
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		_, _ = io.WriteString(conn, "GET /raw HTTP/1.0\r\nHost: db\r\n\r\n")
		b, _ := io.ReadAll(conn)
		if !bytes.Contains(b, []byte("db HTTP/1.0 /raw")) {
			t.Fatalf("passthrough got %q", b)
		}
	})
	t.Run("workload addressed directly", func(t *testing.T) {
		resp, err := cl.http1(netip.AddrPortFrom(v1.ip, v1.appPort)).Get("http://pod/direct")
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || !strings.HasPrefix(string(b), "v1 HTTP/1.1 /direct") {
			t.Fatalf("%d %q", resp.StatusCode, b)
		}
		// The Gateway's policy applies to traffic addressed to the pod; the
		// reviews Service's (DENY /admin*) does not: the pod was not
		// addressed through the Service.
		for path, want := range map[string]int{"/internal/x": 403, "/admin": 200} {
			resp, err = cl.http1(netip.AddrPortFrom(v1.ip, v1.appPort)).Get("http://pod" + path)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != want {
				t.Fatalf("%s on the pod: %d, want %d", path, resp.StatusCode, want)
			}
		}
		// v2 is not bound to this waypoint.
		if _, err := cl.dial(netip.AddrPortFrom(v2.ip, v2.appPort))(context.Background(), "", ""); !errors.Is(err, hbone.ErrBadTarget) {
			t.Fatalf("unbound workload: %v", err)
		}
	})
	t.Run("unknown target is refused with 400", func(t *testing.T) {
		_, err := cl.dial(netip.MustParseAddrPort("10.96.99.99:80"))(context.Background(), "", "")
		var se *hbone.StatusError
		if !errors.As(err, &se) || !errors.Is(err, hbone.ErrBadTarget) {
			t.Fatalf("got %v", err)
		}
	})
	t.Run("metrics and config dump", func(t *testing.T) {
		resp, err := http.Get("http://" + wp.metric + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		for _, want := range []string{`istio_requests_total{`, `reporter="waypoint"`, `source_principal="spiffe://cluster.local/ns/frontend/sa/web"`,
			`destination_principal="spiffe://cluster.local/ns/default/sa/reviews"`, `connection_security_policy="mutual_tls"`,
			`response_code="403"`, `request_protocol="grpc"`, `istio_tcp_connections_opened_total{`,
			`amesh_xds_client_updates_total{result="applied",type="amesh.discovery.v1.Workload"}`,
			"amesh_waypoint_invalid_local_rate_limits 0"} {
			if !bytes.Contains(b, []byte(want)) {
				t.Errorf("metrics lack %s", want)
			}
		}
		resp, err = http.Get("http://" + wp.admin + "/config_dump")
		if err != nil {
			t.Fatal(err)
		}
		b, _ = io.ReadAll(resp.Body)
		resp.Body.Close()
		for _, want := range []string{`"waypoint_services"`, `"certificates"`, "10.96.0.10:9080", `"state": "valid"`} {
			if !bytes.Contains(b, []byte(want)) {
				t.Errorf("config dump lacks %s:\n%s", want, b)
			}
		}
	})
	t.Run("drain", func(t *testing.T) {
		if err := wp.stop(); err != nil {
			t.Fatal(err)
		}
		if _, err := http.Get("http://" + wp.ready + "/healthz/ready"); err == nil {
			t.Fatal("readiness still served after stop")
		}
	})
}

func signer(t *testing.T) (*ecdsa.PrivateKey, string) {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	set, err := json.Marshal(jose.JSONWebKeySet{Keys: []jose.JSONWebKey{{Key: &k.PublicKey, KeyID: "k1", Algorithm: "ES256", Use: "sig"}}})
	if err != nil {
		t.Fatal(err)
	}
	return k, string(set)
}

func token(t *testing.T, k *ecdsa.PrivateKey, c jwt.Claims) string {
	s, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.ES256, Key: k}, (&jose.SignerOptions{}).WithType("JWT").WithHeader("kid", "k1"))
	if err != nil {
		t.Fatal(err)
	}
	tok, err := jwt.Signed(s).Claims(c).Serialize()
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// TestPoliciesAndResilienceThroughHBONE: JWT, rate limiting, retries and
// outlier detection with real HBONE on both sides of the waypoint.
func TestPoliciesAndResilienceThroughHBONE(t *testing.T) {
	c := newController(t)
	hbonePort := freePortOn(t, netip.MustParseAddr("127.0.0.1"))
	wpID, _ := identity.ID(td, "default", "waypoint")
	var badCalls, flakyCalls atomic.Int32
	good := startPod(t, c, hbonePort, wpID, key("api"), 80, "api", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/flaky" && flakyCalls.Add(1)%2 == 1 {
			w.WriteHeader(503)
			return
		}
		fmt.Fprint(w, "good")
	}), nil)
	bad := startPod(t, c, hbonePort, wpID, key("api"), 80, "api", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		badCalls.Add(1)
		w.WriteHeader(500)
	}), nil)
	key1, jwks := signer(t)
	apiVIP := netip.MustParseAddr("10.96.1.1")
	c.set(discoveryv1.ServiceType, service("api", apiVIP, 80, "http"))
	c.set(discoveryv1.WorkloadType, good.workload, bad.workload)
	c.set(discoveryv1.WaypointServiceType, &discoveryv1.WaypointService{Service: key("api"), Gateway: "default/waypoint",
		HttpRoutes: []*discoveryv1.HTTPRoute{{Namespace: "default", Name: "api", Rules: []*discoveryv1.HTTPRouteRule{{
			Backends: []*discoveryv1.BackendRef{{Service: key("api"), Port: 80, Weight: 1}},
			Retry:    &discoveryv1.RetryPolicy{Attempts: 3, Codes: []uint32{500, 503}, Backoff: durationpb.New(time.Millisecond)},
		}}}},
		RequestAuthentications: []*discoveryv1.RequestAuthentication{{Namespace: "default", Name: "jwt", JwtRules: []*discoveryv1.JWTRule{{
			Issuer: "https://issuer.example", Audiences: []string{"api"}, Jwks: jwks}}}},
		Authorizations: []*discoveryv1.Authorization{{Namespace: "default", Name: "need-jwt", Rules: []*discoveryv1.Rule{{
			From: []*discoveryv1.Source{{RequestPrincipals: []string{"https://issuer.example/*"}}}}}}},
		TrafficPolicy: &discoveryv1.TrafficPolicy{
			LocalRateLimit:   &discoveryv1.LocalRateLimit{MaxTokens: 30, TokensPerFill: 30, FillInterval: durationpb.New(time.Hour)},
			OutlierDetection: &discoveryv1.OutlierDetection{Consecutive_5Xx: 2, BaseEjectionTime: durationpb.New(time.Minute), MaxEjectionPercent: 50},
		}})
	c.set(discoveryv1.WaypointGatewayType) // none, as the controller publishes
	wp := startWaypoint(t, c, hbonePort)
	cl := newClient(t, c, wp)
	hc := cl.http1(netip.AddrPortFrom(apiVIP, 80))
	now := time.Now()
	valid := token(t, key1, jwt.Claims{Issuer: "https://issuer.example", Subject: "alice", Audience: jwt.Audience{"api"}, Expiry: jwt.NewNumericDate(now.Add(time.Hour))})
	expired := token(t, key1, jwt.Claims{Issuer: "https://issuer.example", Subject: "alice", Audience: jwt.Audience{"api"}, Expiry: jwt.NewNumericDate(now.Add(-time.Hour))})
	wrongAud := token(t, key1, jwt.Claims{Issuer: "https://issuer.example", Subject: "alice", Audience: jwt.Audience{"other"}, Expiry: jwt.NewNumericDate(now.Add(time.Hour))})
	// Signed by the configured issuer's key, but naming another issuer.
	wrongIss := token(t, key1, jwt.Claims{Issuer: "https://evil.example", Subject: "alice", Audience: jwt.Audience{"api"}, Expiry: jwt.NewNumericDate(now.Add(time.Hour))})
	h2c := cl.h2c(netip.AddrPortFrom(apiVIP, 80))
	doWith := func(c *http.Client, path, tok string) (int, string, http.Header) {
		req, _ := http.NewRequest("GET", "http://api"+path, nil)
		if tok != "" {
			req.Header.Set("Authorization", "Bearer "+tok)
		}
		resp, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		return resp.StatusCode, string(b), resp.Header
	}
	do := func(path, tok string) (int, string, http.Header) { return doWith(hc, path, tok) }
	used := 0
	for _, c := range []struct {
		name string
		c    *http.Client
	}{{"jwt http1", hc}, {"jwt h2c", h2c}} {
		t.Run(c.name, func(t *testing.T) {
			for _, tc := range []struct {
				name, tok, challenge string
				code                 int
			}{
				{"expired", expired, "expired", 401},
				{"wrong audience", wrongAud, "audience", 401},
				{"wrong issuer", wrongIss, "issuer is not configured", 401},
				{"no token with a request-principal ALLOW", "", "", 403},
				{"valid", valid, "", 200},
			} {
				code, _, h := doWith(c.c, "/", tc.tok)
				used++
				if code != tc.code {
					t.Fatalf("%s: %d, want %d", tc.name, code, tc.code)
				}
				if ch := h.Get("Www-Authenticate"); tc.challenge != "" &&
					(!strings.Contains(ch, `error="invalid_token"`) || !strings.Contains(ch, tc.challenge)) {
					t.Fatalf("%s: www-authenticate %q", tc.name, ch)
				}
			}
		})
	}
	valids := 2 // taken from the bucket by the "valid" cases above
	t.Run("retries and outlier ejection", func(t *testing.T) {
		for i := range 10 {
			code, body, _ := do("/", valid)
			used++
			if code != 200 || body != "good" {
				t.Fatalf("request %d: %d %q (retries should hide the bad endpoint)", i, code, body)
			}
		}
		if n := badCalls.Load(); n > 2 {
			t.Fatalf("bad endpoint got %d requests; outlier detection ejects it after 2", n)
		}
		if code, body, _ := do("/flaky", valid); code != 200 || body != "good" {
			t.Fatalf("flaky: %d %q", code, body)
		}
		used++
	})
	t.Run("rate limit exact", func(t *testing.T) {
		ok, limited := 0, 0
		for range 40 - used + 5 {
			code, _, _ := do("/", valid)
			switch code {
			case 200:
				ok++
			case 429:
				limited++
			default:
				t.Fatalf("unexpected %d", code)
			}
		}
		// 30 tokens in the bucket: the JWT and authz refusals above came
		// before the limiter and took none.
		if want := 30 - 11 - valids; ok != want || limited != 40-used+5-want {
			t.Fatalf("ok %d limited %d, want %d ok", ok, limited, want)
		}
	})
}

// TestDrainThroughHBONE: stopping the waypoint lets an in-flight request
// finish, while readiness fails at once.
func TestDrainThroughHBONE(t *testing.T) {
	c := newController(t)
	hbonePort := freePortOn(t, netip.MustParseAddr("127.0.0.1"))
	wpID, _ := identity.ID(td, "default", "waypoint")
	entered := make(chan struct{}, 1)
	slow := startPod(t, c, hbonePort, wpID, key("slow"), 80, "slow", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		entered <- struct{}{}
		time.Sleep(time.Second)
		fmt.Fprint(w, "finished")
	}), nil)
	vip := netip.MustParseAddr("10.96.2.1")
	c.set(discoveryv1.ServiceType, service("slow", vip, 80, "http"))
	c.set(discoveryv1.WorkloadType, slow.workload)
	c.set(discoveryv1.WaypointServiceType, &discoveryv1.WaypointService{Service: key("slow"), Gateway: "default/waypoint"})
	c.set(discoveryv1.WaypointGatewayType) // none, as the controller publishes
	wp := startWaypoint(t, c, hbonePort)
	cl := newClient(t, c, wp)
	type result struct {
		code int
		body string
		err  error
	}
	rc := make(chan result, 1)
	go func() {
		resp, err := cl.http1(netip.AddrPortFrom(vip, 80)).Get("http://slow/")
		if err != nil {
			rc <- result{err: err}
			return
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		rc <- result{code: resp.StatusCode, body: string(b)}
	}()
	<-entered
	stopped := make(chan error, 1)
	go func() { stopped <- wp.stop() }()
	deadline := time.Now().Add(500 * time.Millisecond)
	unready := false
	for !unready && time.Now().Before(deadline) {
		resp, err := http.Get("http://" + wp.ready + "/healthz/ready")
		if err != nil {
			unready = true
			break
		}
		unready = resp.StatusCode == 503
		resp.Body.Close()
		time.Sleep(20 * time.Millisecond)
	}
	if !unready {
		t.Error("still ready while draining")
	}
	r := <-rc
	if r.err != nil || r.code != 200 || r.body != "finished" {
		t.Fatalf("in-flight request during drain: %+v", r)
	}
	if err := <-stopped; err != nil {
		t.Fatal(err)
	}
}
