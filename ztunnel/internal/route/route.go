// Package route decides where an outbound connection captured from a pod
// goes (DESIGN.md §4 "Outbound"): the original destination is looked up as
// a service VIP, then as a workload IP; a bound waypoint takes the traffic
// over HBONE; otherwise an endpoint is picked round robin, reached over
// HBONE when it is captured and in plain TCP when not. Destinations the
// mesh does not know pass through unchanged; those that only rejected
// discovery data claims are refused.
package route

import (
	"errors"
	"fmt"
	"net/netip"
	"sync"
	"sync/atomic"

	discoveryv1 "github.com/amesh-dev/amesh/api/discovery/v1"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/amesh-dev/amesh/ztunnel/internal/store"
)

// DefaultHBONEPort is the HBONE port of captured pods and waypoints.
const DefaultHBONEPort = 15008

// Errors for destinations that are known but cannot be reached. The
// connection is refused rather than passed through: the mesh knows the
// destination and must not leak its traffic in plaintext.
var (
	ErrNoEndpoint = errors.New("no healthy endpoint")
	ErrNoWaypoint = errors.New("no usable waypoint")
	ErrNoPort     = errors.New("service has no such port")
	ErrNoIdentity = errors.New("destination has no identity")
	// ErrRejected: the destination is claimed only by discovery data that
	// failed validation; it may well be in the mesh, so it is refused
	// rather than passed through in plaintext.
	ErrRejected = errors.New("destination's discovery data was rejected")
)

// Kind is how a connection is forwarded.
type Kind int

const (
	// Passthrough dials Authority in plain TCP.
	Passthrough Kind = iota
	// HBONE opens a CONNECT tunnel to Proxy for Authority, verifying
	// that the peer is Identity.
	HBONE
)

func (k Kind) String() string {
	if k == HBONE {
		return "hbone"
	}
	return "passthrough"
}

// Target is one way to forward a connection.
type Target struct {
	Kind Kind
	// Proxy is the HBONE address (pod or waypoint IP, port 15008).
	Proxy netip.AddrPort
	// Authority is the CONNECT authority for HBONE, or the address to dial
	// for passthrough.
	Authority netip.AddrPort
	// Identity is the peer identity HBONE must verify.
	Identity spiffeid.ID
	// Workload is the workload that terminates the connection (the
	// endpoint, or the waypoint pod); nil when unknown.
	Workload *store.Workload
	// Waypoint is set when the target is a waypoint.
	Waypoint bool
}

func (t Target) String() string {
	if t.Kind == HBONE {
		return fmt.Sprintf("hbone %s via %s (%s)", t.Authority, t.Proxy, t.Identity)
	}
	return "passthrough " + t.Authority.String()
}

// Plan is the routing decision for one connection: the first target and
// at most one alternative for a retry after a connect failure.
type Plan struct {
	// Service is the destination service when the connection was
	// addressed to a VIP.
	Service *store.Service
	// Targets has one or two entries.
	Targets []Target
}

// Source describes the connecting pod.
type Source struct {
	// Gateway is the waypoint Gateway "<ns>/<name>" the source pod
	// implements, if it is a waypoint: traffic from a waypoint never goes
	// back through it.
	Gateway string
}

// Router computes plans from the discovery store. It keeps round-robin
// positions per service and per waypoint. Safe for concurrent use.
type Router struct {
	store *store.Store
	rr    sync.Map // key string → *atomic.Uint64
}

// New returns a Router reading s.
func New(s *store.Store) *Router { return &Router{store: s} }

func (r *Router) next(key string) uint64 {
	v, ok := r.rr.Load(key)
	if !ok {
		v, _ = r.rr.LoadOrStore(key, new(atomic.Uint64))
	}
	return v.(*atomic.Uint64).Add(1) - 1
}

// Outbound plans a connection from src to its original destination dst.
func (r *Router) Outbound(src Source, dst netip.AddrPort) (Plan, error) {
	dst = netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())
	if svc := r.store.ServiceByVIP(dst.Addr()); svc != nil {
		return r.toService(src, svc, dst)
	}
	if w := r.store.WorkloadByIP(dst.Addr()); w != nil {
		t, err := r.toWorkload(src, w, dst)
		if err != nil {
			return Plan{}, err
		}
		return Plan{Targets: []Target{t}}, nil
	}
	if name, ok := r.store.Blocked(dst.Addr()); ok {
		return Plan{}, fmt.Errorf("%w: %s claims %s", ErrRejected, name, dst.Addr())
	}
	return Plan{Targets: []Target{{Kind: Passthrough, Authority: dst}}}, nil
}

func (r *Router) toService(src Source, svc *store.Service, dst netip.AddrPort) (Plan, error) {
	sp, ok := svc.Port(dst.Port())
	if !ok {
		return Plan{}, fmt.Errorf("%w: %s port %d", ErrNoPort, svc.Name, dst.Port())
	}
	plan := Plan{Service: svc}
	if wp := svc.S.GetWaypoint(); wp != nil && src.Gateway != wp.GetGateway() {
		ts, err := r.viaWaypoint(wp, dst)
		if err != nil {
			return Plan{}, fmt.Errorf("service %s: %w", svc.Name, err)
		}
		plan.Targets = ts
		return plan, nil
	}
	// Eligible endpoints, in store order (sorted by name).
	var eps []endpoint
	for _, w := range r.store.Endpoints(svc.Name) {
		if !w.Healthy() {
			continue
		}
		tp := w.Services[svc.Name][sp.GetServicePort()]
		if tp == 0 {
			tp = sp.GetTargetPort()
		}
		if tp == 0 {
			// A named target port this workload does not resolve.
			continue
		}
		a, ok := pickAddr(w.Addrs, dst.Addr())
		if !ok {
			continue
		}
		eps = append(eps, endpoint{w: w, addr: netip.AddrPortFrom(a, uint16(tp))})
	}
	if len(eps) == 0 {
		return Plan{}, fmt.Errorf("%w: service %s port %d", ErrNoEndpoint, svc.Name, dst.Port())
	}
	start := int(r.next("svc/"+svc.Name) % uint64(len(eps)))
	n := min(2, len(eps))
	for i := 0; i < n; i++ {
		ep := eps[(start+i)%len(eps)]
		t, err := r.toWorkload(src, ep.w, ep.addr)
		if err != nil {
			if i == 0 {
				return Plan{}, err
			}
			break
		}
		plan.Targets = append(plan.Targets, t)
	}
	return plan, nil
}

type endpoint struct {
	w    *store.Workload
	addr netip.AddrPort
}

// pickAddr prefers an address of the same family as the destination.
func pickAddr(as []netip.Addr, like netip.Addr) (netip.Addr, bool) {
	for _, a := range as {
		if a.Is4() == like.Is4() {
			return a, true
		}
	}
	if len(as) > 0 {
		return as[0], true
	}
	return netip.Addr{}, false
}

// toWorkload forwards to one workload at addr.
func (r *Router) toWorkload(src Source, w *store.Workload, addr netip.AddrPort) (Target, error) {
	// A workload bound to a waypoint (by label, or the per-service-account
	// waypoint of its identity) is reached through it. For service
	// traffic this applies when the service itself has no waypoint.
	if wp := w.W.GetWaypoint(); wp != nil && src.Gateway != wp.GetGateway() {
		ts, err := r.viaWaypoint(wp, addr)
		if err != nil {
			return Target{}, fmt.Errorf("workload %s: %w", w.Name, err)
		}
		return ts[0], nil
	}
	if !w.HBONE() {
		return Target{Kind: Passthrough, Authority: addr, Workload: w}, nil
	}
	if w.Identity.IsZero() {
		return Target{}, fmt.Errorf("%w: workload %s", ErrNoIdentity, w.Name)
	}
	return Target{
		Kind:      HBONE,
		Proxy:     netip.AddrPortFrom(addr.Addr(), DefaultHBONEPort),
		Authority: addr,
		Identity:  w.Identity,
		Workload:  w,
	}, nil
}

// viaWaypoint returns up to two waypoint targets carrying authority.
func (r *Router) viaWaypoint(g *discoveryv1.GatewayAddress, authority netip.AddrPort) ([]Target, error) {
	port := uint16(g.GetHbonePort())
	if port == 0 {
		port = DefaultHBONEPort
	}
	var ws []*store.Workload
	for _, w := range r.store.WaypointWorkloads(g) {
		if w.Healthy() && len(w.Addrs) > 0 && !w.Identity.IsZero() {
			ws = append(ws, w)
		}
	}
	if len(ws) == 0 {
		return nil, fmt.Errorf("%w: %s has no healthy pod with an identity", ErrNoWaypoint, gatewayName(g))
	}
	start := int(r.next("wp/"+gatewayName(g)) % uint64(len(ws)))
	var out []Target
	for i := 0; i < min(2, len(ws)); i++ {
		w := ws[(start+i)%len(ws)]
		a, _ := pickAddr(w.Addrs, authority.Addr())
		out = append(out, Target{
			Kind:      HBONE,
			Proxy:     netip.AddrPortFrom(a, port),
			Authority: authority,
			Identity:  w.Identity,
			Workload:  w,
			Waypoint:  true,
		})
	}
	return out, nil
}

func gatewayName(g *discoveryv1.GatewayAddress) string {
	if g.GetGateway() != "" {
		return g.GetGateway()
	}
	return g.GetService()
}

// Waypoints returns the identities of the waypoints a workload is bound
// to: its own waypoint and those of the services it is an endpoint of.
// The destination ztunnel admits them without applying the workload's L4
// policies, which the waypoint enforces.
func (r *Router) Waypoints(w *store.Workload) []spiffeid.ID {
	if w == nil {
		return nil
	}
	var gs []*discoveryv1.GatewayAddress
	if wp := w.W.GetWaypoint(); wp != nil {
		gs = append(gs, wp)
	}
	for svc := range w.Services {
		if s := r.store.Service(svc); s != nil && s.S.GetWaypoint() != nil {
			gs = append(gs, s.S.GetWaypoint())
		}
	}
	var out []spiffeid.ID
	for _, g := range gs {
		for _, ww := range r.store.WaypointWorkloads(g) {
			if !ww.Identity.IsZero() {
				out = append(out, ww.Identity)
			}
		}
	}
	return out
}
