package upstream

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	discoveryv1 "github.com/amesh-dev/amesh/api/discovery/v1"
)

// Errors of the upstream layer. The proxy maps them to status codes and
// response flags.
var (
	// ErrNoHealthy: every endpoint is unhealthy or ejected (503, flag UH).
	ErrNoHealthy = errors.New("no healthy upstream")
	// ErrOverflow: a circuit-breaker limit was reached (503, flag UO).
	ErrOverflow = errors.New("upstream overflow")
)

// ConnectError wraps a failure to open a connection to an endpoint (503,
// flag UF); it is always retryable.
type ConnectError struct {
	Endpoint netip.AddrPort
	Err      error
}

func (e *ConnectError) Error() string {
	return fmt.Sprintf("connect to %s: %v", e.Endpoint, e.Err)
}
func (e *ConnectError) Unwrap() error { return e.Err }

// Dialer opens a connection (an HBONE stream or a TCP connection) to ep.
type Dialer func(ctx context.Context, ep *Endpoint) (net.Conn, error)

// Options configure a Cluster.
type Options struct {
	// Name for telemetry: "<namespace>/<hostname>:<port>".
	Name string
	// HTTP2 selects h2c (prior knowledge) upstream; else HTTP/1.1.
	HTTP2 bool
	Dial  Dialer
	// Now is the clock (outlier detection); default time.Now.
	Now func() time.Time
}

// Cluster is one backend service port. Safe for concurrent use.
type Cluster struct {
	name  string
	http2 bool
	dial  Dialer
	now   func() time.Time

	cur    atomic.Pointer[snapshot]
	mu     sync.Mutex // guards states, updates and retired
	states map[netip.AddrPort]*epState
	// transport pools the connections. Its settings are fixed once it is
	// in use, so a change of idle timeout swaps in a new one; the retired
	// ones keep serving requests in flight until their connections idle.
	transport atomic.Pointer[http.Transport]
	idle      time.Duration
	retired   []*http.Transport

	requests, pending, retries atomic.Int64
	connMu                     sync.Mutex
	conns                      int64
	connFreed                  chan struct{}

	// Stats for admin and tests.
	overflows, ejectionsTotal atomic.Int64
	// ejectedUntil is the latest end of any ejection (Unix nanoseconds):
	// before it Pick checks each endpoint, after it none can be ejected.
	ejectedUntil atomic.Int64
}

type snapshot struct {
	all     []*Endpoint
	byAddr  map[string]*Endpoint
	lb      balancer
	hashCk  *discoveryv1.HashCookie
	limits  limits
	od      *discoveryv1.OutlierDetection
	connect time.Duration
	// maxPerConn bounds requests per upstream HTTP/1.1 connection (0: no
	// bound).
	maxPerConn int64
}

type limits struct {
	maxConns, maxPending, maxRequests, maxRetries int64
}

// Circuit-breaker limits of a cluster whose policy leaves them unset (0):
// Envoy's defaults. Istio raises Envoy's to 2³²−1 unless a DestinationRule
// sets them; amesh keeps them bounded, so that one slow or flooded backend
// cannot take all of a waypoint's memory and connections.
const (
	DefaultMaxConnections     = 1024
	DefaultMaxPendingRequests = 1024
	DefaultMaxRequests        = 1024
	DefaultMaxRetries         = 3
)

func limitsOf(cb *discoveryv1.CircuitBreaker) limits {
	l := limits{maxConns: int64(cb.GetMaxConnections()), maxPending: int64(cb.GetMaxPendingRequests()),
		maxRequests: int64(cb.GetMaxRequests()), maxRetries: int64(cb.GetMaxRetries())}
	if l.maxConns == 0 {
		l.maxConns = DefaultMaxConnections
	}
	if l.maxPending == 0 {
		l.maxPending = DefaultMaxPendingRequests
	}
	if l.maxRequests == 0 {
		l.maxRequests = DefaultMaxRequests
	}
	if l.maxRetries == 0 {
		l.maxRetries = DefaultMaxRetries
	}
	return l
}

// DefaultIdleTimeout closes upstream connections idle this long when the
// traffic policy sets no idle_timeout.
const DefaultIdleTimeout = 60 * time.Second

// maxRetired bounds the transports kept after idle-timeout changes; older
// ones have their idle connections closed and are forgotten (their busy
// connections close when they next go idle).
const maxRetired = 4

// New returns a cluster with no endpoints.
func New(opts Options) *Cluster {
	c := &Cluster{name: opts.Name, http2: opts.HTTP2, dial: opts.Dial, now: opts.Now,
		states: map[netip.AddrPort]*epState{}, connFreed: make(chan struct{}), idle: DefaultIdleTimeout}
	if c.now == nil {
		c.now = time.Now
	}
	c.transport.Store(c.newTransport(c.idle))
	c.cur.Store(&snapshot{byAddr: map[string]*Endpoint{}, lb: &roundRobin{}, limits: limitsOf(nil), connect: 10 * time.Second})
	return c
}

// newTransport returns a transport whose connections close after idle
// without requests. For HTTP/2 the timeout is fixed when a connection is
// made, for HTTP/1.1 whenever it returns to the pool.
func (c *Cluster) newTransport(idle time.Duration) *http.Transport {
	t := &http.Transport{
		DialContext:           c.dialContext,
		MaxIdleConnsPerHost:   256,
		IdleConnTimeout:       idle,
		ResponseHeaderTimeout: 0,
		DisableCompression:    true,
		ForceAttemptHTTP2:     false,
	}
	var p http.Protocols
	if c.http2 {
		p.SetUnencryptedHTTP2(true)
		t.HTTP2 = &http.HTTP2Config{MaxConcurrentStreams: 1000, PingTimeout: 15 * time.Second, SendPingTimeout: 30 * time.Second}
	} else {
		p.SetHTTP1(true)
	}
	t.Protocols = &p
	return t
}

// Name is the cluster's telemetry name.
func (c *Cluster) Name() string { return c.name }

// Update replaces the endpoints and traffic policy. Per-endpoint state
// (outlier ejection, outstanding requests) survives for addresses that stay.
func (c *Cluster) Update(eps []Endpoint, tp *discoveryv1.TrafficPolicy) {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := &snapshot{byAddr: make(map[string]*Endpoint, len(eps)), lb: newBalancer(tp.GetLoadBalancer()),
		hashCk: tp.GetLoadBalancer().GetHashCookie(), limits: limitsOf(tp.GetCircuitBreaker()),
		od: tp.GetOutlierDetection(), connect: tp.GetConnectionPool().GetConnectTimeout().AsDuration(),
		maxPerConn: int64(tp.GetConnectionPool().GetMaxRequestsPerConnection())}
	if s.connect <= 0 {
		s.connect = 10 * time.Second
	}
	if old := c.cur.Load(); old != nil {
		if rr, ok := old.lb.(*roundRobin); ok {
			if _, still := s.lb.(*roundRobin); still {
				s.lb = rr // keep the rotation position
			}
		}
	}
	states := make(map[netip.AddrPort]*epState, len(eps))
	for i := range eps {
		e := eps[i]
		st := c.states[e.Addr]
		if st == nil {
			st = &epState{}
		}
		states[e.Addr] = st
		e.state = st
		e.addr = e.Addr.String()
		s.all = append(s.all, &e)
		s.byAddr[e.addr] = &e
	}
	c.states = states
	idle := tp.GetConnectionPool().GetIdleTimeout().AsDuration()
	if idle <= 0 {
		idle = DefaultIdleTimeout
	}
	if idle != c.idle {
		// Idle connections of the old transport close now; busy ones
		// finish their requests there.
		c.idle = idle
		old := c.transport.Swap(c.newTransport(idle))
		c.retired = append(c.retired, old)
		if len(c.retired) > maxRetired {
			c.retired[0].CloseIdleConnections()
			c.retired = c.retired[1:]
		}
	}
	c.cur.Store(s)
	// Drop connections to removed endpoints (and the retired transports'
	// connections that went idle since).
	c.transport.Load().CloseIdleConnections()
	for _, t := range c.retired {
		t.CloseIdleConnections()
	}
}

// IdleTimeout is the idle timeout of new upstream connections.
func (c *Cluster) IdleTimeout() time.Duration { return c.transport.Load().IdleConnTimeout }

// Endpoints returns the current endpoints (for admin dumps).
func (c *Cluster) Endpoints() []*Endpoint { return c.cur.Load().all }

// HashCookie returns the consistent-hash cookie settings, when the cluster
// hashes on a cookie.
func (c *Cluster) HashCookie() *discoveryv1.HashCookie { return c.cur.Load().hashCk }

// Pick chooses an available endpoint, avoiding those in tried when another
// is available (retries go elsewhere).
func (c *Cluster) Pick(in *HashInput, tried []*Endpoint) (*Endpoint, error) {
	s := c.cur.Load()
	avail := s.all
	if now := c.now(); now.UnixNano() < c.ejectedUntil.Load() {
		// Some endpoint may be ejected: filter (rare, so allocating is fine).
		avail = make([]*Endpoint, 0, len(s.all))
		for _, e := range s.all {
			if !e.state.ejected(now) {
				avail = append(avail, e)
			}
		}
	}
	if len(avail) == 0 {
		return nil, ErrNoHealthy
	}
	if len(tried) > 0 && len(avail) > 1 {
		fresh := avail[:0:0]
		for _, e := range avail {
			dup := false
			for _, t := range tried {
				if t.Addr == e.Addr {
					dup = true
					break
				}
			}
			if !dup {
				fresh = append(fresh, e)
			}
		}
		if len(fresh) > 0 {
			avail = fresh
		}
	}
	return s.lb.pick(avail, in), nil
}

// Admission is a request (or retry) counted against the circuit breaker's
// limits until Release. The zero value releases nothing.
type Admission struct{ n *atomic.Int64 }

// Release gives the admission back; calling it again does nothing. An
// Admission is released by one goroutine.
func (a *Admission) Release() {
	if a.n != nil {
		a.n.Add(-1)
		a.n = nil
	}
}

// Admit counts a request against max_requests and max_pending_requests.
// The admission must be released when the request is done.
func (c *Cluster) Admit() (Admission, error) {
	l := c.cur.Load().limits
	if c.requests.Add(1) > l.maxRequests {
		c.requests.Add(-1)
		c.overflows.Add(1)
		return Admission{}, fmt.Errorf("%w: max requests %d", ErrOverflow, l.maxRequests)
	}
	if c.pending.Load() >= l.maxPending {
		c.requests.Add(-1)
		c.overflows.Add(1)
		return Admission{}, fmt.Errorf("%w: max pending requests %d", ErrOverflow, l.maxPending)
	}
	return Admission{&c.requests}, nil
}

// AdmitRetry counts a retry against max_retries; ok is false when the
// retry budget is exhausted.
func (c *Cluster) AdmitRetry() (adm Admission, ok bool) {
	l := c.cur.Load().limits
	if c.retries.Add(1) > l.maxRetries {
		c.retries.Add(-1)
		c.overflows.Add(1)
		return Admission{}, false
	}
	return Admission{&c.retries}, true
}

// RoundTrip sends req to ep over the pooled connections: Do with req's
// context and body.
func (c *Cluster) RoundTrip(req *http.Request, ep *Endpoint) (*http.Response, error) {
	return c.Do(req.Context(), req, nil, ep)
}

// Do sends a shallow copy of req with ctx (and body, when not nil) to ep
// over the pooled connections. req.URL is rewritten to address the
// endpoint, and req.Header may gain "Connection: close" when the connection
// reaches max_requests_per_connection. The endpoint's outstanding count
// stays raised until the response body is closed.
func (c *Cluster) Do(ctx context.Context, req *http.Request, body io.ReadCloser, ep *Endpoint) (*http.Response, error) {
	req.URL.Scheme = "http"
	req.URL.Host = ep.hostPort()
	if req.Header == nil {
		req.Header = http.Header{}
	}
	ep.state.outstanding.Add(1)
	c.pending.Add(1)
	// One allocation holds the trace hooks and the response body wrapper.
	st := &roundTrip{c: c, maxPerConn: c.cur.Load().maxPerConn}
	st.trace.GotConn = st.gotConn
	r := req.WithContext(httptrace.WithClientTrace(ctx, &st.trace))
	if body != nil {
		r.Body, r.GetBody = body, nil
	}
	st.req = r
	resp, err := c.transport.Load().RoundTrip(r)
	st.connDone()
	if err != nil {
		ep.state.outstanding.Add(-1)
		return nil, err
	}
	if resp.StatusCode == http.StatusSwitchingProtocols {
		// An upgraded connection (WebSocket): the body is the raw
		// connection and must stay an io.ReadWriteCloser.
		ep.state.outstanding.Add(-1)
		return resp, nil
	}
	st.body = countedBody{ReadCloser: resp.Body, ep: ep}
	resp.Body = &st.body
	return resp, nil
}

// roundTrip is the state of one Do.
type roundTrip struct {
	c          *Cluster
	req        *http.Request
	maxPerConn int64
	got        atomic.Bool
	trace      httptrace.ClientTrace
	body       countedBody
}

// connDone ends the request's wait for a connection (pending).
func (st *roundTrip) connDone() {
	if st.got.CompareAndSwap(false, true) {
		st.c.pending.Add(-1)
	}
}

func (st *roundTrip) gotConn(info httptrace.GotConnInfo) {
	st.connDone()
	// GotConn runs on the RoundTrip goroutine before the request is
	// written, so asking for "Connection: close" here is in time (the
	// transport may have copied req, but the header map is shared).
	if tc, ok := info.Conn.(*trackedConn); ok && st.maxPerConn > 0 && !st.c.http2 && tc.requests.Add(1) >= st.maxPerConn {
		st.req.Close = true
		st.req.Header.Set("Connection", "close")
	}
}

type countedBody struct {
	io.ReadCloser
	ep     *Endpoint
	closed atomic.Bool
}

func (b *countedBody) Close() error {
	if b.closed.CompareAndSwap(false, true) {
		b.ep.state.outstanding.Add(-1)
	}
	return b.ReadCloser.Close()
}

func (c *Cluster) dialContext(ctx context.Context, _, addr string) (net.Conn, error) {
	s := c.cur.Load()
	ep := s.byAddr[addr]
	if ep == nil {
		return nil, &ConnectError{Err: fmt.Errorf("endpoint %s is gone", addr)}
	}
	ctx, cancel := context.WithTimeout(ctx, s.connect)
	defer cancel()
	if err := c.acquireConn(ctx, s.limits.maxConns); err != nil {
		return nil, &ConnectError{Endpoint: ep.Addr, Err: fmt.Errorf("%w: max connections: %w", ErrOverflow, err)}
	}
	conn, err := c.dial(ctx, ep)
	if err != nil {
		c.releaseConn()
		return nil, &ConnectError{Endpoint: ep.Addr, Err: err}
	}
	return &trackedConn{Conn: conn, c: c}, nil
}

func (c *Cluster) acquireConn(ctx context.Context, limit int64) error {
	for {
		c.connMu.Lock()
		if c.conns < limit {
			c.conns++
			c.connMu.Unlock()
			return nil
		}
		ch := c.connFreed
		c.connMu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// tryAcquireConn takes a connection slot if one is free.
func (c *Cluster) tryAcquireConn(limit int64) bool {
	c.connMu.Lock()
	defer c.connMu.Unlock()
	if c.conns >= limit {
		return false
	}
	c.conns++
	return true
}

func (c *Cluster) releaseConn() {
	c.connMu.Lock()
	c.conns--
	close(c.connFreed)
	c.connFreed = make(chan struct{})
	c.connMu.Unlock()
}

// Conns is the number of open upstream connections.
func (c *Cluster) Conns() int64 {
	c.connMu.Lock()
	defer c.connMu.Unlock()
	return c.conns
}

type trackedConn struct {
	net.Conn
	c        *Cluster
	once     sync.Once
	requests atomic.Int64
}

func (t *trackedConn) Close() error {
	t.once.Do(t.c.releaseConn)
	return t.Conn.Close()
}

// CloseWrite forwards half-close when the underlying connection has it.
func (t *trackedConn) CloseWrite() error {
	if cw, ok := t.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}

// Close releases pooled connections.
func (c *Cluster) Close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.transport.Load().CloseIdleConnections()
	for _, t := range c.retired {
		t.CloseIdleConnections()
	}
}

// Overflows counts circuit-breaker rejections.
func (c *Cluster) Overflows() int64 { return c.overflows.Load() }

// DialEndpoint opens a raw connection (for L4 passthrough) to an endpoint
// picked by the load balancer, trying another endpoint once on failure.
// The connection counts against max_connections until closed; at the
// limit the passthrough is refused at once (ErrOverflow), as a TCP proxy
// does, rather than queued like an HTTP request.
func (c *Cluster) DialEndpoint(ctx context.Context, in *HashInput) (_ *Endpoint, _ net.Conn, err error) {
	if limit := c.cur.Load().limits.maxConns; !c.tryAcquireConn(limit) {
		c.overflows.Add(1)
		return nil, nil, fmt.Errorf("%w: max connections %d", ErrOverflow, limit)
	}
	defer func() {
		if err != nil {
			c.releaseConn()
		}
	}()
	var tried []*Endpoint
	var lastErr error
	for range 2 {
		ep, err := c.Pick(in, tried)
		if err != nil {
			return nil, nil, err
		}
		tried = append(tried, ep)
		s := c.cur.Load()
		dctx, cancel := context.WithTimeout(ctx, s.connect)
		conn, err := c.dial(dctx, ep)
		cancel()
		if err == nil {
			c.Report(ep, 200, nil)
			return ep, &trackedConn{Conn: conn, c: c}, nil
		}
		lastErr = &ConnectError{Endpoint: ep.Addr, Err: err}
		if ctx.Err() != nil {
			// The client gave up: nothing learnt about the endpoint.
			return nil, nil, lastErr
		}
		c.Report(ep, 0, lastErr)
	}
	return nil, nil, lastErr
}
