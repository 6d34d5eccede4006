package xds_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	discoveryv1 "github.com/amesh-dev/amesh/api/discovery/v1"
	"github.com/amesh-dev/amesh/api/xds"
	"github.com/amesh-dev/amesh/api/xds/xdsclient"
)

func newServer(t testing.TB, p *pki, auth *authenticator, reg prometheus.Registerer) *testServer {
	t.Helper()
	return startServer(t, p, xds.NewServer(xds.ServerOptions{Authenticate: auth.authenticate, Registerer: reg}), "127.0.0.1:0")
}

func must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func TestInitialSync(t *testing.T) {
	p, auth := newPKI(t), newAuthenticator()
	srv := newServer(t, p, auth, nil)
	must(t, srv.Set(wlType, []*xds.Resource{wl("w1", ""), wl("w2", ""), wl("w3", "")}))
	must(t, srv.Set(svcType, []*xds.Resource{svc("s1")}))
	st := newStore()
	c := runClient(t, dial(t, p, srv.addr, "ztunnel-1"), st, wlType, svcType, wpType)
	// The server has never been given WaypointServices: the client is not
	// synced until it has (an empty set is enough).
	eventually(t, "workloads and services arrive", func() bool { return len(st.names(wlType)) == 3 && len(st.names(svcType)) == 1 })
	select {
	case <-c.Synced():
		t.Fatal("synced before the server had any WaypointService state")
	case <-time.After(100 * time.Millisecond):
	}
	must(t, srv.Set(wpType, nil))
	waitSynced(t, c)
	if got := st.names(wlType); !slices.Equal(got, []string{"w1", "w2", "w3"}) {
		t.Errorf("workloads = %v", got)
	}
	if got := st.names(svcType); !slices.Equal(got, []string{"s1"}) {
		t.Errorf("services = %v", got)
	}
	if !sameBody(st.get(svcType, "s1").Body, svc("s1").Body) {
		t.Errorf("service body = %v", st.get(svcType, "s1").Body)
	}
	if _, ok := st.get(wlType, "w1").Body.(*discoveryv1.Workload); !ok {
		t.Errorf("workload body is %T", st.get(wlType, "w1").Body)
	}
	// Versions were derived from content: the client holds the server's.
	want := map[string]string{}
	for _, r := range srv.Resources(wlType) {
		want[r.Name] = r.Version
		if r.Version == "" {
			t.Errorf("%s has no derived version", r.Name)
		}
	}
	if got := c.Versions(wlType); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("client versions %v, server %v", got, want)
	}
	// The node reached the authenticator.
	auth.mu.Lock()
	n := auth.nodes[0]
	auth.mu.Unlock()
	if n.GetMetadata().GetFields()["kind"].GetStringValue() != "ztunnel" || !strings.HasPrefix(n.GetId(), "pod-") {
		t.Errorf("node = %v", n)
	}
	eventually(t, "connected client listed", func() bool { return slices.Equal(srv.Clients(), []string{"ztunnel-1"}) })
}

func TestIncrementalVisibility(t *testing.T) {
	p, auth := newPKI(t), newAuthenticator()
	srv := newServer(t, p, auth, nil)
	must(t, srv.Set(wpType, []*xds.Resource{
		{Name: "a/route", Scope: "gw-a", Body: &discoveryv1.WaypointService{Service: "a", Gateway: "gw-a"}},
		{Name: "b/route", Scope: "gw-b", Body: &discoveryv1.WaypointService{Service: "b", Gateway: "gw-b"}},
	}))
	sa, sb := newStore(), newStore()
	ca := runClient(t, dial(t, p, srv.addr, "scope:gw-a"), sa, wpType)
	cb := runClient(t, dial(t, p, srv.addr, "scope:gw-b"), sb, wpType)
	waitSynced(t, ca)
	waitSynced(t, cb)
	if got := sa.names(wpType); !slices.Equal(got, []string{"a/route"}) {
		t.Fatalf("A sees %v", got)
	}
	if got := sb.names(wpType); !slices.Equal(got, []string{"b/route"}) {
		t.Fatalf("B sees %v", got)
	}

	// A change of A's resource reaches A only.
	na, nb := sa.ncalls(), sb.ncalls()
	must(t, srv.Update(wpType, []*xds.Resource{{Name: "a/route", Scope: "gw-a", Body: &discoveryv1.WaypointService{Service: "a", Gateway: "gw-a", HttpRoutes: []*discoveryv1.HTTPRoute{{Name: "r1"}}}}}, nil))
	eventually(t, "A receives its update", func() bool { return sa.ncalls() > na })
	if c := sa.callsSince(na); len(c) != 1 || len(c[0].upserts) != 1 || !strings.HasPrefix(c[0].upserts[0], "a/route@") || len(c[0].removes) != 0 {
		t.Errorf("A got %+v, want exactly the one upsert", c)
	}
	quiet(t, "B got A's update", func() bool { return sb.ncalls() > nb })

	// Moving the resource to B's scope removes it from A and adds it to B.
	na, nb = sa.ncalls(), sb.ncalls()
	must(t, srv.Update(wpType, []*xds.Resource{{Name: "a/route", Scope: "gw-b", Body: &discoveryv1.WaypointService{Service: "a", Gateway: "gw-b"}}}, nil))
	eventually(t, "A loses a/route", func() bool { return len(sa.names(wpType)) == 0 })
	eventually(t, "B gains a/route", func() bool { return slices.Equal(sb.names(wpType), []string{"a/route", "b/route"}) })
	if c := sa.callsSince(na); len(c) != 1 || !slices.Equal(c[0].removes, []string{"a/route"}) || len(c[0].upserts) != 0 {
		t.Errorf("A got %+v, want the removal only", c)
	}

	// A scope-only change with the same version changes visibility too.
	na = sa.ncalls()
	r := srv.Resources(wpType)[0] // a/route, now gw-b
	must(t, srv.Update(wpType, []*xds.Resource{{Name: r.Name, Version: r.Version, Body: r.Body, Scope: "gw-a"}}, nil))
	eventually(t, "A regains a/route", func() bool { return slices.Equal(sa.names(wpType), []string{"a/route"}) })
	eventually(t, "B loses a/route", func() bool { return slices.Equal(sb.names(wpType), []string{"b/route"}) })

	// The subscriber's own view changes: Recheck pushes what became visible.
	na = sa.ncalls()
	auth.sub("scope:gw-a").allow("gw-b")
	quiet(t, "a push without Recheck", func() bool { return sa.ncalls() > na })
	srv.Recheck("scope:gw-a")
	eventually(t, "A sees b/route after Recheck", func() bool { return slices.Equal(sa.names(wpType), []string{"a/route", "b/route"}) })
	if c := sa.callsSince(na); len(c) != 1 || len(c[0].upserts) != 1 || !strings.HasPrefix(c[0].upserts[0], "b/route@") {
		t.Errorf("Recheck sent %+v, want only b/route", c)
	}

	// An update that changes nothing sends nothing.
	na, nb = sa.ncalls(), sb.ncalls()
	must(t, srv.Set(wpType, srv.Resources(wpType)))
	quiet(t, "a push for an unchanged Set", func() bool { return sa.ncalls() > na || sb.ncalls() > nb })
}

func TestRemoval(t *testing.T) {
	p, auth := newPKI(t), newAuthenticator()
	srv := newServer(t, p, auth, nil)
	must(t, srv.Set(wlType, []*xds.Resource{wl("w1", ""), wl("w2", ""), wl("w3", "")}))
	st := newStore()
	c := runClient(t, dial(t, p, srv.addr, "z"), st, wlType)
	waitSynced(t, c)

	n := st.ncalls()
	must(t, srv.Update(wlType, nil, []string{"w2", "never-existed"}))
	eventually(t, "w2 removed", func() bool { return slices.Equal(st.names(wlType), []string{"w1", "w3"}) })
	if c := st.callsSince(n); len(c) != 1 || !slices.Equal(c[0].removes, []string{"w2"}) {
		t.Errorf("calls %+v", c)
	}
	// Set with fewer resources removes the missing ones.
	must(t, srv.Set(wlType, []*xds.Resource{wl("w3", "")}))
	eventually(t, "only w3 left", func() bool { return slices.Equal(st.names(wlType), []string{"w3"}) })
	// Set with none removes everything.
	must(t, srv.Set(wlType, nil))
	eventually(t, "nothing left", func() bool { return len(st.names(wlType)) == 0 })
	if v := c.Versions(wlType); len(v) != 0 {
		t.Errorf("client still holds %v", v)
	}
}

func TestNACK(t *testing.T) {
	p, auth := newPKI(t), newAuthenticator()
	reg := prometheus.NewRegistry()
	srv := newServer(t, p, auth, reg)
	must(t, srv.Set(wlType, []*xds.Resource{wl("w1", "")}))
	st := newStore()
	st.reject = func(_ string, r *xds.Resource) error {
		if r.Body.(*discoveryv1.Workload).GetServiceAccount() == "poison" {
			return errors.New("service account poison is not allowed")
		}
		return nil
	}
	c := runClient(t, dial(t, p, srv.addr, "z"), st, wlType)
	waitSynced(t, c)
	good := c.Versions(wlType)["w1"]

	n := st.ncalls()
	must(t, srv.Update(wlType, []*xds.Resource{wl("w1", "", "poison"), wl("w2", "")}, nil))
	eventually(t, "the NACK is counted", func() bool {
		return metricValue(t, reg, "amesh_xds_nacks_total") == 1
	})
	// The whole response was refused: old state kept on both sides.
	if v := c.Versions(wlType); v["w1"] != good || len(v) != 1 {
		t.Errorf("client versions after NACK = %v, want only w1@%s", v, good)
	}
	if st.ncalls() != n || st.get(wlType, "w2") != nil {
		t.Errorf("the handler's state changed after a NACK")
	}

	// The NACKed version is not resent while it does not change, even when
	// other resources change.
	must(t, srv.Update(wlType, []*xds.Resource{wl("w3", "")}, nil))
	eventually(t, "w3 arrives", func() bool { return st.get(wlType, "w3") != nil })
	for _, c := range st.callsSince(n) {
		for _, u := range c.upserts {
			if strings.HasPrefix(u, "w1@") || strings.HasPrefix(u, "w2@") {
				t.Errorf("NACKed resource resent: %v", c)
			}
		}
	}
	if got := metricValue(t, reg, "amesh_xds_nacks_total"); got != 1 {
		t.Errorf("NACKs = %v, want 1", got)
	}

	// A new version of it is sent and accepted.
	must(t, srv.Update(wlType, []*xds.Resource{wl("w1", "", "fixed")}, nil))
	eventually(t, "fixed w1 arrives", func() bool {
		r := st.get(wlType, "w1")
		return r != nil && r.Body.(*discoveryv1.Workload).GetServiceAccount() == "fixed"
	})
}

// metricValue sums a gathered counter or gauge over its label sets, or
// returns a histogram's sample count.
func metricValue(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	sum := 0.0
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			sum += m.GetCounter().GetValue() + m.GetGauge().GetValue() + float64(m.GetHistogram().GetSampleCount())
		}
	}
	return sum
}

func TestServerRestartResume(t *testing.T) {
	p, auth := newPKI(t), newAuthenticator()
	srv1 := newServer(t, p, auth, nil)
	must(t, srv1.Set(wlType, []*xds.Resource{wl("keep", ""), wl("change", ""), wl("drop", "")}))
	must(t, srv1.Set(svcType, []*xds.Resource{svc("s1")}))
	st := newStore()
	c := runClient(t, dial(t, p, srv1.addr, "z"), st, wlType, svcType)
	waitSynced(t, c)
	before := c.Versions(wlType)

	srv1.stop()
	time.Sleep(100 * time.Millisecond)
	// The client keeps its state while the controller is away.
	if got := c.Versions(wlType); fmt.Sprint(got) != fmt.Sprint(before) {
		t.Errorf("state while disconnected = %v, want %v", got, before)
	}
	if got := st.names(wlType); !slices.Equal(got, []string{"change", "drop", "keep"}) {
		t.Errorf("handler state while disconnected = %v", got)
	}

	n := st.ncalls()
	connects := c.Connects()
	reg := prometheus.NewRegistry()
	srv2 := startServer(t, p, xds.NewServer(xds.ServerOptions{Authenticate: auth.authenticate, Registerer: reg}), srv1.addr)
	// The client reconnects before the new server has any state: it must
	// not be told to delete what it holds.
	eventually(t, "client reconnects", func() bool { return len(srv2.Clients()) == 1 })
	time.Sleep(50 * time.Millisecond)
	if got := st.names(wlType); len(got) != 3 {
		t.Fatalf("client state changed before the new server had state: %v", got)
	}
	must(t, srv2.Set(wlType, []*xds.Resource{wl("keep", ""), wl("change", "", "new-sa"), wl("new", "")}))
	must(t, srv2.Set(svcType, []*xds.Resource{svc("s1")}))

	eventually(t, "client converges on the new server", func() bool {
		return slices.Equal(st.names(wlType), []string{"change", "keep", "new"}) &&
			st.get(wlType, "change").Body.(*discoveryv1.Workload).GetServiceAccount() == "new-sa"
	})
	if c.Connects() <= connects {
		t.Errorf("no reconnection recorded")
	}
	// Only the differences crossed the wire: no re-send of "keep" or "s1".
	var ups, rms []string
	for _, call := range st.callsSince(n) {
		for _, u := range call.upserts {
			ups = append(ups, strings.Split(u, "@")[0])
		}
		rms = append(rms, call.removes...)
	}
	slices.Sort(ups)
	if !slices.Equal(ups, []string{"change", "new"}) || !slices.Equal(rms, []string{"drop"}) {
		t.Errorf("after resume: upserts %v removes %v; want [change new] and [drop]", ups, rms)
	}
	if got := metricValue(t, reg, "amesh_xds_pushes_total"); got == 0 {
		t.Error("no pushes recorded")
	}
	if got := c.Versions(wlType); got["keep"] != before["keep"] {
		t.Errorf("keep changed version: %v → %v", before["keep"], got["keep"])
	}
}

func TestManyClients(t *testing.T) {
	p, auth := newPKI(t), newAuthenticator()
	reg := prometheus.NewRegistry()
	srv := newServer(t, p, auth, reg)
	var all []*xds.Resource
	for i := range 300 {
		all = append(all, wl(fmt.Sprintf("w%03d", i), ""))
	}
	must(t, srv.Set(wlType, all))
	const clients = 40
	stores := make([]*store, clients)
	var cs []*xdsclient.Client
	for i := range clients {
		stores[i] = newStore()
		cs = append(cs, runClient(t, dial(t, p, srv.addr, fmt.Sprintf("z%d", i)), stores[i], wlType))
	}
	for _, c := range cs {
		waitSynced(t, c)
	}
	for i, s := range stores {
		if got := len(s.names(wlType)); got != 300 {
			t.Errorf("client %d holds %d workloads", i, got)
		}
	}
	eventually(t, "gauge counts every client", func() bool {
		return metricValue(t, reg, "amesh_xds_connected_clients") == clients
	})
	must(t, srv.Update(wlType, []*xds.Resource{wl("w007", "", "updated")}, []string{"w008"}))
	for i, s := range stores {
		eventually(t, fmt.Sprintf("client %d converges", i), func() bool {
			r := s.get(wlType, "w007")
			return r != nil && r.Body.(*discoveryv1.Workload).GetServiceAccount() == "updated" && s.get(wlType, "w008") == nil
		})
	}
	if n := metricValue(t, reg, "amesh_xds_push_latency_seconds"); n == 0 {
		t.Error("no push latency recorded")
	}
}

func TestAuthenticationRefused(t *testing.T) {
	p, auth := newPKI(t), newAuthenticator()
	srv := newServer(t, p, auth, nil)
	must(t, srv.Set(wlType, []*xds.Resource{wl("w1", "")}))
	st := newStore()
	c := runClient(t, dial(t, p, srv.addr, "denied"), st, wlType)
	eventually(t, "the client retries", func() bool { return c.Connects() >= 3 })
	select {
	case <-c.Synced():
		t.Fatal("a refused client synced")
	default:
	}
	if st.ncalls() != 0 || len(srv.Clients()) != 0 {
		t.Errorf("refused client got %d calls; server lists %v", st.ncalls(), srv.Clients())
	}

	// Without an authenticator every stream is refused.
	bare := startServer(t, p, xds.NewServer(xds.ServerOptions{}), "127.0.0.1:0")
	ads := discoveryv3.NewAggregatedDiscoveryServiceClient(dial(t, p, bare.addr, "z"))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := ads.DeltaAggregatedResources(ctx)
	must(t, err)
	must(t, s.Send(&discoveryv3.DeltaDiscoveryRequest{TypeUrl: wlType}))
	if _, err := s.Recv(); status.Code(err) != codes.PermissionDenied {
		t.Errorf("stream without authenticator = %v, want PermissionDenied", err)
	}
}

func TestSetRejectsInvalid(t *testing.T) {
	srv := xds.NewServer(xds.ServerOptions{})
	must(t, srv.Set(wlType, []*xds.Resource{wl("w1", "")}))
	tests := []struct {
		name string
		do   func() error
	}{
		{"no name", func() error { return srv.Set(wlType, []*xds.Resource{{Body: &discoveryv1.Workload{}}}) }},
		{"no body", func() error { return srv.Set(wlType, []*xds.Resource{{Name: "x"}}) }},
		{"nil resource", func() error { return srv.Update(wlType, []*xds.Resource{nil}, nil) }},
		{"wrong type", func() error { return srv.Set(wlType, []*xds.Resource{svc("s")}) }},
		{"duplicate", func() error { return srv.Set(wlType, []*xds.Resource{wl("a", ""), wl("a", "")}) }},
		{"upsert and remove", func() error { return srv.Update(wlType, []*xds.Resource{wl("a", "")}, []string{"a"}) }},
		{"valid then invalid", func() error { return srv.Update(wlType, []*xds.Resource{wl("ok", ""), {Name: "bad"}}, nil) }},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if err := tc.do(); !errors.Is(err, xds.ErrInvalidResource) {
				t.Errorf("= %v, want ErrInvalidResource", err)
			}
			if got := srv.Resources(wlType); len(got) != 1 || got[0].Name != "w1" {
				t.Errorf("state changed: %v", got)
			}
		})
	}
}

// rawStream is a hand-driven delta ADS stream, for protocol details the
// Client does not exercise (explicit subscriptions, resumption claims).
type rawStream struct {
	t *testing.T
	s grpc.BidiStreamingClient[discoveryv3.DeltaDiscoveryRequest, discoveryv3.DeltaDiscoveryResponse]
}

func openRaw(t *testing.T, conn grpc.ClientConnInterface) *rawStream {
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	s, err := discoveryv3.NewAggregatedDiscoveryServiceClient(conn).DeltaAggregatedResources(ctx)
	must(t, err)
	return &rawStream{t: t, s: s}
}

func (r *rawStream) send(req *discoveryv3.DeltaDiscoveryRequest) {
	r.t.Helper()
	must(r.t, r.s.Send(req))
}

func (r *rawStream) recv() *discoveryv3.DeltaDiscoveryResponse {
	r.t.Helper()
	type res struct {
		m   *discoveryv3.DeltaDiscoveryResponse
		err error
	}
	ch := make(chan res, 1)
	go func() { m, err := r.s.Recv(); ch <- res{m, err} }()
	select {
	case x := <-ch:
		must(r.t, x.err)
		// ACK it so that the server's nonce bookkeeping stays tidy.
		must(r.t, r.s.Send(&discoveryv3.DeltaDiscoveryRequest{TypeUrl: x.m.GetTypeUrl(), ResponseNonce: x.m.GetNonce()}))
		return x.m
	case <-time.After(10 * time.Second):
		r.t.Fatal("no response within 10s")
		return nil
	}
}

func names(resp *discoveryv3.DeltaDiscoveryResponse) (ups, rms []string) {
	for _, r := range resp.GetResources() {
		ups = append(ups, r.GetName())
	}
	rms = slices.Clone(resp.GetRemovedResources())
	slices.Sort(ups)
	slices.Sort(rms)
	return ups, rms
}

func TestExplicitSubscription(t *testing.T) {
	p, auth := newPKI(t), newAuthenticator()
	srv := newServer(t, p, auth, nil)
	must(t, srv.Set(wlType, []*xds.Resource{wl("w1", ""), wl("w2", ""), wl("w3", "")}))
	r := openRaw(t, dial(t, p, srv.addr, "z"))

	r.send(&discoveryv3.DeltaDiscoveryRequest{Node: rawNode("raw"), TypeUrl: wlType, ResourceNamesSubscribe: []string{"w1", "missing"}})
	if ups, rms := names(r.recv()); !slices.Equal(ups, []string{"w1"}) || len(rms) != 0 {
		t.Fatalf("explicit subscription got %v / %v", ups, rms)
	}
	// A change to an unsubscribed resource is not sent; a subscribed one is.
	must(t, srv.Update(wlType, []*xds.Resource{wl("w2", "", "x"), wl("w1", "", "y")}, nil))
	if ups, _ := names(r.recv()); !slices.Equal(ups, []string{"w1"}) {
		t.Fatalf("update got %v, want only w1", ups)
	}
	// Subscribing to a name sends it even if nothing changed; a resource
	// created later under a subscribed name arrives too.
	r.send(&discoveryv3.DeltaDiscoveryRequest{TypeUrl: wlType, ResourceNamesSubscribe: []string{"w3", "w1"}})
	if ups, _ := names(r.recv()); !slices.Equal(ups, []string{"w1", "w3"}) {
		t.Fatalf("second subscription got %v", ups)
	}
	must(t, srv.Update(wlType, []*xds.Resource{wl("missing", "")}, nil))
	if ups, _ := names(r.recv()); !slices.Equal(ups, []string{"missing"}) {
		t.Fatalf("late resource got %v", ups)
	}
	// An unsubscribed name is dropped silently and no longer updated.
	// (Subscribing to w2 in the same request yields a response, which tells
	// the test that the server has processed the request.)
	r.send(&discoveryv3.DeltaDiscoveryRequest{TypeUrl: wlType, ResourceNamesUnsubscribe: []string{"w1"}, ResourceNamesSubscribe: []string{"w2"}})
	if ups, _ := names(r.recv()); !slices.Equal(ups, []string{"w2"}) {
		t.Fatalf("subscribing to w2 got %v", ups)
	}
	must(t, srv.Update(wlType, []*xds.Resource{wl("w1", "", "z"), wl("w3", "", "z")}, nil))
	if ups, rms := names(r.recv()); !slices.Equal(ups, []string{"w3"}) || len(rms) != 0 {
		t.Fatalf("after unsubscribing w1 got %v / %v", ups, rms)
	}
	// Wildcard brings in everything the client does not hold.
	r.send(&discoveryv3.DeltaDiscoveryRequest{TypeUrl: wlType, ResourceNamesSubscribe: []string{"*"}})
	if ups, rms := names(r.recv()); !slices.Equal(ups, []string{"w1"}) || len(rms) != 0 {
		t.Fatalf("wildcard got %v / %v", ups, rms)
	}
}

func TestResumeClaims(t *testing.T) {
	p, auth := newPKI(t), newAuthenticator()
	srv := newServer(t, p, auth, nil)
	must(t, srv.Set(wlType, []*xds.Resource{wl("same", ""), wl("stale", ""), {Name: "hidden", Scope: "elsewhere", Body: &discoveryv1.Workload{Name: "hidden"}}}))
	versions := map[string]string{}
	for _, r := range srv.Resources(wlType) {
		versions[r.Name] = r.Version
	}
	r := openRaw(t, dial(t, p, srv.addr, "z"))
	r.send(&discoveryv3.DeltaDiscoveryRequest{Node: rawNode("raw"), TypeUrl: wlType, InitialResourceVersions: map[string]string{
		"same":   versions["same"],
		"stale":  "old-version",
		"gone":   "v1",               // the server no longer has it
		"hidden": versions["hidden"], // the client may no longer see it
	}})
	ups, rms := names(r.recv())
	if !slices.Equal(ups, []string{"stale"}) || !slices.Equal(rms, []string{"gone", "hidden"}) {
		t.Errorf("resume: upserts %v removes %v; want [stale] and [gone hidden]", ups, rms)
	}
	// Resuming with everything current still gets a first (empty) response,
	// so that the client knows the subscription is live.
	r2 := openRaw(t, dial(t, p, srv.addr, "z2"))
	r2.send(&discoveryv3.DeltaDiscoveryRequest{Node: rawNode("raw2"), TypeUrl: wlType, InitialResourceVersions: map[string]string{"same": versions["same"], "stale": versions["stale"]}})
	if resp := r2.recv(); len(resp.GetResources())+len(resp.GetRemovedResources()) != 0 || resp.GetNonce() == "" {
		t.Errorf("current resume got %v", resp)
	}
}

// TestConcurrentUpdates races writers against many streams (run with -race)
// and checks every client converges on the final state.
func TestConcurrentUpdates(t *testing.T) {
	p, auth := newPKI(t), newAuthenticator()
	srv := newServer(t, p, auth, nil)
	var stores []*store
	for i := range 8 {
		s := newStore()
		stores = append(stores, s)
		runClient(t, dial(t, p, srv.addr, fmt.Sprintf("z%d", i)), s, wlType, svcType)
	}
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 200 {
				name := fmt.Sprintf("w%d-%d", w, i%20)
				if i%7 == 6 {
					_ = srv.Update(wlType, nil, []string{name})
				} else {
					_ = srv.Update(wlType, []*xds.Resource{wl(name, "", fmt.Sprint(i))}, nil)
				}
				if i%50 == 0 {
					_ = srv.Set(svcType, []*xds.Resource{svc(fmt.Sprint("s", i))})
				}
			}
		}()
	}
	wg.Wait()
	want := map[string]string{}
	for _, r := range srv.Resources(wlType) {
		want[r.Name] = r.Version
	}
	for i, s := range stores {
		eventually(t, fmt.Sprintf("client %d converges", i), func() bool {
			s.mu.Lock()
			defer s.mu.Unlock()
			if len(s.res[wlType]) != len(want) {
				return false
			}
			for n, v := range want {
				if r := s.res[wlType][n]; r == nil || r.Version != v {
					return false
				}
			}
			return true
		})
	}
}
