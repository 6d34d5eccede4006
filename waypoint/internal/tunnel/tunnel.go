// Package tunnel serves what arrives inside the waypoint's HBONE tunnels:
// for a service port (or a bound workload's port) whose protocol is HTTP,
// HTTP/2 or gRPC, HTTP/1.1 or h2c (told apart by the HTTP/2 preface) handed
// to the L7 proxy; for any other protocol an L4 passthrough to a
// load-balanced endpoint (or to the addressed workload), under L4
// authorization. Nothing is accepted before the catalog has synced.
package tunnel

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"time"

	"github.com/amesh-dev/amesh/waypoint/internal/authz"
	"github.com/amesh-dev/amesh/waypoint/internal/catalog"
	"github.com/amesh-dev/amesh/waypoint/internal/proxy"
	"github.com/amesh-dev/amesh/waypoint/internal/telemetry"
	"github.com/amesh-dev/amesh/waypoint/internal/upstream"
	"go.uber.org/zap"
)

// Errors returned by Accept; the HBONE layer maps them to CONNECT answers.
var (
	// ErrUnknownTarget: the authority is not a service this waypoint
	// serves (400).
	ErrUnknownTarget = errors.New("target is not served by this waypoint")
	// ErrDenied: L4 authorization refused the connection (401).
	ErrDenied = errors.New("denied by authorization policy")
	// ErrUnreachable: no endpoint could be reached for passthrough, or the
	// discovery state needed to decide has not arrived yet (503).
	ErrUnreachable = errors.New("no reachable endpoint")
)

// Limits bound what one client can make the HTTP server hold. A stalled
// request body is bounded by the proxy (proxy.Options.RequestBodyIdleTimeout),
// which knows when it is waiting for the client.
type Limits struct {
	// ReadHeaderTimeout bounds slow headers (slowloris); default 10s.
	ReadHeaderTimeout time.Duration
	// IdleTimeout closes idle keep-alive connections; default 5m.
	IdleTimeout time.Duration
	// MaxHeaderBytes per request; default 64 KiB.
	MaxHeaderBytes int
	// MaxConcurrentStreams per HTTP/2 connection; default 250.
	MaxConcurrentStreams int
	// DrainTimeout bounds graceful shutdown; default 20s.
	DrainTimeout time.Duration
}

func (l Limits) withDefaults() Limits {
	if l.ReadHeaderTimeout <= 0 {
		l.ReadHeaderTimeout = 10 * time.Second
	}
	if l.IdleTimeout <= 0 {
		l.IdleTimeout = 5 * time.Minute
	}
	if l.MaxHeaderBytes <= 0 {
		l.MaxHeaderBytes = 64 << 10
	}
	if l.MaxConcurrentStreams <= 0 {
		l.MaxConcurrentStreams = 250
	}
	if l.DrainTimeout <= 0 {
		l.DrainTimeout = 20 * time.Second
	}
	return l
}

// Options configure a Server.
type Options struct {
	Catalog *catalog.Catalog
	Proxy   http.Handler
	Metrics *telemetry.Metrics
	Logger  *zap.Logger
	Limits  Limits
	// ClusterID labels TCP metrics.
	ClusterID string
}

// Server serves tunnel streams.
type Server struct {
	cat     *catalog.Catalog
	metrics *telemetry.Metrics
	log     *zap.Logger
	limits  Limits
	cluster string
	http    *http.Server
	ln      *listener
	l4      sync.WaitGroup
	l4Mu    sync.Mutex
	l4Conns map[net.Conn]struct{}
}

// New returns a server; Run serves.
func New(opts Options) *Server {
	s := &Server{cat: opts.Catalog, metrics: opts.Metrics, log: opts.Logger, limits: opts.Limits.withDefaults(),
		cluster: opts.ClusterID, ln: newListener(), l4Conns: map[net.Conn]struct{}{}}
	if s.log == nil {
		s.log = zap.NewNop()
	}
	var p http.Protocols
	p.SetHTTP1(true)
	p.SetUnencryptedHTTP2(true)
	s.http = &http.Server{
		Handler:           opts.Proxy,
		Protocols:         &p,
		ReadHeaderTimeout: s.limits.ReadHeaderTimeout,
		IdleTimeout:       s.limits.IdleTimeout,
		MaxHeaderBytes:    s.limits.MaxHeaderBytes,
		HTTP2: &http.HTTP2Config{
			MaxConcurrentStreams:      s.limits.MaxConcurrentStreams,
			MaxDecoderHeaderTableSize: 4096,
			MaxEncoderHeaderTableSize: 4096,
			MaxReadFrameSize:          1 << 14,
			PingTimeout:               15 * time.Second,
			SendPingTimeout:           60 * time.Second,
		},
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			if tc, ok := c.(*tunnelConn); ok {
				return proxy.WithConn(ctx, tc.ci)
			}
			return ctx
		},
		ErrorLog: zap.NewStdLog(s.log.Named("http")),
	}
	return s
}

// Accept decides on one tunnel before it is answered: it returns the
// function that serves the stream, or an error (ErrUnknownTarget, ErrDenied,
// ErrUnreachable). peer is the verified client identity ("spiffe://…"),
// source the original client address.
func (s *Server) Accept(ctx context.Context, peer string, source netip.Addr, target netip.AddrPort) (func(net.Conn), error) {
	t, err := s.cat.Resolve(target)
	switch {
	case errors.Is(err, catalog.ErrNotSynced):
		return nil, fmt.Errorf("%w: %w", ErrUnreachable, err)
	case err != nil:
		return nil, fmt.Errorf("%w: %w", ErrUnknownTarget, err)
	}
	ci := &proxy.ConnInfo{Peer: peer, Source: source, Target: target}
	if t.HTTP() {
		return func(c net.Conn) { s.serveHTTP(c, ci) }, nil
	}
	a := &authz.Attributes{L4: true, SourceIP: source, Port: t.Port}
	if pr, ok := strings.CutPrefix(peer, "spiffe://"); ok {
		a.Principal = pr
		if _, rest, ok := strings.Cut(pr, "/ns/"); ok {
			a.Namespace, _, _ = strings.Cut(rest, "/")
		}
	}
	if d := t.Authz.Evaluate(a); !d.Allow {
		return nil, fmt.Errorf("%w: %s", ErrDenied, d.Policy)
	}
	// Connect before answering, so the client learns of failure (503).
	ep, up, err := s.cat.DialTarget(ctx, t, target, &upstream.HashInput{SourceIP: source})
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrUnreachable, err)
	}
	return func(c net.Conn) { s.passthrough(c, up, t, ep, ci) }, nil
}

func (s *Server) serveHTTP(c net.Conn, ci *proxy.ConnInfo) {
	tc := &tunnelConn{Conn: c, ci: ci, done: make(chan struct{})}
	if !s.ln.push(tc) {
		c.Close()
		return
	}
	<-tc.done
}

func (s *Server) passthrough(c, up net.Conn, t *catalog.Target, ep *upstream.Endpoint, ci *proxy.ConnInfo) {
	s.l4.Add(1)
	defer s.l4.Done()
	s.track(c, true)
	s.track(up, true)
	defer s.track(c, false)
	defer s.track(up, false)
	l := &telemetry.Labels{RequestProtocol: "tcp", ResponseFlags: "-", SourcePrincipal: ci.Peer,
		DestinationService: t.Service.GetHostname(), DestinationServiceName: t.Service.GetName(),
		DestinationServiceNamespace: t.Service.GetNamespace(), DestinationWorkload: ep.Workload,
		DestinationWorkloadNamespace: ep.Namespace, DestinationPrincipal: ep.Identity,
		DestinationCanonicalService: ep.CanonicalName, DestinationCanonicalRevision: ep.CanonicalRevision,
		SourceCluster: s.cluster, DestinationCluster: s.cluster, ConnectionSecurityPolicy: "mutual_tls"}
	if w := s.cat.WorkloadByIP(ci.Source); w != nil {
		l.SourceWorkload, l.SourceWorkloadNamespace = w.GetWorkloadName(), w.GetNamespace()
		l.SourceCanonicalService, l.SourceCanonicalRevision = w.GetCanonicalName(), w.GetCanonicalRevision()
	}
	if s.metrics != nil {
		s.metrics.TCPOpen(l)
	}
	toUp, toClient := splice(c, up)
	if s.metrics != nil {
		s.metrics.TCPClose(l, toClient, toUp)
	}
}

func (s *Server) track(c net.Conn, add bool) {
	s.l4Mu.Lock()
	defer s.l4Mu.Unlock()
	if add {
		s.l4Conns[c] = struct{}{}
	} else {
		delete(s.l4Conns, c)
	}
}

// Run serves until ctx is done, then drains: it stops taking tunnels,
// lets in-flight HTTP requests finish (HTTP/1.1 connections close after
// their current request, HTTP/2 ones get GOAWAY) within the drain timeout,
// then closes what remains, including L4 passthroughs.
func (s *Server) Run(ctx context.Context) error {
	errc := make(chan error, 1)
	go func() { errc <- s.http.Serve(s.ln) }()
	select {
	case err := <-errc:
		return fmt.Errorf("tunnel http server: %w", err)
	case <-ctx.Done():
	}
	dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), s.limits.DrainTimeout)
	defer cancel()
	err := s.http.Shutdown(dctx)
	if err != nil {
		_ = s.http.Close()
	}
	<-errc
	// L4 connections get the rest of the drain time.
	done := make(chan struct{})
	go func() { s.l4.Wait(); close(done) }()
	select {
	case <-done:
	case <-dctx.Done():
		s.l4Mu.Lock()
		for c := range s.l4Conns {
			_ = c.Close()
		}
		s.l4Mu.Unlock()
		<-done
	}
	return nil
}

// tunnelConn is one tunnel stream handed to the HTTP server.
type tunnelConn struct {
	net.Conn
	ci   *proxy.ConnInfo
	once sync.Once
	done chan struct{}
}

func (c *tunnelConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(func() { close(c.done) })
	return err
}

// listener feeds tunnel streams to the HTTP server.
type listener struct {
	ch     chan *tunnelConn
	mu     sync.Mutex
	closed bool
	done   chan struct{}
}

func newListener() *listener {
	return &listener{ch: make(chan *tunnelConn), done: make(chan struct{})}
}

func (l *listener) push(c *tunnelConn) bool {
	select {
	case l.ch <- c:
		return true
	case <-l.done:
		return false
	}
}

func (l *listener) Accept() (net.Conn, error) {
	select {
	case c := <-l.ch:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *listener) Close() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.closed {
		l.closed = true
		close(l.done)
	}
	return nil
}

func (l *listener) Addr() net.Addr { return tunnelAddr{} }

type tunnelAddr struct{}

func (tunnelAddr) Network() string { return "hbone" }
func (tunnelAddr) String() string  { return "hbone" }

// splice copies both ways with half-close, returning bytes a→b and b→a.
func splice(a, b net.Conn) (ab, ba int64) {
	var wg sync.WaitGroup
	cp := func(dst, src net.Conn, n *int64) {
		defer wg.Done()
		*n, _ = io.Copy(dst, src)
		if cw, ok := dst.(interface{ CloseWrite() error }); ok {
			_ = cw.CloseWrite()
		} else {
			_ = dst.Close()
		}
	}
	wg.Add(2)
	go cp(b, a, &ab)
	go cp(a, b, &ba)
	wg.Wait()
	_ = a.Close()
	_ = b.Close()
	return ab, ba
}
