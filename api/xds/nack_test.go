package xds_test

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	discoveryv1 "github.com/amesh-dev/amesh/api/discovery/v1"
	"github.com/amesh-dev/amesh/api/xds"
	"github.com/amesh-dev/amesh/api/xds/xdsclient"
)

// rejectPoison makes a store NACK every response carrying a workload of
// service account "poison".
func rejectPoison(st *store) *store {
	st.reject = func(_ string, r *xds.Resource) error {
		if w, ok := r.Body.(*discoveryv1.Workload); ok && w.GetServiceAccount() == "poison" {
			return errors.New("service account poison is not allowed")
		}
		return nil
	}
	return st
}

// updates returns amesh_xds_client_updates_total of one result.
func updates(t *testing.T, reg *prometheus.Registry, result string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	sum := 0.0
	for _, mf := range mfs {
		if mf.GetName() != "amesh_xds_client_updates_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "result" && l.GetValue() == result {
					sum += m.GetCounter().GetValue()
				}
			}
		}
	}
	return sum
}

// TestRejectedFirstPushSyncs: a first push that the client rejects (in
// full, or one part of a split push) still completes the client's initial
// sync, with the state it had before plus the accepted parts — as Envoy
// finishes warming on a rejected initial configuration — instead of
// leaving the client (a ztunnel or waypoint) unsynced, and so unready,
// until the bad resource changes. The rejection is counted.
func TestRejectedFirstPushSyncs(t *testing.T) {
	for _, tc := range []struct {
		name     string
		maxN     int
		want     []string // what the client holds once synced
		applied  float64
		rejected float64
	}{
		{"one response", 0, nil, 0, 1},
		{"split push, one part rejected", 1, []string{"w1", "w3"}, 2, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, auth := newPKI(t), newAuthenticator()
			srv := newChunkingServer(t, p, auth, tc.maxN, 0)
			must(t, srv.Set(wlType, []*xds.Resource{wl("w1", ""), wl("w2", "", "poison"), wl("w3", "")}))
			must(t, srv.Set(svcType, []*xds.Resource{svc("s1")}))
			reg := prometheus.NewRegistry()
			st := rejectPoison(newStore())
			c := runClientOpts(t, xdsclient.Options{Conn: dial(t, p, srv.addr, "z"), TypeURLs: []string{wlType, svcType},
				Handler: st, Registerer: reg})
			waitSynced(t, c)
			if got := st.names(wlType); !slices.Equal(got, tc.want) {
				t.Errorf("handler holds %v once synced, want %v", got, tc.want)
			}
			if got := slices.Sorted(func(yield func(string) bool) {
				for n := range c.Versions(wlType) {
					if !yield(n) {
						return
					}
				}
			}); !slices.Equal(got, tc.want) {
				t.Errorf("client versions %v once synced, want %v", got, tc.want)
			}
			if got := st.names(svcType); !slices.Equal(got, []string{"s1"}) {
				t.Errorf("services %v", got)
			}
			if got := updates(t, reg, "rejected"); got != tc.rejected {
				t.Errorf("rejected updates = %v, want %v", got, tc.rejected)
			}
			if got := updates(t, reg, "applied"); got != tc.applied+1 { // + the services
				t.Errorf("applied updates = %v, want %v", got, tc.applied+1)
			}
			// A fixed version is sent and accepted.
			must(t, srv.Update(wlType, []*xds.Resource{wl("w2", "", "fixed")}, nil))
			eventually(t, "fixed w2 arrives", func() bool { return st.get(wlType, "w2") != nil })
		})
	}
}

// TestNACKedVersionAfterReconnect: the server remembers a NACKed version
// per stream only, so after a reconnection it sends it once more (the
// client claims only what it holds) and it is rejected once more — and
// that is all: a NACK never ends the stream, so nothing loops.
func TestNACKedVersionAfterReconnect(t *testing.T) {
	p, auth := newPKI(t), newAuthenticator()
	reg1 := prometheus.NewRegistry()
	srv1 := newServer(t, p, auth, reg1)
	must(t, srv1.Set(wlType, []*xds.Resource{wl("w1", "")}))
	creg := prometheus.NewRegistry()
	st := rejectPoison(newStore())
	c := runClientOpts(t, xdsclient.Options{Conn: dial(t, p, srv1.addr, "z"), TypeURLs: []string{wlType}, Handler: st, Registerer: creg})
	waitSynced(t, c)
	good := c.Versions(wlType)["w1"]
	must(t, srv1.Update(wlType, []*xds.Resource{wl("w1", "", "poison")}, nil))
	eventually(t, "the NACK", func() bool { return metricValue(t, reg1, "amesh_xds_nacks_total") == 1 })

	srv1.stop()
	reg2 := prometheus.NewRegistry()
	srv2 := startServer(t, p, xds.NewServer(xds.ServerOptions{Authenticate: auth.authenticate, Registerer: reg2}), srv1.addr)
	must(t, srv2.Set(wlType, []*xds.Resource{wl("w1", "", "poison")}))
	eventually(t, "the NACK after reconnecting", func() bool { return metricValue(t, reg2, "amesh_xds_nacks_total") == 1 })
	connects := c.Connects()
	time.Sleep(500 * time.Millisecond)
	if got := metricValue(t, reg2, "amesh_xds_nacks_total"); got != 1 {
		t.Errorf("NACKs after reconnecting = %v, want 1", got)
	}
	if got := metricValue(t, reg2, "amesh_xds_pushes_total"); got != 1 {
		t.Errorf("pushes after reconnecting = %v, want 1", got)
	}
	if got := c.Connects(); got != connects || got != 2 {
		t.Errorf("streams opened = %d (was %d), want 2", got, connects)
	}
	if got := updates(t, creg, "rejected"); got != 2 {
		t.Errorf("client rejected updates = %v, want 2", got)
	}
	if v := c.Versions(wlType); v["w1"] != good || len(v) != 1 {
		t.Errorf("client holds %v, want w1@%s", v, good)
	}
}

// TestPartialRejection: a Handler that applies a response except some of
// its resources (an *xdsclient.RejectedError) NACKs it, and the client holds
// what was applied at its version and the rejected names too (at the
// version held before, or none), so that a later removal of any of them
// still reaches the Handler — the Handler may hold something in their
// place — and a reconnection asks for the rejected ones again.
func TestPartialRejection(t *testing.T) {
	p, auth := newPKI(t), newAuthenticator()
	reg := prometheus.NewRegistry()
	srv := newServer(t, p, auth, reg)
	must(t, srv.Set(wlType, []*xds.Resource{wl("w1", ""), wl("w2", "", "poison"), wl("w3", "")}))
	st := rejectPoison(newStore())
	st.partial = true
	c := runClientOpts(t, xdsclient.Options{Conn: dial(t, p, srv.addr, "z"), TypeURLs: []string{wlType}, Handler: st})
	waitSynced(t, c)
	if got := st.names(wlType); !slices.Equal(got, []string{"w1", "w3"}) {
		t.Fatalf("handler holds %v, want [w1 w3]", got)
	}
	eventually(t, "the NACK", func() bool { return metricValue(t, reg, "amesh_xds_nacks_total") == 1 })
	v := c.Versions(wlType)
	if v["w1"] == "" || v["w3"] == "" {
		t.Errorf("applied resources not held at their version: %v", v)
	}
	if got, ok := v["w2"]; !ok || got != "" {
		t.Errorf("rejected new resource held as %q (present %v), want held without a version", got, ok)
	}

	// A rejected update of a held resource keeps the held version.
	good := v["w1"]
	must(t, srv.Update(wlType, []*xds.Resource{wl("w1", "", "poison")}, nil))
	eventually(t, "the second NACK", func() bool { return metricValue(t, reg, "amesh_xds_nacks_total") == 2 })
	if got := c.Versions(wlType)["w1"]; got != good {
		t.Errorf("w1 held at %q after a rejected update, want %q", got, good)
	}

	// Removing the rejected resources reaches the handler.
	n := st.ncalls()
	must(t, srv.Update(wlType, nil, []string{"w1", "w2"}))
	eventually(t, "the removals", func() bool {
		for _, cl := range st.callsSince(n) {
			if slices.Equal(slices.Sorted(slices.Values(cl.removes)), []string{"w1", "w2"}) {
				return true
			}
		}
		return false
	})
	if got := st.names(wlType); !slices.Equal(got, []string{"w3"}) {
		t.Errorf("handler holds %v, want [w3]", got)
	}
	if v := c.Versions(wlType); len(v) != 1 || v["w3"] == "" {
		t.Errorf("client holds %v, want only w3", v)
	}
}

// TestRejectedErrorMessage: the NACK detail names the rejected resources,
// sorted, and stays short when there are many.
func TestRejectedErrorMessage(t *testing.T) {
	e := &xdsclient.RejectedError{Rejected: map[string]error{"b": errors.New("bad port"), "a": errors.New("bad cidr")}}
	if got, want := e.Error(), "2 resources rejected: a: bad cidr; b: bad port"; got != want {
		t.Errorf("Error() = %q, want %q", got, want)
	}
	many := &xdsclient.RejectedError{Rejected: map[string]error{}}
	for i := range 100 {
		many.Rejected[fmt.Sprintf("r%03d", i)] = errors.New("bad")
	}
	msg := many.Error()
	if !strings.HasPrefix(msg, "100 resources rejected: r000: bad; ") || !strings.HasSuffix(msg, "; and 90 more") {
		t.Errorf("Error() = %q", msg)
	}
}
