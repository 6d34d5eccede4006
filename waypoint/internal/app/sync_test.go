package app

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/netip"
	"sync"
	"testing"
	"time"

	discoveryv1 "github.com/amesh-dev/amesh/api/discovery/v1"
	"github.com/amesh-dev/amesh/api/hbone"
	"github.com/amesh-dev/amesh/api/identity"
	"github.com/amesh-dev/amesh/api/xds"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/reflect/protoreflect"
)

// holdLastPart is a gRPC stream interceptor for the fake controller: it
// holds back the response that completes a split push of typeURL (the one
// following a response marked xds.MoreToCome) until release is closed.
type holdLastPart struct {
	typeURL string
	held    chan struct{} // closed when a response is being held
	release chan struct{}
	once    sync.Once
}

func newHoldLastPart(typeURL string) *holdLastPart {
	return &holdLastPart{typeURL: typeURL, held: make(chan struct{}), release: make(chan struct{})}
}

func (h *holdLastPart) intercept(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	return handler(srv, &holdStream{ServerStream: ss, h: h})
}

type holdStream struct {
	grpc.ServerStream
	h    *holdLastPart
	more bool // the last response of typeURL was marked MoreToCome
}

func (s *holdStream) SendMsg(m any) error {
	if pm, ok := m.(interface{ ProtoReflect() protoreflect.Message }); ok {
		r := pm.ProtoReflect()
		fields := r.Descriptor().Fields()
		if r.Get(fields.ByName("type_url")).String() == s.h.typeURL {
			more := r.Get(fields.ByName("system_version_info")).String() == xds.MoreToCome
			if s.more && !more {
				s.h.once.Do(func() { close(s.h.held) })
				select {
				case <-s.h.release:
				case <-s.Context().Done():
					return s.Context().Err()
				}
			}
			s.more = more
		}
	}
	return s.ServerStream.SendMsg(m)
}

// TestNotReadyUntilSplitPushComplete: the controller splits a large push
// into several responses (here one resource each). While the last
// response of the waypoint services is still on its way, every core type
// has had a delta applied and the waypoint holds a valid certificate, yet
// it is not ready and refuses every tunnel (503): it would otherwise serve
// with part of its state. Once the last response arrives it is ready and
// serves both services.
func TestNotReadyUntilSplitPushComplete(t *testing.T) {
	hold := newHoldLastPart(discoveryv1.WaypointServiceType)
	c := newControllerWith(t, controllerOptions{maxResponseResources: 1, grpc: []grpc.ServerOption{grpc.StreamInterceptor(hold.intercept)}})
	hbonePort := freePortOn(t, netip.MustParseAddr("127.0.0.1"))
	wpID, _ := identity.ID(td, "default", "waypoint")
	app := func(name string) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { fmt.Fprint(w, name) })
	}
	pa := startPod(t, c, hbonePort, wpID, key("alpha"), 80, "alpha", app("alpha"), nil)
	pb := startPod(t, c, hbonePort, wpID, key("beta"), 80, "beta", app("beta"), nil)
	vipA := netip.AddrPortFrom(netip.MustParseAddr("10.96.5.1"), 80)
	vipB := netip.AddrPortFrom(netip.MustParseAddr("10.96.5.2"), 80)
	c.set(discoveryv1.ServiceType, service("alpha", vipA.Addr(), 80, "http"), service("beta", vipB.Addr(), 80, "http"))
	c.set(discoveryv1.WorkloadType, pa.workload, pb.workload)
	c.set(discoveryv1.WaypointGatewayType, &discoveryv1.WaypointGateway{Gateway: "default/waypoint"})
	c.set(discoveryv1.WaypointServiceType,
		&discoveryv1.WaypointService{Service: key("alpha"), Gateway: "default/waypoint"},
		&discoveryv1.WaypointService{Service: key("beta"), Gateway: "default/waypoint"})

	wp := launchWaypoint(t, c, hbonePort)
	select {
	case <-hold.held:
	case <-time.After(20 * time.Second):
		t.Fatal("the last part of the waypoint services push was never sent")
	}
	// The first part is applied and the certificate issued: everything an
	// "each type had a delta" check would call ready.
	deadline := time.Now().Add(20 * time.Second)
	for {
		certOK := false
		for _, cert := range wp.app.store.Snapshot() {
			certOK = certOK || cert.ID == wp.app.self && cert.State == "valid"
		}
		if certOK && len(wp.app.xds.Versions(discoveryv1.WaypointServiceType)) == 1 &&
			len(wp.app.xds.Versions(discoveryv1.WorkloadType)) == 2 && len(wp.app.xds.Versions(discoveryv1.ServiceType)) == 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("first part not applied or no certificate: %v", wp.app.xds.Versions(discoveryv1.WaypointServiceType))
		}
		time.Sleep(20 * time.Millisecond)
	}
	resp, err := http.Get("http://" + wp.ready + "/healthz/ready")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusServiceUnavailable {
		t.Errorf("ready with part of a split push: %d", resp.StatusCode)
	}
	cl := newClient(t, c, wp)
	for _, vip := range []netip.AddrPort{vipA, vipB} {
		if conn, err := cl.dial(vip)(context.Background(), "", ""); !errors.Is(err, hbone.ErrUnreachable) {
			if conn != nil {
				conn.Close()
			}
			t.Errorf("tunnel to %s with part of a split push: %v, want 503", vip, err)
		}
	}

	close(hold.release)
	wp.waitReady(t)
	for vip, want := range map[netip.AddrPort]string{vipA: "alpha", vipB: "beta"} {
		resp, err := cl.http1(vip).Get("http://svc/")
		if err != nil {
			t.Fatalf("%s once synced: %v", vip, err)
		}
		b := make([]byte, 16)
		n, _ := resp.Body.Read(b)
		resp.Body.Close()
		if resp.StatusCode != 200 || string(b[:n]) != want {
			t.Errorf("%s once synced: %d %q, want 200 %q", vip, resp.StatusCode, b[:n], want)
		}
	}
}
