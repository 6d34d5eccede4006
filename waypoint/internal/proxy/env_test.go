package proxy

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	discoveryv1 "github.com/amesh-dev/amesh/api/discovery/v1"
	"github.com/amesh-dev/amesh/api/hbone"
	"github.com/amesh-dev/amesh/api/identity/identitytest"
	"github.com/amesh-dev/amesh/waypoint/internal/catalog"
	"github.com/amesh-dev/amesh/waypoint/internal/telemetry"
	"github.com/amesh-dev/amesh/waypoint/internal/upstream"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"
	"go.uber.org/zap/zaptest/observer"
	"google.golang.org/protobuf/proto"
)

// env runs the proxy the way the waypoint does, with real HBONE on both
// sides: a client-side shim (the source ztunnel) accepts plain TCP from the
// test's HTTP clients and tunnels each connection over HBONE (mTLS, HTTP/2
// CONNECT) to the waypoint's HBONE server, whose streams are served by an
// HTTP/1.1 + h2c server running the proxy; upstream, every backend sits
// behind its own HBONE server (the destination ztunnel), which admits only
// the waypoint's identity.
type env struct {
	t       testing.TB
	cat     *catalog.Catalog
	proxy   *Proxy
	reg     *prometheus.Registry
	ca      *identitytest.CA
	wpCert  *tls.Certificate
	wpID    spiffeid.ID
	hc      *hbone.Client // the waypoint's upstream client
	access  *observer.ObservedLogs
	vip     map[string]netip.AddrPort
	nextVIP atomic.Uint32
	uid     atomic.Uint32

	podMu     sync.Mutex
	hbonePort uint16
	pods      map[netip.Addr]bool
}

func newEnv(t testing.TB) *env {
	t.Helper()
	e := &env{t: t, vip: map[string]netip.AddrPort{}, reg: prometheus.NewRegistry(), pods: map[netip.Addr]bool{}}
	e.ca = identitytest.Must("cluster.local")
	e.wpCert, e.wpID = e.ca.MustLeaf("default", "waypoint")
	e.hc = hbone.NewClient(hbone.ClientConfig{
		Certificates: func(context.Context, spiffeid.ID) (*tls.Certificate, error) { return e.wpCert, nil },
		Bundle:       e.ca.Bundle(),
	})
	t.Cleanup(func() { e.hc.Close() })
	var d net.Dialer
	dial := func(ctx context.Context, ep *upstream.Endpoint) (net.Conn, error) {
		if !ep.HBONE {
			return d.DialContext(ctx, "tcp", ep.Addr.String())
		}
		want, err := spiffeid.FromString(ep.Identity)
		if err != nil {
			return nil, err
		}
		return e.hc.Dial(ctx, hbone.DialRequest{Source: e.wpID, Expected: []spiffeid.ID{want},
			Proxy: netip.AddrPortFrom(ep.Addr.Addr(), e.hbonePort), Target: ep.Addr})
	}
	log := zap.NewNop()
	if _, fuzz := t.(*testing.F); !fuzz { // a fuzz target may not log through F
		log = zaptest.NewLogger(t)
	}
	e.cat = catalog.New(catalog.Options{Dial: dial, Logger: log})
	e.cat.MarkSynced() // tests load their state directly
	tr, err := telemetry.NewTracer(context.Background(), telemetry.TracingConfig{SampleRatio: 1, ServiceName: "waypoint-test"})
	if err != nil {
		t.Fatal(err)
	}
	core, logs := observer.New(zap.InfoLevel)
	e.access = logs
	e.proxy = New(Options{Catalog: e.cat, Metrics: telemetry.NewMetrics(e.reg), Tracer: tr,
		AccessLog: zap.New(core), Logger: log})
	return e
}

// streamConn is one HBONE stream handed to the front HTTP server.
type streamConn struct {
	net.Conn
	ci   *ConnInfo
	once sync.Once
	done chan struct{}
}

func (c *streamConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(func() { close(c.done) })
	return err
}

type streamListener struct {
	ch   chan net.Conn
	stop chan struct{}
	once sync.Once
}

func (l *streamListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.ch:
		return c, nil
	case <-l.stop:
		return nil, net.ErrClosed
	}
}
func (l *streamListener) Close() error   { l.once.Do(func() { close(l.stop) }); return nil }
func (l *streamListener) Addr() net.Addr { return &net.TCPAddr{} }

// front starts the waypoint side for service:port and returns the URL of
// the client-side shim that tunnels to it. h2c says nothing here (the
// server speaks both, told apart by the preface); it is kept for the
// tests' readability.
func (e *env) front(service string, port uint32, _ bool) string {
	e.t.Helper()
	target := e.vipFor(service, port)
	ln := &streamListener{ch: make(chan net.Conn), stop: make(chan struct{})}
	var p http.Protocols
	p.SetHTTP1(true)
	p.SetUnencryptedHTTP2(true)
	hs := &http.Server{Handler: e.proxy, Protocols: &p, ConnContext: func(ctx context.Context, c net.Conn) context.Context {
		return WithConn(ctx, c.(*streamConn).ci)
	}}
	go func() { _ = hs.Serve(ln) }()
	e.t.Cleanup(func() { hs.Close() })

	srv := hbone.NewServer(hbone.ServerConfig{
		Certificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return e.wpCert, nil },
		Bundle:      e.ca.Bundle(), TrustDomain: e.ca.TrustDomain, DrainTimeout: 100 * time.Millisecond,
		Handler: func(ctx context.Context, r *hbone.Request) (func(net.Conn), error) {
			if r.Authority != target {
				return nil, hbone.ErrBadTarget
			}
			ci := &ConnInfo{Peer: r.Peer.String(), Source: r.RemoteAddr.Addr(), Target: r.Authority}
			return func(s net.Conn) {
				sc := &streamConn{Conn: s, ci: ci, done: make(chan struct{})}
				select {
				case ln.ch <- sc:
					<-sc.done
				case <-ln.stop:
				}
			}, nil
		},
	})
	hln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		e.t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan struct{})
	go func() { _ = srv.Serve(ctx, hln); close(served) }()
	e.t.Cleanup(func() {
		http.DefaultTransport.(*http.Transport).CloseIdleConnections()
		cancel()
		hs.Close()
		<-served
	})

	// The source ztunnel: plain TCP in, HBONE out, as client/curl.
	clientCert, clientID := e.ca.MustLeaf("client", "curl")
	hc := hbone.NewClient(hbone.ClientConfig{
		Certificates: func(context.Context, spiffeid.ID) (*tls.Certificate, error) { return clientCert, nil },
		Bundle:       e.ca.Bundle(),
	})
	shim, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { shim.Close(); hc.Close() })
	proxyAddr := netip.MustParseAddrPort(hln.Addr().String())
	go func() {
		for {
			c, err := shim.Accept()
			if err != nil {
				return
			}
			go func() {
				s, err := hc.Dial(context.Background(), hbone.DialRequest{Source: clientID, Expected: []spiffeid.ID{e.wpID},
					Proxy: proxyAddr, Target: target})
				if err != nil {
					c.Close()
					return
				}
				_, _, _ = hbone.Splice(c, s)
			}()
		}
	}()
	return "http://" + shim.Addr().String()
}

func (e *env) vipFor(service string, port uint32) netip.AddrPort {
	if a, ok := e.vip[service]; ok {
		return netip.AddrPortFrom(a.Addr(), uint16(port))
	}
	n := e.nextVIP.Add(1)
	a := netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 96, byte(n >> 8), byte(n)}), uint16(port))
	e.vip[service] = a
	return a
}

func key(name string) string { return "default/" + name + ".default.svc.cluster.local" }

// pod puts an HBONE server (the destination ztunnel, identity
// default/<sa>) in front of the backend at ip; it admits only the
// waypoint and connects to the backend before answering.
func (e *env) pod(ip netip.Addr, sa string) {
	e.t.Helper()
	e.podMu.Lock()
	defer e.podMu.Unlock()
	if e.pods[ip] {
		return
	}
	port := e.hbonePort // 0 for the first pod: the kernel chooses; later pods reuse it
	ln, err := net.Listen("tcp", netip.AddrPortFrom(ip, port).String())
	if err != nil {
		e.t.Fatalf("pod HBONE listener on %s: %v", ip, err)
	}
	if e.hbonePort == 0 {
		e.hbonePort = uint16(ln.Addr().(*net.TCPAddr).Port)
	}
	e.pods[ip] = true
	cert, _ := e.ca.MustLeaf("default", sa)
	srv := hbone.NewServer(hbone.ServerConfig{
		Certificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return cert, nil },
		Bundle:      e.ca.Bundle(), TrustDomain: e.ca.TrustDomain, DrainTimeout: 100 * time.Millisecond,
		Handler: func(ctx context.Context, r *hbone.Request) (func(net.Conn), error) {
			if r.Peer != e.wpID {
				return nil, hbone.ErrDenied
			}
			if r.Authority.Addr() != ip {
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
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { _ = srv.Serve(ctx, ln); close(done) }()
	e.t.Cleanup(func() { cancel(); <-done })
}

// service publishes a Service with one port and its backends (each an
// httptest server on its own loopback address, behind its own HBONE pod
// server).
func (e *env) service(name string, port uint32, appProto string, backends ...*httptest.Server) {
	e.t.Helper()
	vip := e.vipFor(name, port)
	ip := vip.Addr().As4()
	svc := &discoveryv1.Service{Name: name, Namespace: "default", Hostname: name + ".default.svc.cluster.local",
		Addresses: [][]byte{ip[:]}, Ports: []*discoveryv1.ServicePort{{Name: "http", ServicePort: port, AppProtocol: appProto}}}
	msgs := []proto.Message{svc}
	for i, b := range backends {
		ap := netip.MustParseAddrPort(b.Listener.Addr().String())
		e.pod(ap.Addr(), name)
		a := ap.Addr().As4()
		msgs = append(msgs, &discoveryv1.Workload{
			Uid: fmt.Sprintf("%s-%d-%d", name, i, e.uid.Add(1)), Name: name + "-" + strconv.Itoa(i), Namespace: "default",
			Addresses: [][]byte{a[:]}, ServiceAccount: name, TrustDomain: "cluster.local", WorkloadName: name,
			CanonicalName: name, CanonicalRevision: "v1", TunnelProtocol: discoveryv1.TunnelProtocol_TUNNEL_PROTOCOL_HBONE,
			Services: map[string]*discoveryv1.PortList{key(name): {Ports: []*discoveryv1.Port{{ServicePort: port, TargetPort: uint32(ap.Port())}}}},
		})
	}
	if err := e.cat.Update(msgs, nil); err != nil {
		e.t.Fatal(err)
	}
}

// waypoint publishes the WaypointService for name.
func (e *env) waypoint(ws *discoveryv1.WaypointService) {
	e.t.Helper()
	if err := e.cat.Update([]proto.Message{ws}, nil); err != nil {
		e.t.Fatal(err)
	}
}

var loopbackN atomic.Uint32

// loopbackBase spreads concurrent test processes over 127.0.0.0/8.
var loopbackBase = byte(10 + uint32(time.Now().UnixNano()%200))

// backend starts an HTTP/1.1+h2c server on a fresh loopback address so each
// backend is a distinct endpoint (and pod).
func backend(t testing.TB, h http.Handler) *httptest.Server {
	t.Helper()
	n := loopbackN.Add(1)
	ln, err := net.Listen("tcp", fmt.Sprintf("127.%d.%d.%d:0", loopbackBase, n/250, 1+n%250))
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewUnstartedServer(h)
	srv.Listener.Close()
	srv.Listener = ln
	var p http.Protocols
	p.SetHTTP1(true)
	p.SetUnencryptedHTTP2(true)
	srv.Config.Protocols = &p
	srv.Start()
	t.Cleanup(srv.Close)
	return srv
}

// named returns a backend answering with its name.
func named(t testing.TB, name string) *httptest.Server {
	return backend(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Backend", name)
		_, _ = w.Write([]byte(name))
	}))
}
