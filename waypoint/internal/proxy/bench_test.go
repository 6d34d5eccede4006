package proxy

import (
	"net/http"
	"net/http/httptest"
	"net/netip"
	"testing"

	discoveryv1 "github.com/amesh-dev/amesh/api/discovery/v1"
)

// BenchmarkServeHTTP measures the handler's own cost per request (routing,
// policy, telemetry, pooled upstream round trip to a loopback backend).
func BenchmarkServeHTTP(b *testing.B) {
	e := newEnv(b)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { _, _ = w.Write([]byte("ok")) }))
	defer srv.Close()
	e.service("bench", 80, "http", srv)
	e.waypoint(&discoveryv1.WaypointService{Service: key("bench"), HttpRoutes: []*discoveryv1.HTTPRoute{{Namespace: "default", Name: "r",
		Rules: []*discoveryv1.HTTPRouteRule{{Backends: []*discoveryv1.BackendRef{{Service: key("bench"), Port: 80, Weight: 1}}}}}}})
	ci := &ConnInfo{Peer: "spiffe://cluster.local/ns/client/sa/curl", Source: netip.MustParseAddr("127.0.0.1"), Target: e.vipFor("bench", 80)}
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		r := httptest.NewRequest("GET", "http://bench/api/items?x=1", nil)
		r = r.WithContext(WithConn(r.Context(), ci))
		w := httptest.NewRecorder()
		e.proxy.ServeHTTP(w, r)
		if w.Code != 200 {
			b.Fatalf("status %d", w.Code)
		}
	}
}
