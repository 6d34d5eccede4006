// Package catalog is the waypoint's discovery state: the Workloads, Services,
// WaypointServices and this waypoint's WaypointGateway received from the
// controller, compiled into immutable per-target snapshots (routes, policies,
// rate limiters) and upstream clusters kept up to date with their endpoints.
//
// Two kinds of traffic reach a waypoint. Service-addressed traffic (the
// authority is a Service VIP and port) is served with that Service's
// WaypointService. Workload-addressed traffic (the authority is the IP and
// target port of a workload bound to this waypoint: per-service-account
// waypoints, use-waypoint on a pod, or ztunnel having picked such a pod as
// the endpoint of a Service without a waypoint of its own) is served with
// the WaypointGateway's policies and a default route to the workload
// itself. Its protocol is the app protocol that the workload's Services
// declare for that target port; a port no Service declares is TCP (no
// sniffing). Traffic for workloads not bound to this waypoint is not served.
// Nothing is served until the initial discovery state has arrived, and
// workload-addressed traffic not until the WaypointGateway has (fail
// closed: the waypoint would not know the policies that apply).
package catalog

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	discoveryv1 "github.com/amesh-dev/amesh/api/discovery/v1"
	"github.com/amesh-dev/amesh/waypoint/internal/authn"
	"github.com/amesh-dev/amesh/waypoint/internal/authz"
	"github.com/amesh-dev/amesh/waypoint/internal/ratelimit"
	"github.com/amesh-dev/amesh/waypoint/internal/route"
	"github.com/amesh-dev/amesh/waypoint/internal/upstream"
	"go.uber.org/zap"
	"google.golang.org/protobuf/proto"
)

// Target is everything needed to serve traffic addressed to one service
// port through this waypoint. Immutable.
type Target struct {
	// Key is the service resource name "<namespace>/<hostname>".
	Key      string
	Service  *discoveryv1.Service
	Port     uint32
	Protocol string // "http", "http2", "grpc", "tcp", "tls"
	Routes   *route.Table
	Authz    *authz.Engine
	Authn    *authn.Authenticator
	// Limiter is shared by all ports of the service; nil when unset.
	Limiter *ratelimit.Bucket
	// LimiterErr is set (and Limiter nil) when the service's LocalRateLimit
	// cannot be enforced: its HTTP requests are refused (fail closed).
	LimiterErr error
	Fault      *discoveryv1.FaultInjection
	Policy     *discoveryv1.TrafficPolicy
	// Workload is set for traffic addressed to a workload's own IP (its
	// Key is "workload:<uid>"); Service is then a stand-in for labels.
	Workload *discoveryv1.Workload
}

// Errors of Resolve.
var (
	// ErrNotSynced: the discovery state needed to decide has not arrived
	// yet (the caller answers 503, the client may retry).
	ErrNotSynced = errors.New("discovery state not synced")
	// ErrNotServed: the address is neither a service this waypoint serves
	// nor a workload bound to it.
	ErrNotServed = errors.New("not served by this waypoint")
)

// HTTP reports whether the target is served at L7.
func (t *Target) HTTP() bool { return httpProtocol(t.Protocol) }

// Options configure a Catalog.
type Options struct {
	Dial   upstream.Dialer
	Keys   *authn.KeyCache
	Logger *zap.Logger
	// Gateway is this waypoint's Gateway "<namespace>/<name>"; workloads
	// bound to it (Workload.waypoint) are served when addressed directly,
	// with the policies of the WaypointGateway of that name.
	Gateway string
}

// Catalog holds the discovery state. Safe for concurrent use.
type Catalog struct {
	dial    upstream.Dialer
	keys    *authn.KeyCache
	log     *zap.Logger
	gateway string

	mu        sync.Mutex
	workloads map[string]*discoveryv1.Workload
	services  map[string]*discoveryv1.Service
	waypoints map[string]*discoveryv1.WaypointService
	// gw is this waypoint's WaypointGateway; nil until it arrives.
	gw       *discoveryv1.WaypointGateway
	synced   bool // MarkSynced was called
	limiters map[string]*limiterEntry
	clusters map[clusterKey]*upstream.Cluster
	// wlProto is the protocol of each workload-addressed port.
	wlProto map[clusterKey]string
	// bySvc indexes workloads by the services they are endpoints of.
	bySvc map[string][]*discoveryv1.Workload

	snap atomic.Pointer[snapshot]
}

type limiterEntry struct {
	cfg *discoveryv1.LocalRateLimit
	b   *ratelimit.Bucket
	err error // cfg is invalid
}

type clusterKey struct {
	service string
	port    uint32
}

type snapshot struct {
	byAddr map[netip.AddrPort]*Target
	byIP   map[netip.Addr]*discoveryv1.Workload
	// bound holds, per address of a workload bound to this waypoint, the
	// target for its ports that no Service declares (TCP); Port is unset.
	bound      map[netip.Addr]*Target
	waypoints  map[string]*discoveryv1.WaypointService
	services   map[string]*discoveryv1.Service
	gw         *discoveryv1.WaypointGateway
	ready      bool
	generation uint64
}

// New returns an empty catalog.
func New(opts Options) *Catalog {
	c := &Catalog{dial: opts.Dial, keys: opts.Keys, log: opts.Logger, gateway: opts.Gateway, wlProto: map[clusterKey]string{},
		workloads: map[string]*discoveryv1.Workload{}, services: map[string]*discoveryv1.Service{},
		waypoints: map[string]*discoveryv1.WaypointService{}, limiters: map[string]*limiterEntry{},
		clusters: map[clusterKey]*upstream.Cluster{}}
	if c.log == nil {
		c.log = zap.NewNop()
	}
	if c.keys == nil {
		c.keys = authn.NewKeyCache(authn.Options{})
	}
	c.snap.Store(&snapshot{byAddr: map[netip.AddrPort]*Target{}, byIP: map[netip.Addr]*discoveryv1.Workload{},
		bound: map[netip.Addr]*Target{}})
	return c
}

// Apply applies one discovery delta of typeURL: upserts and removals by
// resource name. It validates everything first: on error nothing changes
// (the xDS client NACKs).
func (c *Catalog) Apply(typeURL string, upserts []proto.Message, removes []string) error {
	for _, m := range upserts {
		if ok := typeOf(m) == typeURL; !ok {
			return fmt.Errorf("catalog: %T published under %s", m, typeURL)
		}
	}
	switch typeURL {
	case discoveryv1.WorkloadType, discoveryv1.ServiceType, discoveryv1.WaypointServiceType, discoveryv1.WaypointGatewayType:
	default:
		return fmt.Errorf("catalog: unexpected type %s", typeURL)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, m := range upserts {
		switch r := m.(type) {
		case *discoveryv1.Workload:
			c.workloads[r.GetUid()] = r
		case *discoveryv1.Service:
			c.services[r.GetNamespace()+"/"+r.GetHostname()] = r
		case *discoveryv1.WaypointService:
			c.waypoints[r.GetService()] = r
		case *discoveryv1.WaypointGateway:
			// Other waypoints' resources may be visible too; only this
			// waypoint's own applies.
			if c.gateway != "" && r.GetGateway() == c.gateway {
				c.gw = r
			}
		}
	}
	for _, n := range removes {
		switch typeURL {
		case discoveryv1.WorkloadType:
			delete(c.workloads, n)
		case discoveryv1.ServiceType:
			delete(c.services, n)
		case discoveryv1.WaypointServiceType:
			delete(c.waypoints, n)
		case discoveryv1.WaypointGatewayType:
			if n == c.gateway {
				c.gw = nil
			}
		}
	}
	c.rebuild()
	return nil
}

func typeOf(m proto.Message) string {
	switch m.(type) {
	case *discoveryv1.Workload:
		return discoveryv1.WorkloadType
	case *discoveryv1.Service:
		return discoveryv1.ServiceType
	case *discoveryv1.WaypointService:
		return discoveryv1.WaypointServiceType
	case *discoveryv1.WaypointGateway:
		return discoveryv1.WaypointGatewayType
	}
	return "type.googleapis.com/" + string(m.ProtoReflect().Descriptor().FullName())
}

// Update upserts resources of any of the catalog's types (tests and static
// configuration).
func (c *Catalog) Update(upserts []proto.Message, removes []string) error {
	byType := map[string][]proto.Message{}
	var order []string
	for _, m := range upserts {
		t := typeOf(m)
		if _, ok := byType[t]; !ok {
			order = append(order, t)
		}
		byType[t] = append(byType[t], m)
	}
	for _, t := range order {
		if err := c.Apply(t, byType[t], nil); err != nil {
			return err
		}
	}
	if len(removes) > 0 {
		return errors.New("catalog: Update cannot remove; use Apply with a type")
	}
	return nil
}

// MarkSynced declares the initial discovery state complete: the waypoint
// calls it once its xDS client reports Synced (every subscribed type had
// its whole first push, possibly split into several responses, handled);
// tests and static configuration call it once they loaded their state.
// Having applied some delta of each type is not enough: a push split into
// several responses would make the waypoint serve with part of its state.
func (c *Catalog) MarkSynced() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.synced = true
	s := *c.snap.Load()
	s.ready = true
	c.snap.Store(&s)
}

// Ready reports whether MarkSynced was called: until then Resolve refuses
// everything.
func (c *Catalog) Ready() bool { return c.snap.Load().ready }

// GatewayReady reports whether this waypoint's WaypointGateway has arrived:
// until then workload-addressed traffic is refused.
func (c *Catalog) GatewayReady() bool { return c.snap.Load().gw != nil }

func addrOf(b []byte) (netip.Addr, bool) {
	a, ok := netip.AddrFromSlice(b)
	return a.Unmap(), ok
}

// rebuild recomputes the snapshot; c.mu is held.
func (c *Catalog) rebuild() {
	old := c.snap.Load()
	s := &snapshot{byAddr: map[netip.AddrPort]*Target{}, byIP: map[netip.Addr]*discoveryv1.Workload{},
		bound: map[netip.Addr]*Target{}, waypoints: maps.Clone(c.waypoints), services: maps.Clone(c.services),
		gw: c.gw, ready: c.synced, generation: old.generation + 1}
	c.bySvc = map[string][]*discoveryv1.Workload{}
	for _, w := range c.workloads {
		for _, a := range w.GetAddresses() {
			if ip, ok := addrOf(a); ok {
				s.byIP[ip] = w
			}
		}
		for k := range w.GetServices() {
			c.bySvc[k] = append(c.bySvc[k], w)
		}
	}
	liveLimiters := map[string]bool{}
	for key, ws := range c.waypoints {
		svc := c.services[key]
		if svc == nil {
			continue
		}
		az := authz.Compile(ws.GetAuthorizations())
		an := authn.New(ws.GetRequestAuthentications(), c.keys, authn.Options{})
		lim, limErr := c.limiter(key, ws.GetTrafficPolicy().GetLocalRateLimit())
		liveLimiters[key] = true
		for _, sp := range svc.GetPorts() {
			t := &Target{Key: key, Service: svc, Port: sp.GetServicePort(), Protocol: protocol(sp),
				Routes: route.Compile(key, sp.GetServicePort(), ws.GetHttpRoutes(), ws.GetGrpcRoutes()),
				Authz:  az, Authn: an, Limiter: lim, LimiterErr: limErr, Fault: ws.GetTrafficPolicy().GetFault(), Policy: ws.GetTrafficPolicy()}
			for _, err := range t.Routes.Errors() {
				c.log.Warn("route problem", zap.String("service", key), zap.Error(err))
			}
			for _, a := range svc.GetAddresses() {
				if ip, ok := addrOf(a); ok {
					s.byAddr[netip.AddrPortFrom(ip, uint16(sp.GetServicePort()))] = t
				}
			}
		}
	}
	c.workloadTargets(s, liveLimiters)
	c.configureKeys()
	for k := range c.limiters {
		if !liveLimiters[k] {
			delete(c.limiters, k)
		}
	}
	c.snap.Store(s)
	for k, cl := range c.clusters {
		if uid, ok := strings.CutPrefix(k.service, workloadPrefix); ok {
			if _, live := c.wlProto[k]; !live {
				cl.Close()
				delete(c.clusters, k)
				continue
			}
			cl.Update(c.workloadEndpoint(uid, k.port), c.gw.GetTrafficPolicy())
			continue
		}
		if _, ok := c.services[k.service]; !ok {
			cl.Close()
			delete(c.clusters, k)
			continue
		}
		cl.Update(c.endpoints(k.service, k.port), c.policyFor(k.service))
	}
}

// workloadPrefix marks the pseudo-service of a workload addressed directly.
const workloadPrefix = "workload:"

// configureKeys tells the JWKS cache which URIs the RequestAuthentications
// reference now, so that it drops keys no longer needed and refetches
// those whose rules changed.
func (c *Catalog) configureKeys() {
	var ras []*discoveryv1.RequestAuthentication
	for _, ws := range c.waypoints {
		ras = append(ras, ws.GetRequestAuthentications()...)
	}
	ras = append(ras, c.gw.GetRequestAuthentications()...)
	c.keys.Configure(authn.Fingerprints(ras))
}

// gatewayLimiterKey keys the rate limiter of workload-addressed traffic:
// one bucket for the Gateway, shared by all workloads bound to it.
const gatewayLimiterKey = "gateway:"

// workloadTargets adds targets for workloads bound to this waypoint and
// addressed by their own IP, with the WaypointGateway's policies. Without
// the WaypointGateway none are added (fail closed). liveLimiters collects
// the limiter keys in use.
func (c *Catalog) workloadTargets(s *snapshot, liveLimiters map[string]bool) {
	clear(c.wlProto)
	if c.gateway == "" || c.gw == nil {
		return
	}
	tp := c.gw.GetTrafficPolicy()
	az := authz.Compile(c.gw.GetAuthorizations())
	an := authn.New(c.gw.GetRequestAuthentications(), c.keys, authn.Options{})
	lk := gatewayLimiterKey + c.gateway
	lim, limErr := c.limiter(lk, tp.GetLocalRateLimit())
	liveLimiters[lk] = true
	for uid, w := range c.workloads {
		if w.GetWaypoint().GetGateway() != c.gateway || len(w.GetAddresses()) == 0 {
			continue
		}
		key := workloadPrefix + uid
		pseudo := &discoveryv1.Service{Name: w.GetWorkloadName(), Namespace: w.GetNamespace()}
		base := &Target{Key: key, Service: pseudo, Protocol: "tcp", Workload: w,
			Authz: az, Authn: an, Limiter: lim, LimiterErr: limErr, Fault: tp.GetFault(), Policy: tp}
		ports := c.workloadPorts(w)
		for port, proto := range ports {
			c.wlProto[clusterKey{key, port}] = proto
		}
		for _, a := range w.GetAddresses() {
			ip, ok := addrOf(a)
			if !ok {
				continue
			}
			s.bound[ip] = base
			for port, proto := range ports {
				ap := netip.AddrPortFrom(ip, uint16(port))
				if _, taken := s.byAddr[ap]; taken {
					continue // a Service VIP (never expected to collide)
				}
				t := *base
				t.Port, t.Protocol = port, proto
				if t.HTTP() {
					t.Routes = route.Compile(key, port, nil, nil)
				}
				s.byAddr[ap] = &t
			}
		}
	}
}

// workloadPorts maps the target ports that w's Services declare to their
// protocol. When Services disagree about one target port, an HTTP-family
// protocol wins over TCP (a declaration says more than the default), and
// among those the Service first in name order wins.
func (c *Catalog) workloadPorts(w *discoveryv1.Workload) map[uint32]string {
	keys := make([]string, 0, len(w.GetServices()))
	for k := range w.GetServices() {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	ports := map[uint32]string{}
	for _, svcKey := range keys {
		svc := c.services[svcKey]
		if svc == nil {
			continue
		}
		for _, sp := range svc.GetPorts() {
			tp := sp.GetTargetPort()
			for _, p := range w.GetServices()[svcKey].GetPorts() {
				if p.GetServicePort() == sp.GetServicePort() && p.GetTargetPort() != 0 {
					tp = p.GetTargetPort()
				}
			}
			if tp == 0 || tp > 65535 {
				continue
			}
			proto := protocol(sp)
			if prev, ok := ports[tp]; !ok || !httpProtocol(prev) && httpProtocol(proto) {
				ports[tp] = proto
			}
		}
	}
	return ports
}

func httpProtocol(p string) bool {
	switch p {
	case "http", "http2", "grpc":
		return true
	}
	return false
}

// workloadEndpoint is the single endpoint of a directly addressed workload.
// Its readiness does not matter: traffic addressed to a pod's IP reaches
// the pod whether or not it is ready, as without a mesh.
func (c *Catalog) workloadEndpoint(uid string, port uint32) []upstream.Endpoint {
	w := c.workloads[uid]
	if w == nil || len(w.GetAddresses()) == 0 {
		return nil
	}
	ip, ok := addrOf(w.GetAddresses()[0])
	if !ok {
		return nil
	}
	return []upstream.Endpoint{endpointOf(w, netip.AddrPortFrom(ip, uint16(port)))}
}

func endpointOf(w *discoveryv1.Workload, addr netip.AddrPort) upstream.Endpoint {
	td := w.GetTrustDomain()
	if td == "" {
		td = "cluster.local"
	}
	return upstream.Endpoint{
		Addr:     addr,
		HBONE:    w.GetTunnelProtocol() == discoveryv1.TunnelProtocol_TUNNEL_PROTOCOL_HBONE,
		Identity: "spiffe://" + td + "/ns/" + w.GetNamespace() + "/sa/" + w.GetServiceAccount(),
		Workload: w.GetWorkloadName(), Namespace: w.GetNamespace(),
		CanonicalName: w.GetCanonicalName(), CanonicalRevision: w.GetCanonicalRevision(),
	}
}

// limiter returns the token bucket of key's LocalRateLimit (nil when there
// is none), or the reason it cannot be enforced. An invalid one fails
// closed: the caller refuses the requests it would have limited. It is
// logged once per configuration.
func (c *Catalog) limiter(key string, cfg *discoveryv1.LocalRateLimit) (*ratelimit.Bucket, error) {
	if cfg == nil {
		delete(c.limiters, key)
		return nil, nil
	}
	if e := c.limiters[key]; e != nil && proto.Equal(e.cfg, cfg) {
		return e.b, e.err // keep the bucket's tokens across unrelated updates
	}
	b, err := ratelimit.New(cfg, nil)
	if err != nil {
		c.log.Error("invalid local rate limit: requests refused until it is fixed", zap.String("service", key), zap.Error(err))
	}
	c.limiters[key] = &limiterEntry{cfg: cfg, b: b, err: err}
	return b, err
}

// InvalidRateLimits counts the services (and this waypoint's Gateway) whose
// LocalRateLimit cannot be enforced, and whose requests are therefore
// refused.
func (c *Catalog) InvalidRateLimits() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for _, e := range c.limiters {
		if e.err != nil {
			n++
		}
	}
	return n
}

func protocol(sp *discoveryv1.ServicePort) string {
	p := strings.ToLower(sp.GetAppProtocol())
	if p == "" {
		return "tcp"
	}
	return p
}

// policyFor returns the traffic policy for upstream service key: the served
// service's own policy, else any waypoint service's backend_policies entry.
func (c *Catalog) policyFor(key string) *discoveryv1.TrafficPolicy {
	if ws := c.waypoints[key]; ws != nil && ws.GetTrafficPolicy() != nil {
		return ws.GetTrafficPolicy()
	}
	keys := make([]string, 0, len(c.waypoints))
	for k := range c.waypoints {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		if tp := c.waypoints[k].GetBackendPolicies()[key]; tp != nil {
			return tp
		}
	}
	return nil
}

// endpoints lists the healthy endpoints of service key on service port.
func (c *Catalog) endpoints(key string, port uint32) []upstream.Endpoint {
	svc := c.services[key]
	var target uint32
	for _, sp := range svc.GetPorts() {
		if sp.GetServicePort() == port {
			target = sp.GetTargetPort()
		}
	}
	var out []upstream.Endpoint
	for _, w := range c.bySvc[key] {
		if w.GetStatus() != discoveryv1.WorkloadStatus_WORKLOAD_STATUS_HEALTHY || len(w.GetAddresses()) == 0 {
			continue
		}
		pl, ok := w.GetServices()[key]
		if !ok {
			continue
		}
		tp := target
		for _, p := range pl.GetPorts() {
			if p.GetServicePort() == port && p.GetTargetPort() != 0 {
				tp = p.GetTargetPort()
			}
		}
		if tp == 0 {
			continue
		}
		ip, ok := addrOf(w.GetAddresses()[0])
		if !ok {
			continue
		}
		out = append(out, endpointOf(w, netip.AddrPortFrom(ip, uint16(tp))))
	}
	slices.SortFunc(out, func(a, b upstream.Endpoint) int { return a.Addr.Compare(b.Addr) })
	return out
}

// Target returns the target for traffic addressed to addr, or nil. It
// knows only the service ports and the declared ports of bound workloads
// (everything served at L7); Resolve also knows a bound workload's other
// ports and says why an address is not served.
func (c *Catalog) Target(addr netip.AddrPort) *Target {
	return c.snap.Load().byAddr[netip.AddrPortFrom(addr.Addr().Unmap(), addr.Port())]
}

// Resolve returns the target for a tunnel addressed to addr: ErrNotSynced
// before the initial state (or, for a workload bound to this waypoint,
// before the WaypointGateway) has arrived, ErrNotServed for an address
// this waypoint does not serve. A bound workload's port that no Service
// declares is served as TCP.
func (c *Catalog) Resolve(addr netip.AddrPort) (*Target, error) {
	s := c.snap.Load()
	if !s.ready {
		return nil, ErrNotSynced
	}
	addr = netip.AddrPortFrom(addr.Addr().Unmap(), addr.Port())
	if t := s.byAddr[addr]; t != nil {
		return t, nil
	}
	if base := s.bound[addr.Addr()]; base != nil {
		if addr.Port() == 0 {
			return nil, fmt.Errorf("%w: %s: port 0", ErrNotServed, addr)
		}
		t := *base
		t.Port = uint32(addr.Port())
		return &t, nil
	}
	if c.gateway != "" && s.gw == nil {
		if w := s.byIP[addr.Addr()]; w != nil && w.GetWaypoint().GetGateway() == c.gateway {
			return nil, fmt.Errorf("%w: no WaypointGateway %s yet for workload %s", ErrNotSynced, c.gateway, addr)
		}
	}
	return nil, fmt.Errorf("%w: %s", ErrNotServed, addr)
}

// DialTarget opens a raw connection (L4 passthrough) for t: to the
// addressed workload itself for a workload target (addr is what the client
// addressed), else to an endpoint of the service picked by its load
// balancer.
func (c *Catalog) DialTarget(ctx context.Context, t *Target, addr netip.AddrPort, in *upstream.HashInput) (*upstream.Endpoint, net.Conn, error) {
	if w := t.Workload; w != nil {
		ep := endpointOf(w, netip.AddrPortFrom(addr.Addr().Unmap(), uint16(t.Port)))
		d := t.Policy.GetConnectionPool().GetConnectTimeout().AsDuration()
		if d <= 0 {
			d = 10 * time.Second
		}
		dctx, cancel := context.WithTimeout(ctx, d)
		defer cancel()
		conn, err := c.dial(dctx, &ep)
		if err != nil {
			return nil, nil, &upstream.ConnectError{Endpoint: ep.Addr, Err: err}
		}
		return &ep, conn, nil
	}
	cl, err := c.Cluster(t.Key, t.Port)
	if err != nil {
		return nil, nil, err
	}
	return cl.DialEndpoint(ctx, in)
}

// WorkloadByIP returns the workload with address ip, or nil.
func (c *Catalog) WorkloadByIP(ip netip.Addr) *discoveryv1.Workload {
	return c.snap.Load().byIP[ip.Unmap()]
}

// Service returns the service with resource name key, or nil.
func (c *Catalog) Service(key string) *discoveryv1.Service {
	return c.snap.Load().services[key]
}

// Cluster returns the upstream cluster of service key on port, creating it
// on first use. It fails when the service or port is unknown.
func (c *Catalog) Cluster(key string, port uint32) (*upstream.Cluster, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	k := clusterKey{key, port}
	if cl := c.clusters[k]; cl != nil {
		return cl, nil
	}
	if uid, ok := strings.CutPrefix(key, workloadPrefix); ok {
		proto, live := c.wlProto[k]
		if !live {
			return nil, fmt.Errorf("workload %q is not served on port %d", uid, port)
		}
		cl := upstream.New(upstream.Options{Name: fmt.Sprintf("%s:%d", key, port), HTTP2: proto == "http2" || proto == "grpc", Dial: c.dial})
		cl.Update(c.workloadEndpoint(uid, port), c.gw.GetTrafficPolicy())
		c.clusters[k] = cl
		return cl, nil
	}
	svc := c.services[key]
	if svc == nil {
		return nil, fmt.Errorf("unknown backend service %q", key)
	}
	var sp *discoveryv1.ServicePort
	for _, p := range svc.GetPorts() {
		if p.GetServicePort() == port {
			sp = p
		}
	}
	if sp == nil {
		return nil, fmt.Errorf("backend service %q has no port %d", key, port)
	}
	proto := protocol(sp)
	cl := upstream.New(upstream.Options{Name: fmt.Sprintf("%s:%d", key, port), HTTP2: proto == "http2" || proto == "grpc", Dial: c.dial})
	cl.Update(c.endpoints(key, port), c.policyFor(key))
	c.clusters[k] = cl
	return cl, nil
}

// Dump is the admin view of the catalog.
type Dump struct {
	Generation uint64 `json:"generation"`
	Ready      bool   `json:"ready"`
	// Gateway is this waypoint's Gateway; GatewayConfig whether its
	// WaypointGateway has arrived (workload-addressed traffic needs it).
	Gateway       string                    `json:"gateway"`
	GatewayConfig bool                      `json:"gateway_config"`
	BoundIPs      []string                  `json:"bound_workload_ips"`
	Targets       []string                  `json:"targets"`
	Clusters      map[string][]EndpointDump `json:"clusters"`
}

// EndpointDump is one endpoint in a Dump.
type EndpointDump struct {
	Address     string `json:"address"`
	HBONE       bool   `json:"hbone"`
	Identity    string `json:"identity"`
	Outstanding int64  `json:"outstanding"`
	Ejected     bool   `json:"ejected"`
}

// Snapshot returns the admin view.
func (c *Catalog) Snapshot() Dump {
	s := c.snap.Load()
	d := Dump{Generation: s.generation, Ready: s.ready, Gateway: c.gateway, GatewayConfig: s.gw != nil,
		Clusters: map[string][]EndpointDump{}}
	for a, t := range s.byAddr {
		d.Targets = append(d.Targets, fmt.Sprintf("%s -> %s:%d (%s)", a, t.Key, t.Port, t.Protocol))
	}
	sort.Strings(d.Targets)
	for ip := range s.bound {
		d.BoundIPs = append(d.BoundIPs, ip.String())
	}
	sort.Strings(d.BoundIPs)
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, cl := range c.clusters {
		var eds []EndpointDump
		for _, e := range cl.Endpoints() {
			eds = append(eds, EndpointDump{Address: e.Addr.String(), HBONE: e.HBONE, Identity: e.Identity,
				Outstanding: e.Outstanding(), Ejected: cl.Ejected(e)})
		}
		d.Clusters[cl.Name()] = eds
	}
	return d
}

// WaypointServices returns the raw WaypointService resources (admin dump).
func (c *Catalog) WaypointServices() map[string]*discoveryv1.WaypointService {
	return c.snap.Load().waypoints
}

// WaypointGateway returns this waypoint's WaypointGateway, nil until it
// arrives (admin dump).
func (c *Catalog) WaypointGateway() *discoveryv1.WaypointGateway { return c.snap.Load().gw }

// Close releases the pooled upstream connections of every cluster.
func (c *Catalog) Close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, cl := range c.clusters {
		cl.Close()
	}
}
