package hbone

import (
	"context"
	"crypto/tls"
	"io"
	"net"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/amesh-dev/amesh/api/identity"
)

const benchChunk = 256 << 10

func discard(context.Context, *Request) (func(net.Conn), error) {
	return func(c net.Conn) { _, _ = io.Copy(io.Discard, c) }, nil
}

// BenchmarkThroughput compares one HBONE stream with the same bytes over a
// plain TLS 1.3 connection (same certificates, no HTTP/2): the baseline.
func BenchmarkThroughput(b *testing.B) {
	b.Run("hbone", func(b *testing.B) {
		e := newEnv(b, discard)
		s := e.dial(b, "10.0.0.1:80")
		buf := make([]byte, benchChunk)
		b.SetBytes(benchChunk)
		b.ResetTimer()
		for range b.N {
			if _, err := s.Write(buf); err != nil {
				b.Fatal(err)
			}
		}
		_ = s.CloseWrite()
		_, _ = io.Copy(io.Discard, s)
		b.StopTimer()
		s.Close()
	})
	b.Run("tls", func(b *testing.B) {
		e := newEnv(b, discard) // only for its certificates
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			b.Fatal(err)
		}
		defer ln.Close()
		srvTLS := identity.ServerTLS(func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return e.srvCert, nil }, e.bundle, e.ca.TrustDomain)
		var wg sync.WaitGroup
		defer wg.Wait()
		wg.Go(func() {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			defer c.Close()
			_, _ = io.Copy(io.Discard, tls.Server(c, srvTLS))
		})
		nc, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			b.Fatal(err)
		}
		tc := tls.Client(nc, identity.ClientTLS(func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return e.cliCert, nil }, e.bundle, e.srvID))
		defer tc.Close()
		buf := make([]byte, benchChunk)
		b.SetBytes(benchChunk)
		b.ResetTimer()
		for range b.N {
			if _, err := tc.Write(buf); err != nil {
				b.Fatal(err)
			}
		}
		_ = tc.CloseWrite()
		b.StopTimer()
	})
}

// BenchmarkConnectWarm: CONNECT + 200 + close on an already-open connection.
func BenchmarkConnectWarm(b *testing.B) {
	e := newEnv(b, discard)
	e.dial(b, "10.0.0.1:80").Close()
	b.ResetTimer()
	for range b.N {
		s := e.dial(b, "10.0.0.1:80")
		s.Close()
	}
}

// BenchmarkConnectCold: TCP + TLS 1.3 mTLS handshake + HTTP/2 preface +
// CONNECT + 200, each time on a new client.
func BenchmarkConnectCold(b *testing.B) {
	e := newEnv(b, discard)
	b.ResetTimer()
	for range b.N {
		cl := NewClient(e.client.cfg)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		s, err := cl.Dial(ctx, e.req("10.0.0.1:80"))
		cancel()
		if err != nil {
			b.Fatal(err)
		}
		s.Close()
		cl.Close()
	}
}

// BenchmarkIdleHeap measures the heap held by idle tunnelled TCP connections,
// client and server side together: app TCP ⇄ Splice ⇄ HBONE stream ⇄ Splice
// ⇄ backend TCP, all idle, 100 streams per HTTP/2 connection.
func BenchmarkIdleHeap(b *testing.B) {
	const n = 1000
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	var bwg sync.WaitGroup
	defer func() { ln.Close(); bwg.Wait() }()
	var mu sync.Mutex
	var backends []net.Conn
	bwg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			backends = append(backends, c)
			mu.Unlock()
		}
	})
	e := newEnv(b, forward)
	target := ln.Addr().String()
	for range b.N {
		var apps []net.Conn
		var wg sync.WaitGroup
		before := heapInUse()
		for range n {
			s := e.dial(b, target)
			app, inner := tcpPair(b)
			apps = append(apps, app)
			wg.Go(func() {
				_, _, _ = Splice(inner, s)
				inner.Close()
				s.Close()
			})
		}
		time.Sleep(200 * time.Millisecond) // let every splice block in its reads
		after := heapInUse()
		b.ReportMetric(float64(after-before)/n, "heapB/conn")
		// Both ends close: each splice sees EOF in both directions.
		for _, a := range apps {
			a.Close()
		}
		mu.Lock()
		for _, c := range backends {
			c.Close()
		}
		backends = nil
		mu.Unlock()
		wg.Wait()
	}
}

func heapInUse() int64 {
	runtime.GC()
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return int64(m.HeapAlloc)
}
