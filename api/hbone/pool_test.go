package hbone

import (
	"context"
	"crypto/tls"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); !cond(); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

func echoOnce(t *testing.T, s *Stream, msg string) {
	t.Helper()
	if _, err := s.Write([]byte(msg)); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(s, buf); err != nil || string(buf) != msg {
		t.Fatalf("echo %q, %v", buf, err)
	}
}

func TestPoolReuse(t *testing.T) {
	e := newEnv(t, echo)
	for range 5 {
		s := e.dial(t, "10.0.0.1:80")
		echoOnce(t, s, "x")
		s.Close()
	}
	a, b := e.dial(t, "10.0.0.1:80"), e.dial(t, "10.0.0.2:443")
	echoOnce(t, a, "a")
	echoOnce(t, b, "b")
	a.Close()
	b.Close()
	if n := e.ln.n.Load(); n != 1 {
		t.Fatalf("%d TCP connections for sequential and concurrent streams to one proxy; want 1", n)
	}

	// Another pool key component, source or expectation: another connection.
	r := e.req("10.0.0.1:80")
	r.PoolKey = "netns-2"
	c, err := e.client.Dial(context.Background(), r)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	r = e.req("10.0.0.1:80")
	r.Expected = append(r.Expected, spiffeid.RequireFromString("spiffe://cluster.local/ns/x/sa/y"))
	c, err = e.client.Dial(context.Background(), r)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	if n := e.ln.n.Load(); n != 3 {
		t.Fatalf("%d TCP connections; want 3 (one per pool key)", n)
	}
}

func TestPoolStreamCap(t *testing.T) {
	e := newEnv(t, echo)
	var streams []*Stream
	for range 100 {
		streams = append(streams, e.dial(t, "10.0.0.1:80"))
	}
	if n := e.ln.n.Load(); n != 1 {
		t.Fatalf("%d connections for 100 streams; want 1", n)
	}
	streams = append(streams, e.dial(t, "10.0.0.1:80"))
	if n := e.ln.n.Load(); n != 2 {
		t.Fatalf("%d connections for 101 streams; want 2", n)
	}
	// Once a slot frees up on the first connection it is used again.
	streams[0].Close()
	waitFor(t, "the closed stream to free its slot", func() bool {
		var first *conn
		e.client.mu.Lock()
		for _, p := range e.client.pools {
			first = p[0]
		}
		e.client.mu.Unlock()
		first.mu.Lock()
		defer first.mu.Unlock()
		return len(first.streams) < 100
	})
	streams[0] = e.dial(t, "10.0.0.1:80")
	if n := e.ln.n.Load(); n != 2 {
		t.Fatalf("%d connections; want 2", n)
	}
	for _, s := range streams {
		echoOnce(t, s, "cap")
		s.Close()
	}
}

func TestPoolGoAwayEviction(t *testing.T) {
	e := newEnv(t, echo)
	old := e.dial(t, "10.0.0.1:80")
	defer old.Close()
	echoOnce(t, old, "before")
	e.srv.eachConn(func(c *conn) { c.drain() }) // server sends GOAWAY
	waitFor(t, "the client to see GOAWAY", func() bool { return !old.c.usable() })

	s := e.dial(t, "10.0.0.1:80")
	if n := e.ln.n.Load(); n != 2 {
		t.Fatalf("%d connections after GOAWAY; want a new one", n)
	}
	echoOnce(t, s, "new")
	s.Close()
	// The stream that was open before GOAWAY keeps working, and its
	// connection goes away when it ends.
	echoOnce(t, old, "after")
	_ = old.CloseWrite()
	_, _ = io.ReadAll(old)
	old.Close()
	waitFor(t, "the drained connection to close", func() bool { return e.client.ConnCount() == 1 && e.srv.ConnCount() == 1 })
}

func TestPoolIdleAndBrokenEviction(t *testing.T) {
	e := newEnv(t, echo, func(_ *ServerConfig, c *ClientConfig) { c.IdleTimeout = 100 * time.Millisecond })
	s := e.dial(t, "10.0.0.1:80")
	echoOnce(t, s, "x")
	s.Close()
	waitFor(t, "the idle connection to close", func() bool { return e.client.ConnCount() == 0 })
	waitFor(t, "the server to see it close", func() bool { return e.srv.ConnCount() == 0 })

	s = e.dial(t, "10.0.0.1:80")
	if n := e.ln.n.Load(); n != 2 {
		t.Fatalf("%d connections; want a new one after the idle close", n)
	}
	// Break the connection under the stream (server side TCP close).
	e.srv.eachConn(func(c *conn) { c.nc.Close() })
	_ = s.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := s.Read(make([]byte, 1)); err == nil || isTimeout(err) {
		t.Fatalf("read on a broken connection: %v", err)
	}
	s.Close()
	s = e.dial(t, "10.0.0.1:80")
	defer s.Close()
	echoOnce(t, s, "y")
	if n := e.ln.n.Load(); n != 3 {
		t.Fatalf("%d connections; want a new one after the broken one", n)
	}
}

// stallProxy forwards TCP to target until stalled, after which it forwards
// nothing (but keeps the connections open), like a peer that hangs.
type stallProxy struct {
	ln      net.Listener
	target  string
	mu      sync.Mutex
	stalled chan struct{}
	conns   []net.Conn
	wg      sync.WaitGroup
}

func newStallProxy(t *testing.T, target string) *stallProxy {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &stallProxy{ln: ln, target: target, stalled: make(chan struct{})}
	p.wg.Go(p.serve)
	t.Cleanup(func() {
		ln.Close()
		p.mu.Lock()
		for _, c := range p.conns {
			c.Close()
		}
		p.mu.Unlock()
		p.wg.Wait()
	})
	return p
}

func (p *stallProxy) serve() {
	for {
		a, err := p.ln.Accept()
		if err != nil {
			return
		}
		b, err := net.Dial("tcp", p.target)
		if err != nil {
			a.Close()
			continue
		}
		p.mu.Lock()
		p.conns = append(p.conns, a, b)
		p.mu.Unlock()
		cp := func(dst, src net.Conn) {
			buf := make([]byte, 32<<10)
			for {
				n, err := src.Read(buf)
				if err != nil {
					return
				}
				select {
				case <-p.stalled:
					continue // swallow
				default:
				}
				if _, err := dst.Write(buf[:n]); err != nil {
					return
				}
			}
		}
		p.wg.Go(func() { cp(a, b) })
		p.wg.Go(func() { cp(b, a) })
	}
}

func TestKeepalive(t *testing.T) {
	var proxy *stallProxy
	e := newEnv(t, echo, func(s *ServerConfig, c *ClientConfig) {
		c.PingInterval, c.PingTimeout = 100*time.Millisecond, 300*time.Millisecond
		var d net.Dialer
		c.Dial = func(ctx context.Context, _, _ string) (net.Conn, error) {
			return d.DialContext(ctx, "tcp", proxy.ln.Addr().String())
		}
	})
	proxy = newStallProxy(t, e.addr.String())
	s := e.dial(t, "10.0.0.1:80")
	defer s.Close()
	echoOnce(t, s, "alive")
	// Idle but healthy: PINGs are answered, the connection stays.
	time.Sleep(500 * time.Millisecond)
	echoOnce(t, s, "still alive")
	close(proxy.stalled)
	start := time.Now()
	_ = s.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err := s.Read(make([]byte, 1))
	if err == nil || isTimeout(err) {
		t.Fatalf("read on a hung connection: %v", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("hung connection detected after %v", d)
	}
	t.Logf("hung connection closed after %v: %v", time.Since(start), err)
}

// TestPoolCertificateExpiry: a pooled connection stops taking streams when
// the client certificate it was made with expires; the next Dial makes a new
// connection with the current certificate.
func TestPoolCertificateExpiry(t *testing.T) {
	e := newEnv(t, echo)
	now := time.Now()
	short, err := e.ca.Leaf(e.cliID, now.Add(-time.Minute), now.Add(1500*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	cert := short
	e.client.cfg.Certificates = func(context.Context, spiffeid.ID) (*tls.Certificate, error) {
		mu.Lock()
		defer mu.Unlock()
		return cert, nil
	}
	s := e.dial(t, "10.0.0.1:80")
	echoOnce(t, s, "x")
	s.Close()
	mu.Lock()
	cert = e.cliCert // the store rotated
	mu.Unlock()
	time.Sleep(time.Until(short.Leaf.NotAfter) + 50*time.Millisecond)
	s = e.dial(t, "10.0.0.1:80")
	defer s.Close()
	echoOnce(t, s, "y")
	if n := e.ln.n.Load(); n != 2 {
		t.Fatalf("%d connections; want a new one after the certificate expired", n)
	}
}
