package xds_test

import (
	"fmt"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/protobuf/proto"

	"github.com/amesh-dev/amesh/api/xds"
	"github.com/amesh-dev/amesh/api/xds/xdsclient"
)

func newChunkingServer(t *testing.T, p *pki, auth *authenticator, maxN, maxB int) *testServer {
	t.Helper()
	return startServer(t, p, xds.NewServer(xds.ServerOptions{
		Authenticate: auth.authenticate, MaxResponseResources: maxN, MaxResponseBytes: maxB,
	}), "127.0.0.1:0")
}

func workloads(n int, prefix string) []*xds.Resource {
	out := make([]*xds.Resource, n)
	for i := range out {
		out[i] = wl(fmt.Sprintf("%s%04d", prefix, i), "")
	}
	return out
}

// TestChunkedPush: a push larger than the response bound arrives as
// several responses of at most that many resources (upserts and removals),
// each with its own nonce, all but the last marked MoreToCome; together
// they carry every resource exactly once.
func TestChunkedPush(t *testing.T) {
	p, auth := newPKI(t), newAuthenticator()
	srv := newChunkingServer(t, p, auth, 10, -1)
	must(t, srv.Set(wlType, workloads(95, "w")))
	r := openRaw(t, dial(t, p, srv.addr, "ztunnel-1"))
	r.send(&discoveryv3.DeltaDiscoveryRequest{Node: rawNode("raw"), TypeUrl: wlType})

	// recvPush reads the responses of one push.
	recvPush := func() (ups, rms []string, parts int) {
		t.Helper()
		nonces := map[string]bool{}
		for {
			resp := r.recv()
			parts++
			if n := len(resp.GetResources()) + len(resp.GetRemovedResources()); n > 10 {
				t.Fatalf("response %d carries %d resources, bound 10", parts, n)
			}
			if nonces[resp.GetNonce()] {
				t.Fatalf("nonce %s reused", resp.GetNonce())
			}
			nonces[resp.GetNonce()] = true
			u, rm := names(resp)
			ups, rms = append(ups, u...), append(rms, rm...)
			if resp.GetSystemVersionInfo() != xds.MoreToCome {
				return ups, rms, parts
			}
		}
	}
	ups, _, parts := recvPush()
	if parts != 10 {
		t.Errorf("95 resources in %d responses, want 10", parts)
	}
	slices.Sort(ups)
	if want := names95(); !slices.Equal(ups, want) {
		t.Fatalf("got %d distinct names of 95: %v", len(slices.Compact(slices.Clone(ups))), ups)
	}

	// 25 removals and 3 upserts: 28 changes in 3 responses.
	var gone []string
	for i := range 25 {
		gone = append(gone, fmt.Sprintf("w%04d", i))
	}
	must(t, srv.Update(wlType, workloads(3, "new"), gone))
	ups, rms, parts := recvPush()
	slices.Sort(rms)
	if parts != 3 || len(ups) != 3 || !slices.Equal(rms, gone) {
		t.Errorf("update in %d responses: upserts %v, removes %v", parts, ups, rms)
	}
}

func names95() []string {
	var out []string
	for i := range 95 {
		out = append(out, fmt.Sprintf("w%04d", i))
	}
	return out
}

// TestChunkedByteBudget: responses stay within the byte budget, a
// resource larger than the budget travels alone.
func TestChunkedByteBudget(t *testing.T) {
	p, auth := newPKI(t), newAuthenticator()
	srv := newChunkingServer(t, p, auth, -1, 2000)
	rs := workloads(40, "w")
	// One resource above the budget on its own.
	big := wl("big", "", string(make([]byte, 3000)))
	rs = append(rs, big)
	must(t, srv.Set(wlType, rs))
	r := openRaw(t, dial(t, p, srv.addr, "ztunnel-1"))
	r.send(&discoveryv3.DeltaDiscoveryRequest{Node: rawNode("raw"), TypeUrl: wlType})
	total, parts := 0, 0
	for {
		resp := r.recv()
		parts++
		size := 0
		for _, x := range resp.GetResources() {
			size += proto.Size(x)
		}
		if len(resp.GetResources()) > 1 && size > 2000 {
			t.Errorf("response %d: %d resources in %d bytes, budget 2000", parts, len(resp.GetResources()), size)
		}
		total += len(resp.GetResources())
		if resp.GetSystemVersionInfo() != xds.MoreToCome {
			break
		}
	}
	if total != 41 || parts < 2 {
		t.Errorf("%d resources in %d responses", total, parts)
	}
}

// TestClientSyncedAfterLastPart: the client applies and acknowledges each
// response of a split push, and is synced only once the last one is
// applied; a push split into one response per resource does not stall the
// stream although the client acknowledges every one.
func TestClientSyncedAfterLastPart(t *testing.T) {
	for _, tc := range []struct {
		name string
		n    int
		maxN int
	}{
		{"ten per response", 95, 10},
		{"one per response", 3000, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, auth := newPKI(t), newAuthenticator()
			srv := newChunkingServer(t, p, auth, tc.maxN, -1)
			must(t, srv.Set(wlType, workloads(tc.n, "w")))
			st := newStore()
			var cp atomic.Pointer[xdsclient.Client]
			early := make(chan int, 1)
			checking := xdsclient.HandlerFunc(func(typeURL string, ups []*xds.Resource, rms []string) error {
				if c := cp.Load(); c != nil {
					select {
					case <-c.Synced():
						select {
						case early <- len(st.names(typeURL)):
						default:
						}
					default:
					}
				}
				return st.Apply(typeURL, ups, rms)
			})
			c := runClient(t, dial(t, p, srv.addr, "ztunnel-1"), checking, wlType)
			cp.Store(c)
			select {
			case <-c.Synced():
			case <-time.After(30 * time.Second):
				t.Fatalf("not synced; holds %d of %d", len(st.names(wlType)), tc.n)
			}
			select {
			case n := <-early:
				t.Fatalf("synced while holding %d of %d", n, tc.n)
			default:
			}
			if got := len(st.names(wlType)); got != tc.n {
				t.Fatalf("synced holding %d of %d", got, tc.n)
			}
			want := (tc.n + tc.maxN - 1) / tc.maxN
			if got := st.ncalls(); got != want {
				t.Errorf("%d Apply calls, want one per response (%d)", got, want)
			}
		})
	}
}

// TestWithoutCodec: on a gRPC server without xds.Codec the server still
// sends complete, split responses (assembled through the standard codec),
// and other services on that server are unaffected by the codec choice.
func TestWithoutCodec(t *testing.T) {
	for _, withCodec := range []bool{false, true} {
		t.Run(fmt.Sprint("codec=", withCodec), func(t *testing.T) {
			p, auth := newPKI(t), newAuthenticator()
			srv := startServerCodec(t, p, xds.NewServer(xds.ServerOptions{
				Authenticate: auth.authenticate, MaxResponseResources: 7,
			}), "127.0.0.1:0", withCodec)
			must(t, srv.Set(wlType, workloads(50, "w")))
			must(t, srv.Set(svcType, []*xds.Resource{svc("s1")}))
			st := newStore()
			c := runClient(t, dial(t, p, srv.addr, "ztunnel-1"), st, wlType, svcType)
			waitSynced(t, c)
			if got := st.names(wlType); len(got) != 50 {
				t.Fatalf("%d workloads", len(got))
			}
			if !sameBody(st.get(wlType, "w0007").Body, wl("w0007", "").Body) {
				t.Errorf("body %v", st.get(wlType, "w0007").Body)
			}
		})
	}
}
