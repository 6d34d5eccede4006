package hbone

import (
	"cmp"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"sync"
	"time"

	"github.com/amesh-dev/amesh/api/identity"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.uber.org/zap"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// Request is one CONNECT as the Handler sees it.
type Request struct {
	Peer       spiffeid.ID    // verified client identity
	Authority  netip.AddrPort // parsed CONNECT :authority
	Header     http.Header    // request headers (forwarded, baggage, traceparent…)
	RemoteAddr netip.AddrPort // the HBONE client's TCP address
	LocalAddr  netip.AddrPort // the address the HBONE connection reached
}

// Handler decides on one CONNECT before any answer is sent. It returns a
// function run with the stream after the 200, or an error answered with
// 401 (errors.Is ErrDenied), 400 (ErrBadTarget) or 503 (ErrUnreachable and
// anything else). A non-nil function is always called, even if the client
// went away meanwhile (its stream I/O then fails at once), so that it can
// release what the handler prepared; the stream is closed after it returns.
// ctx ends when the stream ends or the server stops after its drain.
type Handler func(ctx context.Context, r *Request) (func(stream net.Conn), error)

// ServerConfig configures a Server.
type ServerConfig struct {
	Certificate func(*tls.ClientHelloInfo) (*tls.Certificate, error)
	Bundle      *identity.Bundle
	TrustDomain spiffeid.TrustDomain
	Handler     Handler
	Logger      *zap.Logger

	MaxConcurrentStreams uint32        // per connection; default 1000
	HandshakeTimeout     time.Duration // TLS handshake and HTTP/2 preface; default 10s
	DrainTimeout         time.Duration // graceful stop bound; default 10s
	PingInterval         time.Duration // default 10s
	PingTimeout          time.Duration // default 20s
}

// Server accepts HBONE connections.
type Server struct {
	cfg ServerConfig
	tls *tls.Config

	mu      sync.Mutex
	serving map[*serving]struct{} // one per running Serve call
}

// NewServer returns a server; Serve checks the configuration.
func NewServer(cfg ServerConfig) *Server {
	cfg.MaxConcurrentStreams = cmp.Or(cfg.MaxConcurrentStreams, 1000)
	cfg.HandshakeTimeout = cmp.Or(cfg.HandshakeTimeout, 10*time.Second)
	cfg.DrainTimeout = cmp.Or(cfg.DrainTimeout, 10*time.Second)
	if cfg.Logger == nil {
		cfg.Logger = zap.NewNop()
	}
	return &Server{cfg: cfg, tls: identity.ServerTLS(cfg.Certificate, cfg.Bundle, cfg.TrustDomain)}
}

// serving is the state of one Serve call.
type serving struct {
	base     context.Context
	wg       sync.WaitGroup
	mu       sync.Mutex
	conns    map[*conn]struct{}
	draining bool
}

// Serve accepts connections on ln until ctx ends, then drains: it stops
// accepting, sends GOAWAY, lets the streams in flight finish for up to
// DrainTimeout, closes what is left and returns after all its goroutines
// (handlers included) have exited. It returns nil after ctx ends, or the
// error that stopped accepting.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	switch {
	case s.cfg.Handler == nil:
		return errors.New("hbone: ServerConfig.Handler is nil")
	case s.cfg.Certificate == nil:
		return errors.New("hbone: ServerConfig.Certificate is nil")
	case s.cfg.Bundle == nil:
		return errors.New("hbone: ServerConfig.Bundle is nil")
	case s.cfg.TrustDomain.IsZero():
		return errors.New("hbone: ServerConfig.TrustDomain is empty")
	}
	base, hardStop := context.WithCancel(context.WithoutCancel(ctx))
	defer hardStop()
	st := &serving{base: base, conns: make(map[*conn]struct{})}
	s.mu.Lock()
	if s.serving == nil {
		s.serving = make(map[*serving]struct{})
	}
	s.serving[st] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.serving, st)
		s.mu.Unlock()
	}()
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()

	var acceptErr error
	var delay time.Duration
	for {
		nc, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				break
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				delay = min(max(2*delay, 5*time.Millisecond), time.Second)
				time.Sleep(delay)
				continue
			}
			acceptErr = fmt.Errorf("hbone: accept: %w", err)
			break
		}
		delay = 0
		st.wg.Go(func() { s.serveConn(st, nc) })
	}
	ln.Close()

	st.mu.Lock()
	st.draining = true
	for c := range st.conns {
		c.drain()
	}
	st.mu.Unlock()
	done := make(chan struct{})
	go func() {
		st.wg.Wait()
		close(done)
	}()
	t := time.NewTimer(s.cfg.DrainTimeout)
	defer t.Stop()
	select {
	case <-done:
	case <-t.C:
		hardStop()
		st.mu.Lock()
		for c := range st.conns {
			c.close(errServerStopped)
		}
		st.mu.Unlock()
		<-done
	}
	return acceptErr
}

var errServerStopped = errors.New("hbone: server stopped")

// eachConn calls f for every open connection of every Serve call.
func (s *Server) eachConn(f func(*conn)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for st := range s.serving {
		st.mu.Lock()
		for c := range st.conns {
			f(c)
		}
		st.mu.Unlock()
	}
}

// ConnCount returns the number of open HBONE connections (for metrics).
func (s *Server) ConnCount() int {
	n := 0
	s.eachConn(func(*conn) { n++ })
	return n
}

func (s *Server) serveConn(st *serving, nc net.Conn) {
	log := s.cfg.Logger
	deadline := time.Now().Add(s.cfg.HandshakeTimeout)
	hctx, cancel := context.WithDeadline(st.base, deadline)
	defer cancel()
	tc := tls.Server(nc, s.tls)
	if err := tc.HandshakeContext(hctx); err != nil {
		log.Debug("hbone: TLS handshake failed", zap.Stringer("remote", nc.RemoteAddr()), zap.Error(err))
		nc.Close()
		return
	}
	peer, err := identity.PeerID(tc.ConnectionState())
	if err != nil {
		nc.Close()
		return
	}
	_ = tc.SetReadDeadline(deadline)
	preface := make([]byte, len(http2.ClientPreface))
	if _, err := io.ReadFull(tc, preface); err != nil || string(preface) != http2.ClientPreface {
		log.Debug("hbone: bad HTTP/2 preface", zap.Stringer("remote", nc.RemoteAddr()), zap.Error(err))
		tc.Close()
		return
	}
	_ = tc.SetReadDeadline(time.Time{})

	var c *conn
	c = newConn(tc, peer, connConfig{
		maxStreams:   s.cfg.MaxConcurrentStreams,
		pingInterval: s.cfg.PingInterval,
		pingTimeout:  s.cfg.PingTimeout,
		log:          log,
		spawn:        st.wg.Go,
		onStream: func(stream *Stream, req *request) {
			st.wg.Go(func() { s.handleStream(st.base, c, stream, req) })
		},
		onClose: func(c *conn) {
			st.mu.Lock()
			delete(st.conns, c)
			st.mu.Unlock()
		},
	})
	st.mu.Lock()
	if st.draining {
		st.mu.Unlock()
		tc.Close()
		return
	}
	st.conns[c] = struct{}{}
	c.start()
	st.mu.Unlock()
}

func (s *Server) handleStream(base context.Context, c *conn, stream *Stream, req *request) {
	ctx, cancel := context.WithCancel(base)
	defer cancel()
	defer func() {
		c.mu.Lock()
		c.handlers--
		c.mu.Unlock()
	}()
	c.mu.Lock()
	stream.cancel = cancel
	if stream.removed {
		cancel()
	}
	c.mu.Unlock()

	status, why := http.StatusOK, ""
	var auth netip.AddrPort
	switch {
	case req.truncated:
		status, why = http.StatusRequestHeaderFieldsTooLarge, "header list too large"
	case req.method != http.MethodConnect:
		status, why = http.StatusBadRequest, "method "+req.method
	case req.protocol != "" || req.scheme != "" || req.path != "":
		status, why = http.StatusBadRequest, "extended or malformed CONNECT"
	default:
		var err error
		if auth, err = ParseAuthority(req.authority); err != nil {
			status, why = http.StatusBadRequest, err.Error()
		}
	}
	if status != http.StatusOK {
		s.cfg.Logger.Debug("hbone: bad request", zap.Stringer("peer", c.peer), zap.String("reason", why))
		stream.respond(status)
		return
	}
	r := &Request{
		Peer:       c.peer,
		Authority:  auth,
		Header:     req.header,
		RemoteAddr: addrPort(c.nc.RemoteAddr()),
		LocalAddr:  addrPort(c.nc.LocalAddr()),
	}
	fn, err := s.cfg.Handler(ctx, r)
	if err != nil {
		s.cfg.Logger.Debug("hbone: CONNECT refused", zap.Stringer("peer", c.peer),
			zap.Stringer("authority", auth), zap.Error(err))
		stream.respond(statusFor(err))
		return
	}
	stream.respond(http.StatusOK)
	if fn != nil {
		fn(stream)
	}
	_ = stream.Close()
}

// respond sends the final response HEADERS of a server stream; any status
// but 200 ends the stream.
func (s *Stream) respond(status int) {
	c := s.c
	c.mu.Lock()
	defer c.mu.Unlock()
	if s.removed || c.closing {
		return
	}
	end := status != http.StatusOK
	c.writeHeadersLocked(s.id, []hpack.HeaderField{{Name: ":status", Value: strconv.Itoa(status)}}, end)
	if !end {
		c.flushCtrlLocked()
		return
	}
	c.signalLocked()
	s.endSent, s.endQueued = true, true
	s.closed = true
	c.consumedLocked(s, s.rbuf.n)
	s.rbuf.reset()
	if s.recvEnd {
		s.maybeFinishLocked()
	} else {
		c.resetLocked(s, http2.ErrCodeNo, net.ErrClosed)
	}
}

func addrPort(a net.Addr) netip.AddrPort {
	if ta, ok := a.(*net.TCPAddr); ok {
		ap := ta.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	}
	ap, _ := netip.ParseAddrPort(a.String())
	return ap
}
