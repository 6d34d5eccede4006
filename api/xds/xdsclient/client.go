// Package xdsclient is the data plane's delta-xDS client
// (DeltaAggregatedResources, envoy's discovery protos as go-control-plane
// generates them), and the types it shares with the server in package xds:
// Resource and MoreToCome. It does not link go-control-plane (see wire.go),
// so that ztunnel and the waypoint do not carry envoy's descriptors.
//
// Client subscribes (wildcard) to a list of type URLs, hands every response
// to a Handler (an error NACKs it and keeps the old state; a RejectedError
// NACKs it with the names of the resources the handler could not apply and
// keeps the rest), reconnects with jittered exponential backoff, resumes
// with the versions it holds, and keeps its state while disconnected. It is
// Synced once every type had a whole first push handled (the last response
// of a split push), applied or rejected: a rejected first push leaves the
// previous (empty) state, as Envoy's warming does.
package xdsclient

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"
)

// Resource is one named discovery resource.
type Resource struct {
	Name string
	// Version identifies the content; the server diffs by it. Empty means
	// "derive it from the content" (a hash of the deterministic encoding).
	Version string
	// Body is the resource (a discoveryv1 message whose type matches the
	// type URL it is published under).
	Body proto.Message
	// Scope is opaque to both packages and lets the server's Subscriber
	// decide visibility (for example "gateway/<ns>/<name>"). It is not
	// sent; the client leaves it empty.
	Scope string
}

// MoreToCome is the SystemVersionInfo of a response that another response
// of the same push follows: clients are synced only after the last one.
const MoreToCome = "amesh.dev/more-to-come"

// Handler applies the responses a Client receives.
type Handler interface {
	// Apply applies one delta response of typeURL: upserts (new or changed
	// resources, Body decoded; Scope empty) and removes (names the client
	// held). It is called from Client.Run's goroutine, one response at a
	// time. An error NACKs the response; the client's state (and, the
	// handler must ensure, its own) stays as before — unless the error is
	// (or wraps) a *RejectedError: then the handler applied everything but
	// the upserts it names, and the response is NACKed with their names.
	Apply(typeURL string, upserts []*Resource, removes []string) error
}

// RejectedError is returned by a Handler that applied a response except
// some of its upserts: the removes and every other upsert took effect. The
// client then holds the applied upserts at their new version and keeps
// holding the rejected names — at the version it held before, or at none
// (an empty version) — because the handler may keep something in their
// place (the previous version, or a fail-closed stand-in): a later removal
// of one of them must still reach the handler, and a reconnection asks
// for them again.
type RejectedError struct {
	// Rejected maps the name of each upsert that was not applied as sent
	// to the reason.
	Rejected map[string]error
}

// maxRejectedListed bounds how many rejected resources an error message
// (and so a NACK's error detail) names.
const maxRejectedListed = 10

// Error names the rejected resources, sorted, with their reasons.
func (e *RejectedError) Error() string {
	names := slices.Sorted(maps.Keys(e.Rejected))
	var b strings.Builder
	fmt.Fprintf(&b, "%d resources rejected: ", len(names))
	for i, n := range names {
		if i == maxRejectedListed {
			fmt.Fprintf(&b, "; and %d more", len(names)-i)
			break
		}
		if i > 0 {
			b.WriteString("; ")
		}
		fmt.Fprintf(&b, "%s: %v", n, e.Rejected[n])
	}
	return b.String()
}

// HandlerFunc adapts a function to Handler.
type HandlerFunc func(typeURL string, upserts []*Resource, removes []string) error

// Apply calls f.
func (f HandlerFunc) Apply(typeURL string, upserts []*Resource, removes []string) error {
	return f(typeURL, upserts, removes)
}

// Options configures a Client.
type Options struct {
	// Conn is the connection to the controller (TLS; bearer credentials
	// via grpc.WithPerRPCCredentials(bearer.PerRPC(...))).
	Conn grpc.ClientConnInterface
	// Node identifies the client: Id = pod name; Metadata "kind"
	// (ztunnel|waypoint), "node", "namespace", "pod", "gateway".
	Node *Node
	// TypeURLs are subscribed to (wildcard), in this order.
	TypeURLs []string
	Handler  Handler
	// Logger: default zap.NewNop().
	Logger *zap.Logger
	// InitialBackoff and MaxBackoff bound the reconnection delay, which
	// doubles after each failed attempt, with jitter, and resets once a
	// stream delivered a response. Defaults 100 ms and 15 s.
	InitialBackoff, MaxBackoff time.Duration
	// MaxMessageSize bounds one response (default 256 MiB). The server
	// splits large pushes into responses of about 1 MiB, but a single
	// resource may be larger, and other servers may not split.
	MaxMessageSize int
	// Registerer receives the client's metrics (responses applied and
	// rejected, by type). Nil: not registered.
	Registerer prometheus.Registerer
}

// Client is a delta-ADS client.
type Client struct {
	opts    Options
	log     *zap.Logger
	updates *prometheus.CounterVec // type, result

	synced     chan struct{}
	syncedOnce sync.Once

	mu    sync.Mutex
	state map[string]map[string]string // type URL → name → version held
	// complete holds the types whose first push was handled to its end:
	// a response not marked MoreToCome (the last of a push split into
	// several), applied or rejected.
	complete map[string]bool
	// rejected holds the types with a rejected response in their first
	// push (logged when it completes).
	rejected map[string]error
	connect  int // streams opened (for tests and logs)
}

// New returns a client; Run starts it.
func New(opts Options) *Client {
	if opts.Logger == nil {
		opts.Logger = zap.NewNop()
	}
	if opts.InitialBackoff <= 0 {
		opts.InitialBackoff = 100 * time.Millisecond
	}
	if opts.MaxBackoff <= 0 {
		opts.MaxBackoff = 15 * time.Second
	}
	if opts.MaxMessageSize <= 0 {
		opts.MaxMessageSize = 256 << 20
	}
	c := &Client{
		opts:     opts,
		log:      opts.Logger,
		synced:   make(chan struct{}),
		state:    map[string]map[string]string{},
		complete: map[string]bool{},
		rejected: map[string]error{},
		updates: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "amesh_xds_client_updates_total",
			Help: "Discovery responses received, by resource type and result (applied, or rejected and NACKed).",
		}, []string{"type", "result"}),
	}
	if opts.Registerer != nil {
		c.updates = registerUpdates(opts.Registerer, opts.Logger, c.updates)
	}
	for _, t := range opts.TypeURLs {
		c.state[t] = map[string]string{}
	}
	if len(opts.TypeURLs) == 0 {
		close(c.synced)
	}
	return c
}

// Synced is closed once every type URL had its first push handled in
// full: a push the server split into several responses (ServerOptions.
// MaxResponseResources) counts when its last response is handled. Each
// response is still applied (Handler.Apply) and acknowledged on its own.
//
// A rejected response (NACKed: Handler.Apply failed) counts as handled,
// as Envoy finishes warming when its initial configuration is rejected:
// the client is then synced with the state it had before (empty for a
// first push), logs it as an error and counts it in
// amesh_xds_client_updates_total{result="rejected"}. Otherwise one bad
// resource would keep the client unsynced — a ztunnel or waypoint unready
// — until that resource changes. The server does not resend a rejected
// version on the same stream; after a reconnection the client claims only
// what it holds, so the server sends it once more and it is rejected once
// more (no loop: a NACK never ends the stream).
func (c *Client) Synced() <-chan struct{} { return c.synced }

// Versions returns the resources of typeURL the client holds (name →
// version).
func (c *Client) Versions(typeURL string) map[string]string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return maps.Clone(c.state[typeURL])
}

// Connects returns how many streams the client has opened.
func (c *Client) Connects() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.connect
}

// registerUpdates registers the updates counter, or returns the identical
// one registered before (clients on one registry share it).
func registerUpdates(reg prometheus.Registerer, log *zap.Logger, c *prometheus.CounterVec) *prometheus.CounterVec {
	if err := reg.Register(c); err != nil {
		var are prometheus.AlreadyRegisteredError
		if errors.As(err, &are) {
			if existing, ok := are.ExistingCollector.(*prometheus.CounterVec); ok {
				return existing
			}
		}
		log.Error("xds: cannot register metric", zap.Error(err))
	}
	return c
}

// ShortType is the metric label of a type URL: its full message name.
func ShortType(typeURL string) string {
	if i := strings.LastIndexByte(typeURL, '/'); i >= 0 {
		return typeURL[i+1:]
	}
	return typeURL
}

var errNoTypes = errors.New("xds: no type URLs to subscribe to")

// Run keeps a stream open until ctx ends, reconnecting with jittered
// exponential backoff. It returns nil when ctx is done. Call it once.
func (c *Client) Run(ctx context.Context) error {
	if len(c.opts.TypeURLs) == 0 {
		return errNoTypes
	}
	if c.opts.Conn == nil || c.opts.Handler == nil {
		return errors.New("xds: client needs a Conn and a Handler")
	}
	backoff := c.opts.InitialBackoff
	for {
		progressed, err := c.session(ctx)
		if ctx.Err() != nil {
			return nil
		}
		if progressed {
			backoff = c.opts.InitialBackoff
		}
		// Full jitter in [backoff/2, backoff).
		d := backoff/2 + rand.N(backoff/2+1)
		c.log.Warn("xds stream ended; reconnecting", zap.Error(err), zap.Duration("after", d))
		t := time.NewTimer(d)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-t.C:
		}
		backoff = min(backoff*2, c.opts.MaxBackoff)
	}
}

// session runs one stream. progressed reports whether it applied (or
// NACKed) at least one response.
func (c *Client) session(ctx context.Context) (progressed bool, err error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	s, err := c.opts.Conn.NewStream(ctx, &grpc.StreamDesc{StreamName: "DeltaAggregatedResources", ServerStreams: true, ClientStreams: true},
		adsMethod, grpc.MaxCallRecvMsgSize(c.opts.MaxMessageSize), grpc.ForceCodecV2(codec{}))
	if err != nil {
		return false, fmt.Errorf("xds: open stream: %w", err)
	}
	c.mu.Lock()
	c.connect++
	initial := make(map[string]map[string]string, len(c.state))
	for t, v := range c.state {
		initial[t] = maps.Clone(v)
	}
	c.mu.Unlock()
	for i, t := range c.opts.TypeURLs {
		req := &request{typeURL: t, initial: initial[t]}
		if i == 0 {
			req.node = c.opts.Node
		}
		if err := s.SendMsg(req); err != nil {
			return false, fmt.Errorf("xds: subscribe %s: %w", t, err)
		}
	}
	for {
		resp := new(response)
		if err := s.RecvMsg(resp); err != nil {
			return progressed, fmt.Errorf("xds: receive: %w", err)
		}
		progressed = true
		ack := &request{typeURL: resp.typeURL, responseNonce: resp.nonce}
		aerr := c.apply(resp)
		if aerr != nil {
			c.log.Warn("xds NACK", zap.String("type", resp.typeURL), zap.String("nonce", resp.nonce), zap.Error(aerr))
			ack.errCode, ack.errMessage = int32(codes.InvalidArgument), aerr.Error()
		}
		c.handled(resp, aerr)
		if err := s.SendMsg(ack); err != nil {
			return progressed, fmt.Errorf("xds: acknowledge: %w", err)
		}
	}
}

// apply decodes and applies one response; on error nothing changes, except
// for a *RejectedError from the handler (see there).
func (c *Client) apply(resp *response) error {
	typeURL := resp.typeURL
	c.mu.Lock()
	held, ok := c.state[typeURL]
	c.mu.Unlock()
	if !ok {
		return fmt.Errorf("unsubscribed type %s", typeURL)
	}
	upserts := make([]*Resource, 0, len(resp.resources))
	seen := make(map[string]bool, len(resp.resources))
	var mt protoreflect.MessageType // resolved once per response
	for _, r := range resp.resources {
		if r.name == "" {
			return errors.New("resource without name")
		}
		if seen[r.name] {
			return fmt.Errorf("resource %s sent twice", r.name)
		}
		seen[r.name] = true
		if !r.hasBody {
			return fmt.Errorf("resource %s without body", r.name)
		}
		if r.bodyType != typeURL {
			return fmt.Errorf("resource %s of type %s in a %s response", r.name, r.bodyType, typeURL)
		}
		if mt == nil {
			var err error
			if mt, err = protoregistry.GlobalTypes.FindMessageByURL(typeURL); err != nil {
				return fmt.Errorf("resource %s: %w", r.name, err)
			}
		}
		body := mt.New().Interface()
		if err := proto.Unmarshal(r.body, body); err != nil {
			return fmt.Errorf("resource %s: %w", r.name, err)
		}
		upserts = append(upserts, &Resource{Name: r.name, Version: r.version, Body: body})
	}
	var removes []string
	for _, n := range resp.removed {
		if seen[n] {
			return fmt.Errorf("resource %s both updated and removed", n)
		}
		if _, ok := held[n]; ok {
			removes = append(removes, n)
		}
	}
	err := c.opts.Handler.Apply(typeURL, upserts, removes)
	var rej *RejectedError
	if err != nil && !errors.As(err, &rej) {
		return err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	m := c.state[typeURL]
	for _, r := range upserts {
		if rej != nil {
			if _, bad := rej.Rejected[r.Name]; bad {
				if _, ok := m[r.Name]; !ok {
					m[r.Name] = "" // held, at no version the server has
				}
				continue
			}
		}
		m[r.Name] = r.Version
	}
	for _, n := range removes {
		delete(m, n)
	}
	return err
}

// handled records that resp was applied (aerr nil) or rejected, and marks
// its type's first push complete at its last response either way.
func (c *Client) handled(resp *response, aerr error) {
	typeURL := resp.typeURL
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.state[typeURL]; !ok {
		return // not subscribed: neither counted nor part of the sync
	}
	result := "applied"
	if aerr != nil {
		result = "rejected"
	}
	c.updates.WithLabelValues(ShortType(typeURL), result).Inc()
	if c.complete[typeURL] {
		return
	}
	if aerr != nil {
		c.rejected[typeURL] = aerr
	}
	if resp.systemVersionInfo == MoreToCome {
		return
	}
	c.complete[typeURL] = true
	if err := c.rejected[typeURL]; err != nil {
		delete(c.rejected, typeURL)
		c.log.Error("xds: first push handled with rejected responses; synced without what they carried until an accepted version arrives",
			zap.String("type", typeURL), zap.Int("held", len(c.state[typeURL])), zap.Error(err))
	}
	if len(c.complete) == len(c.opts.TypeURLs) {
		c.syncedOnce.Do(func() { close(c.synced) })
	}
}
