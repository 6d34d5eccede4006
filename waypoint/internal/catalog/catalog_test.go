package catalog

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"sync"
	"testing"
	"time"

	discoveryv1 "github.com/amesh-dev/amesh/api/discovery/v1"
	"github.com/amesh-dev/amesh/waypoint/internal/authn"
	"github.com/amesh-dev/amesh/waypoint/internal/authz"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
)

const key = "shop/cart.shop.svc.cluster.local"

func fixture(t *testing.T) *Catalog {
	t.Helper()
	c := New(Options{})
	c.MarkSynced()
	svc := &discoveryv1.Service{Name: "cart", Namespace: "shop", Hostname: "cart.shop.svc.cluster.local",
		Addresses: [][]byte{{10, 96, 0, 10}},
		Ports: []*discoveryv1.ServicePort{
			{Name: "http", ServicePort: 80, TargetPort: 8080, AppProtocol: "http"},
			{Name: "grpc-api", ServicePort: 9090, AppProtocol: "grpc"}, // named target port
			{Name: "db", ServicePort: 5432, TargetPort: 5432},
		}}
	w := func(uid string, ip byte, status discoveryv1.WorkloadStatus, ports ...*discoveryv1.Port) *discoveryv1.Workload {
		return &discoveryv1.Workload{Uid: uid, Name: uid, Namespace: "shop", Addresses: [][]byte{{10, 1, 0, ip}},
			ServiceAccount: "cart", TrustDomain: "example.org", Status: status,
			TunnelProtocol: discoveryv1.TunnelProtocol_TUNNEL_PROTOCOL_HBONE,
			Services:       map[string]*discoveryv1.PortList{key: {Ports: ports}}}
	}
	if err := c.Update([]proto.Message{svc,
		w("a", 1, discoveryv1.WorkloadStatus_WORKLOAD_STATUS_HEALTHY, &discoveryv1.Port{ServicePort: 9090, TargetPort: 9999}),
		w("b", 2, discoveryv1.WorkloadStatus_WORKLOAD_STATUS_UNHEALTHY),
		&discoveryv1.WaypointService{Service: key, TrafficPolicy: &discoveryv1.TrafficPolicy{
			LocalRateLimit: &discoveryv1.LocalRateLimit{MaxTokens: 1, FillInterval: durationpb.New(time.Hour)}}},
	}, nil); err != nil {
		t.Fatal(err)
	}
	return c
}

func TestTargetsAndEndpoints(t *testing.T) {
	c := fixture(t)
	tg := c.Target(netip.MustParseAddrPort("10.96.0.10:80"))
	if tg == nil || !tg.HTTP() || tg.Key != key {
		t.Fatalf("target %+v", tg)
	}
	if db := c.Target(netip.MustParseAddrPort("10.96.0.10:5432")); db == nil || db.HTTP() || db.Protocol != "tcp" {
		t.Fatalf("db target %+v", db)
	}
	if c.Target(netip.MustParseAddrPort("10.96.0.10:81")) != nil {
		t.Fatal("unknown port resolved")
	}
	cl, err := c.Cluster(key, 80)
	if err != nil {
		t.Fatal(err)
	}
	eps := cl.Endpoints()
	if len(eps) != 1 || eps[0].Addr != netip.MustParseAddrPort("10.1.0.1:8080") || !eps[0].HBONE ||
		eps[0].Identity != "spiffe://example.org/ns/shop/sa/cart" {
		t.Fatalf("endpoints %+v (unhealthy must be skipped)", eps)
	}
	cl9090, err := c.Cluster(key, 9090)
	if err != nil {
		t.Fatal(err)
	}
	if eps := cl9090.Endpoints(); len(eps) != 1 || eps[0].Addr.Port() != 9999 {
		t.Fatalf("named target port not resolved per workload: %+v", eps)
	}
	if _, err := c.Cluster(key, 1234); err == nil {
		t.Fatal("cluster for a missing port")
	}
}

func TestApplyValidatesAndRemovesByType(t *testing.T) {
	c := fixture(t)
	before := c.Target(netip.MustParseAddrPort("10.96.0.10:80"))
	// A wrong type under a type URL is NACKed and changes nothing.
	err := c.Apply(discoveryv1.ServiceType, []proto.Message{&discoveryv1.Service{Name: "x", Namespace: "y", Hostname: "x.y"},
		&discoveryv1.Workload{Uid: "zzz"}}, nil)
	if err == nil {
		t.Fatal("mixed types accepted")
	}
	if c.Service("y/x.y") != nil {
		t.Fatal("NACKed update partially applied")
	}
	// The rate limiter survives unrelated updates (tokens are not refilled).
	if !before.Limiter.Allow() {
		t.Fatal("first token")
	}
	if err := c.Apply(discoveryv1.WorkloadType, []proto.Message{&discoveryv1.Workload{Uid: "c", Addresses: [][]byte{{10, 1, 0, 3}}}}, nil); err != nil {
		t.Fatal(err)
	}
	after := c.Target(netip.MustParseAddrPort("10.96.0.10:80"))
	if after.Limiter != before.Limiter || after.Limiter.Allow() {
		t.Fatal("rate limiter reset by an unrelated update")
	}
	if c.WorkloadByIP(netip.MustParseAddr("10.1.0.3")) == nil {
		t.Fatal("workload by IP")
	}
	// Removing the WaypointService (same name as the Service) keeps the Service.
	if err := c.Apply(discoveryv1.WaypointServiceType, nil, []string{key}); err != nil {
		t.Fatal(err)
	}
	if c.Service(key) == nil {
		t.Fatal("removing the WaypointService removed the Service")
	}
	if c.Target(netip.MustParseAddrPort("10.96.0.10:80")) != nil {
		t.Fatal("target still served without its WaypointService")
	}
	if err := c.Apply(discoveryv1.ServiceType, nil, []string{key}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Cluster(key, 80); err == nil {
		t.Fatal("cluster of a removed service")
	}
}

func TestWorkloadAddressedTargets(t *testing.T) {
	c := New(Options{Gateway: "shop/waypoint"})
	bound := &discoveryv1.GatewayAddress{Gateway: "shop/waypoint"}
	w := func(uid string, ip byte, wp *discoveryv1.GatewayAddress, svcs ...string) *discoveryv1.Workload {
		m := map[string]*discoveryv1.PortList{}
		for _, s := range svcs {
			m[s] = &discoveryv1.PortList{}
		}
		return &discoveryv1.Workload{Uid: uid, Namespace: "shop", Addresses: [][]byte{{10, 1, 0, ip}}, ServiceAccount: uid,
			Waypoint: wp, TunnelProtocol: discoveryv1.TunnelProtocol_TUNNEL_PROTOCOL_HBONE, Services: m}
	}
	svcDeny := &discoveryv1.Authorization{Namespace: "shop", Name: "svc-deny-all", Action: discoveryv1.Authorization_ACTION_DENY, Rules: []*discoveryv1.Rule{{}}}
	gwDeny := &discoveryv1.Authorization{Namespace: "shop", Name: "gw-deny-admin", Action: discoveryv1.Authorization_ACTION_DENY,
		Rules: []*discoveryv1.Rule{{To: []*discoveryv1.Operation{{Paths: []string{"/admin*"}}}}}}
	other := "shop/tcp-other.shop.svc.cluster.local"
	apply := func(typeURL string, ms ...proto.Message) {
		t.Helper()
		if err := c.Apply(typeURL, ms, nil); err != nil {
			t.Fatal(err)
		}
	}
	wantErr := func(addr string, want error) {
		t.Helper()
		if tg, err := c.Resolve(netip.MustParseAddrPort(addr)); !errors.Is(err, want) {
			t.Fatalf("Resolve(%s) = %+v, %v; want %v", addr, tg, err, want)
		}
	}
	// Nothing is served before the state is declared synced, however many
	// types have had a delta applied.
	apply(discoveryv1.ServiceType,
		&discoveryv1.Service{Name: "cart", Namespace: "shop", Hostname: "cart.shop.svc.cluster.local", Addresses: [][]byte{{10, 96, 0, 10}},
			Ports: []*discoveryv1.ServicePort{{ServicePort: 80, TargetPort: 8080, AppProtocol: "http"}}},
		// Declares 8080 as TCP: the HTTP declaration of cart wins.
		&discoveryv1.Service{Name: "tcp-other", Namespace: "shop", Hostname: "tcp-other.shop.svc.cluster.local",
			Ports: []*discoveryv1.ServicePort{{ServicePort: 1, TargetPort: 8080}, {ServicePort: 5432, TargetPort: 5432}}})
	apply(discoveryv1.WorkloadType, w("bound", 1, bound, key, other), w("other-waypoint", 2, &discoveryv1.GatewayAddress{Gateway: "shop/else"}, key),
		w("unbound", 3, nil, key), w("bound-no-service", 4, bound, "shop/nope.shop.svc.cluster.local"))
	wantErr("10.96.0.10:80", ErrNotSynced)
	apply(discoveryv1.WaypointServiceType, &discoveryv1.WaypointService{Service: key, Authorizations: []*discoveryv1.Authorization{svcDeny}})
	apply(discoveryv1.WaypointGatewayType)
	if c.Ready() {
		t.Fatal("ready before MarkSynced")
	}
	wantErr("10.96.0.10:80", ErrNotSynced)
	c.MarkSynced()
	if !c.Ready() || c.GatewayReady() {
		t.Fatalf("ready %v gateway ready %v", c.Ready(), c.GatewayReady())
	}
	if _, err := c.Resolve(netip.MustParseAddrPort("10.96.0.10:80")); err != nil {
		t.Fatalf("service traffic without a WaypointGateway: %v", err)
	}
	// Bound workloads wait for the WaypointGateway; others are never served.
	wantErr("10.1.0.1:8080", ErrNotSynced)
	wantErr("10.1.0.3:8080", ErrNotServed)
	// Another gateway's resource is ignored.
	apply(discoveryv1.WaypointGatewayType, &discoveryv1.WaypointGateway{Gateway: "shop/else"})
	wantErr("10.1.0.1:8080", ErrNotSynced)

	apply(discoveryv1.WaypointGatewayType, &discoveryv1.WaypointGateway{Gateway: "shop/waypoint",
		Authorizations: []*discoveryv1.Authorization{gwDeny},
		TrafficPolicy:  &discoveryv1.TrafficPolicy{LocalRateLimit: &discoveryv1.LocalRateLimit{MaxTokens: 1, FillInterval: durationpb.New(time.Hour)}}})
	tg, err := c.Resolve(netip.MustParseAddrPort("10.1.0.1:8080"))
	if err != nil || tg.Workload.GetUid() != "bound" || tg.Protocol != "http" || tg.Port != 8080 {
		t.Fatalf("bound workload target %+v, %v", tg, err)
	}
	if c.Target(netip.MustParseAddrPort("10.1.0.1:8080")) != tg {
		t.Fatal("Target and Resolve disagree")
	}
	// The Gateway's policies apply, not the Service's.
	if !tg.Authz.Evaluate(&authz.Attributes{Path: "/books"}).Allow || tg.Authz.Evaluate(&authz.Attributes{Path: "/admin/x"}).Allow {
		t.Fatal("workload target does not carry the WaypointGateway's authorization")
	}
	m, ok := tg.Routes.Lookup(mustReq(t))
	if !ok || !m.Rule.Default {
		t.Fatal("no default route")
	}
	cl, err := c.Cluster(m.Rule.Backends[0].GetService(), m.Rule.Backends[0].GetPort())
	if err != nil {
		t.Fatal(err)
	}
	if eps := cl.Endpoints(); len(eps) != 1 || eps[0].Addr != netip.MustParseAddrPort("10.1.0.1:8080") {
		t.Fatalf("workload cluster %+v", eps)
	}
	// Ports no Service declares as HTTP are TCP, on any bound workload.
	for _, tc := range []struct {
		addr string
		port uint32
	}{{"10.1.0.1:5432", 5432}, {"10.1.0.1:9999", 9999}, {"10.1.0.4:8080", 8080}} {
		tg, err := c.Resolve(netip.MustParseAddrPort(tc.addr))
		if err != nil || tg.HTTP() || tg.Port != tc.port || tg.Workload == nil || tg.Authz.Evaluate(&authz.Attributes{L4: true}).Allow {
			t.Errorf("%s: %+v %v (want TCP under the Gateway's DENY, which at L4 ignores its path)", tc.addr, tg, err)
		}
	}
	// The rate limit bucket is the Gateway's, shared by its workloads.
	t4, _ := c.Resolve(netip.MustParseAddrPort("10.1.0.4:8080"))
	if tg.Limiter == nil || t4.Limiter != tg.Limiter {
		t.Fatal("bound workloads do not share the Gateway's rate limiter")
	}
	wantErr("10.1.0.2:8080", ErrNotServed)
	wantErr("10.1.0.3:8080", ErrNotServed)
	wantErr("10.9.9.9:80", ErrNotServed)
	// Removing the WaypointGateway stops workload-addressed traffic again.
	if err := c.Apply(discoveryv1.WaypointGatewayType, nil, []string{"shop/waypoint"}); err != nil {
		t.Fatal(err)
	}
	wantErr("10.1.0.1:8080", ErrNotSynced)
	if _, err := c.Cluster(m.Rule.Backends[0].GetService(), m.Rule.Backends[0].GetPort()); err == nil {
		t.Fatal("workload cluster outlived the WaypointGateway")
	}
}

func mustReq(t *testing.T) *http.Request {
	r, err := http.NewRequest("GET", "http://x/", nil)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// TestJWKSFollowsRequestAuthentications: the JWKS URIs of the
// RequestAuthentications in WaypointServices and the WaypointGateway are
// fetched as soon as they are configured, and again when their rules
// change, not when unrelated resources change.
func TestJWKSFollowsRequestAuthentications(t *testing.T) {
	var mu sync.Mutex
	fetched := map[string]int{}
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		fetched[r.URL.Path]++
		mu.Unlock()
		_, _ = w.Write([]byte(`{"keys":[]}`))
	}))
	t.Cleanup(srv.Close)
	count := func(path string) int {
		mu.Lock()
		defer mu.Unlock()
		return fetched[path]
	}
	waitCount := func(path string, n int) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for count(path) < n {
			if time.Now().After(deadline) {
				t.Fatalf("%s fetched %d times, want %d", path, count(path), n)
			}
			time.Sleep(5 * time.Millisecond)
		}
		time.Sleep(20 * time.Millisecond)
		if count(path) != n {
			t.Fatalf("%s fetched %d times, want %d", path, count(path), n)
		}
	}
	keys := authn.NewKeyCache(authn.Options{Client: srv.Client()})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { _ = keys.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	c := New(Options{Keys: keys, Gateway: "shop/waypoint"})
	ra := func(path, aud string) []*discoveryv1.RequestAuthentication {
		return []*discoveryv1.RequestAuthentication{{Namespace: "shop", Name: "jwt", JwtRules: []*discoveryv1.JWTRule{{
			Issuer: "https://issuer.example", JwksUri: srv.URL + path, Audiences: []string{aud}}}}}
	}
	if err := c.Update([]proto.Message{
		&discoveryv1.Service{Name: "cart", Namespace: "shop", Hostname: "cart.shop.svc.cluster.local", Addresses: [][]byte{{10, 96, 0, 10}},
			Ports: []*discoveryv1.ServicePort{{ServicePort: 80, AppProtocol: "http"}}},
		&discoveryv1.WaypointService{Service: key, RequestAuthentications: ra("/svc", "a")},
	}, nil); err != nil {
		t.Fatal(err)
	}
	waitCount("/svc", 1)
	if err := c.Update([]proto.Message{&discoveryv1.WaypointGateway{Gateway: "shop/waypoint", RequestAuthentications: ra("/gw", "a")},
		&discoveryv1.Workload{Uid: "w", Addresses: [][]byte{{10, 1, 0, 1}}}}, nil); err != nil {
		t.Fatal(err)
	}
	waitCount("/gw", 1)
	waitCount("/svc", 1)
	if err := c.Update([]proto.Message{&discoveryv1.WaypointService{Service: key, RequestAuthentications: ra("/svc", "b")}}, nil); err != nil {
		t.Fatal(err)
	}
	waitCount("/svc", 2)
	waitCount("/gw", 1)
}
