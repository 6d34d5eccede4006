package route

import (
	"errors"
	"net/netip"
	"strings"
	"testing"

	discoveryv1 "github.com/amesh-dev/amesh/api/discovery/v1"

	"github.com/amesh-dev/amesh/ztunnel/internal/store"
)

func ip(s string) []byte { return netip.MustParseAddr(s).AsSlice() }

const (
	echoSvc = "default/echo.default.svc.cluster.local"
	wpSvc   = "default/waypoint.default.svc.cluster.local"
	saWpSvc = "default/sa-wp.default.svc.cluster.local"
)

type wlOpt func(*discoveryv1.Workload)

func captured(w *discoveryv1.Workload) {
	w.TunnelProtocol = discoveryv1.TunnelProtocol_TUNNEL_PROTOCOL_HBONE
}
func unhealthy(w *discoveryv1.Workload) {
	w.Status = discoveryv1.WorkloadStatus_WORKLOAD_STATUS_UNHEALTHY
}
func inService(svc string, pairs ...uint32) wlOpt {
	return func(w *discoveryv1.Workload) {
		if w.Services == nil {
			w.Services = map[string]*discoveryv1.PortList{}
		}
		pl := &discoveryv1.PortList{}
		for i := 0; i+1 < len(pairs); i += 2 {
			pl.Ports = append(pl.Ports, &discoveryv1.Port{ServicePort: pairs[i], TargetPort: pairs[i+1]})
		}
		w.Services[svc] = pl
	}
}
func waypoint(gw, svc string) wlOpt {
	return func(w *discoveryv1.Workload) {
		w.Waypoint = &discoveryv1.GatewayAddress{Gateway: gw, Service: svc, HbonePort: 15008}
	}
}
func implements(gw string) wlOpt { return func(w *discoveryv1.Workload) { w.WaypointForGateway = gw } }
func sa(name string) wlOpt       { return func(w *discoveryv1.Workload) { w.ServiceAccount = name } }

func workload(uid, addr string, opts ...wlOpt) store.Resource {
	w := &discoveryv1.Workload{Uid: uid, Name: uid, Namespace: "default", ServiceAccount: uid, Addresses: [][]byte{ip(addr)}}
	for _, o := range opts {
		o(w)
	}
	return store.Resource{Name: uid, Body: w}
}

func service(name, vip string, wp *discoveryv1.GatewayAddress, ports ...*discoveryv1.ServicePort) store.Resource {
	return store.Resource{Name: name, Body: &discoveryv1.Service{
		Name: strings.Split(strings.Split(name, "/")[1], ".")[0], Namespace: "default",
		Addresses: [][]byte{ip(vip)}, Ports: ports, Waypoint: wp,
	}}
}

func newStore(t *testing.T, ws []store.Resource, ss []store.Resource) *store.Store {
	t.Helper()
	s := store.New("cluster.local")
	if err := s.Apply(discoveryv1.WorkloadType, ws, nil); err != nil {
		t.Fatal(err)
	}
	if err := s.Apply(discoveryv1.ServiceType, ss, nil); err != nil {
		t.Fatal(err)
	}
	return s
}

// plan renders a plan compactly: "kind authority via proxy id" per target.
func render(p Plan) string {
	var parts []string
	for _, t := range p.Targets {
		s := t.Kind.String() + " " + t.Authority.String()
		if t.Kind == HBONE {
			s += " via " + t.Proxy.String() + " " + t.Identity.String()
		}
		if t.Waypoint {
			s += " waypoint"
		}
		parts = append(parts, s)
	}
	return strings.Join(parts, "; ")
}

func TestOutbound(t *testing.T) {
	port80 := &discoveryv1.ServicePort{ServicePort: 80, TargetPort: 8080}
	named := &discoveryv1.ServicePort{ServicePort: 90} // named target port
	svcWp := &discoveryv1.GatewayAddress{Gateway: "default/waypoint", Service: wpSvc, HbonePort: 15008}
	base := []store.Resource{
		workload("wp", "10.0.9.1", captured, implements("default/waypoint"), inService(wpSvc, 15008, 15008), sa("waypoint")),
		workload("sawp", "10.0.9.2", captured, implements("default/sa-wp"), inService(saWpSvc, 15008, 15008)),
	}
	tests := []struct {
		name string
		ws   []store.Resource
		ss   []store.Resource
		src  Source
		dst  string
		want []string // one rendered plan per call, in order
		err  error
	}{
		{
			name: "unknown destination passes through",
			dst:  "192.0.2.1:443",
			want: []string{"passthrough 192.0.2.1:443"},
		},
		{
			name: "captured pod by IP uses HBONE",
			ws:   []store.Resource{workload("b", "10.0.0.2", captured)},
			dst:  "10.0.0.2:8080",
			want: []string{"hbone 10.0.0.2:8080 via 10.0.0.2:15008 spiffe://cluster.local/ns/default/sa/b"},
		},
		{
			name: "uncaptured pod by IP passes through",
			ws:   []store.Resource{workload("b", "10.0.0.2")},
			dst:  "10.0.0.2:8080",
			want: []string{"passthrough 10.0.0.2:8080"},
		},
		{
			name: "service VIP round robin with retry candidate",
			ws: []store.Resource{
				workload("b1", "10.0.0.2", captured, inService(echoSvc, 80, 8080)),
				workload("b2", "10.0.0.3", captured, inService(echoSvc, 80, 8080)),
			},
			ss:  []store.Resource{service(echoSvc, "10.96.0.10", nil, port80)},
			dst: "10.96.0.10:80",
			want: []string{
				"hbone 10.0.0.2:8080 via 10.0.0.2:15008 spiffe://cluster.local/ns/default/sa/b1; hbone 10.0.0.3:8080 via 10.0.0.3:15008 spiffe://cluster.local/ns/default/sa/b2",
				"hbone 10.0.0.3:8080 via 10.0.0.3:15008 spiffe://cluster.local/ns/default/sa/b2; hbone 10.0.0.2:8080 via 10.0.0.2:15008 spiffe://cluster.local/ns/default/sa/b1",
				"hbone 10.0.0.2:8080 via 10.0.0.2:15008 spiffe://cluster.local/ns/default/sa/b1; hbone 10.0.0.3:8080 via 10.0.0.3:15008 spiffe://cluster.local/ns/default/sa/b2",
			},
		},
		{
			name: "unhealthy endpoints are skipped",
			ws: []store.Resource{
				workload("b1", "10.0.0.2", captured, unhealthy, inService(echoSvc, 80, 8080)),
				workload("b2", "10.0.0.3", inService(echoSvc, 80, 8080)),
			},
			ss:   []store.Resource{service(echoSvc, "10.96.0.10", nil, port80)},
			dst:  "10.96.0.10:80",
			want: []string{"passthrough 10.0.0.3:8080", "passthrough 10.0.0.3:8080"},
		},
		{
			name: "named target port resolved per workload",
			ws: []store.Resource{
				workload("b1", "10.0.0.2", captured, inService(echoSvc, 90, 9091)),
				workload("b2", "10.0.0.3", captured, inService(echoSvc, 80, 8080)), // does not resolve 90
			},
			ss:   []store.Resource{service(echoSvc, "10.96.0.10", nil, port80, named)},
			dst:  "10.96.0.10:90",
			want: []string{"hbone 10.0.0.2:9091 via 10.0.0.2:15008 spiffe://cluster.local/ns/default/sa/b1"},
		},
		{
			name: "no healthy endpoint refuses",
			ws:   []store.Resource{workload("b1", "10.0.0.2", captured, unhealthy, inService(echoSvc, 80, 8080))},
			ss:   []store.Resource{service(echoSvc, "10.96.0.10", nil, port80)},
			dst:  "10.96.0.10:80",
			err:  ErrNoEndpoint,
		},
		{
			name: "unknown service port refuses",
			ss:   []store.Resource{service(echoSvc, "10.96.0.10", nil, port80)},
			dst:  "10.96.0.10:81",
			err:  ErrNoPort,
		},
		{
			name: "service waypoint",
			ws:   []store.Resource{workload("b1", "10.0.0.2", captured, inService(echoSvc, 80, 8080))},
			ss:   []store.Resource{service(echoSvc, "10.96.0.10", svcWp, port80)},
			dst:  "10.96.0.10:80",
			want: []string{"hbone 10.96.0.10:80 via 10.0.9.1:15008 spiffe://cluster.local/ns/default/sa/waypoint waypoint"},
		},
		{
			name: "the waypoint itself is not sent back to itself",
			ws:   []store.Resource{workload("b1", "10.0.0.2", captured, inService(echoSvc, 80, 8080))},
			ss:   []store.Resource{service(echoSvc, "10.96.0.10", svcWp, port80)},
			src:  Source{Gateway: "default/waypoint"},
			dst:  "10.96.0.10:80",
			want: []string{"hbone 10.0.0.2:8080 via 10.0.0.2:15008 spiffe://cluster.local/ns/default/sa/b1"},
		},
		{
			name: "workload waypoint for direct traffic",
			ws:   []store.Resource{workload("b1", "10.0.0.2", captured, waypoint("default/waypoint", wpSvc))},
			dst:  "10.0.0.2:8080",
			want: []string{"hbone 10.0.0.2:8080 via 10.0.9.1:15008 spiffe://cluster.local/ns/default/sa/waypoint waypoint"},
		},
		{
			name: "per-service-account waypoint of the chosen endpoint",
			ws:   []store.Resource{workload("b1", "10.0.0.2", captured, inService(echoSvc, 80, 8080), waypoint("default/sa-wp", saWpSvc))},
			ss:   []store.Resource{service(echoSvc, "10.96.0.10", nil, port80)},
			dst:  "10.96.0.10:80",
			want: []string{"hbone 10.0.0.2:8080 via 10.0.9.2:15008 spiffe://cluster.local/ns/default/sa/sawp waypoint"},
		},
		{
			name: "waypoint without pods refuses",
			ws:   []store.Resource{workload("b1", "10.0.0.2", captured, waypoint("default/ghost", "default/ghost.default.svc.cluster.local"))},
			dst:  "10.0.0.2:8080",
			err:  ErrNoWaypoint,
		},
		{
			name: "captured pod without identity refuses",
			ws:   []store.Resource{workload("b1", "10.0.0.2", captured, sa(""))},
			dst:  "10.0.0.2:8080",
			err:  ErrNoIdentity,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := newStore(t, append(append([]store.Resource{}, base...), tt.ws...), tt.ss)
			r := New(s)
			if tt.err != nil {
				_, err := r.Outbound(tt.src, netip.MustParseAddrPort(tt.dst))
				if !errors.Is(err, tt.err) {
					t.Fatalf("Outbound error = %v, want %v", err, tt.err)
				}
				return
			}
			for i, want := range tt.want {
				p, err := r.Outbound(tt.src, netip.MustParseAddrPort(tt.dst))
				if err != nil {
					t.Fatalf("call %d: %v", i, err)
				}
				if got := render(p); got != want {
					t.Fatalf("call %d:\n got %s\nwant %s", i, got, want)
				}
			}
		})
	}
}

func TestWaypointIdentities(t *testing.T) {
	svcWp := &discoveryv1.GatewayAddress{Gateway: "default/waypoint", Service: wpSvc, HbonePort: 15008}
	s := newStore(t, []store.Resource{
		workload("wp", "10.0.9.1", captured, implements("default/waypoint"), inService(wpSvc, 15008, 15008), sa("waypoint")),
		workload("sawp", "10.0.9.2", captured, implements("default/sa-wp"), inService(saWpSvc, 15008, 15008)),
		workload("b1", "10.0.0.2", captured, inService(echoSvc, 80, 8080), waypoint("default/sa-wp", saWpSvc)),
		workload("b2", "10.0.0.3", captured),
	}, []store.Resource{service(echoSvc, "10.96.0.10", svcWp, &discoveryv1.ServicePort{ServicePort: 80})})
	r := New(s)
	got := map[string]bool{}
	for _, id := range r.Waypoints(s.Workload("b1")) {
		got[id.String()] = true
	}
	if len(got) != 2 || !got["spiffe://cluster.local/ns/default/sa/waypoint"] || !got["spiffe://cluster.local/ns/default/sa/sawp"] {
		t.Fatalf("Waypoints(b1) = %v", got)
	}
	if ids := r.Waypoints(s.Workload("b2")); len(ids) != 0 {
		t.Fatalf("Waypoints(b2) = %v, want none", ids)
	}
}

// TestRejectedDestination: an address that only rejected discovery data
// claims is refused, never passed through in plaintext; a valid workload
// claiming it decides as usual.
func TestRejectedDestination(t *testing.T) {
	bad := workload("bad", "10.0.0.7", captured)
	bad.Body.(*discoveryv1.Workload).Services = map[string]*discoveryv1.PortList{echoSvc: {Ports: []*discoveryv1.Port{{ServicePort: 0}}}}
	s := store.New("cluster.local")
	if err := s.Apply(discoveryv1.WorkloadType, []store.Resource{bad, workload("ok", "10.0.0.8", captured)}, nil); err == nil {
		t.Fatal("invalid workload accepted")
	}
	r := New(s)
	if p, err := r.Outbound(Source{}, netip.MustParseAddrPort("10.0.0.7:8080")); !errors.Is(err, ErrRejected) {
		t.Fatalf("to a rejected workload's address: plan %s, error %v; want ErrRejected", render(p), err)
	}
	if p, err := r.Outbound(Source{}, netip.MustParseAddrPort("10.0.0.8:8080")); err != nil || p.Targets[0].Kind != HBONE {
		t.Fatalf("to the valid workload of the same response: plan %s, error %v", render(p), err)
	}
	// A valid workload taking the address decides.
	if err := s.Apply(discoveryv1.WorkloadType, []store.Resource{workload("other", "10.0.0.7", captured)}, nil); err != nil {
		t.Fatal(err)
	}
	if p, err := r.Outbound(Source{}, netip.MustParseAddrPort("10.0.0.7:8080")); err != nil || p.Targets[0].Identity.String() != "spiffe://cluster.local/ns/default/sa/other" {
		t.Fatalf("to a valid workload sharing the address: plan %s, error %v", render(p), err)
	}
	// Unknown addresses still pass through.
	if p, err := r.Outbound(Source{}, netip.MustParseAddrPort("10.0.0.99:8080")); err != nil || p.Targets[0].Kind != Passthrough {
		t.Fatalf("to an unknown address: plan %s, error %v", render(p), err)
	}
}
