package hbone

import (
	"crypto/tls"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/amesh-dev/amesh/api/identity"
)

// BenchmarkRoundTrip measures request/response latency through a tunnel
// the way ztunnel carries it: app TCP ⇄ Splice ⇄ HBONE stream ⇄ Splice ⇄
// backend TCP (an echo server), one op being a 1 KiB request and its 1 KiB
// echo. ns/op is the round-trip time; cpu-us/op is the CPU the whole
// process (app, both tunnel ends, backend) spent per round trip.
//
// Baselines in the same run: "direct" (app ⇄ backend over loopback TCP,
// no tunnel) and "tls-proxy" (the same two TCP legs joined by one TLS 1.3
// connection per tunnel with a goroutine per direction at each end and no
// HTTP/2: the floor of a TLS tunnel). The "-16" variants run 16
// conversations at once (16 tunnels sharing one HBONE connection, like
// ztunnel's pool; 16 TLS connections for the baseline).
func BenchmarkRoundTrip(b *testing.B) {
	for _, par := range []int{1, 16} {
		suffix := ""
		if par > 1 {
			suffix = "-16"
		}
		b.Run("direct"+suffix, func(b *testing.B) {
			backend := echoServer(b)
			benchRTT(b, par, func(b *testing.B) net.Conn {
				c, err := net.Dial("tcp", backend)
				if err != nil {
					b.Fatal(err)
				}
				return c
			})
		})
		b.Run("tls-proxy"+suffix, func(b *testing.B) {
			backend := echoServer(b)
			proxy := tlsProxy(b, backend)
			benchRTT(b, par, proxy)
		})
		b.Run("hbone"+suffix, func(b *testing.B) {
			backend := echoServer(b)
			e := newEnv(b, forward)
			var wg sync.WaitGroup
			b.Cleanup(wg.Wait)
			benchRTT(b, par, func(b *testing.B) net.Conn {
				s := e.dial(b, backend)
				app, inner := tcpPair(b)
				wg.Go(func() {
					_, _, _ = Splice(inner, s)
					inner.Close()
					s.Close()
				})
				return app
			})
		})
	}
}

// benchRTT runs b.N round trips of 1 KiB spread over par conversations on
// connections from dial.
func benchRTT(b *testing.B, par int, dial func(*testing.B) net.Conn) {
	conns := make([]net.Conn, par)
	for i := range conns {
		conns[i] = dial(b)
	}
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	req := make([]byte, 1024)
	resp := make([]byte, 1024)
	for range 100 { // warm up
		roundTrip(b, conns[0], req, resp)
	}
	b.ResetTimer()
	cpu := cpuTime()
	start := time.Now()
	var wg sync.WaitGroup
	for i, c := range conns {
		n := b.N / par
		if i < b.N%par {
			n++
		}
		wg.Go(func() {
			req, resp := make([]byte, 1024), make([]byte, 1024)
			for range n {
				roundTrip(b, c, req, resp)
			}
		})
	}
	wg.Wait()
	el := time.Since(start)
	b.StopTimer()
	b.ReportMetric(float64(cpuTime()-cpu)/1e3/float64(b.N), "cpu-us/op")
	// With par conversations, ns/op is wall time / ops; the latency of one
	// round trip is par times that.
	b.ReportMetric(float64(el.Nanoseconds())*float64(par)/float64(b.N)/1e3, "rtt-us")
}

func roundTrip(b *testing.B, c net.Conn, req, resp []byte) {
	if _, err := c.Write(req); err != nil {
		b.Error(err)
		return
	}
	if _, err := io.ReadFull(c, resp); err != nil {
		b.Error(err)
	}
}

// echoServer is a TCP echo server on loopback; it stops with the benchmark.
func echoServer(b testing.TB) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	var wg sync.WaitGroup
	b.Cleanup(func() { ln.Close(); wg.Wait() })
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Go(func() {
				defer c.Close()
				buf := make([]byte, 32<<10)
				for {
					n, err := c.Read(buf)
					if n > 0 {
						if _, err := c.Write(buf[:n]); err != nil {
							return
						}
					}
					if err != nil {
						return
					}
				}
			})
		}
	})
	return ln.Addr().String()
}

// tlsProxy is the baseline tunnel: a TLS 1.3 server that forwards each
// connection to backend, and a dial function returning the app end of a TCP
// connection forwarded into a new TLS connection to it.
func tlsProxy(b *testing.B, backend string) func(*testing.B) net.Conn {
	e := newEnv(b, discard) // for its certificates
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	var wg sync.WaitGroup
	b.Cleanup(func() { ln.Close(); wg.Wait() })
	join := func(x, y net.Conn) {
		var jw sync.WaitGroup
		jw.Go(func() { _, _ = io.Copy(x, y); x.Close(); y.Close() })
		_, _ = io.Copy(y, x)
		x.Close()
		y.Close()
		jw.Wait()
	}
	srvTLS := identity.ServerTLS(func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return e.srvCert, nil }, e.bundle, e.ca.TrustDomain)
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Go(func() {
				up, err := net.Dial("tcp", backend)
				if err != nil {
					c.Close()
					return
				}
				join(tls.Server(c, srvTLS), up)
			})
		}
	})
	cliTLS := identity.ClientTLS(func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return e.cliCert, nil }, e.bundle, e.srvID)
	return func(b *testing.B) net.Conn {
		nc, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			b.Fatal(err)
		}
		tc := tls.Client(nc, cliTLS)
		if err := tc.Handshake(); err != nil {
			b.Fatal(err)
		}
		app, inner := tcpPair(b)
		wg.Go(func() { join(inner, tc) })
		return app
	}
}

// BenchmarkTunnelThroughput moves bulk data the way ztunnel does: app TCP →
// Splice → HBONE stream → Splice → backend TCP (a sink that reads and
// discards), against "tls-proxy", the same two TCP legs joined by one TLS
// 1.3 connection with a copying goroutine per direction at each end.
// cpu-ns/B is the CPU of the whole process (app, both tunnel ends, sink)
// per byte.
func BenchmarkTunnelThroughput(b *testing.B) {
	b.Run("tls-proxy", func(b *testing.B) {
		sink := sinkServer(b)
		benchBulk(b, tlsProxy(b, sink)(b))
	})
	b.Run("hbone", func(b *testing.B) {
		sink := sinkServer(b)
		e := newEnv(b, forward)
		s := e.dial(b, sink)
		app, inner := tcpPair(b)
		done := make(chan struct{})
		go func() {
			_, _, _ = Splice(inner, s)
			inner.Close()
			s.Close()
			close(done)
		}()
		benchBulk(b, app)
		<-done
	})
}

// benchBulk writes b.N chunks into c, half-closes it and waits for the
// far end's close (the sink read everything).
func benchBulk(b *testing.B, c net.Conn) {
	buf := make([]byte, benchChunk)
	b.SetBytes(benchChunk)
	b.ResetTimer()
	cpu := cpuTime()
	for range b.N {
		if _, err := c.Write(buf); err != nil {
			b.Fatal(err)
		}
	}
	_ = c.(*net.TCPConn).CloseWrite()
	_, _ = io.Copy(io.Discard, c) // EOF once the sink has read everything
	b.StopTimer()
	reportCPU(b, cpu)
	c.Close()
}

// sinkServer is a TCP server that reads and discards until EOF, then
// closes.
func sinkServer(b testing.TB) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	var wg sync.WaitGroup
	b.Cleanup(func() { ln.Close(); wg.Wait() })
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Go(func() {
				buf := make([]byte, 128<<10)
				for {
					if _, err := c.Read(buf); err != nil {
						break
					}
				}
				c.Close()
			})
		}
	})
	return ln.Addr().String()
}
