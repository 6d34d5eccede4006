package store

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	discoveryv1 "github.com/amesh-dev/amesh/api/discovery/v1"
	"google.golang.org/protobuf/proto"

	"github.com/amesh-dev/amesh/ztunnel/internal/authz"
)

func ip(s string) []byte { return netip.MustParseAddr(s).AsSlice() }

func wl(uid, ns, sa string, addr string, svcs map[string]*discoveryv1.PortList) *discoveryv1.Workload {
	return &discoveryv1.Workload{
		Uid: uid, Name: uid, Namespace: ns, ServiceAccount: sa, Addresses: [][]byte{ip(addr)},
		Services: svcs, TunnelProtocol: discoveryv1.TunnelProtocol_TUNNEL_PROTOCOL_HBONE,
	}
}

func ports(pairs ...uint32) *discoveryv1.PortList {
	pl := &discoveryv1.PortList{}
	for i := 0; i+1 < len(pairs); i += 2 {
		pl.Ports = append(pl.Ports, &discoveryv1.Port{ServicePort: pairs[i], TargetPort: pairs[i+1]})
	}
	return pl
}

func mustApply(t *testing.T, s *Store, typeURL string, ups []Resource, rm []string) {
	t.Helper()
	if err := s.Apply(typeURL, ups, rm); err != nil {
		t.Fatalf("Apply(%s): %v", typeURL, err)
	}
}

func TestWorkloadIndexes(t *testing.T) {
	s := New("cluster.local")
	svc := "default/echo.default.svc.cluster.local"
	mustApply(t, s, discoveryv1.WorkloadType, []Resource{
		{Name: "b", Body: wl("b", "default", "echo", "10.0.0.2", map[string]*discoveryv1.PortList{svc: ports(80, 8080)})},
		{Name: "a", Body: wl("a", "default", "echo", "10.0.0.1", map[string]*discoveryv1.PortList{svc: ports(80, 8080)})},
	}, nil)
	mustApply(t, s, discoveryv1.ServiceType, []Resource{{Name: svc, Body: &discoveryv1.Service{
		Name: "echo", Namespace: "default", Hostname: "echo.default.svc.cluster.local",
		Addresses: [][]byte{ip("10.96.0.10")}, Ports: []*discoveryv1.ServicePort{{ServicePort: 80}},
	}}}, nil)

	if w := s.WorkloadByIP(netip.MustParseAddr("10.0.0.1")); w == nil || w.Name != "a" {
		t.Fatalf("WorkloadByIP(10.0.0.1) = %v", w)
	}
	if w := s.WorkloadByIP(netip.MustParseAddr("::ffff:10.0.0.2")); w == nil || w.Name != "b" {
		t.Fatalf("WorkloadByIP(mapped 10.0.0.2) = %v", w)
	}
	if got := s.WorkloadByIP(netip.MustParseAddr("10.0.0.1")).Identity.String(); got != "spiffe://cluster.local/ns/default/sa/echo" {
		t.Fatalf("identity = %s", got)
	}
	if sv := s.ServiceByVIP(netip.MustParseAddr("10.96.0.10")); sv == nil || sv.Name != svc {
		t.Fatalf("ServiceByVIP = %v", sv)
	}
	eps := s.Endpoints(svc)
	if len(eps) != 2 || eps[0].Name != "a" || eps[1].Name != "b" {
		t.Fatalf("Endpoints = %v", names(eps))
	}

	// Update a: it leaves the service and changes IP.
	held := s.Endpoints(svc)
	mustApply(t, s, discoveryv1.WorkloadType, []Resource{{Name: "a", Body: wl("a", "default", "echo", "10.0.0.3", nil)}}, nil)
	if w := s.WorkloadByIP(netip.MustParseAddr("10.0.0.1")); w != nil {
		t.Fatalf("old IP still indexed: %v", w.Name)
	}
	if w := s.WorkloadByIP(netip.MustParseAddr("10.0.0.3")); w == nil || w.Name != "a" {
		t.Fatalf("new IP not indexed")
	}
	if eps := s.Endpoints(svc); len(eps) != 1 || eps[0].Name != "b" {
		t.Fatalf("Endpoints after update = %v", names(eps))
	}
	if len(held) != 2 || held[0].Name != "a" {
		t.Fatalf("a slice handed out earlier was modified: %v", names(held))
	}

	// Remove b and the service.
	mustApply(t, s, discoveryv1.WorkloadType, nil, []string{"b", "unknown"})
	mustApply(t, s, discoveryv1.ServiceType, nil, []string{svc})
	if eps := s.Endpoints(svc); len(eps) != 0 {
		t.Fatalf("Endpoints after removal = %v", names(eps))
	}
	if s.ServiceByVIP(netip.MustParseAddr("10.96.0.10")) != nil {
		t.Fatalf("service VIP still indexed")
	}
}

func names(ws []*Workload) []string {
	var out []string
	for _, w := range ws {
		out = append(out, w.Name)
	}
	return out
}

func TestSharedIP(t *testing.T) {
	s := New("cluster.local")
	mustApply(t, s, discoveryv1.WorkloadType, []Resource{
		{Name: "z", Body: wl("z", "a", "x", "10.0.0.1", nil)},
		{Name: "m", Body: wl("m", "a", "x", "10.0.0.1", nil)},
	}, nil)
	if w := s.WorkloadByIP(netip.MustParseAddr("10.0.0.1")); w.Name != "m" {
		t.Fatalf("got %s, want m", w.Name)
	}
	mustApply(t, s, discoveryv1.WorkloadType, nil, []string{"m"})
	if w := s.WorkloadByIP(netip.MustParseAddr("10.0.0.1")); w == nil || w.Name != "z" {
		t.Fatalf("removing one holder dropped the other")
	}
}

// TestApplyRejects: each invalid resource is rejected on its own — the
// error is a *RejectedError naming it (and wraps ErrInvalid) — while the
// rest of the update (a valid upsert, a removal) applies.
func TestApplyRejects(t *testing.T) {
	bundle := func(name string, pems ...string) Resource {
		return Resource{Name: name, Body: &discoveryv1.TrustBundle{TrustDomain: name, RootsPem: pems}}
	}
	root := string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: selfSigned(t).Raw}))
	fine := map[string]Resource{
		discoveryv1.WorkloadType: {Name: "fine", Body: wl("fine", "n", "sa", "10.0.0.5", nil)},
		discoveryv1.ServiceType: {Name: "n/fine", Body: &discoveryv1.Service{Name: "fine", Namespace: "n",
			Addresses: [][]byte{ip("10.96.0.5")}, Ports: []*discoveryv1.ServicePort{{ServicePort: 80}}}},
		discoveryv1.AuthorizationType: {Name: "n/fine", Body: &discoveryv1.Authorization{Name: "fine", Namespace: "n", Scope: discoveryv1.Authorization_SCOPE_NAMESPACE}},
		discoveryv1.TrustBundleType:   bundle("fine.example", root),
	}
	keep := map[string]Resource{
		discoveryv1.WorkloadType: {Name: "keep", Body: wl("keep", "n", "sa", "10.0.0.1", nil)},
		discoveryv1.ServiceType: {Name: "n/keep", Body: &discoveryv1.Service{Name: "keep", Namespace: "n",
			Addresses: [][]byte{ip("10.96.0.1")}, Ports: []*discoveryv1.ServicePort{{ServicePort: 80}}}},
		discoveryv1.AuthorizationType: {Name: "n/keep", Body: &discoveryv1.Authorization{Name: "keep", Namespace: "n", Scope: discoveryv1.Authorization_SCOPE_NAMESPACE}},
		discoveryv1.TrustBundleType:   bundle("keep.example", root),
	}
	held := func(s *Store, typeURL, name string) bool {
		d := s.Snapshot()
		switch typeURL {
		case discoveryv1.WorkloadType:
			return s.Workload(name) != nil
		case discoveryv1.ServiceType:
			return s.Service(name) != nil
		case discoveryv1.AuthorizationType:
			for _, a := range d.Authorizations {
				if a.GetNamespace()+"/"+a.GetName() == name {
					return true
				}
			}
			return false
		default:
			_, ok := d.TrustBundles[name]
			return ok
		}
	}
	tests := []struct {
		name    string
		typeURL string
		res     Resource
	}{
		{"workload bad address", discoveryv1.WorkloadType, Resource{Name: "a", Body: &discoveryv1.Workload{Addresses: [][]byte{{1, 2, 3}}}}},
		{"workload uid mismatch", discoveryv1.WorkloadType, Resource{Name: "a", Body: &discoveryv1.Workload{Uid: "b"}}},
		{"workload no name", discoveryv1.WorkloadType, Resource{Body: &discoveryv1.Workload{}}},
		{"workload bad trust domain", discoveryv1.WorkloadType, Resource{Name: "a", Body: &discoveryv1.Workload{ServiceAccount: "x", Namespace: "n", TrustDomain: "Bad Domain"}}},
		{"workload port out of range", discoveryv1.WorkloadType, Resource{Name: "a", Body: &discoveryv1.Workload{Services: map[string]*discoveryv1.PortList{"n/s": ports(80, 70000)}}}},
		{"workload bad waypoint", discoveryv1.WorkloadType, Resource{Name: "a", Body: &discoveryv1.Workload{Waypoint: &discoveryv1.GatewayAddress{}}}},
		{"workload wrong body", discoveryv1.WorkloadType, Resource{Name: "a", Body: &discoveryv1.Service{}}},
		{"service bad vip", discoveryv1.ServiceType, Resource{Name: "n/s", Body: &discoveryv1.Service{Addresses: [][]byte{{}}}}},
		{"service port zero", discoveryv1.ServiceType, Resource{Name: "n/s", Body: &discoveryv1.Service{Ports: []*discoveryv1.ServicePort{{}}}}},
		{"service bad waypoint address", discoveryv1.ServiceType, Resource{Name: "n/s", Body: &discoveryv1.Service{Waypoint: &discoveryv1.GatewayAddress{Address: []byte{1}}}}},
		{"policy bad cidr", discoveryv1.AuthorizationType, Resource{Name: "n/p", Body: &discoveryv1.Authorization{Name: "p", Namespace: "n", Rules: []*discoveryv1.Rule{{From: []*discoveryv1.Source{{IpBlocks: []string{"x"}}}}}}}},
		{"policy name mismatch", discoveryv1.AuthorizationType, Resource{Name: "n/q", Body: &discoveryv1.Authorization{Name: "p", Namespace: "n"}}},
		{"bundle no certs", discoveryv1.TrustBundleType, bundle("bad.example", "garbage")},
		{"bundle bad cert", discoveryv1.TrustBundleType, bundle("bad.example", string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: []byte("x")})))},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := New("cluster.local")
			mustApply(t, s, tt.typeURL, []Resource{keep[tt.typeURL]}, nil)
			err := s.Apply(tt.typeURL, []Resource{fine[tt.typeURL], tt.res}, []string{keep[tt.typeURL].Name})
			rej, ok := errors.AsType[*RejectedError](err)
			if !ok || !errors.Is(err, ErrInvalid) {
				t.Fatalf("Apply error = %v, want a *RejectedError wrapping ErrInvalid", err)
			}
			if len(rej.Rejected) != 1 || rej.Rejected[tt.res.Name] == nil {
				t.Fatalf("rejected %v, want only %q", rej.Rejected, tt.res.Name)
			}
			if !held(s, tt.typeURL, fine[tt.typeURL].Name) || held(s, tt.typeURL, keep[tt.typeURL].Name) {
				t.Fatalf("the valid part of the update was not applied (fine held %v, keep held %v)",
					held(s, tt.typeURL, fine[tt.typeURL].Name), held(s, tt.typeURL, keep[tt.typeURL].Name))
			}
		})
	}
	t.Run("unknown type", func(t *testing.T) {
		s := New("cluster.local")
		if err := s.Apply("type.googleapis.com/foo", []Resource{{Name: "x"}}, nil); !errors.Is(err, ErrUnknownType) || s.Version() != 0 {
			t.Fatalf("Apply error = %v (version %d), want ErrUnknownType and no change", err, s.Version())
		}
	})
}

// decide evaluates the policies of a workload in ns (listing names) for a
// connection from principal to port 8080.
func decide(s *Store, ns string, names []string, principal string) authz.Decision {
	return authz.Evaluate(s.Policies(ns, names), &authz.Conn{
		SourceIP: netip.MustParseAddr("10.1.0.1"), Principal: principal, Namespace: strings.Split(principal, "/")[2],
		DestinationIP: netip.MustParseAddr("10.0.0.1"), DestinationPort: 8080,
	})
}

// TestRejectedPolicyFailsClosed: an Authorization that does not compile
// never widens access. Good policies of the same response apply; the bad
// one keeps its previous version, or else a stand-in denies everything it
// selects, whether it was an ALLOW or a DENY.
func TestRejectedPolicyFailsClosed(t *testing.T) {
	const alice, bob = "cluster.local/ns/client/sa/alice", "cluster.local/ns/client/sa/bob"
	pol := func(ns, name string, scope discoveryv1.Authorization_Scope, deny bool, principals ...string) Resource {
		a := &discoveryv1.Authorization{Name: name, Namespace: ns, Scope: scope}
		if deny {
			a.Action = discoveryv1.Authorization_ACTION_DENY
		}
		if len(principals) > 0 {
			a.Rules = []*discoveryv1.Rule{{From: []*discoveryv1.Source{{Principals: principals}}}}
		}
		return Resource{Name: ns + "/" + name, Body: a}
	}
	broken := func(r Resource) Resource {
		a := proto.Clone(r.Body).(*discoveryv1.Authorization)
		a.Rules = append(a.Rules, &discoveryv1.Rule{From: []*discoveryv1.Source{{IpBlocks: []string{"not-a-cidr"}}}})
		return Resource{Name: r.Name, Body: a}
	}
	const ns, wlScope, global = discoveryv1.Authorization_SCOPE_NAMESPACE, discoveryv1.Authorization_SCOPE_WORKLOAD, discoveryv1.Authorization_SCOPE_GLOBAL
	type check struct {
		ns        string
		names     []string
		principal string
		allowed   bool
	}
	tests := []struct {
		name   string
		before []Resource // applied first (valid)
		update []Resource // one response with a bad policy
		remove []string
		checks []check
	}{
		{
			name: "bad policy among good DENY policies at first sync",
			update: []Resource{
				pol("a", "deny-alice", ns, true, alice),
				broken(pol("b", "allow-alice", ns, false, alice)),
				pol("c", "deny-bob", global, true, bob),
			},
			checks: []check{
				{"a", nil, alice, false}, // the good DENY applies
				{"a", nil, bob, false},   // so does the global one
				{"d", nil, alice, true},  // untouched namespaces stay open
				{"b", nil, alice, false}, // the bad ALLOW's targets are closed
			},
		},
		{
			name:   "bad DENY alone denies its targets",
			update: []Resource{broken(pol("a", "deny-alice", ns, true, alice))},
			checks: []check{{"a", nil, alice, false}, {"a", nil, bob, false}, {"b", nil, bob, true}},
		},
		{
			name:   "bad workload-scoped ALLOW denies the workloads listing it",
			update: []Resource{broken(pol("a", "allow-alice", wlScope, false, alice))},
			checks: []check{{"a", []string{"a/allow-alice"}, alice, false}, {"a", nil, alice, true}},
		},
		{
			name: "unknown scope denies everywhere",
			update: []Resource{{Name: "a/odd", Body: &discoveryv1.Authorization{
				Name: "odd", Namespace: "a", Scope: discoveryv1.Authorization_Scope(42), Action: discoveryv1.Authorization_ACTION_ALLOW,
			}}},
			checks: []check{{"a", nil, alice, false}, {"z", nil, bob, false}},
		},
		{
			name:   "a bad update keeps the previous version",
			before: []Resource{pol("a", "deny-alice", ns, true, alice)},
			update: []Resource{broken(pol("a", "deny-alice", ns, true, bob))},
			checks: []check{{"a", nil, alice, false}, {"a", nil, bob, true}},
		},
		{
			name:   "a bad update of a stand-in keeps denying",
			before: nil,
			update: []Resource{broken(pol("a", "allow-alice", ns, false, alice)), broken(pol("a", "x", ns, false, alice))},
			remove: []string{"a/x"},
			checks: []check{{"a", nil, alice, false}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := New("cluster.local")
			if tt.before != nil {
				mustApply(t, s, discoveryv1.AuthorizationType, tt.before, nil)
			}
			err := s.Apply(discoveryv1.AuthorizationType, tt.update, nil)
			if _, ok := errors.AsType[*RejectedError](err); !ok {
				t.Fatalf("Apply error = %v, want a *RejectedError", err)
			}
			if tt.remove != nil {
				mustApply(t, s, discoveryv1.AuthorizationType, nil, tt.remove)
			}
			for _, c := range tt.checks {
				if d := decide(s, c.ns, c.names, c.principal); d.Allowed != c.allowed {
					t.Errorf("%s → workload in %s %v: allowed %v (%s), want %v", c.principal, c.ns, c.names, d.Allowed, d.Reason, c.allowed)
				}
			}
		})
	}

	t.Run("a valid version or a removal lifts the stand-in", func(t *testing.T) {
		s := New("cluster.local")
		bad := broken(pol("a", "allow-alice", ns, false, alice))
		if err := s.Apply(discoveryv1.AuthorizationType, []Resource{bad}, nil); err == nil {
			t.Fatal("bad policy accepted")
		}
		if decide(s, "a", nil, alice).Allowed {
			t.Fatal("stand-in does not deny")
		}
		if d := s.Snapshot(); d.Rejected[discoveryv1.AuthorizationType]["a/allow-alice"] == "" {
			t.Errorf("config dump does not list the rejection: %v", d.Rejected)
		}
		mustApply(t, s, discoveryv1.AuthorizationType, []Resource{pol("a", "allow-alice", ns, false, alice)}, nil)
		if !decide(s, "a", nil, alice).Allowed || decide(s, "a", nil, bob).Allowed {
			t.Fatal("the valid version does not replace the stand-in")
		}
		if d := s.Snapshot(); len(d.Rejected) != 0 && len(d.Rejected[discoveryv1.AuthorizationType]) != 0 {
			t.Errorf("rejection still listed: %v", d.Rejected)
		}
		if err := s.Apply(discoveryv1.AuthorizationType, []Resource{bad}, nil); err == nil {
			t.Fatal("bad policy accepted")
		}
		if !decide(s, "a", nil, alice).Allowed || decide(s, "a", nil, bob).Allowed {
			t.Fatal("a bad update did not keep the valid version")
		}
		mustApply(t, s, discoveryv1.AuthorizationType, nil, []string{"a/allow-alice"})
		if !decide(s, "a", nil, bob).Allowed {
			t.Fatal("removing the policy left something denying")
		}
	})
}

// TestRejectedWorkload: an invalid workload does not disturb the others of
// its response, keeps its previous version if it had one, and its
// addresses are blocked (never unknown, which would pass through in
// plaintext) where no valid workload or service claims them.
func TestRejectedWorkload(t *testing.T) {
	const svc = "default/echo.default.svc.cluster.local"
	member := map[string]*discoveryv1.PortList{svc: ports(80, 8080)}
	bad := func(uid, addr string) Resource {
		w := wl(uid, "default", "echo", addr, map[string]*discoveryv1.PortList{
			svc:             ports(80, 8080),
			"default/other": ports(80, 70000), // out of range
		})
		return Resource{Name: uid, Body: w}
	}
	addr := netip.MustParseAddr
	s := New("cluster.local")
	err := s.Apply(discoveryv1.WorkloadType, []Resource{
		{Name: "w1", Body: wl("w1", "default", "echo", "10.0.0.1", member)},
		bad("w2", "10.0.0.2"),
		{Name: "w3", Body: wl("w3", "default", "echo", "10.0.0.3", member)},
	}, nil)
	rej, ok := errors.AsType[*RejectedError](err)
	if !ok || len(rej.Rejected) != 1 || rej.Rejected["w2"] == nil {
		t.Fatalf("Apply error = %v, want w2 rejected", err)
	}
	if got := names(s.Endpoints(svc)); !slices.Equal(got, []string{"w1", "w3"}) {
		t.Fatalf("endpoints %v, want [w1 w3]", got)
	}
	if s.Workload("w2") != nil || s.WorkloadByIP(addr("10.0.0.2")) != nil {
		t.Fatal("the rejected workload is in the store")
	}
	if name, ok := s.Blocked(addr("10.0.0.2")); !ok || name != "workload w2" {
		t.Fatalf("Blocked(10.0.0.2) = %q, %v", name, ok)
	}
	if _, ok := s.Blocked(addr("10.0.0.1")); ok {
		t.Fatal("a valid workload's address is blocked")
	}

	// A bad update of w1 keeps its previous version; the address it
	// moves to is blocked.
	if err := s.Apply(discoveryv1.WorkloadType, []Resource{bad("w1", "10.0.0.9")}, nil); err == nil {
		t.Fatal("bad update accepted")
	}
	if w := s.WorkloadByIP(addr("10.0.0.1")); w == nil || w.Name != "w1" || !w.HBONE() {
		t.Fatalf("w1's previous version is gone: %v", w)
	}
	if _, ok := s.Blocked(addr("10.0.0.9")); !ok {
		t.Fatal("the address of a rejected update is not blocked")
	}

	// A valid version, or a removal, lifts the block.
	mustApply(t, s, discoveryv1.WorkloadType, []Resource{{Name: "w2", Body: wl("w2", "default", "echo", "10.0.0.2", member)}}, []string{"w1"})
	for _, a := range []string{"10.0.0.2", "10.0.0.9"} {
		if name, ok := s.Blocked(addr(a)); ok {
			t.Errorf("%s still blocked by %s", a, name)
		}
	}
	if got := names(s.Endpoints(svc)); !slices.Equal(got, []string{"w2", "w3"}) {
		t.Fatalf("endpoints %v, want [w2 w3]", got)
	}

	// Services too.
	err = s.Apply(discoveryv1.ServiceType, []Resource{
		{Name: "default/bad", Body: &discoveryv1.Service{Addresses: [][]byte{ip("10.96.0.9")}, Ports: []*discoveryv1.ServicePort{{}}}},
		{Name: svc, Body: &discoveryv1.Service{Addresses: [][]byte{ip("10.96.0.10")}, Ports: []*discoveryv1.ServicePort{{ServicePort: 80}}}},
	}, nil)
	if _, ok := errors.AsType[*RejectedError](err); !ok {
		t.Fatalf("Apply error = %v", err)
	}
	if s.ServiceByVIP(addr("10.96.0.10")) == nil {
		t.Fatal("the valid service was not applied")
	}
	if name, ok := s.Blocked(addr("10.96.0.9")); !ok || name != "service default/bad" {
		t.Fatalf("Blocked(10.96.0.9) = %q, %v", name, ok)
	}
}

func TestPoliciesScope(t *testing.T) {
	s := New("cluster.local")
	pol := func(ns, name string, scope discoveryv1.Authorization_Scope) Resource {
		return Resource{Name: ns + "/" + name, Body: &discoveryv1.Authorization{Name: name, Namespace: ns, Scope: scope}}
	}
	mustApply(t, s, discoveryv1.AuthorizationType, []Resource{
		pol("istio-system", "global", discoveryv1.Authorization_SCOPE_GLOBAL),
		pol("foo", "ns-wide", discoveryv1.Authorization_SCOPE_NAMESPACE),
		pol("bar", "ns-wide", discoveryv1.Authorization_SCOPE_NAMESPACE),
		pol("foo", "selected", discoveryv1.Authorization_SCOPE_WORKLOAD),
		pol("foo", "other", discoveryv1.Authorization_SCOPE_WORKLOAD),
	}, nil)
	tests := []struct {
		ns    string
		names []string
		want  []string
	}{
		{"foo", []string{"foo/selected"}, []string{"foo/ns-wide", "foo/selected", "istio-system/global"}},
		{"bar", nil, []string{"bar/ns-wide", "istio-system/global"}},
		{"baz", []string{"foo/ns-wide", "missing/x"}, []string{"istio-system/global"}},
	}
	for _, tt := range tests {
		var got []string
		for _, p := range s.Policies(tt.ns, tt.names) {
			got = append(got, p.Name)
		}
		if len(got) != len(tt.want) {
			t.Fatalf("Policies(%s, %v) = %v, want %v", tt.ns, tt.names, got, tt.want)
		}
		for i := range got {
			if got[i] != tt.want[i] {
				t.Fatalf("Policies(%s, %v) = %v, want %v", tt.ns, tt.names, got, tt.want)
			}
		}
	}
	if !s.HasWorkloadPolicies("foo") || s.HasWorkloadPolicies("bar") {
		t.Fatalf("HasWorkloadPolicies: foo %v, bar %v", s.HasWorkloadPolicies("foo"), s.HasWorkloadPolicies("bar"))
	}
	mustApply(t, s, discoveryv1.AuthorizationType, nil, []string{"istio-system/global"})
	if got := s.Policies("bar", nil); len(got) != 1 {
		t.Fatalf("removed policy still applies: %d", len(got))
	}
}

func TestChangedAndBundles(t *testing.T) {
	s := New("cluster.local")
	ch := s.Changed()
	select {
	case <-ch:
		t.Fatal("changed before any update")
	default:
	}
	root := selfSigned(t)
	mustApply(t, s, discoveryv1.TrustBundleType, []Resource{{Name: "cluster.local", Body: &discoveryv1.TrustBundle{
		TrustDomain: "cluster.local", RootsPem: []string{string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: root.Raw}))},
	}}}, nil)
	select {
	case <-ch:
	case <-time.After(time.Second):
		t.Fatal("Changed not closed by an update")
	}
	if r := s.Roots()["cluster.local"]; len(r) != 1 || !r[0].Equal(root) {
		t.Fatalf("roots = %v", r)
	}
	d := s.Snapshot()
	if rs := d.TrustBundles["cluster.local"].Roots; len(rs) != 1 || rs[0].SubjectKeyID == "" || rs[0].SubjectKeyID != hex.EncodeToString(root.SubjectKeyId) {
		t.Fatalf("snapshot bundles = %+v", d.TrustBundles)
	}
}

func TestWaypointWorkloads(t *testing.T) {
	s := New("cluster.local")
	wp := wl("wp-1", "foo", "waypoint", "10.0.1.1", nil)
	wp.WaypointForGateway = "foo/waypoint"
	mustApply(t, s, discoveryv1.WorkloadType, []Resource{{Name: "wp-1", Body: wp}}, nil)
	g := &discoveryv1.GatewayAddress{Service: "foo/waypoint.foo.svc.cluster.local", Gateway: "foo/waypoint", HbonePort: 15008}
	if got := s.WaypointWorkloads(g); len(got) != 1 || got[0].Name != "wp-1" {
		t.Fatalf("by gateway = %v", names(got))
	}
	wp2 := wl("wp-2", "foo", "waypoint", "10.0.1.2", map[string]*discoveryv1.PortList{g.Service: ports(15008, 15008)})
	mustApply(t, s, discoveryv1.WorkloadType, []Resource{{Name: "wp-2", Body: wp2}}, nil)
	if got := s.WaypointWorkloads(g); len(got) != 1 || got[0].Name != "wp-2" {
		t.Fatalf("by service = %v", names(got))
	}
}

func selfSigned(t *testing.T) *x509.Certificate {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{Organization: []string{"test"}},
		NotBefore: time.Now(), NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// FuzzApply feeds arbitrary protobuf bytes as each resource type: Apply
// either rejects them in a *RejectedError or accepts them, the indexes
// stay usable, and a removal leaves nothing behind.
func FuzzApply(f *testing.F) {
	seed, _ := proto.Marshal(wl("a", "ns", "sa", "10.0.0.1", map[string]*discoveryv1.PortList{"ns/s": ports(80, 8080)}))
	f.Add(seed, uint8(0))
	svc, _ := proto.Marshal(&discoveryv1.Service{Addresses: [][]byte{ip("10.96.0.1")}, Ports: []*discoveryv1.ServicePort{{ServicePort: 80}}})
	f.Add(svc, uint8(1))
	f.Add([]byte{0x22, 0x03, 1, 2, 3}, uint8(0))
	f.Fuzz(func(t *testing.T, data []byte, kind uint8) {
		s := New("cluster.local")
		var typeURL string
		var body proto.Message
		switch kind % 4 {
		case 0:
			typeURL, body = discoveryv1.WorkloadType, &discoveryv1.Workload{}
		case 1:
			typeURL, body = discoveryv1.ServiceType, &discoveryv1.Service{}
		case 2:
			typeURL, body = discoveryv1.AuthorizationType, &discoveryv1.Authorization{}
		default:
			typeURL, body = discoveryv1.TrustBundleType, &discoveryv1.TrustBundle{}
		}
		if err := proto.Unmarshal(data, body); err != nil {
			return
		}
		name := "x"
		if a, ok := body.(*discoveryv1.Authorization); ok {
			name = a.GetNamespace() + "/" + a.GetName()
		}
		err := s.Apply(typeURL, []Resource{{Name: name, Body: body}}, nil)
		if rej, ok := errors.AsType[*RejectedError](err); err != nil && (!ok || !errors.Is(err, ErrInvalid) || rej.Rejected[name] == nil) {
			t.Fatalf("error is not a *RejectedError naming %q and wrapping ErrInvalid: %v", name, err)
		}
		for _, a := range []string{"10.0.0.1", "10.96.0.1", "::1"} {
			s.WorkloadByIP(netip.MustParseAddr(a))
			s.ServiceByVIP(netip.MustParseAddr(a))
			s.Blocked(netip.MustParseAddr(a))
		}
		s.Policies("ns", []string{name})
		s.Snapshot()
		if err := s.Apply(typeURL, nil, []string{name}); err != nil {
			t.Fatal(err)
		}
		// A removal leaves nothing behind: no block, no stand-in.
		if d := s.Snapshot(); len(d.Workloads)+len(d.Services)+len(d.Authorizations)+len(d.TrustBundles)+len(d.Rejected[typeURL]) != 0 {
			t.Fatalf("removal left %+v", d)
		}
		for _, a := range []string{"10.0.0.1", "10.96.0.1", "::1"} {
			if _, ok := s.Blocked(netip.MustParseAddr(a)); ok {
				t.Fatalf("%s still blocked after removal", a)
			}
		}
	})
}

// TestEndpointsImmutable: the endpoint lists the store hands out (to the
// router, which iterates them without the store's lock) never change
// afterwards, whatever is added or removed — checked both directly and,
// under -race, while another goroutine reads them.
func TestEndpointsImmutable(t *testing.T) {
	const svc = "default/echo.default.svc.cluster.local"
	member := map[string]*discoveryv1.PortList{svc: ports(80, 8080)}
	s := New("cluster.local")
	// Room to grow in place: 6 endpoints (a backing array of 8), then more
	// inserted in front.
	var rs []Resource
	for i := range 6 {
		n := fmt.Sprintf("w-%03d", 100+i)
		rs = append(rs, Resource{Name: n, Body: wl(n, "default", "echo", fmt.Sprintf("10.0.0.%d", 100+i), member)})
	}
	mustApply(t, s, discoveryv1.WorkloadType, rs, nil)

	held := s.Endpoints(svc)
	want := names(held)
	wp := &discoveryv1.GatewayAddress{Service: svc}
	heldWP := s.WaypointWorkloads(wp)

	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case <-stop:
				return
			default:
			}
			for _, l := range [][]*Workload{s.Endpoints(svc), s.WaypointWorkloads(wp)} {
				for _, w := range l {
					_ = w.Name
				}
			}
		}
	}()
	for i := range 100 {
		n := fmt.Sprintf("w-%03d", 99-i) // sorts before every existing one
		mustApply(t, s, discoveryv1.WorkloadType, []Resource{{Name: n, Body: wl(n, "default", "echo", fmt.Sprintf("10.0.1.%d", i), member)}}, nil)
		if i%10 == 0 {
			mustApply(t, s, discoveryv1.WorkloadType, nil, []string{n})
		}
	}
	close(stop)
	<-done
	if got := names(held); !slices.Equal(got, want) {
		t.Fatalf("an endpoint list handed out earlier changed: %v, was %v", got, want)
	}
	if got := names(heldWP); !slices.Equal(got, want) {
		t.Fatalf("a waypoint list handed out earlier changed: %v, was %v", got, want)
	}
	if got := len(s.Endpoints(svc)); got != 6+90 {
		t.Fatalf("%d endpoints, want %d", got, 6+90)
	}
	if eps := s.Endpoints(svc); !slices.IsSortedFunc(eps, func(a, b *Workload) int { return strings.Compare(a.Name, b.Name) }) {
		t.Fatalf("endpoints not sorted: %v", names(eps))
	}
}
