package hbone

import (
	"cmp"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/amesh-dev/amesh/api/identity"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.uber.org/zap"
	"golang.org/x/net/http/httpguts"
)

// ClientConfig configures a Client.
type ClientConfig struct {
	// Certificates returns the client certificate of a source identity,
	// e.g. identity.Store.Certificate.
	Certificates func(ctx context.Context, src spiffeid.ID) (*tls.Certificate, error)
	Bundle       *identity.Bundle
	// Dial opens the TCP connection to an HBONE address; ztunnel dials from
	// inside a pod's network namespace with SO_MARK (the Dial context carries
	// whatever the caller of Client.Dial put in it). Default: net.Dialer.
	Dial              func(ctx context.Context, network, addr string) (net.Conn, error)
	HandshakeTimeout  time.Duration // bound on TCP connect + TLS handshake; default 10s
	IdleTimeout       time.Duration // close a connection without streams after this; default 30s
	MaxStreamsPerConn int           // concurrent streams per HTTP/2 connection; default 100
	PingInterval      time.Duration // default 10s
	PingTimeout       time.Duration // default 20s
	Logger            *zap.Logger
}

// DialRequest says where and as whom to tunnel.
type DialRequest struct {
	Source   spiffeid.ID    // client certificate identity
	Expected []spiffeid.ID  // acceptable server identities
	Proxy    netip.AddrPort // HBONE address (podIP:15008 or waypointIP:15008)
	Target   netip.AddrPort // :authority
	PoolKey  string         // extra pool-key component (e.g. the source netns)
	Header   http.Header    // forwarded, baggage, traceparent…
}

// Client opens HBONE streams over pooled HTTP/2 connections, one pool per
// (source identity, expected identities, proxy address, PoolKey). Safe for
// concurrent use.
type Client struct {
	cfg    ClientConfig
	ctx    context.Context // canceled by Close: aborts dials in flight
	cancel context.CancelFunc

	mu     sync.Mutex
	pools  map[poolKey][]*conn
	dials  map[poolKey]*dialCall
	conns  map[*conn]poolKey
	closed bool
	wg     sync.WaitGroup
}

type poolKey struct {
	src, expected string
	proxy         netip.AddrPort
	extra         string
}

type dialCall struct {
	done chan struct{}
	err  error
}

// NewClient returns a client.
func NewClient(cfg ClientConfig) *Client {
	cfg.IdleTimeout = cmp.Or(cfg.IdleTimeout, 30*time.Second)
	cfg.HandshakeTimeout = cmp.Or(cfg.HandshakeTimeout, 10*time.Second)
	cfg.MaxStreamsPerConn = cmp.Or(cfg.MaxStreamsPerConn, 100)
	if cfg.Dial == nil {
		var d net.Dialer
		cfg.Dial = d.DialContext
	}
	if cfg.Logger == nil {
		cfg.Logger = zap.NewNop()
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Client{
		cfg:    cfg,
		ctx:    ctx,
		cancel: cancel,
		pools:  make(map[poolKey][]*conn),
		dials:  make(map[poolKey]*dialCall),
		conns:  make(map[*conn]poolKey),
	}
}

// Dial opens a stream to r.Target through r.Proxy. ctx bounds the connection
// set-up and the CONNECT; once Dial returns, ctx no longer matters. A non-200
// answer is a *StatusError (errors.Is ErrDenied, ErrBadTarget,
// ErrUnreachable); a server whose identity is not expected fails the TLS
// handshake with identity.ErrPeer. The returned net.Conn is a *Stream.
func (cl *Client) Dial(ctx context.Context, r DialRequest) (net.Conn, error) {
	switch {
	case r.Source.IsZero():
		return nil, errors.New("hbone: dial: no source identity")
	case len(r.Expected) == 0:
		return nil, errors.New("hbone: dial: no expected server identity")
	case !r.Proxy.IsValid() || r.Proxy.Port() == 0:
		return nil, fmt.Errorf("hbone: dial: bad proxy address %v", r.Proxy)
	case !r.Target.IsValid() || r.Target.Port() == 0:
		return nil, fmt.Errorf("hbone: dial: bad target %v", r.Target)
	case cl.cfg.Certificates == nil || cl.cfg.Bundle == nil:
		return nil, errors.New("hbone: ClientConfig needs Certificates and Bundle")
	}
	for k, vs := range r.Header {
		if !httpguts.ValidHeaderFieldName(k) {
			return nil, fmt.Errorf("hbone: dial: invalid header name %q", k)
		}
		for _, v := range vs {
			if !httpguts.ValidHeaderFieldValue(v) {
				return nil, fmt.Errorf("hbone: dial: invalid value for header %q", k)
			}
		}
	}
	exp := make([]string, len(r.Expected))
	for i, id := range r.Expected {
		exp[i] = id.String()
	}
	slices.Sort(exp)
	key := poolKey{src: r.Source.String(), expected: strings.Join(exp, " "), proxy: r.Proxy, extra: r.PoolKey}
	authority := netip.AddrPortFrom(r.Target.Addr().Unmap(), r.Target.Port()).String()
	var err error
	for range 3 {
		var c *conn
		if c, err = cl.get(ctx, key, r); err != nil {
			return nil, fmt.Errorf("hbone: dial %s via %s: %w", authority, r.Proxy, err)
		}
		var s *Stream
		if s, err = c.openStream(ctx, authority, r.Header); err == nil {
			return s, nil
		}
		if !errors.Is(err, errRefused) {
			break
		}
	}
	return nil, fmt.Errorf("hbone: CONNECT %s via %s: %w", authority, r.Proxy, err)
}

// get returns a pooled connection with a reserved stream slot, dialing one if
// none has room.
func (cl *Client) get(ctx context.Context, key poolKey, r DialRequest) (*conn, error) {
	cl.mu.Lock()
	for {
		if cl.closed {
			cl.mu.Unlock()
			return nil, ErrClientClosed
		}
		var found *conn
		kept := cl.pools[key][:0]
		for _, c := range cl.pools[key] {
			if !c.usable() {
				continue // GOAWAY'd, broken or closing: evict
			}
			kept = append(kept, c)
			if found == nil && c.reserve(cl.cfg.MaxStreamsPerConn) {
				found = c
			}
		}
		clear(cl.pools[key][len(kept):])
		if len(kept) == 0 {
			delete(cl.pools, key)
		} else {
			cl.pools[key] = kept
		}
		if found != nil {
			cl.mu.Unlock()
			return found, nil
		}
		if d := cl.dials[key]; d != nil {
			cl.mu.Unlock()
			select {
			case <-d.done:
			case <-ctx.Done():
				return nil, ctx.Err()
			}
			if d.err != nil && ctx.Err() == nil && !errors.Is(d.err, context.Canceled) && !errors.Is(d.err, context.DeadlineExceeded) {
				return nil, d.err
			}
			cl.mu.Lock()
			continue
		}
		d := &dialCall{done: make(chan struct{})}
		cl.dials[key] = d
		cl.wg.Add(1)
		cl.mu.Unlock()
		c, err := cl.dialConn(ctx, r)
		cl.mu.Lock()
		delete(cl.dials, key)
		d.err = err
		close(d.done)
		if err != nil {
			cl.wg.Done()
			cl.mu.Unlock()
			return nil, err
		}
		if cl.closed {
			cl.wg.Done()
			cl.mu.Unlock()
			c.close(ErrClientClosed)
			return nil, ErrClientClosed
		}
		cl.pools[key] = append(cl.pools[key], c)
		cl.conns[c] = key
		c.start()
		cl.wg.Done()
		if c.reserve(cl.cfg.MaxStreamsPerConn) {
			cl.mu.Unlock()
			return c, nil
		}
		cl.mu.Unlock()
		c.mu.Lock()
		err = c.err
		c.mu.Unlock()
		if err == nil {
			err = errors.New("new connection cannot take streams")
		}
		return nil, err
	}
}

// dialConn dials the proxy and completes the mTLS handshake.
func (cl *Client) dialConn(ctx context.Context, r DialRequest) (*conn, error) {
	ctx, cancel := context.WithTimeout(ctx, cl.cfg.HandshakeTimeout)
	defer cancel()
	stop := context.AfterFunc(cl.ctx, cancel)
	defer stop()
	cert, err := cl.cfg.Certificates(ctx, r.Source)
	if err != nil {
		return nil, fmt.Errorf("certificate for %s: %w", r.Source, err)
	}
	if cert.Leaf != nil && !time.Now().Before(cert.Leaf.NotAfter) {
		return nil, fmt.Errorf("certificate for %s expired at %v", r.Source, cert.Leaf.NotAfter)
	}
	nc, err := cl.cfg.Dial(ctx, "tcp", r.Proxy.String())
	if err != nil {
		return nil, err
	}
	tc := tls.Client(nc, identity.ClientTLS(func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return cert, nil },
		cl.cfg.Bundle, r.Expected...))
	if err := tc.HandshakeContext(ctx); err != nil {
		nc.Close()
		return nil, fmt.Errorf("TLS handshake with %s: %w", r.Proxy, err)
	}
	peer, err := identity.PeerID(tc.ConnectionState())
	if err != nil {
		tc.Close()
		return nil, err
	}
	c := newConn(tc, peer, connConfig{
		client:       true,
		idleTimeout:  cl.cfg.IdleTimeout,
		pingInterval: cl.cfg.PingInterval,
		pingTimeout:  cl.cfg.PingTimeout,
		log:          cl.cfg.Logger,
		spawn:        cl.wg.Go,
		onClose:      cl.forget,
	})
	if cert.Leaf != nil && (c.expiry.IsZero() || cert.Leaf.NotAfter.Before(c.expiry)) {
		c.expiry = cert.Leaf.NotAfter
	}
	return c, nil
}

// forget drops a closed connection from the pool.
func (cl *Client) forget(c *conn) {
	cl.mu.Lock()
	defer cl.mu.Unlock()
	key, ok := cl.conns[c]
	if !ok {
		return
	}
	delete(cl.conns, c)
	p := cl.pools[key]
	if i := slices.Index(p, c); i >= 0 {
		p = slices.Delete(p, i, i+1)
		if len(p) == 0 {
			delete(cl.pools, key)
		} else {
			cl.pools[key] = p
		}
	}
}

// ConnCount returns the number of open HTTP/2 connections (for metrics).
func (cl *Client) ConnCount() int {
	cl.mu.Lock()
	defer cl.mu.Unlock()
	return len(cl.conns)
}

// Close closes every connection (resetting their streams), aborts dials in
// flight and waits for the client's goroutines.
func (cl *Client) Close() error {
	cl.mu.Lock()
	cl.closed = true
	conns := make([]*conn, 0, len(cl.conns))
	for c := range cl.conns {
		conns = append(conns, c)
	}
	cl.mu.Unlock()
	cl.cancel()
	for _, c := range conns {
		c.close(ErrClientClosed)
	}
	cl.wg.Wait()
	return nil
}

// lowerHeader returns the HTTP/2 (lower-case) form of a header name.
func lowerHeader(k string) string { return strings.ToLower(k) }

// validRequestHeader reports whether a header may be forwarded in CONNECT.
func validRequestHeader(name string) bool {
	switch name {
	case "", "connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te", "host":
		return false
	}
	return !strings.HasPrefix(name, ":")
}
