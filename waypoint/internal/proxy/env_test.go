package proxy

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strconv"
	"sync/atomic"
	"testing"

	discoveryv1 "github.com/amesh-dev/amesh/api/discovery/v1"
	"github.com/amesh-dev/amesh/waypoint/internal/catalog"
	"github.com/amesh-dev/amesh/waypoint/internal/telemetry"
	"github.com/amesh-dev/amesh/waypoint/internal/upstream"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"
	"google.golang.org/protobuf/proto"
)

// env is a waypoint proxy in front of plain-TCP loopback backends, served by
// an HTTP/1.1 + h2c server that stamps each connection with the tunnel
// information a real HBONE tunnel would carry.
type env struct {
	t       testing.TB
	cat     *catalog.Catalog
	proxy   *Proxy
	reg     *prometheus.Registry
	vip     map[string]netip.AddrPort // service name → VIP:port
	nextVIP atomic.Uint32
	uid     atomic.Uint32
}

func newEnv(t testing.TB) *env {
	t.Helper()
	var d net.Dialer
	dial := func(ctx context.Context, ep *upstream.Endpoint) (net.Conn, error) {
		return d.DialContext(ctx, "tcp", ep.Addr.String())
	}
	e := &env{t: t, vip: map[string]netip.AddrPort{}, reg: prometheus.NewRegistry()}
	log := zap.NewNop()
	if _, fuzz := t.(*testing.F); !fuzz { // a fuzz target may not log through F
		log = zaptest.NewLogger(t)
	}
	e.cat = catalog.New(catalog.Options{Dial: dial, Logger: log})
	tr, err := telemetry.NewTracer(context.Background(), telemetry.TracingConfig{SampleRatio: 1, ServiceName: "waypoint-test"})
	if err != nil {
		t.Fatal(err)
	}
	e.proxy = New(Options{Catalog: e.cat, Metrics: telemetry.NewMetrics(e.reg), Tracer: tr,
		AccessLog: zap.NewNop(), Logger: log})
	return e
}

// serve starts the front server; the tunnel target of each connection is
// chosen by the client through the "X-Test-Target" trick: we instead give
// each service its own front listener.
func (e *env) front(service string, port uint32, h2c bool) string {
	e.t.Helper()
	target := e.vipFor(service, port)
	srv := httptest.NewUnstartedServer(e.proxy)
	var p http.Protocols
	p.SetHTTP1(true)
	if h2c {
		p.SetUnencryptedHTTP2(true)
	}
	srv.Config.Protocols = &p
	srv.Config.ConnContext = func(ctx context.Context, c net.Conn) context.Context {
		src := netip.MustParseAddrPort(c.RemoteAddr().String())
		return WithConn(ctx, &ConnInfo{Peer: "spiffe://cluster.local/ns/client/sa/curl", Source: src.Addr(), Target: target})
	}
	srv.Start()
	e.t.Cleanup(srv.Close)
	return srv.URL
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

// service publishes a Service with one port and its backends (each an
// httptest server bound to its own loopback address).
func (e *env) service(name string, port uint32, appProto string, backends ...*httptest.Server) {
	e.t.Helper()
	vip := e.vipFor(name, port)
	ip := vip.Addr().As4()
	svc := &discoveryv1.Service{Name: name, Namespace: "default", Hostname: name + ".default.svc.cluster.local",
		Addresses: [][]byte{ip[:]}, Ports: []*discoveryv1.ServicePort{{Name: "http", ServicePort: port, AppProtocol: appProto}}}
	msgs := []proto.Message{svc}
	for i, b := range backends {
		ap := netip.MustParseAddrPort(b.Listener.Addr().String())
		a := ap.Addr().As4()
		msgs = append(msgs, &discoveryv1.Workload{
			Uid: fmt.Sprintf("%s-%d-%d", name, i, e.uid.Add(1)), Name: name + "-" + strconv.Itoa(i), Namespace: "default",
			Addresses: [][]byte{a[:]}, ServiceAccount: name, WorkloadName: name, CanonicalName: name, CanonicalRevision: "v1",
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

// backend starts an HTTP/1.1+h2c server on a fresh loopback address
// (127.0.1.x) so each backend is a distinct endpoint.
func backend(t testing.TB, h http.Handler) *httptest.Server {
	t.Helper()
	n := loopbackN.Add(1)
	ln, err := net.Listen("tcp", fmt.Sprintf("127.0.%d.%d:0", 1+n/250, 1+n%250))
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
