package xds

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/amesh-dev/amesh/api/xds/xdsclient"
)

// Subscriber is the authenticated peer of one stream.
type Subscriber interface {
	// ID names the subscriber in logs and for Recheck (for example the
	// pod's namespace/name).
	ID() string
	// Visible reports whether the subscriber may see r. It is called with
	// the server's state locked: it must be fast, must not block and must
	// not call back into the Server.
	Visible(typeURL string, r *Resource) bool
}

// ServerOptions configures a Server.
type ServerOptions struct {
	// Authenticate inspects the stream context (bearer token, peer) and the
	// xDS Node of the stream's first request; it returns the subscriber or
	// an error, which ends the stream (a gRPC status error is returned as
	// is, any other error as Unauthenticated). Without it every stream is
	// refused.
	Authenticate func(ctx context.Context, node *corev3.Node) (Subscriber, error)
	// Logger: default zap.NewNop().
	Logger *zap.Logger
	// Registerer receives the server's metrics (pushes, push latency,
	// connected clients, NACKs). Nil: not registered.
	Registerer prometheus.Registerer
	// MaxResponseResources and MaxResponseBytes bound one response: a
	// push of more resources (upserts and removals) or more encoded bytes
	// is split into several responses, sent one after the other, each
	// with its own nonce and acknowledged on its own; all but the last
	// carry SystemVersionInfo MoreToCome. A single resource larger than
	// the byte budget travels alone. Defaults: 1,000 resources, 1 MiB.
	// Negative: no limit (one response per type and push).
	MaxResponseResources int
	MaxResponseBytes     int
}

// MoreToCome is the SystemVersionInfo of a response that another response
// of the same push follows: clients are synced only after the last one.
const MoreToCome = xdsclient.MoreToCome

// Default response bounds.
const (
	DefaultMaxResponseResources = 1000
	DefaultMaxResponseBytes     = 1 << 20
)

// Server is a delta-ADS server. Register it on a grpc.Server; feed it with
// Set and Update. Safe for concurrent use.
type Server struct {
	discoveryv3.UnimplementedAggregatedDiscoveryServiceServer

	opts    ServerOptions
	log     *zap.Logger
	metrics *metrics
	nonce   atomic.Uint64

	mu      sync.RWMutex
	types   map[string]map[string]*entry // type URL → name → resource
	streams map[*stream]struct{}
}

// NewServer returns a server with no resources.
func NewServer(opts ServerOptions) *Server {
	if opts.Logger == nil {
		opts.Logger = zap.NewNop()
	}
	if opts.MaxResponseResources == 0 {
		opts.MaxResponseResources = DefaultMaxResponseResources
	}
	if opts.MaxResponseBytes == 0 {
		opts.MaxResponseBytes = DefaultMaxResponseBytes
	}
	s := &Server{
		opts:    opts,
		log:     opts.Logger,
		types:   map[string]map[string]*entry{},
		streams: map[*stream]struct{}{},
	}
	s.metrics = newMetrics(opts.Registerer, s.log)
	return s
}

// Register registers the aggregated discovery service on g.
func (s *Server) Register(g *grpc.Server) {
	discoveryv3.RegisterAggregatedDiscoveryServiceServer(g, s)
}

// Set replaces every resource of typeURL with all. Only resources whose
// Version or Scope changed, and removals, reach the subscribers. On error
// (ErrInvalidResource) nothing is changed.
func (s *Server) Set(typeURL string, all []*Resource) error {
	start := time.Now()
	// Reuse the encoding of resources whose given version is unchanged.
	s.mu.RLock()
	old := s.types[typeURL]
	reuse := make(map[string]*entry)
	for _, r := range all {
		if r == nil || r.Version == "" {
			continue
		}
		if o, ok := old[r.Name]; ok && o.res.Version == r.Version && o.res.Scope == r.Scope && TypeURL(r.Body) == typeURL {
			reuse[r.Name] = o
		}
	}
	s.mu.RUnlock()

	next := make(map[string]*entry, len(all))
	for _, r := range all {
		e := reuse[nameOf(r)]
		if e == nil {
			var err error
			if e, err = prepare(typeURL, r); err != nil {
				return fmt.Errorf("xds: set %s: %w", typeURL, err)
			}
		}
		if _, dup := next[e.res.Name]; dup {
			return fmt.Errorf("xds: set %s: %w: %s named twice", typeURL, ErrInvalidResource, e.res.Name)
		}
		next[e.res.Name] = e
	}

	s.mu.Lock()
	defer s.mu.Unlock()
	old, existed := s.types[typeURL]
	var changed []string
	for name, e := range next {
		if o, ok := old[name]; ok && same(o, e) {
			next[name] = o
			continue
		}
		changed = append(changed, name)
	}
	for name := range old {
		if _, ok := next[name]; !ok {
			changed = append(changed, name)
		}
	}
	s.types[typeURL] = next
	s.markLocked(typeURL, changed, start, !existed)
	return nil
}

// Update upserts and removes resources of typeURL. Unchanged upserts and
// removals of unknown names are no-ops. On error (ErrInvalidResource)
// nothing is changed.
func (s *Server) Update(typeURL string, upserts []*Resource, removes []string) error {
	start := time.Now()
	prepared := make(map[string]*entry, len(upserts))
	for _, r := range upserts {
		e, err := prepare(typeURL, r)
		if err != nil {
			return fmt.Errorf("xds: update %s: %w", typeURL, err)
		}
		if _, dup := prepared[e.res.Name]; dup {
			return fmt.Errorf("xds: update %s: %w: %s named twice", typeURL, ErrInvalidResource, e.res.Name)
		}
		prepared[e.res.Name] = e
	}
	for _, name := range removes {
		if _, dup := prepared[name]; dup {
			return fmt.Errorf("xds: update %s: %w: %s both upserted and removed", typeURL, ErrInvalidResource, name)
		}
	}

	s.mu.Lock()
	defer s.mu.Unlock()
	m, existed := s.types[typeURL]
	if !existed {
		m = map[string]*entry{}
		s.types[typeURL] = m
	}
	var changed []string
	for name, e := range prepared {
		if o, ok := m[name]; ok && same(o, e) {
			continue
		}
		m[name] = e
		changed = append(changed, name)
	}
	for _, name := range removes {
		if _, ok := m[name]; ok {
			delete(m, name)
			changed = append(changed, name)
		}
	}
	s.markLocked(typeURL, changed, start, !existed)
	return nil
}

// Resources returns the current resources of typeURL (for debugging and
// tests), sorted by name.
func (s *Server) Resources(typeURL string) []*Resource {
	s.mu.RLock()
	defer s.mu.RUnlock()
	out := make([]*Resource, 0, len(s.types[typeURL]))
	for _, name := range slices.Sorted(maps.Keys(s.types[typeURL])) {
		out = append(out, s.types[typeURL][name].res)
	}
	return out
}

// Recheck re-evaluates Visible for every resource, for the subscribers with
// the given IDs (every subscriber if none is given), and pushes what became
// visible or invisible. Call it when a subscriber's view changed without any
// resource changing.
func (s *Server) Recheck(ids ...string) {
	now := time.Now()
	s.mu.RLock()
	defer s.mu.RUnlock()
	for st := range s.streams {
		if len(ids) == 0 || slices.Contains(ids, st.sub.ID()) {
			st.markAll(now)
		}
	}
}

// Clients returns the IDs of the connected subscribers (one per stream).
func (s *Server) Clients() []string {
	s.mu.RLock()
	defer s.mu.RUnlock()
	out := make([]string, 0, len(s.streams))
	for st := range s.streams {
		out = append(out, st.sub.ID())
	}
	slices.Sort(out)
	return out
}

// fullThreshold: above this many changed names a stream recomputes its whole
// view instead of tracking names one by one.
const fullThreshold = 512

// markLocked tells every stream that names of typeURL changed; first means
// the type just got its first state, which streams waiting for it evaluate
// in full.
func (s *Server) markLocked(typeURL string, names []string, at time.Time, first bool) {
	for st := range s.streams {
		switch {
		case first:
			st.markType(typeURL, at)
		case len(names) > 0:
			st.mark(typeURL, names, at)
		}
	}
}

func nameOf(r *Resource) string {
	if r == nil {
		return ""
	}
	return r.Name
}

// DeltaAggregatedResources serves one delta ADS stream.
func (s *Server) DeltaAggregatedResources(gs grpc.BidiStreamingServer[discoveryv3.DeltaDiscoveryRequest, discoveryv3.DeltaDiscoveryResponse]) error {
	ctx := gs.Context()
	first, err := gs.Recv()
	if err != nil {
		if errors.Is(err, io.EOF) {
			return nil
		}
		return err
	}
	if s.opts.Authenticate == nil {
		return status.Error(codes.PermissionDenied, "xds: no authenticator configured")
	}
	sub, err := s.opts.Authenticate(ctx, first.GetNode())
	if err != nil {
		if _, ok := status.FromError(err); !ok {
			err = status.Error(codes.Unauthenticated, err.Error())
		}
		s.log.Warn("xds stream refused", zap.String("node", first.GetNode().GetId()), zap.Error(err))
		return err
	}
	if sub == nil {
		return status.Error(codes.Unauthenticated, "xds: no subscriber")
	}
	st := &stream{
		srv:        s,
		sub:        sub,
		log:        s.log.With(zap.String("subscriber", sub.ID())),
		notify:     make(chan struct{}, 1),
		subscribed: map[string]bool{},
		pending:    map[string]*pendingSet{},
		types:      map[string]*subState{},
		inflight:   map[string]string{},
	}
	s.mu.Lock()
	s.streams[st] = struct{}{}
	s.mu.Unlock()
	s.metrics.clients.Inc()
	st.log.Info("xds subscriber connected", zap.String("node", first.GetNode().GetId()))
	defer func() {
		s.mu.Lock()
		delete(s.streams, st)
		s.mu.Unlock()
		s.metrics.clients.Dec()
		st.log.Info("xds subscriber disconnected")
	}()

	reqs := make(chan *discoveryv3.DeltaDiscoveryRequest, 16)
	recvErr := make(chan error, 1)
	go func() {
		for {
			r, err := gs.Recv()
			if err != nil {
				recvErr <- err
				return
			}
			select {
			case reqs <- r:
			case <-ctx.Done():
				return
			}
		}
	}()

	if err := st.handle(first); err != nil {
		return err
	}
	for {
		if err := st.flush(gs, reqs); err != nil {
			return err
		}
		select {
		case <-ctx.Done():
			return status.FromContextError(ctx.Err()).Err()
		case err := <-recvErr:
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		case r := <-reqs:
			if err := st.handle(r); err != nil {
				return err
			}
		case <-st.notify:
		}
	}
}

// stream is the server side of one subscriber's stream.
type stream struct {
	srv    *Server
	sub    Subscriber
	log    *zap.Logger
	notify chan struct{}

	pmu        sync.Mutex
	subscribed map[string]bool        // type URLs subscribed to
	pending    map[string]*pendingSet // what to look at on the next flush

	// Owned by the stream's goroutine.
	types    map[string]*subState
	order    []string          // type URLs in subscription order
	inflight map[string]string // nonce → type URL of unacknowledged responses
	slab     []held            // see newHeld
}

type pendingSet struct {
	all      bool
	allSince time.Time            // when all was first requested by a change (zero: not a change)
	names    map[string]time.Time // name → when it first changed
}

// held is the version of one resource a client holds (a pointer, so that a
// full recompute updates it with a single map lookup).
type held struct{ version string }

// newHeld allocates a held from the stream's slab: a first sync of many
// resources costs a few allocations rather than one per resource.
func (st *stream) newHeld(version string) *held {
	if len(st.slab) == cap(st.slab) {
		st.slab = make([]held, 0, 1024)
	}
	st.slab = append(st.slab, held{version: version})
	return &st.slab[len(st.slab)-1]
}

type subState struct {
	wildcard  bool
	names     map[string]struct{} // explicit subscriptions
	known     map[string]*held    // name → what the client holds (or was sent)
	sentFirst bool
}

func (st *stream) wake() {
	select {
	case st.notify <- struct{}{}:
	default:
	}
}

func (st *stream) mark(typeURL string, names []string, at time.Time) {
	st.pmu.Lock()
	defer st.pmu.Unlock()
	if !st.subscribed[typeURL] {
		return
	}
	p := st.pending[typeURL]
	if p == nil {
		p = &pendingSet{}
		st.pending[typeURL] = p
	}
	switch {
	case p.all:
		if p.allSince.IsZero() {
			p.allSince = at
		}
	case len(names)+len(p.names) > fullThreshold:
		p.all, p.allSince = true, at
		for _, t := range p.names {
			if t.Before(p.allSince) {
				p.allSince = t
			}
		}
		p.names = nil
	default:
		if p.names == nil {
			p.names = make(map[string]time.Time, len(names))
		}
		for _, n := range names {
			if _, ok := p.names[n]; !ok {
				p.names[n] = at
			}
		}
	}
	st.wake()
}

func (st *stream) markAll(at time.Time) {
	st.pmu.Lock()
	defer st.pmu.Unlock()
	for typeURL := range st.subscribed {
		st.pending[typeURL] = &pendingSet{all: true, allSince: at}
	}
	st.wake()
}

// handle applies one request: ACK/NACK bookkeeping and subscription changes.
func (st *stream) handle(r *discoveryv3.DeltaDiscoveryRequest) error {
	typeURL := r.GetTypeUrl()
	if typeURL == "" {
		return status.Error(codes.InvalidArgument, "xds: request without type_url")
	}
	if nonce := r.GetResponseNonce(); nonce != "" {
		sentType, ok := st.inflight[nonce]
		delete(st.inflight, nonce)
		switch {
		case !ok:
			st.log.Debug("xds response for an unknown nonce", zap.String("type", typeURL), zap.String("nonce", nonce))
		case r.GetErrorDetail() != nil:
			st.srv.metrics.nacks.WithLabelValues(xdsclient.ShortType(sentType)).Inc()
			st.log.Warn("xds NACK", zap.String("type", sentType), zap.String("nonce", nonce),
				zap.Int32("code", r.GetErrorDetail().GetCode()), zap.String("reason", r.GetErrorDetail().GetMessage()))
		default:
			st.log.Debug("xds ACK", zap.String("type", sentType), zap.String("nonce", nonce))
		}
	}

	ss := st.types[typeURL]
	firstForType := ss == nil
	if firstForType {
		ss = &subState{
			names: map[string]struct{}{},
			known: make(map[string]*held, len(r.GetInitialResourceVersions())),
			// A first request naming nothing is a (legacy) wildcard
			// subscription.
			wildcard: len(r.GetResourceNamesSubscribe()) == 0,
		}
		for name, v := range r.GetInitialResourceVersions() {
			ss.known[name] = &held{version: v}
		}
		st.types[typeURL] = ss
		st.order = append(st.order, typeURL)
		st.pmu.Lock()
		st.subscribed[typeURL] = true
		st.pending[typeURL] = &pendingSet{all: true}
		st.pmu.Unlock()
	}
	var recheck []string
	for _, n := range r.GetResourceNamesSubscribe() {
		if n == "*" {
			if !ss.wildcard {
				ss.wildcard = true
				st.markType(typeURL, time.Time{})
			}
			continue
		}
		ss.names[n] = struct{}{}
		// A subscribed name is always answered, even if the client seems
		// to hold it already — except when resuming with its version.
		if _, resumed := r.GetInitialResourceVersions()[n]; !firstForType || !resumed {
			delete(ss.known, n)
		}
		recheck = append(recheck, n)
	}
	for _, n := range r.GetResourceNamesUnsubscribe() {
		if n == "*" {
			ss.wildcard = false
			// The client drops what it no longer subscribes to.
			for name := range ss.known {
				if _, ok := ss.names[name]; !ok {
					delete(ss.known, name)
				}
			}
			continue
		}
		delete(ss.names, n)
		if !ss.wildcard {
			delete(ss.known, n)
		}
	}
	if len(recheck) > 0 {
		st.mark(typeURL, recheck, time.Time{})
	}
	return nil
}

func (st *stream) markType(typeURL string, at time.Time) {
	st.pmu.Lock()
	defer st.pmu.Unlock()
	if !st.subscribed[typeURL] {
		return
	}
	st.pending[typeURL] = &pendingSet{all: true, allSince: at}
	st.wake()
}

type outgoing struct {
	typeURL string
	upserts []*entry // immutable: encoded outside the server's lock
	removes []string
	since   time.Time // earliest change it carries (zero: none measured)
}

// chunk is one response's share of an outgoing push.
type chunk struct {
	upserts []*entry
	removes []string
}

// split cuts a push into responses within the server's bounds; it always
// returns at least one (possibly empty) chunk.
func (s *Server) split(upserts []*entry, removes []string) []chunk {
	maxN, maxB := s.opts.MaxResponseResources, s.opts.MaxResponseBytes
	if maxN < 0 {
		maxN = len(upserts) + len(removes) + 1
	}
	if maxB < 0 {
		maxB = int(^uint(0) >> 1)
	}
	var out []chunk
	cur, n, size := chunk{}, 0, 0
	flush := func() {
		out = append(out, cur)
		cur, n, size = chunk{}, 0, 0
	}
	for i, e := range upserts {
		if n > 0 && (n >= maxN || size+len(e.enc) > maxB) {
			cur.upserts = upserts[i-n : i : i]
			flush()
		}
		n++
		size += len(e.enc)
	}
	if n > 0 {
		cur.upserts = upserts[len(upserts)-n:]
	}
	for len(removes) > 0 {
		room := maxN - n
		if room <= 0 {
			flush()
			continue
		}
		k := min(room, len(removes))
		cur.removes = removes[:k:k]
		removes = removes[k:]
		n += k
	}
	if n > 0 || len(out) == 0 {
		flush()
	}
	return out
}

// flush sends what changed for this subscriber since the last flush: per
// type, one response or, for a large push, several in a row (see
// ServerOptions.MaxResponseResources). Requests arriving meanwhile are
// handled between responses, so that a client blocked on sending its
// acknowledgements never stalls the stream.
func (st *stream) flush(gs grpc.BidiStreamingServer[discoveryv3.DeltaDiscoveryRequest, discoveryv3.DeltaDiscoveryResponse], reqs <-chan *discoveryv3.DeltaDiscoveryRequest) error {
	st.pmu.Lock()
	if len(st.pending) == 0 {
		st.pmu.Unlock()
		return nil
	}
	work := st.pending
	st.pending = map[string]*pendingSet{}
	st.pmu.Unlock()

	var out []outgoing
	st.srv.mu.RLock()
	for _, typeURL := range st.order {
		p := work[typeURL]
		if p == nil {
			continue
		}
		if o, ok := st.build(typeURL, p); ok {
			out = append(out, o)
		}
	}
	st.srv.mu.RUnlock()

	for _, o := range out {
		label := xdsclient.ShortType(o.typeURL)
		chunks := st.srv.split(o.upserts, o.removes)
		for i, c := range chunks {
			if i > 0 {
				if err := st.drain(reqs); err != nil {
					return err
				}
			}
			nonce := st.newNonce(o.typeURL)
			resp := newResponse(o.typeURL, nonce, c.upserts, c.removes)
			if i < len(chunks)-1 {
				resp.msg.SystemVersionInfo = MoreToCome
			}
			if err := gs.SendMsg(resp); err != nil {
				return err
			}
			st.srv.metrics.pushes.WithLabelValues(label).Inc()
			st.log.Debug("xds push", zap.String("type", o.typeURL), zap.String("nonce", nonce),
				zap.Int("upserts", len(c.upserts)), zap.Int("removes", len(c.removes)),
				zap.Int("part", i+1), zap.Int("parts", len(chunks)))
		}
		if !o.since.IsZero() {
			st.srv.metrics.latency.WithLabelValues(label).Observe(time.Since(o.since).Seconds())
		}
	}
	return nil
}

// drain handles the requests already received, without waiting.
func (st *stream) drain(reqs <-chan *discoveryv3.DeltaDiscoveryRequest) error {
	for {
		select {
		case r := <-reqs:
			if err := st.handle(r); err != nil {
				return err
			}
		default:
			return nil
		}
	}
}

// newNonce names a response of typeURL and remembers it until it is
// acknowledged.
func (st *stream) newNonce(typeURL string) string {
	nonce := strconv.FormatUint(st.srv.nonce.Add(1), 36)
	if len(st.inflight) >= maxInflight {
		for k := range st.inflight { // forget the oldest-ish one
			delete(st.inflight, k)
			break
		}
	}
	st.inflight[nonce] = typeURL
	return nonce
}

// build computes one type's response; called with the server's state read
// locked.
func (st *stream) build(typeURL string, p *pendingSet) (outgoing, bool) {
	ss := st.types[typeURL]
	current, ok := st.srv.types[typeURL]
	if !ok {
		// The server has no state for this type yet (for example just
		// after a controller restart): answering now would tell a
		// resuming client to delete everything it holds. Wait for the
		// first Set or Update.
		return outgoing{}, false
	}
	var upserts []*entry
	var removes []string
	var since time.Time
	// consider compares one name's current entry (nil: gone) with what the
	// client holds (h, nil: nothing) and queues the difference.
	consider := func(name string, e *entry, h *held, at time.Time) {
		visible := false
		if e != nil {
			visible = ss.wildcard
			if !visible {
				_, visible = ss.names[name]
			}
			visible = visible && st.sub.Visible(typeURL, e.res)
		}
		switch {
		case visible && h != nil:
			if h.version == e.res.Version {
				return
			}
			h.version = e.res.Version
			upserts = append(upserts, e)
		case visible:
			ss.known[name] = st.newHeld(e.res.Version)
			upserts = append(upserts, e)
		case h != nil:
			delete(ss.known, name)
			removes = append(removes, name)
		default:
			return
		}
		if !at.IsZero() && (since.IsZero() || at.Before(since)) {
			since = at
		}
	}
	if p.all {
		upserts = make([]*entry, 0, len(current))
		if len(ss.known) == 0 {
			ss.known = make(map[string]*held, len(current)) // no growth steps on a first sync
		}
		// Names the client holds that the server no longer has: count
		// them on the way so that the second pass runs only when needed.
		stale := len(ss.known)
		for name, e := range current {
			h := ss.known[name]
			if h != nil {
				stale--
			}
			consider(name, e, h, p.allSince)
		}
		if stale > 0 {
			for name, h := range ss.known {
				if current[name] == nil {
					consider(name, nil, h, p.allSince)
				}
			}
		}
	} else {
		for name, at := range p.names {
			consider(name, current[name], ss.known[name], at)
		}
	}
	if len(upserts) == 0 && len(removes) == 0 && ss.sentFirst {
		return outgoing{}, false
	}
	ss.sentFirst = true
	return outgoing{typeURL: typeURL, upserts: upserts, removes: removes, since: since}, true
}

// maxInflight bounds the nonces remembered per stream for a client that
// does not acknowledge.
const maxInflight = 1024
