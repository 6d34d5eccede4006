// Package store holds ztunnel's view of the mesh: the workloads, services,
// authorization policies and trust bundles streamed by the controller,
// indexed by workload IP and by service VIP, and updated incrementally from
// delta discovery responses. An update that fails validation changes
// nothing (the discovery client NACKs it).
package store

import (
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
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
	changed     chan struct{}
	version     uint64
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

// Apply applies one delta update of typeURL: upserts replace resources by
// name, removes delete them (unknown names are ignored). Every upsert is
// validated first; on error nothing changes.
func (s *Store) Apply(typeURL string, upserts []Resource, removes []string) error {
	switch typeURL {
	case discoveryv1.WorkloadType:
		ws := make([]*Workload, 0, len(upserts))
		for _, r := range upserts {
			w, ok := r.Body.(*discoveryv1.Workload)
			if !ok {
				return fmt.Errorf("%w: %s: body is %T", ErrInvalid, r.Name, r.Body)
			}
			cw, err := s.compileWorkload(r.Name, w)
			if err != nil {
				return err
			}
			ws = append(ws, cw)
		}
		s.mu.Lock()
		defer s.mu.Unlock()
		dirty := map[string][]*Workload{}
		for _, n := range removes {
			s.removeWorkloadLocked(n, dirty)
		}
		for _, w := range ws {
			s.removeWorkloadLocked(w.Name, dirty)
			s.addWorkloadLocked(w, dirty)
		}
		s.rebuildEndpointsLocked(dirty)
	case discoveryv1.ServiceType:
		ss := make([]*Service, 0, len(upserts))
		for _, r := range upserts {
			sv, ok := r.Body.(*discoveryv1.Service)
			if !ok {
				return fmt.Errorf("%w: %s: body is %T", ErrInvalid, r.Name, r.Body)
			}
			cs, err := compileService(r.Name, sv)
			if err != nil {
				return err
			}
			ss = append(ss, cs)
		}
		s.mu.Lock()
		defer s.mu.Unlock()
		for _, n := range removes {
			s.removeServiceLocked(n)
		}
		for _, sv := range ss {
			s.removeServiceLocked(sv.Name)
			s.services[sv.Name] = sv
			for _, a := range sv.Addrs {
				s.byVIP[a] = sv
			}
		}
	case discoveryv1.AuthorizationType:
		ps := make([]*authz.Policy, 0, len(upserts))
		raws := make([]*discoveryv1.Authorization, 0, len(upserts))
		for _, r := range upserts {
			a, ok := r.Body.(*discoveryv1.Authorization)
			if !ok {
				return fmt.Errorf("%w: %s: body is %T", ErrInvalid, r.Name, r.Body)
			}
			p, err := authz.Compile(a)
			if err != nil {
				return fmt.Errorf("%w: %w", ErrInvalid, err)
			}
			if p.Name != r.Name {
				return fmt.Errorf("%w: authorization %s is named %s", ErrInvalid, r.Name, p.Name)
			}
			ps = append(ps, p)
			raws = append(raws, a)
		}
		s.mu.Lock()
		defer s.mu.Unlock()
		for _, n := range removes {
			delete(s.policies, n)
			delete(s.rawPolicies, n)
		}
		for i, p := range ps {
			s.policies[p.Name] = p
			s.rawPolicies[p.Name] = raws[i]
		}
	case discoveryv1.TrustBundleType:
		bs := make([]*Bundle, 0, len(upserts))
		for _, r := range upserts {
			b, ok := r.Body.(*discoveryv1.TrustBundle)
			if !ok {
				return fmt.Errorf("%w: %s: body is %T", ErrInvalid, r.Name, r.Body)
			}
			cb, err := compileBundle(r.Name, b)
			if err != nil {
				return err
			}
			bs = append(bs, cb)
		}
		s.mu.Lock()
		defer s.mu.Unlock()
		for _, n := range removes {
			delete(s.bundles, n)
		}
		for i, b := range bs {
			s.bundles[upserts[i].Name] = b
		}
	default:
		return fmt.Errorf("%w: %s", ErrUnknownType, typeURL)
	}
	s.version++
	close(s.changed)
	s.changed = make(chan struct{})
	return nil
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
}

// DumpBundle describes one trust bundle.
type DumpBundle struct {
	Roots []DumpCert `json:"roots"`
}

// DumpCert describes one certificate.
type DumpCert struct {
	Subject  string `json:"subject"`
	NotAfter string `json:"notAfter"`
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
			db.Roots = append(db.Roots, DumpCert{Subject: c.Subject.String(), NotAfter: c.NotAfter.UTC().Format("2006-01-02T15:04:05Z")})
		}
		d.TrustBundles[n] = db
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
