// Package proxy is the waypoint's HTTP handler: for each request arriving
// through an HBONE tunnel it applies request authentication, authorization,
// local rate limiting and fault injection, selects the route and backend,
// applies the route's filters, and forwards with timeouts, retries and
// mirroring to a load-balanced endpoint, recording metrics, access logs and
// traces.
package proxy

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/http/httputil"
	"net/netip"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	discoveryv1 "github.com/amesh-dev/amesh/api/discovery/v1"
	"github.com/amesh-dev/amesh/waypoint/internal/authn"
	"github.com/amesh-dev/amesh/waypoint/internal/authz"
	"github.com/amesh-dev/amesh/waypoint/internal/catalog"
	"github.com/amesh-dev/amesh/waypoint/internal/fault"
	"github.com/amesh-dev/amesh/waypoint/internal/filter"
	"github.com/amesh-dev/amesh/waypoint/internal/route"
	"github.com/amesh-dev/amesh/waypoint/internal/telemetry"
	"github.com/amesh-dev/amesh/waypoint/internal/upstream"
	"go.opentelemetry.io/otel/trace"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// ConnInfo describes the tunnel a request arrived on.
type ConnInfo struct {
	// Peer is the verified mTLS identity of the HBONE client
	// ("spiffe://..."); empty when there is none.
	Peer string
	// Source is the original client address: the tunnel peer's (see the
	// waypoint app's sourceOf).
	Source netip.Addr
	// Target is the tunnel's :authority, the address the client dialled
	// (a service VIP and port).
	Target netip.AddrPort

	srcOnce sync.Once
	src     string
}

// sourceString is Source.String(), computed once per tunnel.
func (ci *ConnInfo) sourceString() string {
	ci.srcOnce.Do(func() { ci.src = ci.Source.String() })
	return ci.src
}

type connKey struct{}

// WithConn returns ctx carrying ci.
func WithConn(ctx context.Context, ci *ConnInfo) context.Context {
	return context.WithValue(ctx, connKey{}, ci)
}

func connFrom(ctx context.Context) *ConnInfo {
	ci, _ := ctx.Value(connKey{}).(*ConnInfo)
	if ci == nil {
		return &ConnInfo{}
	}
	return ci
}

// Options configure a Proxy.
type Options struct {
	Catalog *catalog.Catalog
	Metrics *telemetry.Metrics
	// Tracer may be nil (no trace propagation).
	Tracer *telemetry.Tracer
	// AccessLog receives one entry per request; nil disables it.
	AccessLog *zap.Logger
	Logger    *zap.Logger
	// ClusterID labels metrics (source_cluster, destination_cluster).
	ClusterID string
	// MaxReplayBytes is how much of a request body is kept for retries and
	// mirrors (default 64 KiB); larger bodies are neither retried nor
	// mirrored.
	MaxReplayBytes int
	// MaxMirrors bounds concurrent mirrored requests (default 256); beyond
	// it mirrors are dropped.
	MaxMirrors int
	// RequestBodyIdleTimeout bounds how long a request waits for the
	// client's next body bytes, while nothing is sent to the client
	// either: then the request ends with 408 (flag SI) or, once its
	// response has started, a reset. Default DefaultRequestBodyIdleTimeout;
	// negative: none.
	RequestBodyIdleTimeout time.Duration
}

// Proxy is the HTTP handler. Safe for concurrent use.
type Proxy struct {
	cat       *catalog.Catalog
	metrics   *telemetry.Metrics
	tracer    *telemetry.Tracer
	access    *zap.Logger
	log       *zap.Logger
	clusterID string
	maxReplay int
	bodyIdle  time.Duration
	mirrors   chan struct{}
	mirrorWG  sync.WaitGroup
	mirrorMu  sync.Mutex
	// mirrorsShut is set by WaitMirrors: no mirror starts after it.
	mirrorsShut bool
	rp          *httputil.ReverseProxy
}

// New returns a proxy.
func New(opts Options) *Proxy {
	p := &Proxy{cat: opts.Catalog, metrics: opts.Metrics, tracer: opts.Tracer, access: opts.AccessLog,
		log: opts.Logger, clusterID: opts.ClusterID, maxReplay: opts.MaxReplayBytes}
	if p.log == nil {
		p.log = zap.NewNop()
	}
	if p.maxReplay <= 0 {
		p.maxReplay = 64 << 10
	}
	switch p.bodyIdle = opts.RequestBodyIdleTimeout; {
	case p.bodyIdle == 0:
		p.bodyIdle = DefaultRequestBodyIdleTimeout
	case p.bodyIdle < 0:
		p.bodyIdle = 0
	}
	n := opts.MaxMirrors
	if n <= 0 {
		n = 256
	}
	p.mirrors = make(chan struct{}, n)
	p.rp = &httputil.ReverseProxy{
		Rewrite:        p.rewrite,
		Transport:      roundTripper{p},
		ModifyResponse: p.modifyResponse,
		ErrorHandler:   p.errorHandler,
		ErrorLog:       zap.NewStdLog(p.log.Named("reverseproxy")),
		BufferPool:     bufferPool{},
	}
	return p
}

// WaitMirrors waits for in-flight mirrored requests (drain); mirrors that
// would start afterwards are dropped.
func (p *Proxy) WaitMirrors() {
	p.mirrorMu.Lock()
	p.mirrorsShut = true
	p.mirrorMu.Unlock()
	p.mirrorWG.Wait()
}

type bufferPool struct{}

var buffers = sync.Pool{New: func() any { b := make([]byte, 16<<10); return &b }}

func (bufferPool) Get() []byte  { return *(buffers.Get().(*[]byte)) }
func (bufferPool) Put(b []byte) { buffers.Put(&b) }

// exchange is the per-request state shared by the handler, the transport
// and the response hooks. It is also the request's context (carrying
// itself under exKey), and holds the per-request helpers, so that a
// request costs one allocation for all of them.
type exchange struct {
	context.Context
	start     time.Time
	ci        *ConnInfo
	target    *catalog.Target
	grpc      bool
	rule      *route.Rule
	backend   *discoveryv1.BackendRef
	cluster   *upstream.Cluster
	endpoint  *upstream.Endpoint
	flags     []string
	details   string
	respMods  []*discoveryv1.HeaderModifier
	setCookie *http.Cookie
	hash      upstream.HashInput
	body      *replay
	resp      *http.Response
	span      trace.Span
	attempts  int
	reqID     string
	reqPrin   string
	origPath  string // as the client sent it, for the access log
	origHost  string

	rw      recorder
	reqBody countingBody
	watch   bodyWatch
	attrs   authz.Attributes
	tried   [2]*upstream.Endpoint
	// Circuit-breaker admissions and the attempt's cancel, released when
	// the response body closes (done) or the round trip fails.
	adm      upstream.Admission
	retryAdm []upstream.Admission
	cancel   context.CancelFunc
	done     doneBody
	log      accessEntry
}

func (ex *exchange) flag(f string) {
	if !slices.Contains(ex.flags, f) {
		ex.flags = append(ex.flags, f)
	}
}

type exKey struct{}

// Value makes the exchange the request context's innermost value.
func (ex *exchange) Value(k any) any {
	if _, ok := k.(exKey); ok {
		return ex
	}
	return ex.Context.Value(k)
}

func exFrom(ctx context.Context) *exchange {
	ex, _ := ctx.Value(exKey{}).(*exchange)
	return ex
}

// release gives back the circuit-breaker admissions.
func (ex *exchange) release() {
	ex.adm.Release()
	for i := range ex.retryAdm {
		ex.retryAdm[i].Release()
	}
}

// spanName avoids building "waypoint <method>" for the usual methods.
func spanName(method string) string {
	switch method {
	case http.MethodGet:
		return "waypoint GET"
	case http.MethodPost:
		return "waypoint POST"
	case http.MethodPut:
		return "waypoint PUT"
	case http.MethodDelete:
		return "waypoint DELETE"
	case http.MethodHead:
		return "waypoint HEAD"
	case http.MethodPatch:
		return "waypoint PATCH"
	case http.MethodOptions:
		return "waypoint OPTIONS"
	}
	return "waypoint " + method
}

// ServeHTTP handles one request.
func (p *Proxy) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	ex := &exchange{Context: r.Context(), start: time.Now(), grpc: route.IsGRPC(r), origPath: r.URL.RequestURI(), origHost: r.Host}
	ex.ci = connFrom(ex.Context)
	ex.rw.ResponseWriter = w
	rw := &ex.rw
	if r.Body != nil && r.Body != http.NoBody {
		ex.reqBody.ReadCloser = r.Body
		r.Body = &ex.reqBody
		if p.bodyIdle > 0 {
			ex.watch.timeout, ex.watch.rc = p.bodyIdle, http.NewResponseController(w)
			ex.reqBody.watch, ex.rw.watch = &ex.watch, &ex.watch
		}
	}
	var ctx context.Context = ex
	if p.tracer != nil {
		ctx, ex.span = p.tracer.Start(ctx, spanName(r.Method), r.Header)
	}
	r = r.WithContext(ctx)
	defer func() {
		if ex.reqBody.watch != nil {
			ex.watch.stop()
		}
		p.finish(ex, rw, r, ex.reqBody.n.Load())
	}()

	ex.reqID = r.Header.Get("X-Request-Id")
	if ex.reqID == "" {
		ex.reqID = newRequestID()
		r.Header.Set("X-Request-Id", ex.reqID)
	}
	ex.target = p.cat.Target(ex.ci.Target)
	if ex.target == nil {
		ex.flag("NR")
		p.local(rw, r, ex, http.StatusServiceUnavailable, "no service at "+ex.ci.Target.String())
		return
	}
	np, err := route.Normalize(r.URL.EscapedPath())
	if err != nil {
		p.local(rw, r, ex, http.StatusBadRequest, err.Error())
		return
	}
	if np != r.URL.EscapedPath() {
		dec, err := url.PathUnescape(np)
		if err != nil {
			p.local(rw, r, ex, http.StatusBadRequest, "bad request path")
			return
		}
		r.URL.Path, r.URL.RawPath = dec, np
	}
	t := ex.target

	// Request authentication (JWT).
	id, err := t.Authn.Authenticate(ctx, r)
	if err != nil {
		ex.details = "jwt_authn_access_denied"
		rw.Header().Set("Www-Authenticate", authn.Challenge(r, err))
		p.local(rw, r, ex, http.StatusUnauthorized, "Jwt verification fails: "+err.Error())
		return
	}
	// Authorization.
	attrs := p.attributes(ex, r, id)
	if d := t.Authz.Evaluate(attrs); !d.Allow {
		ex.details = "rbac_access_denied_matched_policy[" + d.Policy + "]"
		p.local(rw, r, ex, http.StatusForbidden, "RBAC: access denied")
		return
	}
	if id != nil {
		ex.reqPrin = id.Principal
	}
	// Local rate limit. One that cannot be enforced refuses everything
	// (fail closed; the catalog logged why).
	if t.LimiterErr != nil {
		ex.flag("RLSE")
		ex.details = "local_rate_limit_invalid_config"
		p.local(rw, r, ex, http.StatusServiceUnavailable, "local_rate_limit_invalid_config")
		return
	}
	if t.Limiter != nil && !t.Limiter.Allow() {
		ex.flag("RL")
		// Whole seconds to the next fill, rounded up (RFC 9110 delay-seconds).
		ra := (t.Limiter.RetryAfter() + time.Second - 1) / time.Second
		rw.Header().Set("Retry-After", strconv.FormatInt(int64(max(ra, 1)), 10))
		p.local(rw, r, ex, http.StatusTooManyRequests, "local_rate_limited")
		return
	}
	// Fault injection.
	if t.Fault != nil {
		d := fault.Decide(t.Fault, nil)
		if d.Delay > 0 {
			ex.flag("DI")
			select {
			case <-time.After(d.Delay):
			case <-ctx.Done():
				ex.flag("DC")
				return
			}
		}
		if d.Abort {
			ex.flag("FI")
			if ex.grpc && d.GRPCStatus != 0 {
				p.grpcLocal(rw, ex, int(d.GRPCStatus), "fault filter abort")
				return
			}
			p.local(rw, r, ex, d.HTTPStatus, "fault filter abort")
			return
		}
	}
	// Routing.
	m, ok := t.Routes.Lookup(r)
	if !ok {
		ex.flag("NR")
		p.local(rw, r, ex, http.StatusNotFound, "route_not_found")
		return
	}
	ex.rule = m.Rule
	var mirrors []*discoveryv1.RequestMirror
	for _, f := range m.Rule.Filters {
		switch k := f.GetKind().(type) {
		case *discoveryv1.HTTPFilter_RequestRedirect:
			loc, code := filter.Redirect(r, k.RequestRedirect, "http", t.Port, r.URL.Path, m.Prefix)
			rw.Header().Set("Location", loc)
			rw.WriteHeader(code)
			return
		case *discoveryv1.HTTPFilter_RequestHeaderModifier:
			filter.ModifyHeaders(r.Header, k.RequestHeaderModifier, &r.Host)
		case *discoveryv1.HTTPFilter_ResponseHeaderModifier:
			ex.respMods = append(ex.respMods, k.ResponseHeaderModifier)
		case *discoveryv1.HTTPFilter_UrlRewrite:
			if h := k.UrlRewrite.GetHostname(); h != "" {
				r.Host = h
			}
			if pm := k.UrlRewrite.GetPath(); pm != nil {
				r.URL.Path = filter.ReplacePath(r.URL.Path, m.Prefix, pm)
				r.URL.RawPath = ""
			}
		case *discoveryv1.HTTPFilter_RequestMirror:
			mirrors = append(mirrors, k.RequestMirror)
		}
	}
	b := pickBackend(m.Rule.Backends)
	if b == nil || b.GetService() == "" {
		p.local(rw, r, ex, http.StatusInternalServerError, "no valid backend")
		return
	}
	ex.backend = b
	for _, f := range b.GetFilters() {
		switch k := f.GetKind().(type) {
		case *discoveryv1.HTTPFilter_RequestHeaderModifier:
			filter.ModifyHeaders(r.Header, k.RequestHeaderModifier, &r.Host)
		case *discoveryv1.HTTPFilter_ResponseHeaderModifier:
			ex.respMods = append(ex.respMods, k.ResponseHeaderModifier)
		case *discoveryv1.HTTPFilter_RequestMirror:
			mirrors = append(mirrors, k.RequestMirror)
		}
	}
	cl, err := p.cat.Cluster(b.GetService(), b.GetPort())
	if err != nil {
		p.local(rw, r, ex, http.StatusInternalServerError, err.Error())
		return
	}
	ex.cluster = cl
	ex.hash = upstream.HashInput{Header: r.Header, SourceIP: ex.ci.Source}
	if hc := cl.HashCookie(); hc != nil {
		if c, err := r.Cookie(hc.GetName()); err == nil {
			ex.hash.Cookie = c.Value
		} else if hc.GetTtl().AsDuration() > 0 {
			ex.hash.Cookie = newRequestID()
			path := hc.GetPath()
			if path == "" {
				path = "/"
			}
			ex.setCookie = &http.Cookie{Name: hc.GetName(), Value: ex.hash.Cookie, Path: path,
				MaxAge: int(hc.GetTtl().AsDuration().Seconds()), HttpOnly: true}
		}
	}
	if r.Body != nil && r.Body != http.NoBody {
		ex.body = newReplay(r.Body, p.maxReplay)
	}
	if len(mirrors) > 0 {
		p.mirror(r, ex, mirrors)
	}
	if m.Rule.RequestTimeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, m.Rule.RequestTimeout)
		defer cancel()
		r = r.WithContext(ctx)
	}
	if ex.body != nil {
		// The upstream may answer while the body is still coming (HTTP/2
		// always allows it): the HTTP/1.1 server must then not consume the
		// rest of the body itself before writing the response headers.
		rc := ex.watch.rc
		if rc == nil {
			rc = http.NewResponseController(w)
		}
		_ = rc.EnableFullDuplex()
	}
	p.rp.ServeHTTP(rw, r)
}

// newRequestID returns 32 random hex digits. The ID correlates logs and
// traces; it needs to be unique, not unpredictable, so it comes from the
// runtime's per-thread generator rather than the kernel's.
func newRequestID() string {
	var b [16]byte
	binary.LittleEndian.PutUint64(b[:8], rand.Uint64())
	binary.LittleEndian.PutUint64(b[8:], rand.Uint64())
	var out [32]byte
	hex.Encode(out[:], b[:])
	return string(out[:])
}

// pickBackend draws a backend by weight.
func pickBackend(bs []*discoveryv1.BackendRef) *discoveryv1.BackendRef {
	switch len(bs) {
	case 0:
		return nil
	case 1:
		return bs[0]
	}
	var total uint64
	for _, b := range bs {
		total += uint64(b.GetWeight())
	}
	if total == 0 {
		return nil
	}
	n := rand.Uint64N(total)
	for _, b := range bs {
		if n < uint64(b.GetWeight()) {
			return b
		}
		n -= uint64(b.GetWeight())
	}
	return bs[len(bs)-1]
}

// peerNamespace extracts the namespace of a SPIFFE ID
// "spiffe://<td>/ns/<ns>/sa/<sa>".
func peerNamespace(peer string) (string, bool) {
	_, rest, ok := strings.Cut(peer, "/ns/")
	if !ok {
		return "", false
	}
	ns, _, ok := strings.Cut(rest, "/sa/")
	return ns, ok && ns != ""
}

func (p *Proxy) attributes(ex *exchange, r *http.Request, id *authn.Identity) *authz.Attributes {
	a := &ex.attrs
	*a = authz.Attributes{SourceIP: ex.ci.Source, Port: ex.target.Port, Host: r.Host,
		Method: r.Method, Path: r.URL.Path, Header: r.Header}
	if pr, ok := strings.CutPrefix(ex.ci.Peer, "spiffe://"); ok {
		a.Principal = pr
		a.Namespace, _ = peerNamespace(ex.ci.Peer)
	}
	if id != nil {
		a.RequestPrincipal, a.Audiences, a.Claims = id.Principal, id.Audiences, id.Claims
	}
	return a
}

func (p *Proxy) rewrite(pr *httputil.ProxyRequest) {
	in, out := pr.In, pr.Out
	// Rewrite gets a request without X-Forwarded-For; the client's comes
	// back with the original source appended.
	xff := in.Header["X-Forwarded-For"]
	vals := make([]string, 2) // one allocation for both headers' values
	vals[1] = "http"
	out.Header["X-Forwarded-Proto"] = vals[1:2:2]
	if ex := exFrom(in.Context()); ex != nil && ex.ci.Source.IsValid() {
		vals[0] = ex.ci.sourceString()
		if len(xff) > 0 {
			vals[0] = strings.Join(xff, ", ") + ", " + vals[0]
		}
		out.Header["X-Forwarded-For"] = vals[0:1:1]
	} else if len(xff) > 0 {
		out.Header["X-Forwarded-For"] = slices.Clone(xff)
	}
	if p.tracer != nil {
		p.tracer.Inject(out.Context(), out.Header)
	}
	out.Host = in.Host
}

type roundTripper struct{ p *Proxy }

var errNoExchange = errors.New("proxy: request without exchange state")

// RoundTrip sends one upstream request with retries.
func (rt roundTripper) RoundTrip(out *http.Request) (*http.Response, error) {
	ex := exFrom(out.Context())
	if ex == nil {
		return nil, errNoExchange
	}
	var err error
	if ex.adm, err = ex.cluster.Admit(); err != nil {
		return nil, err
	}
	ctx := out.Context()
	rule := ex.rule
	retries := 0
	var codes []uint32
	backoff := 25 * time.Millisecond
	if rp := rule.Retry; rp != nil {
		retries, codes = int(rp.GetAttempts()), rp.GetCodes()
		if d := rp.GetBackoff().AsDuration(); d > 0 {
			backoff = d
		}
	}
	tried := ex.tried[:0]
	for attempt := 0; ; attempt++ {
		ex.attempts = attempt + 1
		ep, err := ex.cluster.Pick(&ex.hash, tried)
		if err != nil {
			ex.release()
			return nil, err
		}
		tried = append(tried, ep)
		actx, cancel := attemptContext(ctx, rule.BackendTimeout, attempt < retries)
		// out is the reverse proxy's private copy; Do sends a shallow copy
		// of it per attempt (the transport may still touch a failed one),
		// each reading the body through its own replay view.
		var view *replayView
		var body io.ReadCloser
		if ex.body != nil {
			if view, err = ex.body.next(); err != nil {
				cancel()
				ex.release()
				return nil, err
			}
			body = view
		}
		resp, err := ex.cluster.Do(actx, out, body, ep)
		status := 0
		if resp != nil {
			status = resp.StatusCode
		}
		// An attempt that failed because the downstream client went away
		// (cancelled the request, broke its upload) says nothing about the
		// endpoint: not reported to outlier detection, not retried.
		clientGone := err != nil && (errors.Is(ctx.Err(), context.Canceled) || ex.body != nil && ex.body.clientFailed())
		if !clientGone {
			ex.cluster.Report(ep, status, err)
		}
		retryable := !clientGone && attempt < retries && ctx.Err() == nil &&
			(err != nil && !errors.Is(err, upstream.ErrOverflow) || slices.Contains(codes, uint32(status))) &&
			(ex.body == nil || ex.body.replayable())
		if retryable {
			if adm, ok := ex.cluster.AdmitRetry(); ok {
				ex.retryAdm = append(ex.retryAdm, adm)
			} else {
				ex.flag("URX")
				retryable = false
			}
		}
		// The retry is decided with the attempt's view killed in the same
		// step: from here on the abandoned transport takes nothing more
		// from the client, so the next attempt replays the whole body.
		if retryable && ex.body != nil && !ex.body.retire(view) {
			last := len(ex.retryAdm) - 1
			ex.retryAdm[last].Release()
			ex.retryAdm = ex.retryAdm[:last]
			retryable = false
		}
		if !retryable {
			if err != nil {
				cancel()
				ex.release()
				if errors.Is(err, context.DeadlineExceeded) && ctx.Err() == nil {
					// The per-try timeout fired.
					return nil, fmt.Errorf("backend request timeout: %w", err)
				}
				return nil, err
			}
			if attempt > 0 && slices.Contains(codes, uint32(status)) {
				ex.flag("URX")
			}
			ex.endpoint = ep
			ex.resp = resp
			if resp.StatusCode == http.StatusSwitchingProtocols {
				// Upgraded (WebSocket): the request is over for the
				// circuit breaker; the connection lives on its own.
				ex.release()
				return resp, nil
			}
			ex.cancel = cancel
			ex.done.ReadCloser, ex.done.ex = resp.Body, ex
			resp.Body = &ex.done
			return resp, nil
		}
		if resp != nil {
			// Drain a little of the failure's body so that an HTTP/1.1
			// connection can be reused, but not for long: cancelling the
			// attempt ends a body that trickles.
			stop := time.AfterFunc(retryDrainTime, cancel)
			_, _ = io.CopyN(io.Discard, resp.Body, retryDrainBytes)
			stop.Stop()
			resp.Body.Close()
		}
		cancel()
		// Exponential backoff with full jitter, capped at 10× the base.
		d := min(backoff<<attempt, 10*backoff)
		d = time.Duration(rand.Int64N(int64(d)) + 1)
		t := time.NewTimer(d)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			ex.release()
			return nil, ctx.Err()
		}
	}
}

// A failed attempt's response body is drained before a retry for at most
// retryDrainBytes and retryDrainTime.
const (
	retryDrainBytes = 64 << 10
	retryDrainTime  = 100 * time.Millisecond
)

func noCancel() {}

// attemptContext bounds one attempt by the backend request timeout, if any.
// An attempt that may be retried can be cancelled on its own (its response
// body's drain is bounded in time). The cancel function is handed to the
// response body, so it is returned rather than deferred.
func attemptContext(ctx context.Context, d time.Duration, retriable bool) (context.Context, context.CancelFunc) {
	switch {
	case d > 0:
		return context.WithTimeout(ctx, d)
	case retriable:
		return context.WithCancel(ctx)
	}
	return ctx, noCancel
}

// doneBody ends the exchange's upstream attempt when the response body is
// closed: the attempt's context and the circuit-breaker admissions.
type doneBody struct {
	io.ReadCloser
	ex   *exchange
	once sync.Once
}

func (b *doneBody) Close() error {
	err := b.ReadCloser.Close()
	b.once.Do(func() {
		b.ex.cancel()
		b.ex.release()
	})
	return err
}

func (p *Proxy) modifyResponse(resp *http.Response) error {
	ex := exFrom(resp.Request.Context())
	if ex == nil {
		return nil
	}
	for _, m := range ex.respMods {
		filter.ModifyHeaders(resp.Header, m, nil)
	}
	if ex.setCookie != nil {
		resp.Header.Add("Set-Cookie", ex.setCookie.String())
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		// Hand the header values to the client's response as they are,
		// instead of the reverse proxy copying them one by one into new
		// slices. Content-Type stays (the reverse proxy reads it to flush
		// server-sent events at once, and copies it); an upgrade's headers
		// stay for the reverse proxy's upgrade handling.
		dst := ex.rw.Header()
		for k, vs := range resp.Header {
			if k == "Content-Type" {
				continue
			}
			if prev, ok := dst[k]; ok {
				dst[k] = append(prev, vs...)
			} else {
				dst[k] = vs
			}
			delete(resp.Header, k)
		}
	}
	return nil
}

func (p *Proxy) errorHandler(w http.ResponseWriter, r *http.Request, err error) {
	ex := exFrom(r.Context())
	code := http.StatusServiceUnavailable
	var ce *upstream.ConnectError
	switch {
	case ex.reqBody.watch != nil && ex.watch.timedOut():
		ex.flag("SI")
		ex.details = "stream_idle_timeout"
		p.log.Debug("request body idle", zap.Error(err), zap.String("request_id", ex.reqID))
		p.local(w, r, ex, http.StatusRequestTimeout, "stream timeout")
		return
	case errors.Is(err, upstream.ErrOverflow):
		ex.flag("UO")
	case errors.Is(err, upstream.ErrNoHealthy):
		ex.flag("UH")
	case errors.Is(err, context.DeadlineExceeded):
		ex.flag("UT")
		code = http.StatusGatewayTimeout
	case errors.As(err, &ce):
		ex.flag("UF")
	case errors.Is(err, context.Canceled):
		ex.flag("DC")
		return // the client went away
	default:
		ex.flag("UC")
	}
	if ex.attempts > 1 {
		ex.flag("URX")
	}
	msg := "upstream connect error or disconnect/reset before headers"
	switch {
	case code == http.StatusGatewayTimeout:
		msg = "upstream request timeout"
	case errors.Is(err, upstream.ErrOverflow):
		msg = "upstream overflow"
	case errors.Is(err, upstream.ErrNoHealthy):
		msg = "no healthy upstream"
	}
	p.log.Debug("upstream error", zap.Error(err), zap.String("request_id", ex.reqID))
	p.local(w, r, ex, code, msg)
}

// grpcCode maps a local HTTP status to a gRPC status (as Envoy does).
func grpcCode(status int) int {
	switch status {
	case 400:
		return 13
	case 401:
		return 16
	case 403:
		return 7
	case 404:
		return 12
	case 429, 502, 503, 504:
		return 14
	}
	return 2
}

// local writes a locally generated reply; gRPC requests get a trailers-only
// gRPC error instead.
func (p *Proxy) local(w http.ResponseWriter, r *http.Request, ex *exchange, code int, msg string) {
	if ex.grpc {
		p.grpcLocal(w, ex, grpcCode(code), msg)
		return
	}
	w.Header().Set("Content-Type", "text/plain")
	w.Header().Set("Content-Length", strconv.Itoa(len(msg)))
	w.WriteHeader(code)
	if r.Method != http.MethodHead {
		_, _ = io.WriteString(w, msg)
	}
}

func (p *Proxy) grpcLocal(w http.ResponseWriter, _ *exchange, status int, msg string) {
	h := w.Header()
	h.Set("Content-Type", "application/grpc")
	h.Set("Grpc-Status", strconv.Itoa(status))
	h.Set("Grpc-Message", url.PathEscape(msg))
	w.WriteHeader(http.StatusOK)
}

// mirror sends fire-and-forget copies of r. A body of known length is read
// first (it is small: at most the replay limit) and shared; a body of
// unknown length (gRPC, chunked uploads) is mirrored once the main request
// has read all of it, if it fits the replay limit. Larger bodies, and bodies
// the upstream never reads to the end, are not mirrored.
func (p *Proxy) mirror(r *http.Request, ex *exchange, ms []*discoveryv1.RequestMirror) {
	hasBody := r.Body != nil && r.Body != http.NoBody
	if hasBody && r.ContentLength > int64(p.maxReplay) {
		return
	}
	type target struct {
		req *http.Request
		cl  *upstream.Cluster
	}
	var targets []target
	for _, m := range ms {
		if pct := m.GetPercent(); pct < 100 && rand.Float64()*100 >= pct {
			continue
		}
		be := m.GetBackend()
		cl, err := p.cat.Cluster(be.GetService(), be.GetPort())
		if err != nil {
			continue
		}
		req := r.Clone(context.WithoutCancel(r.Context()))
		req.RequestURI = ""
		req.Host = r.Host
		req.Body = http.NoBody
		targets = append(targets, target{req, cl})
	}
	if len(targets) == 0 {
		return
	}
	hash := ex.hash
	launch := func(body []byte) {
		for _, tg := range targets {
			if body != nil {
				tg.req.Body = io.NopCloser(bytes.NewReader(body))
				tg.req.ContentLength = int64(len(body))
				tg.req.TransferEncoding = nil
			}
			p.sendMirror(tg.req, tg.cl, hash)
		}
	}
	switch {
	case !hasBody:
		launch(nil)
	case r.ContentLength < 0:
		ex.body.onEOF(launch)
	default:
		// Read the (small, known-size) body once; the main request and the
		// mirrors then use copies.
		v, err := ex.body.next()
		if err != nil {
			return
		}
		b, err := io.ReadAll(io.LimitReader(v, int64(p.maxReplay)+1))
		if err != nil || len(b) > p.maxReplay {
			return
		}
		ex.body = newReplay(io.NopCloser(bytes.NewReader(b)), p.maxReplay)
		launch(b)
	}
}

// sendMirror sends one mirrored request in the background, unless too many
// are in flight already (then it is dropped).
func (p *Proxy) sendMirror(req *http.Request, cl *upstream.Cluster, hash upstream.HashInput) {
	select {
	case p.mirrors <- struct{}{}:
	default:
		return
	}
	p.mirrorMu.Lock()
	if p.mirrorsShut {
		p.mirrorMu.Unlock()
		<-p.mirrors
		return
	}
	p.mirrorWG.Add(1)
	p.mirrorMu.Unlock()
	go func() {
		defer p.mirrorWG.Done()
		defer func() { <-p.mirrors }()
		ctx, cancel := context.WithTimeout(req.Context(), 30*time.Second)
		defer cancel()
		req := req.WithContext(ctx)
		ep, err := cl.Pick(&hash, nil)
		if err != nil {
			return
		}
		resp, err := cl.RoundTrip(req, ep)
		if err != nil {
			return
		}
		_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<20))
		resp.Body.Close()
	}()
}

// recorder captures the status and body size written to the client.
type recorder struct {
	http.ResponseWriter
	code  int
	bytes int64
	watch *bodyWatch // told of writes; nil without a body idle timeout
}

func (w *recorder) WriteHeader(code int) {
	if w.code == 0 && code >= 200 {
		w.code = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *recorder) Write(b []byte) (int, error) {
	if w.code == 0 {
		w.code = http.StatusOK
	}
	n, err := w.ResponseWriter.Write(b)
	w.bytes += int64(n)
	if w.watch != nil && n > 0 {
		w.watch.touch()
	}
	return n, err
}

// Unwrap lets http.ResponseController reach Flush and friends.
func (w *recorder) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// Flush is used by the reverse proxy for streaming.
func (w *recorder) Flush() {
	if f, ok := w.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

// countingBody counts the request body bytes read; the transport may still
// be reading when the handler finishes, hence the atomic.
type countingBody struct {
	io.ReadCloser
	n     atomic.Int64
	watch *bodyWatch // nil: no idle timeout
}

func (b *countingBody) Read(p []byte) (int, error) {
	if b.watch == nil {
		n, err := b.ReadCloser.Read(p)
		b.n.Add(int64(n))
		return n, err
	}
	if err := b.watch.enter(); err != nil {
		return 0, err
	}
	n, err := b.ReadCloser.Read(p)
	b.n.Add(int64(n))
	return n, b.watch.exit(err)
}

func headerSize(h http.Header) int64 {
	var n int64
	for k, vs := range h {
		for _, v := range vs {
			n += int64(len(k) + len(v) + 4)
		}
	}
	return n
}

// finish records metrics, the access log and the span.
func (p *Proxy) finish(ex *exchange, rw *recorder, r *http.Request, bodyIn int64) {
	end := time.Now()
	code := rw.code
	if code == 0 {
		code = http.StatusOK
		if slices.Contains(ex.flags, "DC") {
			code = 0
		}
	}
	flags := "-"
	if len(ex.flags) > 0 {
		flags = strings.Join(ex.flags, ",")
	}
	grpcStatus := ""
	if ex.grpc {
		grpcStatus = rw.Header().Get("Grpc-Status")
		if ex.resp != nil {
			if s := ex.resp.Trailer.Get("Grpc-Status"); s != "" {
				grpcStatus = s
			} else if s := ex.resp.Header.Get("Grpc-Status"); s != "" {
				grpcStatus = s
			}
		}
		grpcStatus = grpcStatusLabel(grpcStatus)
	}
	if p.metrics != nil {
		var l telemetry.Labels
		p.labels(&l, ex, code, grpcStatus, flags)
		reqBytes := headerSize(r.Header) + bodyIn
		respBytes := headerSize(rw.Header()) + rw.bytes
		p.metrics.Request(&l, float64(end.Sub(ex.start).Microseconds())/1000, reqBytes, respBytes)
	}
	if ex.span != nil {
		telemetry.End(ex.span, code, flags, end)
	}
	if p.access != nil {
		if ce := p.access.Check(zap.InfoLevel, "request"); ce != nil {
			ex.log = accessEntry{ex: ex, r: r, end: end, code: code, grpcStatus: grpcStatus, flags: flags, bodyIn: bodyIn}
			ce.Write(zap.Inline(&ex.log))
		}
	}
}

// accessEntry is one access-log record, encoded field by field (a
// []zap.Field of two dozen fields would be built and copied to the heap on
// every request).
type accessEntry struct {
	ex         *exchange
	r          *http.Request
	end        time.Time
	code       int
	grpcStatus string
	flags      string
	bodyIn     int64
}

func (a *accessEntry) MarshalLogObject(enc zapcore.ObjectEncoder) error {
	ex, r := a.ex, a.r
	upstreamHost, clusterName, routeName := "-", "-", "-"
	if ex.endpoint != nil {
		upstreamHost = ex.endpoint.HostPort()
	}
	if ex.cluster != nil {
		clusterName = ex.cluster.Name()
	}
	if ex.rule != nil {
		routeName = ex.rule.ID
	}
	var traceID [32]byte
	tid := traceID[:0]
	if ex.span != nil {
		if sc := ex.span.SpanContext(); sc.HasTraceID() {
			id := sc.TraceID()
			tid = hex.AppendEncode(tid, id[:])
		}
	}
	enc.AddTime("start_time", ex.start)
	enc.AddString("method", r.Method)
	enc.AddString("path", ex.origPath)
	enc.AddString("upstream_path", r.URL.RequestURI())
	enc.AddString("protocol", r.Proto)
	enc.AddInt64("response_code", int64(a.code))
	enc.AddString("grpc_status", a.grpcStatus)
	enc.AddString("response_flags", a.flags)
	enc.AddString("response_code_details", ex.details)
	enc.AddInt64("bytes_received", a.bodyIn)
	enc.AddInt64("bytes_sent", ex.rw.bytes)
	enc.AddFloat64("duration_ms", float64(a.end.Sub(ex.start).Microseconds())/1000)
	enc.AddString("upstream_host", upstreamHost)
	enc.AddString("upstream_cluster", clusterName)
	enc.AddString("route_name", routeName)
	enc.AddInt64("attempts", int64(ex.attempts))
	enc.AddString("authority", ex.origHost)
	enc.AddString("x_request_id", ex.reqID)
	enc.AddByteString("trace_id", tid)
	enc.AddString("downstream_peer_principal", ex.ci.Peer)
	enc.AddString("request_principal", ex.reqPrin)
	enc.AddString("downstream_remote_address", ex.ci.sourceString())
	enc.AddString("user_agent", r.UserAgent())
	return nil
}

// grpcStatusLabel bounds an upstream's grpc-status for telemetry: one of the
// 17 gRPC codes as written by gRPC ("0" to "16"), "unknown" for anything
// else, "" when there is none.
func grpcStatusLabel(s string) string {
	if s == "" {
		return ""
	}
	if len(s) <= 2 {
		if n, err := strconv.Atoi(s); err == nil && n >= 0 && n <= 16 && statusText[n] == s {
			return statusText[n]
		}
	}
	return "unknown"
}

// statusText holds the decimal response codes, so that labelling a
// request does not format one.
var statusText = func() (t [600]string) {
	for i := range t {
		t[i] = strconv.Itoa(i)
	}
	return t
}()

func codeString(code int) string {
	if code >= 0 && code < len(statusText) {
		return statusText[code]
	}
	return strconv.Itoa(code)
}

func (p *Proxy) labels(l *telemetry.Labels, ex *exchange, code int, grpcStatus, flags string) {
	*l = telemetry.Labels{ResponseCode: codeString(code), GRPCResponseStatus: grpcStatus, ResponseFlags: flags,
		RequestProtocol: "http", SourceCluster: p.clusterID, DestinationCluster: p.clusterID,
		ConnectionSecurityPolicy: "none"}
	if ex.grpc {
		l.RequestProtocol = "grpc"
	}
	if ex.ci.Peer != "" {
		l.SourcePrincipal = ex.ci.Peer
		l.ConnectionSecurityPolicy = "mutual_tls"
	}
	if ns, ok := peerNamespace(ex.ci.Peer); ok {
		l.SourceWorkloadNamespace = ns // refined below when the source IP is known
	}
	if ex.ci.Source.IsValid() {
		if w := p.cat.WorkloadByIP(ex.ci.Source); w != nil {
			l.SourceWorkload, l.SourceWorkloadNamespace = w.GetWorkloadName(), w.GetNamespace()
			l.SourceCanonicalService, l.SourceCanonicalRevision = w.GetCanonicalName(), w.GetCanonicalRevision()
			l.SourceApp, l.SourceVersion = w.GetCanonicalName(), w.GetCanonicalRevision()
			if w.GetClusterId() != "" {
				l.SourceCluster = w.GetClusterId()
			}
		}
	}
	if t := ex.target; t != nil {
		l.DestinationService = t.Service.GetHostname()
		l.DestinationServiceName = t.Service.GetName()
		l.DestinationServiceNamespace = t.Service.GetNamespace()
		l.DestinationCanonicalService = t.Service.GetName()
	}
	if ex.backend != nil && ex.target != nil && ex.backend.GetService() != ex.target.Key {
		if s := p.cat.Service(ex.backend.GetService()); s != nil {
			l.DestinationService, l.DestinationServiceName, l.DestinationServiceNamespace = s.GetHostname(), s.GetName(), s.GetNamespace()
		}
	}
	if e := ex.endpoint; e != nil {
		l.DestinationWorkload, l.DestinationWorkloadNamespace = e.Workload, e.Namespace
		l.DestinationPrincipal = e.Identity
		l.DestinationCanonicalService, l.DestinationCanonicalRevision = e.CanonicalName, e.CanonicalRevision
		l.DestinationApp, l.DestinationVersion = e.CanonicalName, e.CanonicalRevision
	}
}
