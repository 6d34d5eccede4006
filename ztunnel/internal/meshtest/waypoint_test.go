package meshtest

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	discoveryv1 "github.com/amesh-dev/amesh/api/discovery/v1"
	"github.com/amesh-dev/amesh/api/hbone"
	"github.com/amesh-dev/amesh/api/identity"
	"github.com/amesh-dev/amesh/api/xds"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/amesh-dev/amesh/ztunnel/internal/netns"
	"github.com/amesh-dev/amesh/ztunnel/internal/testnet"
)

// Waypoint is a minimal L4 waypoint speaking real HBONE in its own pod:
// it terminates CONNECT as its own identity and opens a new tunnel, as
// itself, to the destination pod it was told about.
type Waypoint struct {
	*Pod
	Gateway string // "default/<name>"
	Service string // its Service resource name
	VIP     netip.Addr

	mu     sync.Mutex
	routes map[netip.AddrPort]*Pod // authority → destination pod (port 8080)
	seen   []hbone.Request
}

// AddWaypoint starts a waypoint pod on node n.
func (m *Mesh) AddWaypoint(n *testnet.Node, name string, vip netip.Addr) *Waypoint {
	m.t.Helper()
	t := m.t
	w := &Waypoint{
		Pod:     &Pod{Pod: n.AddPod(t, name), UID: "uid-" + name, SA: name},
		Gateway: "default/" + name,
		Service: "default/" + name + ".default.svc.cluster.local",
		VIP:     vip,
		routes:  map[netip.AddrPort]*Pod{},
	}
	id := w.ID()
	key, err := identity.NewKey()
	if err != nil {
		t.Fatal(err)
	}
	csr, err := identity.NewCSR(key, id)
	if err != nil {
		t.Fatal(err)
	}
	chain, err := m.Ctl.Root.Sign(csr, id, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	cert := &tls.Certificate{PrivateKey: key, Leaf: chain[0]}
	for _, c := range chain {
		cert.Certificate = append(cert.Certificate, c.Raw)
	}
	td := spiffeid.RequireTrustDomainFromString(trustDomain)
	bundle := identity.NewBundle()
	bundle.Set(td, m.Ctl.Root.Roots())

	h, err := netns.Open(w.Path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	client := hbone.NewClient(hbone.ClientConfig{
		Certificates: func(context.Context, spiffeid.ID) (*tls.Certificate, error) { return cert, nil },
		Bundle:       bundle,
		Dial: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return h.Dial(ctx, network, addr, netip.Addr{}, netns.SockOpts{})
		},
	})
	t.Cleanup(func() { client.Close() })
	srv := hbone.NewServer(hbone.ServerConfig{
		Certificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return cert, nil },
		Bundle:      bundle, TrustDomain: td,
		Handler: func(ctx context.Context, r *hbone.Request) (func(net.Conn), error) {
			w.mu.Lock()
			w.seen = append(w.seen, *r)
			dst := w.routes[r.Authority]
			w.mu.Unlock()
			if dst == nil {
				return nil, fmt.Errorf("%w: no route for %s", hbone.ErrBadTarget, r.Authority)
			}
			up, err := client.Dial(ctx, hbone.DialRequest{
				Source: id, Expected: []spiffeid.ID{dst.ID()},
				Proxy: netip.AddrPortFrom(dst.IP, 15008), Target: netip.AddrPortFrom(dst.IP, 8080),
			})
			if err != nil {
				return nil, fmt.Errorf("%w: %w", hbone.ErrUnreachable, err)
			}
			return func(s net.Conn) {
				_, _, _ = hbone.Splice(s, up)
				up.Close()
			}, nil
		},
	})
	ln, err := h.Listen(context.Background(), "tcp", netip.AddrPortFrom(w.IP, 15008).String(), netns.SockOpts{})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { _ = srv.Serve(ctx, ln); close(done) }()
	t.Cleanup(func() { cancel(); <-done })

	wl := w.Workload()
	wl.TunnelProtocol = discoveryv1.TunnelProtocol_TUNNEL_PROTOCOL_HBONE // native HBONE
	wl.WaypointForGateway = w.Gateway
	wl.Services = map[string]*discoveryv1.PortList{w.Service: {Ports: []*discoveryv1.Port{{ServicePort: 15008, TargetPort: 15008}}}}
	m.Ctl.SetWorkload(wl)
	m.Ctl.publish(discoveryv1.ServiceType, &xds.Resource{Name: w.Service, Body: &discoveryv1.Service{
		Name: name, Namespace: "default", Hostname: name + ".default.svc.cluster.local",
		Addresses: [][]byte{vip.AsSlice()}, Ports: []*discoveryv1.ServicePort{{ServicePort: 15008, TargetPort: 15008}},
	}})
	return w
}

// Address is the waypoint's GatewayAddress for bindings.
func (w *Waypoint) Address() *discoveryv1.GatewayAddress {
	return &discoveryv1.GatewayAddress{Service: w.Service, Address: w.VIP.AsSlice(), HbonePort: 15008, Gateway: w.Gateway}
}

// Route tells the waypoint where an authority goes.
func (w *Waypoint) Route(authority netip.AddrPort, to *Pod) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.routes[authority] = to
}

// Seen returns the CONNECT requests received so far.
func (w *Waypoint) Seen() []hbone.Request {
	w.mu.Lock()
	defer w.mu.Unlock()
	return append([]hbone.Request(nil), w.seen...)
}

// TestWaypoint: a service bound to a waypoint is reached through it, and
// so is a workload with its own (per-service-account) waypoint; the
// destination ztunnel admits the waypoint's identity where the workload's
// own L4 policy admits nobody, while direct connections are refused.
func TestWaypoint(t *testing.T) {
	m := NewMesh(t)
	n1, n2 := m.Nodes[0], m.Nodes[1]
	a := m.AddPod(n1, "a", true)
	c := m.AddPod(n2, "c", true)
	d := m.AddPod(n2, "d", true)
	wp := m.AddWaypoint(n2, "wp", netip.MustParseAddr("10.96.9.9"))
	vip := netip.MustParseAddr("10.96.0.30")
	m.Ctl.SetService("svc-c", vip, c)
	// Bind svc-c to the waypoint.
	m.Ctl.publish(discoveryv1.ServiceType, &xds.Resource{Name: "default/svc-c.default.svc.cluster.local", Body: &discoveryv1.Service{
		Name: "svc-c", Namespace: "default", Hostname: "svc-c.default.svc.cluster.local",
		Addresses: [][]byte{vip.AsSlice()}, Ports: []*discoveryv1.ServicePort{{ServicePort: 80, TargetPort: 8080}},
		Waypoint: wp.Address(),
	}})
	// d runs as a service account with its own waypoint.
	wd := d.Workload()
	wd.Waypoint = wp.Address()
	// Both c and d admit nobody at L4 except through their waypoint.
	for _, p := range []*Pod{c, d} {
		m.Ctl.SetPolicy(&discoveryv1.Authorization{Name: "nobody-" + p.Name, Namespace: "default", Scope: discoveryv1.Authorization_SCOPE_WORKLOAD})
	}
	wc := m.Ctl.Workload(c.UID)
	wc.AuthorizationPolicies = []string{"default/nobody-c"}
	m.Ctl.SetWorkload(wc)
	wd.AuthorizationPolicies = []string{"default/nobody-d"}
	m.Ctl.SetWorkload(wd)
	wp.Route(netip.AddrPortFrom(vip, 80), c)
	wp.Route(netip.AddrPortFrom(d.IP, 8080), d)
	m.StartZtunnel(n1)
	m.StartZtunnel(n2)

	t.Run("service bound to a waypoint", func(t *testing.T) {
		converse(t, a, vip.String()+":80", wp.IP, 64<<10)
		found := false
		for _, r := range wp.Seen() {
			if r.Authority == netip.AddrPortFrom(vip, 80) && r.Peer == a.ID() {
				found = true
			}
		}
		if !found {
			t.Fatalf("the waypoint did not see a's CONNECT for the VIP: %+v", wp.Seen())
		}
	})
	t.Run("per-service-account waypoint of the destination workload", func(t *testing.T) {
		converse(t, a, d.IP.String()+":8080", wp.IP, 4<<10)
		found := false
		for _, r := range wp.Seen() {
			if r.Authority == netip.AddrPortFrom(d.IP, 8080) && r.Peer == a.ID() {
				found = true
			}
		}
		if !found {
			t.Fatalf("the waypoint did not see a's CONNECT for d: %+v", wp.Seen())
		}
	})
	t.Run("without the waypoint the workload policy refuses", func(t *testing.T) {
		// c has no waypoint of its own: by IP, a goes straight to it.
		if _, _, err := a.Converse(c.IP.String()+":8080", []byte("x")); err == nil {
			t.Fatal("a reached c directly despite its policy")
		}
	})
}
