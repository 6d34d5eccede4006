package hbone

import (
	"context"
	"crypto/tls"
	"io"
	"net"
	"net/http"
	"runtime"
	"sync"
	"syscall"
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
		cpu := cpuTime()
		for range b.N {
			if _, err := s.Write(buf); err != nil {
				b.Fatal(err)
			}
		}
		_ = s.CloseWrite()
		_, _ = io.Copy(io.Discard, s) // until the server has read everything
		b.StopTimer()
		reportCPU(b, cpu)
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
		read := make(chan struct{})
		wg.Go(func() {
			defer close(read)
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
		cpu := cpuTime()
		for range b.N {
			if _, err := tc.Write(buf); err != nil {
				b.Fatal(err)
			}
		}
		_ = tc.CloseWrite()
		<-read // until the server has read everything
		b.StopTimer()
		reportCPU(b, cpu)
	})
}

// cpuTime returns the process's user+system CPU time. Client and server run
// in this process, so the difference over a benchmark is the CPU both ends
// spent: a measure that the machine's other load does not distort.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func reportCPU(b *testing.B, start time.Duration) {
	b.ReportMetric(float64(cpuTime()-start)/float64(b.N*benchChunk), "cpu-ns/B")
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

// BenchmarkIdleHeap measures the memory held by idle tunnels, client and
// server side together, after GC: heap (heapB/conn) and goroutine stacks
// (stackB/conn).
//
//   - tunnel: app TCP ⇄ Splice ⇄ HBONE stream ⇄ Splice ⇄ backend TCP, the
//     way ztunnel uses it (both TCP legs and all four splice goroutines
//     included), 100 streams per HTTP/2 connection;
//   - tunnel-own-conn: the same with one HTTP/2 (and TLS) connection per
//     tunnel;
//   - stream: a bare stream whose two ends are blocked in Read.
func BenchmarkIdleHeap(b *testing.B) {
	b.Run("tunnel", func(b *testing.B) { benchIdle(b, 1000, 100, true) })
	b.Run("tunnel-own-conn", func(b *testing.B) { benchIdle(b, 300, 1, true) })
	b.Run("stream", func(b *testing.B) { benchIdle(b, 1000, 100, false) })
	b.Run("stream-net-http-baseline", benchIdleNetHTTP)
}

// benchIdleNetHTTP is the baseline for "stream": the same idle CONNECT
// streams with net/http's HTTP/2 client and server (the implementation
// x/net/http2's Server and Transport now defer to), default settings.
func benchIdleNetHTTP(b *testing.B) {
	const n = 100
	e := newEnv(b, discard) // for its certificates
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.WriteHeader(http.StatusOK)
			w.(http.Flusher).Flush()
			_, _ = io.Copy(io.Discard, r.Body)
		}),
		TLSConfig: identity.ServerTLS(func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return e.srvCert, nil }, e.bundle, e.ca.TrustDomain),
		Protocols: new(http.Protocols),
	}
	srv.Protocols.SetHTTP2(true)
	served := make(chan struct{})
	go func() { defer close(served); _ = srv.ServeTLS(ln, "", "") }()
	defer func() { srv.Close(); <-served }()
	tr := &http.Transport{
		TLSClientConfig: identity.ClientTLS(func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return e.cliCert, nil }, e.bundle, e.srvID),
		Protocols:       new(http.Protocols),
	}
	tr.Protocols.SetHTTP2(true)
	defer tr.CloseIdleConnections()
	for range b.N {
		var wg sync.WaitGroup
		var pipes []*io.PipeWriter
		beforeHeap, beforeStack := memInUse()
		for range n {
			pr, pw := io.Pipe()
			req, _ := http.NewRequest(http.MethodConnect, "https://"+ln.Addr().String(), pr)
			req.Host = "10.0.0.1:80"
			resp, err := tr.RoundTrip(req)
			if err != nil {
				b.Fatal(err)
			}
			pipes = append(pipes, pw)
			wg.Go(func() { _, _ = io.Copy(io.Discard, resp.Body); resp.Body.Close() })
		}
		time.Sleep(300 * time.Millisecond)
		afterHeap, afterStack := memInUse()
		b.ReportMetric(float64(afterHeap-beforeHeap)/n, "heapB/conn")
		b.ReportMetric(float64(afterStack-beforeStack)/n, "stackB/conn")
		for _, pw := range pipes {
			pw.Close()
		}
		wg.Wait()
	}
}

func benchIdle(b *testing.B, n, perConn int, splice bool) {
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
	handler := forward
	if !splice {
		handler = discard
	}
	target := ln.Addr().String()
	for range b.N {
		// A fresh client and server each time: connections are measured too.
		e := newEnv(b, handler, func(_ *ServerConfig, c *ClientConfig) { c.MaxStreamsPerConn = perConn })
		var closers []func()
		var wg sync.WaitGroup
		runtime.GC()
		beforeHeap, beforeStack := memInUse()
		for range n {
			s := e.dial(b, target)
			if !splice {
				wg.Go(func() { _, _ = io.Copy(io.Discard, s) })
				closers = append(closers, func() { s.CloseWrite() })
				continue
			}
			app, inner := tcpPair(b)
			closers = append(closers, func() { app.Close() })
			wg.Go(func() {
				_, _, _ = Splice(inner, s)
				inner.Close()
				s.Close()
			})
		}
		time.Sleep(300 * time.Millisecond) // let every goroutine block
		afterHeap, afterStack := memInUse()
		b.ReportMetric(float64(afterHeap-beforeHeap)/float64(n), "heapB/conn")
		b.ReportMetric(float64(afterStack-beforeStack)/float64(n), "stackB/conn")
		// Both ends close: each splice sees EOF in both directions.
		for _, c := range closers {
			c()
		}
		mu.Lock()
		for _, c := range backends {
			c.Close()
		}
		backends = nil
		mu.Unlock()
		wg.Wait()
		e.client.Close()
		e.shutdown(b)
	}
}

func memInUse() (heap, stack int64) {
	runtime.GC()
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return int64(m.HeapAlloc), int64(m.StackInuse)
}
