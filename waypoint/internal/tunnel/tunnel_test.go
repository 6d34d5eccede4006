package tunnel

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	discoveryv1 "github.com/amesh-dev/amesh/api/discovery/v1"
	"github.com/amesh-dev/amesh/api/hbone"
	"github.com/amesh-dev/amesh/api/identity/identitytest"
	"github.com/amesh-dev/amesh/waypoint/internal/catalog"
	"github.com/amesh-dev/amesh/waypoint/internal/proxy"
	"github.com/amesh-dev/amesh/waypoint/internal/telemetry"
	"github.com/amesh-dev/amesh/waypoint/internal/upstream"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.uber.org/zap/zaptest"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// fixture runs a tunnel Server whose "tunnels" are plain loopback TCP
// connections (each accepted connection is one tunnel to target) or, with
// fixtureOptions.hbone, real HBONE streams (mTLS, HTTP/2 CONNECT) to an
// HBONE server handing them to the tunnel Server, as the waypoint does.
type fixture struct {
	t      *testing.T
	srv    *Server
	cat    *catalog.Catalog
	front  string
	target netip.AddrPort
	cancel context.CancelFunc
	done   chan error
	once   sync.Once
	// dial opens one tunnel.
	dial func(ctx context.Context) (net.Conn, error)
}

// fixtureOptions vary a fixture.
type fixtureOptions struct {
	// hbone serves the tunnels over real HBONE.
	hbone bool
	// bodyIdle is the proxy's request body idle timeout.
	bodyIdle time.Duration
}

var vip = netip.MustParseAddrPort("10.96.7.7:80")

func newFixture(t *testing.T, appProto string, backend net.Listener, ws *discoveryv1.WaypointService, limits Limits) *fixture {
	t.Helper()
	return newFixtureWith(t, appProto, backend, ws, limits, fixtureOptions{})
}

func newFixtureWith(t *testing.T, appProto string, backend net.Listener, ws *discoveryv1.WaypointService, limits Limits, opts fixtureOptions) *fixture {
	t.Helper()
	var d net.Dialer
	dial := func(ctx context.Context, ep *upstream.Endpoint) (net.Conn, error) {
		return d.DialContext(ctx, "tcp", ep.Addr.String())
	}
	log := zaptest.NewLogger(t)
	cat := catalog.New(catalog.Options{Dial: dial, Logger: log})
	cat.MarkSynced() // the state below is complete
	bap := netip.MustParseAddrPort(backend.Addr().String())
	ip4 := vip.Addr().As4()
	b4 := bap.Addr().As4()
	key := "default/svc.default.svc.cluster.local"
	if ws == nil {
		ws = &discoveryv1.WaypointService{}
	}
	ws.Service = key
	if err := cat.Update([]proto.Message{
		&discoveryv1.Service{Name: "svc", Namespace: "default", Hostname: "svc.default.svc.cluster.local", Addresses: [][]byte{ip4[:]},
			Ports: []*discoveryv1.ServicePort{{ServicePort: 80, TargetPort: uint32(bap.Port()), AppProtocol: appProto}}},
		&discoveryv1.Workload{Uid: "w1", Name: "svc-0", Namespace: "default", Addresses: [][]byte{b4[:]}, ServiceAccount: "svc",
			Services: map[string]*discoveryv1.PortList{key: {}}},
		ws,
	}, nil); err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewRegistry()
	m := telemetry.NewMetrics(reg)
	p := proxy.New(proxy.Options{Catalog: cat, Metrics: m, Logger: log, RequestBodyIdleTimeout: opts.bodyIdle})
	srv := New(Options{Catalog: cat, Proxy: p, Metrics: m, Logger: log, Limits: limits})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	f := &fixture{t: t, srv: srv, cat: cat, front: ln.Addr().String(), target: vip, cancel: cancel, done: make(chan error, 1)}
	go func() { f.done <- srv.Run(ctx) }()
	f.dial = func(ctx context.Context) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "tcp", f.front)
	}
	if opts.hbone {
		f.serveHBONE(ctx, ln)
		t.Cleanup(func() { ln.Close(); f.stop() })
		return f
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				src := netip.MustParseAddrPort(c.RemoteAddr().String()).Addr()
				fn, err := srv.Accept(ctx, "spiffe://cluster.local/ns/client/sa/c", src, f.target)
				if err != nil {
					_, _ = fmt.Fprintf(c, "REFUSED %v", err)
					c.Close()
					return
				}
				fn(c)
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		f.stop()
	})
	return f
}

// serveHBONE serves HBONE on ln: each CONNECT is decided by the tunnel
// Server's Accept (as the waypoint's handler does) and its stream served by
// it; f.dial opens streams with a client identity.
func (f *fixture) serveHBONE(ctx context.Context, ln net.Listener) {
	ca := identitytest.Must("cluster.local")
	wpCert, wpID := ca.MustLeaf("default", "waypoint")
	clientCert, clientID := ca.MustLeaf("client", "c")
	hs := hbone.NewServer(hbone.ServerConfig{
		Certificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return wpCert, nil },
		Bundle:      ca.Bundle(), TrustDomain: ca.TrustDomain, DrainTimeout: 100 * time.Millisecond,
		Handler: func(ctx context.Context, r *hbone.Request) (func(net.Conn), error) {
			fn, err := f.srv.Accept(ctx, r.Peer.String(), r.RemoteAddr.Addr(), r.Authority)
			switch {
			case err == nil:
				return fn, nil
			case errors.Is(err, ErrUnknownTarget):
				return nil, fmt.Errorf("%w: %w", hbone.ErrBadTarget, err)
			case errors.Is(err, ErrDenied):
				return nil, fmt.Errorf("%w: %w", hbone.ErrDenied, err)
			}
			return nil, fmt.Errorf("%w: %w", hbone.ErrUnreachable, err)
		},
	})
	served := make(chan struct{})
	go func() { _ = hs.Serve(ctx, ln); close(served) }()
	hc := hbone.NewClient(hbone.ClientConfig{
		Certificates: func(context.Context, spiffeid.ID) (*tls.Certificate, error) { return clientCert, nil },
		Bundle:       ca.Bundle(),
	})
	f.t.Cleanup(func() { hc.Close(); f.stop(); <-served })
	proxyAddr := netip.MustParseAddrPort(ln.Addr().String())
	f.dial = func(ctx context.Context) (net.Conn, error) {
		return hc.Dial(ctx, hbone.DialRequest{Source: clientID, Expected: []spiffeid.ID{wpID}, Proxy: proxyAddr, Target: f.target})
	}
}

func (f *fixture) stop() {
	f.once.Do(func() {
		f.cancel()
		select {
		case err := <-f.done:
			if err != nil {
				f.t.Errorf("Run: %v", err)
			}
		case <-time.After(30 * time.Second):
			f.t.Error("Run did not return")
		}
	})
}

func httpBackend(t *testing.T, h http.Handler) net.Listener {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var p http.Protocols
	p.SetHTTP1(true)
	p.SetUnencryptedHTTP2(true)
	srv := &http.Server{Handler: h, Protocols: &p}
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() { srv.Close() })
	return ln
}

func protoEcho() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = fmt.Fprintf(w, "%s %s", r.Proto, r.URL.Path)
	})
}

func TestHTTP1AndH2CDetected(t *testing.T) {
	f := newFixture(t, "http2", httpBackend(t, protoEcho()), nil, Limits{})
	h1 := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "tcp", f.front)
	}}}
	var p http.Protocols
	p.SetUnencryptedHTTP2(true)
	h2 := &http.Client{Transport: &http.Transport{Protocols: &p, DialContext: h1.Transport.(*http.Transport).DialContext}}
	for _, tc := range []struct {
		name   string
		c      *http.Client
		wantIn string
	}{{"http1", h1, "HTTP/1.1"}, {"h2c", h2, "HTTP/2.0"}} {
		t.Run(tc.name, func(t *testing.T) {
			resp, err := tc.c.Get("http://svc/x")
			if err != nil {
				t.Fatal(err)
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.Proto != tc.wantIn {
				t.Errorf("client saw %s", resp.Proto)
			}
			// app protocol http2: upstream is always h2c.
			if string(b) != "HTTP/2.0 /x" {
				t.Errorf("backend saw %q", b)
			}
		})
	}
}

func TestGRPCRouteAndStatus(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer()
	hs := health.NewServer()
	hs.SetServingStatus("reviews", healthpb.HealthCheckResponse_SERVING)
	healthpb.RegisterHealthServer(gs, hs)
	go func() { _ = gs.Serve(ln) }()
	t.Cleanup(gs.Stop)
	ws := &discoveryv1.WaypointService{GrpcRoutes: []*discoveryv1.GRPCRoute{{Namespace: "default", Name: "g", Rules: []*discoveryv1.GRPCRouteRule{
		{Matches: []*discoveryv1.GRPCRouteMatch{{Method: &discoveryv1.GRPCMethodMatch{Service: "grpc.health.v1.Health", Method: "Check"}}},
			Backends: []*discoveryv1.BackendRef{{Service: "default/svc.default.svc.cluster.local", Port: 80, Weight: 1}}},
	}}}}
	f := newFixture(t, "grpc", ln, ws, Limits{})
	cc, err := grpc.NewClient("passthrough:///svc", grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "tcp", f.front)
		}))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	hc := healthpb.NewHealthClient(cc)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := hc.Check(ctx, &healthpb.HealthCheckRequest{Service: "reviews"})
	if err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("Check: %v %v", resp, err)
	}
	if _, err := hc.Check(ctx, &healthpb.HealthCheckRequest{Service: "nope"}); status.Code(err) != codes.NotFound {
		t.Fatalf("backend status not relayed: %v", err)
	}
	// List is not matched by any GRPCRoute rule: a local 404 becomes UNIMPLEMENTED.
	if _, err := hc.List(ctx, &healthpb.HealthListRequest{}); status.Code(err) != codes.Unimplemented {
		t.Fatalf("unrouted method: %v", err)
	}
}

func TestL4PassthroughAndPolicy(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { _, _ = io.Copy(c, c); c.Close() }()
		}
	}()
	ws := &discoveryv1.WaypointService{Authorizations: []*discoveryv1.Authorization{{Namespace: "default", Name: "only-client",
		Rules: []*discoveryv1.Rule{{From: []*discoveryv1.Source{{Namespaces: []string{"client"}}}}}}}}
	f := newFixture(t, "tcp", ln, ws, Limits{})
	c, err := net.Dial("tcp", f.front)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	msg := strings.Repeat("hello ", 10000)
	go func() { _, _ = io.WriteString(c, msg); c.(*net.TCPConn).CloseWrite() }()
	got, _ := io.ReadAll(c)
	if string(got) != msg {
		t.Fatalf("echo returned %d bytes, want %d", len(got), len(msg))
	}
	// Now an ALLOW policy that does not admit the client: refused.
	ws2 := proto.Clone(ws).(*discoveryv1.WaypointService)
	ws2.Authorizations[0].Rules[0].From[0].Namespaces = []string{"other"}
	if err := f.cat.Update([]proto.Message{ws2}, nil); err != nil {
		t.Fatal(err)
	}
	c2, err := net.Dial("tcp", f.front)
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	b, _ := io.ReadAll(c2)
	if !strings.Contains(string(b), "REFUSED") || !strings.Contains(string(b), ErrDenied.Error()) {
		t.Fatalf("denied tunnel got %q", b)
	}
}

func TestUnknownTarget(t *testing.T) {
	f := newFixture(t, "http", httpBackend(t, protoEcho()), nil, Limits{})
	if _, err := f.srv.Accept(context.Background(), "", netip.Addr{}, netip.MustParseAddrPort("10.9.9.9:80")); !errors.Is(err, ErrUnknownTarget) {
		t.Fatalf("got %v", err)
	}
}

func heapMB() float64 {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return float64(ms.HeapInuse) / (1 << 20)
}

// TestHostileClients: oversized headers are refused, slowloris connections
// are cut at the header timeout, a stalled request body is cut at the body
// idle timeout (408) and releases its upstream request, and an HTTP/2
// rapid-reset flood neither grows memory without bound nor starves a
// well-behaved client — over plain tunnels and over real HBONE streams
// (many tunnels sharing one mTLS connection, as from a hostile peer's
// ztunnel).
func TestHostileClients(t *testing.T) {
	for _, transport := range []string{"tcp", "hbone"} {
		t.Run(transport, func(t *testing.T) { testHostileClients(t, transport == "hbone") })
	}
}

func testHostileClients(t *testing.T, overHBONE bool) {
	var inflight, bodies atomic.Int32
	slow := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		inflight.Add(1)
		defer inflight.Add(-1)
		switch r.URL.Path {
		case "/slow":
			select {
			case <-time.After(2 * time.Second):
			case <-r.Context().Done():
			}
		case "/upload":
			bodies.Add(1)
			defer bodies.Add(-1)
			_, _ = io.Copy(io.Discard, r.Body)
		}
		_, _ = io.WriteString(w, "ok")
	})
	f := newFixtureWith(t, "http", httpBackend(t, slow), nil,
		Limits{ReadHeaderTimeout: 300 * time.Millisecond, MaxHeaderBytes: 8 << 10, MaxConcurrentStreams: 100},
		fixtureOptions{hbone: overHBONE, bodyIdle: 300 * time.Millisecond})
	dial := func(ctx context.Context, _, _ string) (net.Conn, error) { return f.dial(ctx) }
	client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DialContext: dial}}
	var p http.Protocols
	p.SetUnencryptedHTTP2(true)
	h2c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{Protocols: &p, DialContext: dial}}
	good := func() error {
		resp, err := client.Get("http://svc/")
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		if resp.StatusCode != 200 {
			return fmt.Errorf("status %d", resp.StatusCode)
		}
		return nil
	}
	if err := good(); err != nil {
		t.Fatal(err)
	}
	base := heapMB()

	t.Run("oversized headers", func(t *testing.T) {
		req, _ := http.NewRequest("GET", "http://svc/", nil)
		req.Header.Set("X-Big", strings.Repeat("a", 64<<10))
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusRequestHeaderFieldsTooLarge {
			t.Fatalf("status %d, want 431", resp.StatusCode)
		}
	})

	t.Run("slowloris", func(t *testing.T) {
		var conns []net.Conn
		for range 50 {
			c, err := f.dial(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			conns = append(conns, c)
			_, _ = io.WriteString(c, "GET / HTTP/1.1\r\nHost: svc\r\nX-Slow: ")
		}
		if err := good(); err != nil {
			t.Fatalf("good client starved during slowloris: %v", err)
		}
		// Every slow connection is closed by the header timeout.
		for _, c := range conns {
			_ = c.SetReadDeadline(time.Now().Add(3 * time.Second))
			buf := make([]byte, 1)
			if _, err := c.Read(buf); err == nil {
				// A 408 may be written before closing; then EOF must follow.
				if _, err := io.ReadAll(c); err != nil {
					t.Fatalf("slow connection still open: %v", err)
				}
			} else if ne, ok := err.(net.Error); ok && ne.Timeout() {
				t.Fatal("slow connection not closed by the header timeout")
			}
			c.Close()
		}
	})

	t.Run("stalled body", func(t *testing.T) {
		for _, tc := range []struct {
			name string
			c    *http.Client
		}{{"http1", client}, {"h2c", h2c}} {
			t.Run(tc.name, func(t *testing.T) {
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				defer cancel()
				pr, pw := io.Pipe()
				go func() {
					_, _ = io.WriteString(pw, "the beginning, and then nothing")
					<-ctx.Done()
					pw.CloseWithError(ctx.Err()) // the client transport waits for its body
				}()
				start := time.Now()
				req, _ := http.NewRequestWithContext(ctx, "POST", "http://svc/upload", pr)
				resp, err := tc.c.Do(req)
				if err != nil {
					t.Fatalf("stalled upload: %v after %v", err, time.Since(start))
				}
				resp.Body.Close()
				if resp.StatusCode != http.StatusRequestTimeout {
					t.Fatalf("stalled upload: %d after %v, want 408", resp.StatusCode, time.Since(start))
				}
				deadline := time.Now().Add(3 * time.Second)
				for bodies.Load() != 0 && time.Now().Before(deadline) {
					time.Sleep(10 * time.Millisecond)
				}
				if n := bodies.Load(); n != 0 {
					t.Fatalf("%d upstream requests still held after the client's body stalled", n)
				}
				if err := good(); err != nil {
					t.Fatal(err)
				}
			})
		}
	})

	t.Run("http2 rapid reset", func(t *testing.T) {
		c, err := f.dial(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		_, _ = io.WriteString(c, http2.ClientPreface)
		fr := http2.NewFramer(c, bufio.NewReader(c))
		_ = fr.WriteSettings()
		var hb strings.Builder
		enc := hpack.NewEncoder(&hb)
		for _, hf := range [][2]string{{":method", "GET"}, {":scheme", "http"}, {":authority", "svc"}, {":path", "/slow"}} {
			_ = enc.WriteField(hpack.HeaderField{Name: hf[0], Value: hf[1]})
		}
		block := []byte(hb.String())
		var wg sync.WaitGroup
		wg.Go(func() { // drain whatever the server sends
			_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
			_, _ = io.Copy(io.Discard, c)
		})
		const streams = 20000
		sent := 0
		for i := uint32(1); sent < streams; i += 2 {
			if err := fr.WriteHeaders(http2.HeadersFrameParam{StreamID: i, BlockFragment: block, EndStream: true, EndHeaders: true}); err != nil {
				break // the server may close the connection: that is a fine defence
			}
			if err := fr.WriteRSTStream(i, http2.ErrCodeCancel); err != nil {
				break
			}
			sent++
		}
		if err := good(); err != nil {
			t.Fatalf("good client starved during rapid reset: %v", err)
		}
		if n := inflight.Load(); n > 110 {
			t.Fatalf("%d backend requests in flight after a reset flood (limit 100 streams)", n)
		}
		if grow := heapMB() - base; grow > 64 {
			t.Fatalf("heap grew %.1f MB under a reset flood", grow)
		}
		c.Close()
		wg.Wait()
	})
}

func TestDrainFinishesInFlight(t *testing.T) {
	started := make(chan struct{}, 1)
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		started <- struct{}{}
		time.Sleep(300 * time.Millisecond)
		_, _ = io.WriteString(w, "finished")
	})
	f := newFixture(t, "http", httpBackend(t, h), nil, Limits{DrainTimeout: 5 * time.Second})
	client := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "tcp", f.front)
	}}}
	type res struct {
		body string
		err  error
	}
	rc := make(chan res, 1)
	go func() {
		resp, err := client.Get("http://svc/")
		if err != nil {
			rc <- res{err: err}
			return
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		rc <- res{body: string(b)}
	}()
	<-started
	f.stop()
	r := <-rc
	if r.err != nil || r.body != "finished" {
		t.Fatalf("in-flight request during drain: %q %v", r.body, r.err)
	}
}
