package upstream

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	discoveryv1 "github.com/amesh-dev/amesh/api/discovery/v1"
	"google.golang.org/protobuf/types/known/durationpb"
)

func tcpDial(ctx context.Context, ep *Endpoint) (net.Conn, error) {
	var d net.Dialer
	return d.DialContext(ctx, "tcp", ep.Addr.String())
}

func eps(n int) []Endpoint {
	out := make([]Endpoint, n)
	for i := range out {
		out[i] = Endpoint{Addr: netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 0, 0, byte(i + 1)}), 8080)}
	}
	return out
}

func TestBalancers(t *testing.T) {
	const n, reqs = 4, 4000
	for _, typ := range []discoveryv1.LoadBalancer_Type{discoveryv1.LoadBalancer_TYPE_ROUND_ROBIN, discoveryv1.LoadBalancer_TYPE_RANDOM, discoveryv1.LoadBalancer_TYPE_LEAST_REQUEST} {
		t.Run(typ.String(), func(t *testing.T) {
			c := New(Options{Name: "x", Dial: tcpDial})
			c.Update(eps(n), &discoveryv1.TrafficPolicy{LoadBalancer: &discoveryv1.LoadBalancer{Type: typ}})
			counts := map[netip.AddrPort]int{}
			for range reqs {
				e, err := c.Pick(&HashInput{}, nil)
				if err != nil {
					t.Fatal(err)
				}
				counts[e.Addr]++
			}
			for a, k := range counts {
				// Each share within 20% of fair (random: sd≈27, bound is 200).
				if k < reqs/n*8/10 || k > reqs/n*12/10 {
					t.Errorf("%s got %d of %d", a, k, reqs)
				}
			}
			if typ == discoveryv1.LoadBalancer_TYPE_ROUND_ROBIN {
				for a, k := range counts {
					if k != reqs/n {
						t.Errorf("round robin uneven: %s %d", a, k)
					}
				}
			}
		})
	}
}

func TestLeastRequestAvoidsBusy(t *testing.T) {
	c := New(Options{Name: "x", Dial: tcpDial})
	c.Update(eps(2), &discoveryv1.TrafficPolicy{LoadBalancer: &discoveryv1.LoadBalancer{Type: discoveryv1.LoadBalancer_TYPE_LEAST_REQUEST}})
	busy := c.Endpoints()[0]
	busy.state.outstanding.Add(10)
	for range 100 {
		e, _ := c.Pick(&HashInput{}, nil)
		if e.Addr == busy.Addr {
			t.Fatal("P2C with two endpoints picked the busy one")
		}
	}
}

func TestConsistentHash(t *testing.T) {
	for _, tc := range []struct {
		name string
		lb   *discoveryv1.LoadBalancer
		in   func(k string) *HashInput
	}{
		{"header", &discoveryv1.LoadBalancer{Type: discoveryv1.LoadBalancer_TYPE_CONSISTENT_HASH, HashHeader: "x-user"},
			func(k string) *HashInput { return &HashInput{Header: http.Header{"X-User": {k}}} }},
		{"cookie", &discoveryv1.LoadBalancer{Type: discoveryv1.LoadBalancer_TYPE_CONSISTENT_HASH, HashCookie: &discoveryv1.HashCookie{Name: "s"}},
			func(k string) *HashInput { return &HashInput{Cookie: k} }},
		{"source ip", &discoveryv1.LoadBalancer{Type: discoveryv1.LoadBalancer_TYPE_CONSISTENT_HASH, HashSourceIp: true},
			func(k string) *HashInput {
				n, _ := strconv.Atoi(strings.TrimPrefix(k, "key-"))
				return &HashInput{SourceIP: netip.AddrFrom4([4]byte{10, 9, byte(n >> 8), byte(n)})}
			}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := New(Options{Name: "x", Dial: tcpDial})
			c.Update(eps(5), &discoveryv1.TrafficPolicy{LoadBalancer: tc.lb})
			first := map[string]netip.AddrPort{}
			spread := map[netip.AddrPort]bool{}
			for i := range 200 {
				k := fmt.Sprint("key-", i)
				e, _ := c.Pick(tc.in(k), nil)
				first[k] = e.Addr
				spread[e.Addr] = true
				for range 3 {
					if again, _ := c.Pick(tc.in(k), nil); again.Addr != e.Addr {
						t.Fatalf("key %s moved", k)
					}
				}
			}
			if len(spread) != 5 {
				t.Fatalf("200 keys landed on %d of 5 endpoints", len(spread))
			}
			// Removing one endpoint moves only its keys.
			c.Update(eps(4), &discoveryv1.TrafficPolicy{LoadBalancer: tc.lb})
			removed := eps(5)[4].Addr
			for k, a := range first {
				e, _ := c.Pick(tc.in(k), nil)
				if a != removed && e.Addr != a {
					t.Fatalf("key %s moved from %s to %s though its endpoint stayed", k, a, e.Addr)
				}
			}
		})
	}
}

type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) now() time.Time      { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *clock) add(d time.Duration) { c.mu.Lock(); c.t = c.t.Add(d); c.mu.Unlock() }

func TestOutlierDetection(t *testing.T) {
	clk := &clock{t: time.Unix(1000, 0)}
	c := New(Options{Name: "x", Dial: tcpDial, Now: clk.now})
	od := &discoveryv1.OutlierDetection{Consecutive_5Xx: 3, BaseEjectionTime: durationpb.New(10 * time.Second),
		Interval: durationpb.New(time.Second), MaxEjectionPercent: 50}
	c.Update(eps(4), &discoveryv1.TrafficPolicy{OutlierDetection: od})
	all := c.Endpoints()
	bad := all[0]
	c.Report(bad, 500, nil)
	c.Report(bad, 500, nil)
	c.Report(bad, 200, nil) // resets
	c.Report(bad, 500, nil)
	c.Report(bad, 500, nil)
	if c.Ejected(bad) {
		t.Fatal("ejected after a success broke the streak")
	}
	c.Report(bad, 503, nil)
	if !c.Ejected(bad) {
		t.Fatal("not ejected after 3 consecutive 5xx")
	}
	for range 100 {
		if e, _ := c.Pick(&HashInput{}, nil); e.Addr == bad.Addr {
			t.Fatal("picked an ejected endpoint")
		}
	}
	// Max ejection percent 50% of 4: a second endpoint may go, a third not.
	for _, e := range all[1:3] {
		for range 3 {
			c.Report(e, 0, &ConnectError{Err: errors.New("refused")})
		}
	}
	if !c.Ejected(all[1]) || c.Ejected(all[2]) {
		t.Fatalf("ejections beyond 50%%: %v %v", c.Ejected(all[1]), c.Ejected(all[2]))
	}
	// Back after base time; the second ejection lasts twice as long.
	clk.add(10 * time.Second)
	if c.Ejected(bad) {
		t.Fatal("still ejected after base_ejection_time")
	}
	for range 3 {
		c.Report(bad, 500, nil)
	}
	clk.add(19 * time.Second)
	if !c.Ejected(bad) {
		t.Fatal("second ejection shorter than 2 × base")
	}
	clk.add(time.Second)
	if c.Ejected(bad) {
		t.Fatal("second ejection longer than 2 × base")
	}
	// A quiet spell of several intervals decays the multiplier back to 1.
	clk.add(5 * time.Second)
	for range 3 {
		c.Report(bad, 500, nil)
	}
	clk.add(10*time.Second - time.Millisecond)
	if !c.Ejected(bad) {
		t.Fatal("third ejection shorter than base")
	}
	clk.add(time.Millisecond)
	if c.Ejected(bad) {
		t.Fatal("multiplier did not decay after a quiet spell")
	}
}

func TestGatewayErrorsOnly(t *testing.T) {
	c := New(Options{Name: "x", Dial: tcpDial})
	c.Update(eps(1), &discoveryv1.TrafficPolicy{OutlierDetection: &discoveryv1.OutlierDetection{ConsecutiveGatewayErrors: 2}})
	e := c.Endpoints()[0]
	c.Report(e, 500, nil)
	c.Report(e, 500, nil)
	c.Report(e, 500, nil)
	if c.Ejected(e) {
		t.Fatal("500 counted as gateway error")
	}
	c.Report(e, 502, nil)
	c.Report(e, 504, nil)
	if !c.Ejected(e) {
		t.Fatal("not ejected after 2 gateway errors")
	}
	if _, err := c.Pick(&HashInput{}, nil); !errors.Is(err, ErrNoHealthy) {
		t.Fatalf("pick with all ejected: %v", err)
	}
}

func backend(t *testing.T, h http.HandlerFunc) Endpoint {
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	return Endpoint{Addr: netip.MustParseAddrPort(srv.Listener.Addr().String())}
}

func TestCircuitBreakerMaxRequests(t *testing.T) {
	release := make(chan struct{})
	ep := backend(t, func(w http.ResponseWriter, r *http.Request) { <-release })
	c := New(Options{Name: "x", Dial: tcpDial})
	c.Update([]Endpoint{ep}, &discoveryv1.TrafficPolicy{CircuitBreaker: &discoveryv1.CircuitBreaker{MaxRequests: 2}})
	var rels []Admission
	for range 2 {
		r, err := c.Admit()
		if err != nil {
			t.Fatal(err)
		}
		rels = append(rels, r)
	}
	if _, err := c.Admit(); !errors.Is(err, ErrOverflow) {
		t.Fatalf("third request admitted: %v", err)
	}
	rels[0].Release()
	rels[0].Release() // idempotent
	if r, err := c.Admit(); err != nil {
		t.Fatal("not admitted after release")
	} else {
		r.Release()
	}
	close(release)
}

func TestMaxConnectionsAndPooling(t *testing.T) {
	var mu sync.Mutex
	remotes := map[string]bool{}
	ep := backend(t, func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		remotes[r.RemoteAddr] = true
		mu.Unlock()
		time.Sleep(5 * time.Millisecond)
		_, _ = io.WriteString(w, "ok")
	})
	c := New(Options{Name: "x", Dial: tcpDial})
	c.Update([]Endpoint{ep}, &discoveryv1.TrafficPolicy{CircuitBreaker: &discoveryv1.CircuitBreaker{MaxConnections: 2}})
	defer c.Close()
	var wg sync.WaitGroup
	for range 20 {
		wg.Go(func() {
			e, _ := c.Pick(&HashInput{}, nil)
			req, _ := http.NewRequest("GET", "http://svc/", nil)
			resp, err := c.RoundTrip(req, e)
			if err != nil {
				t.Error(err)
				return
			}
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		})
	}
	wg.Wait()
	if len(remotes) > 2 {
		t.Fatalf("%d upstream connections with max_connections 2", len(remotes))
	}
	if e := c.Endpoints()[0]; e.Outstanding() != 0 {
		t.Fatalf("outstanding %d after all bodies closed", e.Outstanding())
	}
}

func TestConnectErrorIsTyped(t *testing.T) {
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	addr := ln.Addr().String()
	ln.Close() // nothing listens there now
	c := New(Options{Name: "x", Dial: tcpDial})
	c.Update([]Endpoint{{Addr: netip.MustParseAddrPort(addr)}}, nil)
	e, _ := c.Pick(&HashInput{}, nil)
	req, _ := http.NewRequest("GET", "http://svc/", nil)
	_, err := c.RoundTrip(req, e)
	var ce *ConnectError
	if !errors.As(err, &ce) {
		t.Fatalf("error %T %v is not a ConnectError", err, err)
	}
}

func TestMaxRequestsPerConnection(t *testing.T) {
	var mu sync.Mutex
	perConn := map[string]int{}
	ep := backend(t, func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		mu.Lock()
		perConn[r.RemoteAddr]++
		mu.Unlock()
	})
	c := New(Options{Name: "x", Dial: tcpDial})
	c.Update([]Endpoint{ep}, &discoveryv1.TrafficPolicy{ConnectionPool: &discoveryv1.ConnectionPool{MaxRequestsPerConnection: 3}})
	defer c.Close()
	for i := range 12 {
		e, _ := c.Pick(&HashInput{}, nil)
		method, body := "GET", io.Reader(nil)
		if i%2 == 1 {
			method, body = "POST", strings.NewReader("payload")
		}
		req, _ := http.NewRequest(method, "http://svc/", body)
		resp, err := c.RoundTrip(req, e)
		if err != nil {
			t.Fatal(err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	if len(perConn) != 4 {
		t.Fatalf("12 sequential requests used %d connections, want 4 (3 each): %v", len(perConn), perConn)
	}
	for a, n := range perConn {
		if n > 3 {
			t.Fatalf("connection %s carried %d requests", a, n)
		}
	}
}

func TestCircuitBreakerPendingAndRetries(t *testing.T) {
	release := make(chan struct{})
	entered := make(chan struct{}, 4)
	ep := backend(t, func(w http.ResponseWriter, r *http.Request) {
		entered <- struct{}{}
		<-release
	})
	c := New(Options{Name: "x", Dial: tcpDial})
	c.Update([]Endpoint{ep}, &discoveryv1.TrafficPolicy{CircuitBreaker: &discoveryv1.CircuitBreaker{
		MaxConnections: 1, MaxPendingRequests: 1, MaxRetries: 2}})
	defer c.Close()
	send := func() chan error {
		done := make(chan error, 1)
		rel, err := c.Admit()
		if err != nil {
			done <- err
			return done
		}
		go func() {
			defer rel.Release()
			e, _ := c.Pick(&HashInput{}, nil)
			req, _ := http.NewRequest("GET", "http://svc/", nil)
			resp, err := c.RoundTrip(req, e)
			if err == nil {
				_, _ = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
			}
			done <- err
		}()
		return done
	}
	a := send()
	<-entered // A holds the only connection
	b := send()
	deadline := time.Now().Add(5 * time.Second)
	for c.pending.Load() != 1 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if c.pending.Load() != 1 {
		t.Fatalf("pending = %d, want B waiting for a connection", c.pending.Load())
	}
	if err := <-send(); !errors.Is(err, ErrOverflow) {
		t.Fatalf("third request with one pending: %v", err)
	}
	close(release)
	if err := <-a; err != nil {
		t.Fatal(err)
	}
	if err := <-b; err != nil {
		t.Fatal(err)
	}
	// Retry budget: two concurrent retries, the third is refused.
	r1, ok1 := c.AdmitRetry()
	r2, ok2 := c.AdmitRetry()
	_, ok3 := c.AdmitRetry()
	if !ok1 || !ok2 || ok3 {
		t.Fatalf("retry budget: %v %v %v", ok1, ok2, ok3)
	}
	r1.Release()
	if _, ok := c.AdmitRetry(); !ok {
		t.Fatal("retry refused after one was released")
	}
	r2.Release()
	if c.Overflows() != 2 {
		t.Fatalf("overflows = %d, want 2", c.Overflows())
	}
}

// TestIdleTimeout: connection_pool.idle_timeout closes idle upstream
// connections, for HTTP/2 (whose timeout is fixed when the connection is
// made) as for HTTP/1.1; a changed timeout applies to new connections and
// closes the idle ones made under the old setting.
func TestIdleTimeout(t *testing.T) {
	for _, h2 := range []bool{false, true} {
		t.Run(map[bool]string{false: "http1", true: "h2c"}[h2], func(t *testing.T) {
			var proto atomic.Value
			srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				proto.Store(r.Proto)
			}))
			var p http.Protocols
			p.SetHTTP1(true)
			p.SetUnencryptedHTTP2(true)
			srv.Config.Protocols = &p
			srv.Start()
			t.Cleanup(srv.Close)
			ep := Endpoint{Addr: netip.MustParseAddrPort(srv.Listener.Addr().String())}
			c := New(Options{Name: "x", HTTP2: h2, Dial: tcpDial})
			defer c.Close()
			policy := func(idle time.Duration) *discoveryv1.TrafficPolicy {
				if idle == 0 {
					return nil
				}
				return &discoveryv1.TrafficPolicy{ConnectionPool: &discoveryv1.ConnectionPool{IdleTimeout: durationpb.New(idle)}}
			}
			get := func() {
				t.Helper()
				e, _ := c.Pick(&HashInput{}, nil)
				req, _ := http.NewRequest("GET", "http://svc/", nil)
				resp, err := c.RoundTrip(req, e)
				if err != nil {
					t.Fatal(err)
				}
				_, _ = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if want := map[bool]string{false: "HTTP/1.1", true: "HTTP/2.0"}[h2]; proto.Load() != want {
					t.Fatalf("backend saw %v, want %s", proto.Load(), want)
				}
			}
			waitConns := func(want int64, within time.Duration) time.Duration {
				t.Helper()
				start := time.Now()
				for c.Conns() != want {
					if time.Since(start) > within {
						t.Fatalf("%d connections after %v, want %d", c.Conns(), within, want)
					}
					time.Sleep(10 * time.Millisecond)
				}
				return time.Since(start)
			}

			c.Update([]Endpoint{ep}, policy(200*time.Millisecond))
			get()
			if c.Conns() != 1 {
				t.Fatalf("%d connections after a request", c.Conns())
			}
			if d := waitConns(0, 5*time.Second); d < 100*time.Millisecond {
				t.Fatalf("idle connection closed after %v, before its 200ms timeout", d)
			}
			// Back to the default (60 s): the connection stays.
			c.Update([]Endpoint{ep}, policy(0))
			if c.IdleTimeout() != DefaultIdleTimeout {
				t.Fatalf("idle timeout %v", c.IdleTimeout())
			}
			get()
			time.Sleep(500 * time.Millisecond)
			if c.Conns() != 1 {
				t.Fatalf("%d connections 500ms after a request under the default timeout", c.Conns())
			}
			// A shorter timeout closes the idle connection of the old
			// setting and applies to the next one.
			c.Update([]Endpoint{ep}, policy(150*time.Millisecond))
			waitConns(0, time.Second)
			get()
			waitConns(1, 0)
			waitConns(0, 5*time.Second)
		})
	}
}

// TestOutlierIgnoresCancelled: an attempt cancelled by its caller (the
// downstream client went away) says nothing about the endpoint.
func TestOutlierIgnoresCancelled(t *testing.T) {
	c := New(Options{Name: "x", Dial: tcpDial})
	c.Update(eps(2), &discoveryv1.TrafficPolicy{OutlierDetection: &discoveryv1.OutlierDetection{
		Consecutive_5Xx: 1, ConsecutiveGatewayErrors: 1, MaxEjectionPercent: 100}})
	ep := c.Endpoints()[0]
	for range 5 {
		c.Report(ep, 0, fmt.Errorf("round trip: %w", context.Canceled))
	}
	if c.Ejected(ep) || c.Ejections() != 0 {
		t.Fatal("ejected for cancelled attempts")
	}
	c.Report(ep, 0, context.DeadlineExceeded) // a timeout does count
	if !c.Ejected(ep) {
		t.Fatal("not ejected after a timeout")
	}
}

// TestEjectionTimeCapped: base_ejection_time × ejections is capped at
// max_ejection_time (DefaultMaxEjectionTime, Envoy's default, when unset),
// or at the base when that is longer.
func TestEjectionTimeCapped(t *testing.T) {
	for _, tc := range []struct {
		name            string
		base, max, want time.Duration
	}{
		{"default cap", 30 * time.Second, 0, DefaultMaxEjectionTime},
		{"base above the default cap", 10 * time.Minute, 0, 10 * time.Minute},
		{"cap a multiple of base", 30 * time.Second, 2 * time.Minute, 2 * time.Minute},
		{"cap between multiples", 30 * time.Second, 100 * time.Second, 100 * time.Second},
		{"cap above the default", 30 * time.Second, 10 * time.Minute, 10 * time.Minute},
		{"base above the cap", time.Minute, 30 * time.Second, time.Minute},
	} {
		t.Run(tc.name, func(t *testing.T) {
			clk := &clock{t: time.Unix(1000, 0)}
			c := New(Options{Name: "x", Dial: tcpDial, Now: clk.now})
			od := &discoveryv1.OutlierDetection{Consecutive_5Xx: 1, BaseEjectionTime: durationpb.New(tc.base),
				Interval: durationpb.New(time.Hour), MaxEjectionPercent: 100}
			if tc.max > 0 {
				od.MaxEjectionTime = durationpb.New(tc.max)
			}
			c.Update(eps(2), &discoveryv1.TrafficPolicy{OutlierDetection: od})
			ep := c.Endpoints()[0]
			var longest time.Duration
			for range 40 {
				c.Report(ep, 500, nil)
				start := clk.now()
				for c.Ejected(ep) {
					clk.add(time.Second)
				}
				longest = max(longest, clk.now().Sub(start))
			}
			if longest != tc.want {
				t.Fatalf("longest ejection %v, want %v", longest, tc.want)
			}
		})
	}
}

// TestCircuitBreakerDefaults: limits a policy leaves unset take Envoy's
// defaults (1024 connections, pending requests and requests, 3 retries),
// not unlimited.
func TestCircuitBreakerDefaults(t *testing.T) {
	for _, tc := range []struct {
		name string
		tp   *discoveryv1.TrafficPolicy
		want limits
	}{
		{"no policy", nil, limits{maxConns: 1024, maxPending: 1024, maxRequests: 1024, maxRetries: 3}},
		{"retries only", &discoveryv1.TrafficPolicy{CircuitBreaker: &discoveryv1.CircuitBreaker{MaxRetries: 7}},
			limits{maxConns: 1024, maxPending: 1024, maxRequests: 1024, maxRetries: 7}},
		{"all set", &discoveryv1.TrafficPolicy{CircuitBreaker: &discoveryv1.CircuitBreaker{MaxConnections: 1, MaxPendingRequests: 2, MaxRequests: 3, MaxRetries: 4}},
			limits{maxConns: 1, maxPending: 2, maxRequests: 3, maxRetries: 4}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := New(Options{Name: "x", Dial: tcpDial})
			c.Update(eps(1), tc.tp)
			if got := c.cur.Load().limits; got != tc.want {
				t.Fatalf("limits %+v, want %+v", got, tc.want)
			}
			var adms []Admission
			for range tc.want.maxRequests {
				a, err := c.Admit()
				if err != nil {
					t.Fatal(err)
				}
				adms = append(adms, a)
			}
			if _, err := c.Admit(); !errors.Is(err, ErrOverflow) {
				t.Fatalf("request %d admitted: %v", tc.want.maxRequests+1, err)
			}
			for i := range adms {
				adms[i].Release()
			}
		})
	}
}

// TestPassthroughMaxConnections: L4 passthrough connections count against
// max_connections while open, share the limit with pooled HTTP
// connections, and beyond it are refused at once with ErrOverflow.
func TestPassthroughMaxConnections(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { _, _ = io.Copy(io.Discard, c); c.Close() }()
		}
	}()
	c := New(Options{Name: "x", Dial: tcpDial})
	c.Update([]Endpoint{{Addr: netip.MustParseAddrPort(ln.Addr().String())}},
		&discoveryv1.TrafficPolicy{CircuitBreaker: &discoveryv1.CircuitBreaker{MaxConnections: 2}})
	defer c.Close()
	var open []net.Conn
	for range 2 {
		_, conn, err := c.DialEndpoint(t.Context(), &HashInput{})
		if err != nil {
			t.Fatal(err)
		}
		open = append(open, conn)
	}
	if n := c.Conns(); n != 2 {
		t.Fatalf("%d connections counted, want 2", n)
	}
	start := time.Now()
	if _, _, err := c.DialEndpoint(t.Context(), &HashInput{}); !errors.Is(err, ErrOverflow) {
		t.Fatalf("third passthrough at max_connections 2: %v, want ErrOverflow", err)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("refusal took %v: it must not wait for a slot", d)
	}
	if c.Overflows() != 1 {
		t.Errorf("overflows %d, want 1", c.Overflows())
	}
	open[0].Close()
	open[0].Close() // released once
	if n := c.Conns(); n != 1 {
		t.Fatalf("%d connections counted after one closed twice, want 1", n)
	}
	_, conn, err := c.DialEndpoint(t.Context(), &HashInput{})
	if err != nil {
		t.Fatalf("after a close: %v", err)
	}
	conn.Close()
	open[1].Close()
	if n := c.Conns(); n != 0 {
		t.Fatalf("%d connections counted after all closed", n)
	}
	// A failed dial gives its slot back.
	c.Update([]Endpoint{{Addr: netip.MustParseAddrPort("127.0.0.1:1")}},
		&discoveryv1.TrafficPolicy{CircuitBreaker: &discoveryv1.CircuitBreaker{MaxConnections: 2}})
	if _, _, err := c.DialEndpoint(t.Context(), &HashInput{}); err == nil || errors.Is(err, ErrOverflow) {
		t.Fatalf("dial to a closed port: %v", err)
	}
	if n := c.Conns(); n != 0 {
		t.Fatalf("%d connections counted after a failed dial", n)
	}
}
