package app

import (
	"net/http"
	"net/netip"
	"testing"

	discoveryv1 "github.com/amesh-dev/amesh/api/discovery/v1"
	"github.com/amesh-dev/amesh/api/hbone"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/protobuf/proto"

	"github.com/amesh-dev/amesh/waypoint/internal/catalog"
)

// TestAuditForwardedNotTrustedBlindly: any holder of a mesh certificate
// (a waypoint of another namespace, a custom image in a waypoint
// Deployment) can open HBONE to this waypoint with its own Forwarded
// header. The "for" address feeds ipBlocks / source.ip in L7 and L4
// policy, consistent hashing and telemetry. ztunnel dials from inside the
// source pod's network namespace, so the HBONE peer address already is
// the client's; a "for" that names another workload than the peer's
// identity must not replace it.
func TestAuditForwardedNotTrustedBlindly(t *testing.T) {
	r := &hbone.Request{
		Peer:       spiffeid.RequireFromString("spiffe://cluster.local/ns/evil/sa/wp"),
		RemoteAddr: netip.MustParseAddrPort("10.0.7.7:40000"),
		Header:     http.Header{"Forwarded": {"for=10.0.0.42"}},
	}
	cat := catalog.New(catalog.Options{})
	if got := sourceOf(r, cat.WorkloadByIP); got != netip.MustParseAddr("10.0.7.7") {
		t.Errorf("policy source address = %v, taken from the peer's Forwarded header; want the peer address 10.0.7.7", got)
	}
}

// TestSourceOf: the Forwarded address replaces the peer address only when
// both are addresses of one workload.
func TestSourceOf(t *testing.T) {
	wl := func(uid string, ips ...string) *discoveryv1.Workload {
		w := &discoveryv1.Workload{Uid: uid, Name: uid, Namespace: "default", ServiceAccount: uid}
		for _, ip := range ips {
			w.Addresses = append(w.Addresses, netip.MustParseAddr(ip).AsSlice())
		}
		return w
	}
	cat := catalog.New(catalog.Options{})
	if err := cat.Update([]proto.Message{wl("client", "10.0.0.5", "fd00::5"), wl("other", "10.0.0.42")}, nil); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, peer, forwarded, want string
	}{
		{"no header", "10.0.0.5", "", "10.0.0.5"},
		{"same address", "10.0.0.5", "for=10.0.0.5", "10.0.0.5"},
		{"other family of the same workload", "10.0.0.5", `for="[fd00::5]"`, "fd00::5"},
		{"with port", "fd00::5", `for="10.0.0.5:4711"`, "10.0.0.5"},
		{"another workload's address", "10.0.0.5", "for=10.0.0.42", "10.0.0.5"},
		{"unknown address", "10.0.0.5", "for=192.0.2.1", "10.0.0.5"},
		{"peer address unknown", "10.9.9.9", "for=10.0.0.5", "10.9.9.9"},
		{"garbage", "10.0.0.5", "for=_hidden", "10.0.0.5"},
		{"mapped peer", "::ffff:10.0.0.5", "", "10.0.0.5"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := &hbone.Request{RemoteAddr: netip.AddrPortFrom(netip.MustParseAddr(tc.peer), 40000), Header: http.Header{}}
			if tc.forwarded != "" {
				r.Header.Set("Forwarded", tc.forwarded)
			}
			if got := sourceOf(r, cat.WorkloadByIP); got != netip.MustParseAddr(tc.want) {
				t.Errorf("sourceOf = %v, want %s", got, tc.want)
			}
		})
	}
}
