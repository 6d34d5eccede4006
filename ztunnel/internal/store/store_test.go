package store

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
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

func TestApplyRejects(t *testing.T) {
	tests := []struct {
		name    string
		typeURL string
		res     Resource
		unknown bool
	}{
		{"workload bad address", discoveryv1.WorkloadType, Resource{Name: "a", Body: &discoveryv1.Workload{Addresses: [][]byte{{1, 2, 3}}}}, false},
		{"workload uid mismatch", discoveryv1.WorkloadType, Resource{Name: "a", Body: &discoveryv1.Workload{Uid: "b"}}, false},
		{"workload no name", discoveryv1.WorkloadType, Resource{Body: &discoveryv1.Workload{}}, false},
		{"workload bad trust domain", discoveryv1.WorkloadType, Resource{Name: "a", Body: &discoveryv1.Workload{ServiceAccount: "x", Namespace: "n", TrustDomain: "Bad Domain"}}, false},
		{"workload port out of range", discoveryv1.WorkloadType, Resource{Name: "a", Body: &discoveryv1.Workload{Services: map[string]*discoveryv1.PortList{"n/s": ports(80, 70000)}}}, false},
		{"workload bad waypoint", discoveryv1.WorkloadType, Resource{Name: "a", Body: &discoveryv1.Workload{Waypoint: &discoveryv1.GatewayAddress{}}}, false},
		{"workload wrong body", discoveryv1.WorkloadType, Resource{Name: "a", Body: &discoveryv1.Service{}}, false},
		{"service bad vip", discoveryv1.ServiceType, Resource{Name: "n/s", Body: &discoveryv1.Service{Addresses: [][]byte{{}}}}, false},
		{"service port zero", discoveryv1.ServiceType, Resource{Name: "n/s", Body: &discoveryv1.Service{Ports: []*discoveryv1.ServicePort{{}}}}, false},
		{"service bad waypoint address", discoveryv1.ServiceType, Resource{Name: "n/s", Body: &discoveryv1.Service{Waypoint: &discoveryv1.GatewayAddress{Address: []byte{1}}}}, false},
		{"policy bad cidr", discoveryv1.AuthorizationType, Resource{Name: "n/p", Body: &discoveryv1.Authorization{Name: "p", Namespace: "n", Rules: []*discoveryv1.Rule{{From: []*discoveryv1.Source{{IpBlocks: []string{"x"}}}}}}}, false},
		{"policy name mismatch", discoveryv1.AuthorizationType, Resource{Name: "n/q", Body: &discoveryv1.Authorization{Name: "p", Namespace: "n"}}, false},
		{"bundle no certs", discoveryv1.TrustBundleType, Resource{Name: "cluster.local", Body: &discoveryv1.TrustBundle{RootsPem: []string{"garbage"}}}, false},
		{"bundle bad cert", discoveryv1.TrustBundleType, Resource{Name: "cluster.local", Body: &discoveryv1.TrustBundle{RootsPem: []string{string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: []byte("x")}))}}}, false},
		{"unknown type", "type.googleapis.com/foo", Resource{Name: "x"}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := New("cluster.local")
			// Existing state that a rejected update must not disturb.
			mustApply(t, s, discoveryv1.WorkloadType, []Resource{{Name: "keep", Body: wl("keep", "n", "sa", "10.0.0.1", nil)}}, nil)
			v := s.Version()
			err := s.Apply(tt.typeURL, []Resource{{Name: "fine", Body: wl("fine", "n", "sa", "10.0.0.5", nil)}, tt.res}, []string{"keep"})
			want := ErrInvalid
			if tt.unknown {
				want = ErrUnknownType
			}
			if !errors.Is(err, want) {
				t.Fatalf("Apply error = %v, want %v", err, want)
			}
			if s.Version() != v || s.Workload("keep") == nil || s.Workload("fine") != nil {
				t.Fatalf("a rejected update changed the store")
			}
		})
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
	if len(d.TrustBundles["cluster.local"].Roots) != 1 {
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
// either rejects them with ErrInvalid (changing nothing) or accepts them,
// and the indexes stay usable.
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
		if err := s.Apply(typeURL, []Resource{{Name: name, Body: body}}, nil); err != nil {
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("error does not wrap ErrInvalid: %v", err)
			}
			if s.Version() != 0 {
				t.Fatal("rejected update changed the store")
			}
			return
		}
		for _, a := range []string{"10.0.0.1", "10.96.0.1", "::1"} {
			s.WorkloadByIP(netip.MustParseAddr(a))
			s.ServiceByVIP(netip.MustParseAddr(a))
		}
		s.Policies("ns", []string{name})
		s.Snapshot()
		if err := s.Apply(typeURL, nil, []string{name}); err != nil {
			t.Fatal(err)
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
