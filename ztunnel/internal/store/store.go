// Package store holds ztunnel's view of the mesh: the workloads, services,
// authorization policies and trust bundles streamed by the controller,
// indexed by workload IP and by service VIP, and updated incrementally from
// delta discovery responses. Each resource is validated on its own; one
// that fails is reported (the discovery client NACKs the response naming
// it) and handled fail-closed, while the others apply (see Store.Apply).
package store

import (
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"sort"
	"strings"
	"sync"

	discoveryv1 "github.com/amesh-dev/amesh/api/discovery/v1"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/protobuf/proto"

	"github.com/amesh-dev/amesh/ztunnel/internal/authz"
)

// ErrInvalid marks a resource that failed validation.
var ErrInvalid = errors.New("invalid resource")

// ErrUnknownType is returned for a type URL the store does not hold.
var ErrUnknownType = errors.New("unknown resource type")

// Resource is one named discovery resource of a delta update.
type Resource struct {
	Name string
	Body proto.Message
}

// Workload is a validated discovery Workload with its derived fields. It is
// immutable once in the store.
type Workload struct {
	// Name is the resource name (the workload uid).
	Name string
	W    *discoveryv1.Workload
	// Addrs are the workload's IP addresses.
	Addrs []netip.Addr
	// Identity is the workload's SPIFFE ID (zero when it has no service
	// account).
	Identity spiffeid.ID
	// Services maps service resource names to service port → target port.
	Services map[string]map[uint32]uint32
}

// HBONE reports whether the workload is reached over HBONE.
func (w *Workload) HBONE() bool {
	return w.W.GetTunnelProtocol() == discoveryv1.TunnelProtocol_TUNNEL_PROTOCOL_HBONE
}

// Healthy reports whether the workload may receive traffic.
func (w *Workload) Healthy() bool {
	return w.W.GetStatus() == discoveryv1.WorkloadStatus_WORKLOAD_STATUS_HEALTHY
}

// MtlsMode returns the PeerAuthentication mode for one port.
func (w *Workload) MtlsMode(port uint16) discoveryv1.MtlsMode {
	if m, ok := w.W.GetPortMtlsModes()[uint32(port)]; ok && m != discoveryv1.MtlsMode_MTLS_MODE_UNSET {
		return m
	}
	return w.W.GetMtlsMode()
}

// Service is a validated discovery Service.
type Service struct {
	Name  string // "<namespace>/<hostname>"
	S     *discoveryv1.Service
	Addrs []netip.Addr
}

// Port returns the service port definition for p.
func (s *Service) Port(p uint16) (*discoveryv1.ServicePort, bool) {
	for _, sp := range s.S.GetPorts() {
		if sp.GetServicePort() == uint32(p) {
			return sp, true
		}
	}
	return nil, false
}

// Store is safe for concurrent use.
type Store struct {
	trustDomain string

	mu          sync.RWMutex
	workloads   map[string]*Workload
	byIP        map[netip.Addr][]*Workload
	services    map[string]*Service
	byVIP       map[netip.Addr]*Service
	endpoints   map[string][]*Workload // service name → endpoints sorted by name
	policies    map[string]*authz.Policy
	rawPolicies map[string]*discoveryv1.Authorization
	bundles     map[string]*Bundle
	// rejected holds, by type URL and name, the resources whose last
	// version failed validation; blocked indexes the addresses claimed by
	// rejected workloads and services ("workload <name>", "service <name>").
	rejected map[string]map[string]*rejection
	blocked  map[netip.Addr]map[string]struct{}
	changed  chan struct{}
	version  uint64
}

// Bundle is a trust domain's roots.
type Bundle struct {
	TrustDomain string
	Roots       []*x509.Certificate
}

// New returns an empty store. trustDomain is used for workloads that do
// not name one.
func New(trustDomain string) *Store {
	return &Store{
		trustDomain: trustDomain,
		workloads:   map[string]*Workload{},
		byIP:        map[netip.Addr][]*Workload{},
		services:    map[string]*Service{},
		byVIP:       map[netip.Addr]*Service{},
		endpoints:   map[string][]*Workload{},
		policies:    map[string]*authz.Policy{},
		rawPolicies: map[string]*discoveryv1.Authorization{},
		bundles:     map[string]*Bundle{},
		rejected:    map[string]map[string]*rejection{},
		blocked:     map[netip.Addr]map[string]struct{}{},
		changed:     make(chan struct{}),
	}
}

// Changed returns a channel that is closed at the next change of the store.
func (s *Store) Changed() <-chan struct{} {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.changed
}

// Version counts the changes applied so far.
func (s *Store) Version() uint64 {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.version
}

func addrs(raw [][]byte) ([]netip.Addr, error) {
	out := make([]netip.Addr, 0, len(raw))
	for _, b := range raw {
		a, ok := netip.AddrFromSlice(b)
		if !ok || (len(b) != 4 && len(b) != 16) {
			return nil, fmt.Errorf("%w: address of %d bytes", ErrInvalid, len(b))
		}
		out = append(out, a.Unmap())
	}
	return out, nil
}

func (s *Store) compileWorkload(name string, w *discoveryv1.Workload) (*Workload, error) {
	if name == "" {
		return nil, fmt.Errorf("%w: workload without a name", ErrInvalid)
	}
	if w.GetUid() != "" && w.GetUid() != name {
		return nil, fmt.Errorf("%w: workload %s: uid %q differs from the resource name", ErrInvalid, name, w.GetUid())
	}
	as, err := addrs(w.GetAddresses())
	if err != nil {
		return nil, fmt.Errorf("workload %s: %w", name, err)
	}
	out := &Workload{Name: name, W: w, Addrs: as, Services: map[string]map[uint32]uint32{}}
	if w.GetServiceAccount() != "" {
		td := w.GetTrustDomain()
		if td == "" {
			td = s.trustDomain
		}
		out.Identity, err = IdentityOf(td, w.GetNamespace(), w.GetServiceAccount())
		if err != nil {
			return nil, fmt.Errorf("%w: workload %s: %v", ErrInvalid, name, err)
		}
	}
	for svc, pl := range w.GetServices() {
		m := map[uint32]uint32{}
		for _, p := range pl.GetPorts() {
			if p.GetServicePort() == 0 || p.GetServicePort() > 65535 || p.GetTargetPort() > 65535 {
				return nil, fmt.Errorf("%w: workload %s: service %s: port %d→%d out of range", ErrInvalid, name, svc, p.GetServicePort(), p.GetTargetPort())
			}
			m[p.GetServicePort()] = p.GetTargetPort()
		}
		out.Services[svc] = m
	}
	if wp := w.GetWaypoint(); wp != nil {
		if err := checkGateway(wp); err != nil {
			return nil, fmt.Errorf("workload %s: %w", name, err)
		}
	}
	if _, ok := discoveryv1.TunnelProtocol_name[int32(w.GetTunnelProtocol())]; !ok {
		return nil, fmt.Errorf("%w: workload %s: unknown tunnel protocol %d", ErrInvalid, name, w.GetTunnelProtocol())
	}
	return out, nil
}

// IdentityOf builds spiffe://<td>/ns/<ns>/sa/<sa>.
func IdentityOf(td, ns, sa string) (spiffeid.ID, error) {
	t, err := spiffeid.TrustDomainFromString(td)
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("trust domain %q: %w", td, err)
	}
	return spiffeid.FromSegments(t, "ns", ns, "sa", sa)
}

func checkGateway(g *discoveryv1.GatewayAddress) error {
	if len(g.GetAddress()) != 0 && len(g.GetAddress()) != 4 && len(g.GetAddress()) != 16 {
		return fmt.Errorf("%w: waypoint address of %d bytes", ErrInvalid, len(g.GetAddress()))
	}
	if g.GetService() == "" && len(g.GetAddress()) == 0 {
		return fmt.Errorf("%w: waypoint with neither service nor address", ErrInvalid)
	}
	if g.GetHbonePort() > 65535 {
		return fmt.Errorf("%w: waypoint port %d", ErrInvalid, g.GetHbonePort())
	}
	return nil
}

func compileService(name string, sv *discoveryv1.Service) (*Service, error) {
	if name == "" {
		return nil, fmt.Errorf("%w: service without a name", ErrInvalid)
	}
	as, err := addrs(sv.GetAddresses())
	if err != nil {
		return nil, fmt.Errorf("service %s: %w", name, err)
	}
	for _, p := range sv.GetPorts() {
		if p.GetServicePort() == 0 || p.GetServicePort() > 65535 || p.GetTargetPort() > 65535 {
			return nil, fmt.Errorf("%w: service %s: port %d→%d out of range", ErrInvalid, name, p.GetServicePort(), p.GetTargetPort())
		}
	}
	if wp := sv.GetWaypoint(); wp != nil {
		if err := checkGateway(wp); err != nil {
			return nil, fmt.Errorf("service %s: %w", name, err)
		}
	}
	return &Service{Name: name, S: sv, Addrs: as}, nil
}

func compileBundle(name string, b *discoveryv1.TrustBundle) (*Bundle, error) {
	td := b.GetTrustDomain()
	if td == "" {
		td = name
	}
	if _, err := spiffeid.TrustDomainFromString(td); err != nil {
		return nil, fmt.Errorf("%w: trust bundle %s: %v", ErrInvalid, name, err)
	}
	out := &Bundle{TrustDomain: td}
	for i, p := range b.GetRootsPem() {
		rest := []byte(p)
		for {
			var blk *pem.Block
			blk, rest = pem.Decode(rest)
			if blk == nil {
				break
			}
			if blk.Type != "CERTIFICATE" {
				continue
			}
			c, err := x509.ParseCertificate(blk.Bytes)
			if err != nil {
				return nil, fmt.Errorf("%w: trust bundle %s: root %d: %v", ErrInvalid, name, i, err)
			}
			out.Roots = append(out.Roots, c)
		}
	}
	if len(out.Roots) == 0 {
		return nil, fmt.Errorf("%w: trust bundle %s has no certificate", ErrInvalid, name)
	}
	return out, nil
}

// RejectedError lists the resources of an update that failed validation
// (each reason wraps ErrInvalid). Everything else in the update was
// applied. It wraps ErrInvalid.
type RejectedError struct {
	Rejected map[string]error
}

func (e *RejectedError) Error() string {
	names := sortedKeys(e.Rejected)
	msgs := make([]string, 0, min(len(names), 10))
	for i, n := range names {
		if i == 10 {
			msgs = append(msgs, fmt.Sprintf("and %d more", len(names)-i))
			break
		}
		msgs = append(msgs, e.Rejected[n].Error())
	}
	return fmt.Sprintf("%d of the update's resources rejected: %s", len(names), strings.Join(msgs, "; "))
}

func (e *RejectedError) Unwrap() error { return ErrInvalid }

// rejection is the last version of a resource that failed validation.
type rejection struct {
	err error
	// addrs are the addresses a rejected workload or service claims (those
	// that parse): they are blocked (see Blocked).
	addrs []netip.Addr
	// standIn: a rejected authorization is replaced by a policy denying
	// everything it might select (there was no valid version to keep).
	standIn bool
}

// Apply applies one delta update of typeURL: removes delete resources by
// name (unknown names are ignored) and upserts replace them. Each upsert is
// validated on its own: the valid ones are applied, and the invalid ones
// are reported in a *RejectedError and handled so that access never
// widens (fail closed):
//
//   - a workload or service keeps its previous valid version if it had
//     one; in any case the addresses the rejected version claims (those
//     that parse) are blocked: a connection to an address that no valid
//     workload or service claims, but a rejected one does, is refused
//     instead of passing through in plaintext;
//   - an authorization keeps its previous valid version if it had one;
//     otherwise a stand-in denies all traffic to the workloads it selects
//     (by its scope, namespace and name; everything when its scope is not
//     known), whether it was an ALLOW or a DENY policy;
//   - a trust bundle keeps its previous version (without one, peers of
//     that trust domain cannot be verified anyway).
//
// A later valid version or a removal lifts the rejection.
func (s *Store) Apply(typeURL string, upserts []Resource, removes []string) error {
	rejected := map[string]error{}
	switch typeURL {
	case discoveryv1.WorkloadType:
		ws := make([]*Workload, 0, len(upserts))
		bad := map[string]*rejection{}
		for _, r := range upserts {
			w, ok := r.Body.(*discoveryv1.Workload)
			var cw *Workload
			var err error
			if !ok {
				err = fmt.Errorf("%w: workload %s: body is %T", ErrInvalid, r.Name, r.Body)
			} else {
				cw, err = s.compileWorkload(r.Name, w)
			}
			if err != nil {
				rejected[r.Name] = err
				bad[r.Name] = &rejection{err: err, addrs: parseableAddrs(w.GetAddresses())}
				continue
			}
			ws = append(ws, cw)
		}
		s.mu.Lock()
		defer s.mu.Unlock()
		dirty := map[string][]*Workload{}
		for _, n := range removes {
			s.removeWorkloadLocked(n, dirty)
			s.unrejectLocked(typeURL, n)
		}
		for _, w := range ws {
			s.removeWorkloadLocked(w.Name, dirty)
			s.addWorkloadLocked(w, dirty)
			s.unrejectLocked(typeURL, w.Name)
		}
		for n, rj := range bad {
			s.rejectLocked(typeURL, n, rj)
		}
		s.rebuildEndpointsLocked(dirty)
	case discoveryv1.ServiceType:
		ss := make([]*Service, 0, len(upserts))
		bad := map[string]*rejection{}
		for _, r := range upserts {
			sv, ok := r.Body.(*discoveryv1.Service)
			var cs *Service
			var err error
			if !ok {
				err = fmt.Errorf("%w: service %s: body is %T", ErrInvalid, r.Name, r.Body)
			} else {
				cs, err = compileService(r.Name, sv)
			}
			if err != nil {
				rejected[r.Name] = err
				bad[r.Name] = &rejection{err: err, addrs: parseableAddrs(sv.GetAddresses())}
				continue
			}
			ss = append(ss, cs)
		}
		s.mu.Lock()
		defer s.mu.Unlock()
		for _, n := range removes {
			s.removeServiceLocked(n)
			s.unrejectLocked(typeURL, n)
		}
		for _, sv := range ss {
			s.removeServiceLocked(sv.Name)
			s.services[sv.Name] = sv
			for _, a := range sv.Addrs {
				s.byVIP[a] = sv
			}
			s.unrejectLocked(typeURL, sv.Name)
		}
		for n, rj := range bad {
			s.rejectLocked(typeURL, n, rj)
		}
	case discoveryv1.AuthorizationType:
		ps := make([]*authz.Policy, 0, len(upserts))
		raws := make([]*discoveryv1.Authorization, 0, len(upserts))
		bad := map[string]*discoveryv1.Authorization{}
		for _, r := range upserts {
			a, ok := r.Body.(*discoveryv1.Authorization)
			var p *authz.Policy
			var err error
			switch {
			case !ok:
				err = fmt.Errorf("%w: authorization %s: body is %T", ErrInvalid, r.Name, r.Body)
			default:
				if p, err = authz.Compile(a); err != nil {
					err = fmt.Errorf("%w: authorization %s: %w", ErrInvalid, r.Name, err)
				} else if p.Name != r.Name {
					err = fmt.Errorf("%w: authorization %s is named %s", ErrInvalid, r.Name, p.Name)
				}
			}
			if err != nil {
				rejected[r.Name] = err
				bad[r.Name] = a
				continue
			}
			ps = append(ps, p)
			raws = append(raws, a)
		}
		s.mu.Lock()
		defer s.mu.Unlock()
		for _, n := range removes {
			delete(s.policies, n)
			delete(s.rawPolicies, n)
			s.unrejectLocked(typeURL, n)
		}
		for i, p := range ps {
			s.policies[p.Name] = p
			s.rawPolicies[p.Name] = raws[i]
			s.unrejectLocked(typeURL, p.Name)
		}
		for n, a := range bad {
			rj := &rejection{err: rejected[n]}
			prev := s.rejected[typeURL][n]
			if _, held := s.policies[n]; !held || (prev != nil && prev.standIn) {
				// Nothing valid to keep: deny what it might select.
				p, raw := standIn(n, a)
				s.policies[n] = p
				s.rawPolicies[n] = raw
				rj.standIn = true
			}
			s.rejectLocked(typeURL, n, rj)
		}
	case discoveryv1.TrustBundleType:
		bs := make([]*Bundle, 0, len(upserts))
		names := make([]string, 0, len(upserts))
		for _, r := range upserts {
			b, ok := r.Body.(*discoveryv1.TrustBundle)
			var cb *Bundle
			var err error
			if !ok {
				err = fmt.Errorf("%w: trust bundle %s: body is %T", ErrInvalid, r.Name, r.Body)
			} else {
				cb, err = compileBundle(r.Name, b)
			}
			if err != nil {
				rejected[r.Name] = err
				continue
			}
			bs = append(bs, cb)
			names = append(names, r.Name)
		}
		s.mu.Lock()
		defer s.mu.Unlock()
		for _, n := range removes {
			delete(s.bundles, n)
			s.unrejectLocked(typeURL, n)
		}
		for i, b := range bs {
			s.bundles[names[i]] = b
			s.unrejectLocked(typeURL, names[i])
		}
		for n, err := range rejected {
			s.rejectLocked(typeURL, n, &rejection{err: err})
		}
	default:
		return fmt.Errorf("%w: %s", ErrUnknownType, typeURL)
	}
	s.version++
	close(s.changed)
	s.changed = make(chan struct{})
	if len(rejected) > 0 {
		return &RejectedError{Rejected: rejected}
	}
	return nil
}

// parseableAddrs returns the well-formed addresses of a rejected resource.
func parseableAddrs(raw [][]byte) []netip.Addr {
	var out []netip.Addr
	for _, b := range raw {
		if len(b) != 4 && len(b) != 16 {
			continue
		}
		if a, ok := netip.AddrFromSlice(b); ok {
			out = append(out, a.Unmap())
		}
	}
	return out
}

// standIn is the policy that replaces a rejected authorization without a
// valid previous version: a DENY of every connection to what it might
// select. Its scope and namespace come from the rejected body when they
// are usable (the namespace also from the resource name "<ns>/<name>");
// when they are not, the policy could select anything, and the stand-in
// is global.
func standIn(name string, a *discoveryv1.Authorization) (*authz.Policy, *discoveryv1.Authorization) {
	ns := a.GetNamespace()
	if i := strings.IndexByte(name, '/'); ns == "" && i > 0 {
		ns = name[:i]
	}
	scope := a.GetScope()
	switch scope {
	case discoveryv1.Authorization_SCOPE_WORKLOAD:
		// Selected by resource name from the workloads' policy lists;
		// the namespace marks the namespace as having workload policies.
	case discoveryv1.Authorization_SCOPE_NAMESPACE:
		if ns == "" {
			scope = discoveryv1.Authorization_SCOPE_GLOBAL
		}
	default:
		scope = discoveryv1.Authorization_SCOPE_GLOBAL
	}
	p := authz.DenyAll(name, ns, scope)
	raw := &discoveryv1.Authorization{
		Name: strings.TrimPrefix(name, ns+"/"), Namespace: ns, Scope: scope,
		Action: discoveryv1.Authorization_ACTION_DENY, Rules: []*discoveryv1.Rule{{}},
	}
	return p, raw
}

// rejectLocked records a rejected version and blocks its addresses.
func (s *Store) rejectLocked(typeURL, name string, rj *rejection) {
	s.unrejectLocked(typeURL, name)
	m := s.rejected[typeURL]
	if m == nil {
		m = map[string]*rejection{}
		s.rejected[typeURL] = m
	}
	m[name] = rj
	key := blockKey(typeURL, name)
	for _, a := range rj.addrs {
		if s.blocked[a] == nil {
			s.blocked[a] = map[string]struct{}{}
		}
		s.blocked[a][key] = struct{}{}
	}
}

// unrejectLocked forgets a rejection (a valid version or a removal
// arrived) and unblocks its addresses. A stand-in policy is not removed
// here: the caller replaces or deletes it.
func (s *Store) unrejectLocked(typeURL, name string) {
	rj := s.rejected[typeURL][name]
	if rj == nil {
		return
	}
	delete(s.rejected[typeURL], name)
	key := blockKey(typeURL, name)
	for _, a := range rj.addrs {
		delete(s.blocked[a], key)
		if len(s.blocked[a]) == 0 {
			delete(s.blocked, a)
		}
	}
}

func blockKey(typeURL, name string) string {
	if typeURL == discoveryv1.ServiceType {
		return "service " + name
	}
	return "workload " + name
}

// Blocked reports whether a is claimed by a rejected workload or service
// (see Apply), and names one of them. Callers look up valid workloads and
// services first: a blocked address that none of them claims must not be
// treated as unknown to the mesh.
func (s *Store) Blocked(a netip.Addr) (string, bool) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	keys := s.blocked[a.Unmap()]
	if len(keys) == 0 {
		return "", false
	}
	return slices.Min(slices.Collect(maps.Keys(keys))), true
}

// addWorkloadLocked indexes w. It records w under the services it is an
// endpoint of in dirty; rebuildEndpointsLocked then publishes their new
// lists.
func (s *Store) addWorkloadLocked(w *Workload, dirty map[string][]*Workload) {
	s.workloads[w.Name] = w
	for _, a := range w.Addrs {
		s.byIP[a] = append(s.byIP[a], w)
	}
	for svc := range w.Services {
		dirty[svc] = append(dirty[svc], w)
	}
}

// removeWorkloadLocked unindexes a workload; the services it was an
// endpoint of become dirty.
func (s *Store) removeWorkloadLocked(name string, dirty map[string][]*Workload) {
	w, ok := s.workloads[name]
	if !ok {
		return
	}
	delete(s.workloads, name)
	for _, a := range w.Addrs {
		l := slices.DeleteFunc(s.byIP[a], func(x *Workload) bool { return x.Name == name })
		if len(l) == 0 {
			delete(s.byIP, a)
		} else {
			s.byIP[a] = l
		}
	}
	for svc := range w.Services {
		if _, ok := dirty[svc]; !ok {
			dirty[svc] = nil
		}
	}
}

// rebuildEndpointsLocked recomputes the endpoint lists of the dirty
// services once per update. A published list is never modified (Endpoints
// and WaypointWorkloads hand it out, and the router iterates it without the
// lock): each dirty service gets a fresh slice of its endpoints that are
// still current, plus the workloads added to it (dirty maps each service
// to them), sorted by name.
func (s *Store) rebuildEndpointsLocked(dirty map[string][]*Workload) {
	current := func(w *Workload) bool { return s.workloads[w.Name] == w }
	for svc, added := range dirty {
		old := s.endpoints[svc]
		l := make([]*Workload, 0, len(old)+len(added))
		for _, w := range old {
			if current(w) {
				l = append(l, w)
			}
		}
		for _, w := range added {
			if current(w) {
				l = append(l, w)
			}
		}
		if len(l) == 0 {
			delete(s.endpoints, svc)
			continue
		}
		slices.SortFunc(l, func(a, b *Workload) int { return strings.Compare(a.Name, b.Name) })
		s.endpoints[svc] = l
	}
}

func (s *Store) removeServiceLocked(name string) {
	sv, ok := s.services[name]
	if !ok {
		return
	}
	delete(s.services, name)
	for _, a := range sv.Addrs {
		if s.byVIP[a] == sv {
			delete(s.byVIP, a)
		}
	}
}

// WorkloadByIP returns the workload that owns a. When several claim it
// (host-network pods), the one with the smallest name wins, so the answer
// is stable.
func (s *Store) WorkloadByIP(a netip.Addr) *Workload {
	s.mu.RLock()
	defer s.mu.RUnlock()
	l := s.byIP[a.Unmap()]
	if len(l) == 0 {
		return nil
	}
	best := l[0]
	for _, w := range l[1:] {
		if w.Name < best.Name {
			best = w
		}
	}
	return best
}

// Workload returns a workload by name (uid).
func (s *Store) Workload(name string) *Workload {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.workloads[name]
}

// ServiceByVIP returns the service with virtual IP a.
func (s *Store) ServiceByVIP(a netip.Addr) *Service {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.byVIP[a.Unmap()]
}

// Service returns a service by resource name.
func (s *Store) Service(name string) *Service {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.services[name]
}

// Endpoints returns the workloads that are endpoints of a service, sorted
// by name. The slice must not be modified.
func (s *Store) Endpoints(service string) []*Workload {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.endpoints[service]
}

// WaypointWorkloads returns the workloads implementing a waypoint: the
// endpoints of its service, or else the workloads that declare the gateway.
func (s *Store) WaypointWorkloads(g *discoveryv1.GatewayAddress) []*Workload {
	if g == nil {
		return nil
	}
	s.mu.RLock()
	defer s.mu.RUnlock()
	if eps := s.endpoints[g.GetService()]; len(eps) > 0 {
		return eps
	}
	if g.GetGateway() == "" {
		return nil
	}
	var out []*Workload
	for _, w := range s.workloads {
		if w.W.GetWaypointForGateway() == g.GetGateway() {
			out = append(out, w)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// Policies returns the policies that apply to a workload: global ones, the
// namespace's, and those the workload lists. ns is the workload's namespace
// and names its WORKLOAD-scoped policy list; they are given separately so
// that a pod known only from the node agent can be checked too.
func (s *Store) Policies(ns string, names []string) []*authz.Policy {
	s.mu.RLock()
	defer s.mu.RUnlock()
	var out []*authz.Policy
	for _, p := range s.policies {
		switch p.Scope {
		case discoveryv1.Authorization_SCOPE_GLOBAL:
			out = append(out, p)
		case discoveryv1.Authorization_SCOPE_NAMESPACE:
			if p.Namespace == ns {
				out = append(out, p)
			}
		}
	}
	for _, n := range names {
		if p, ok := s.policies[n]; ok && p.Scope == discoveryv1.Authorization_SCOPE_WORKLOAD {
			out = append(out, p)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// HasWorkloadPolicies reports whether a namespace has WORKLOAD-scoped
// policies (which select pods by name through Workload.authorization_policies).
func (s *Store) HasWorkloadPolicies(ns string) bool {
	s.mu.RLock()
	defer s.mu.RUnlock()
	for _, p := range s.policies {
		if p.Scope == discoveryv1.Authorization_SCOPE_WORKLOAD && p.Namespace == ns {
			return true
		}
	}
	return false
}

// Roots returns the roots of every trust domain, by trust domain.
func (s *Store) Roots() map[string][]*x509.Certificate {
	s.mu.RLock()
	defer s.mu.RUnlock()
	out := map[string][]*x509.Certificate{}
	for _, b := range s.bundles {
		out[b.TrustDomain] = append(out[b.TrustDomain], b.Roots...)
	}
	return out
}

// Dump is a copy of the store's content for the admin config dump.
type Dump struct {
	Version        uint64
	Workloads      []*discoveryv1.Workload
	Services       []*discoveryv1.Service
	Authorizations []*discoveryv1.Authorization
	TrustBundles   map[string]DumpBundle
	// Endpoints maps service names to endpoint workload names.
	Endpoints map[string][]string
	// Rejected lists, by type URL and name, the resources whose last
	// version failed validation, and what stands in their place.
	Rejected map[string]map[string]string
}

// DumpBundle describes one trust bundle.
type DumpBundle struct {
	Roots []DumpCert `json:"roots"`
}

// DumpCert describes one certificate.
type DumpCert struct {
	Subject  string `json:"subject"`
	NotAfter string `json:"notAfter"`
	// SubjectKeyID (hex) tells roots of one subject apart (a rotation's)
	// and matches the authority key ID of the certificates they signed.
	SubjectKeyID string `json:"subjectKeyId,omitempty"`
}

// Snapshot returns copies of everything, sorted by name, for dumps.
func (s *Store) Snapshot() Dump {
	s.mu.RLock()
	defer s.mu.RUnlock()
	d := Dump{Version: s.version, TrustBundles: map[string]DumpBundle{}, Endpoints: map[string][]string{}}
	for _, n := range sortedKeys(s.workloads) {
		d.Workloads = append(d.Workloads, s.workloads[n].W)
	}
	for _, n := range sortedKeys(s.services) {
		d.Services = append(d.Services, s.services[n].S)
	}
	for _, n := range sortedKeys(s.rawPolicies) {
		d.Authorizations = append(d.Authorizations, s.rawPolicies[n])
	}
	for n, b := range s.bundles {
		var db DumpBundle
		for _, c := range b.Roots {
			db.Roots = append(db.Roots, DumpCert{Subject: c.Subject.String(), NotAfter: c.NotAfter.UTC().Format("2006-01-02T15:04:05Z"),
				SubjectKeyID: hex.EncodeToString(c.SubjectKeyId)})
		}
		d.TrustBundles[n] = db
	}
	for typeURL, m := range s.rejected {
		for n, rj := range m {
			what := "not applied"
			switch typeURL {
			case discoveryv1.WorkloadType:
				if s.workloads[n] != nil {
					what = "previous version kept"
				}
			case discoveryv1.ServiceType:
				if s.services[n] != nil {
					what = "previous version kept"
				}
			case discoveryv1.AuthorizationType:
				what = "previous version kept"
				if rj.standIn {
					what = "a stand-in denies all traffic to what it selects"
				}
			case discoveryv1.TrustBundleType:
				if s.bundles[n] != nil {
					what = "previous version kept"
				}
			}
			if len(rj.addrs) > 0 {
				what += "; its addresses are blocked where no valid resource claims them"
			}
			if d.Rejected == nil {
				d.Rejected = map[string]map[string]string{}
			}
			if d.Rejected[typeURL] == nil {
				d.Rejected[typeURL] = map[string]string{}
			}
			d.Rejected[typeURL][n] = rj.err.Error() + " (" + what + ")"
		}
	}
	for svc, eps := range s.endpoints {
		for _, w := range eps {
			d.Endpoints[svc] = append(d.Endpoints[svc], w.Name)
		}
	}
	return d
}

func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// Principal is a SPIFFE ID without its scheme, as policies write it.
func Principal(id spiffeid.ID) string {
	if id.IsZero() {
		return ""
	}
	return strings.TrimPrefix(id.String(), "spiffe://")
}
