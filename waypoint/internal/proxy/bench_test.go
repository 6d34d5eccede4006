package proxy

import (
	"context"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"net/url"
	"strings"
	"sync"
	"testing"

	discoveryv1 "github.com/amesh-dev/amesh/api/discovery/v1"
	"github.com/amesh-dev/amesh/waypoint/internal/route"
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

// FuzzServeHTTP drives the whole handler with fuzzed paths, headers and
// filters' inputs: it must never panic, must answer with a status it can
// explain, and must never forward a request whose path escapes normalisation.
func FuzzServeHTTP(f *testing.F) {
	f.Add("/api/x", "X-Version", "2", "Bearer abc")
	f.Add("/a/../../admin", "Host", "evil", "")
	f.Add("/%2e%2E/x", "Content-Type", "application/grpc", "Bearer a.b.c")
	f.Add("/x%00y", "Traceparent", "00-zz-yy-01", "")
	e := newEnv(f)
	var seen []string
	var mu sync.Mutex
	srv := backend(f, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		seen = append(seen[:0], r.URL.EscapedPath())
		mu.Unlock()
	}))
	e.service("fz", 80, "http", srv)
	e.waypoint(&discoveryv1.WaypointService{Service: key("fz"),
		Authorizations: []*discoveryv1.Authorization{{Namespace: "default", Name: "deny-admin", Action: discoveryv1.Authorization_ACTION_DENY,
			Rules: []*discoveryv1.Rule{{To: []*discoveryv1.Operation{{Paths: []string{"/admin*"}}}}}}},
		RequestAuthentications: []*discoveryv1.RequestAuthentication{{JwtRules: []*discoveryv1.JWTRule{{Issuer: "i", Jwks: `{"keys":[]}`}}}},
		HttpRoutes: []*discoveryv1.HTTPRoute{{Namespace: "default", Name: "r", Rules: []*discoveryv1.HTTPRouteRule{
			{Matches: []*discoveryv1.HTTPRouteMatch{{Headers: []*discoveryv1.HeaderMatch{{Type: discoveryv1.HeaderMatch_TYPE_REGEX, Name: "x-version", Value: "[0-9]+"}}}},
				Filters: []*discoveryv1.HTTPFilter{{Kind: &discoveryv1.HTTPFilter_UrlRewrite{UrlRewrite: &discoveryv1.URLRewrite{
					Path: &discoveryv1.PathModifier{Kind: &discoveryv1.PathModifier_ReplacePrefixMatch{ReplacePrefixMatch: "/v2"}}}}}},
				Backends: []*discoveryv1.BackendRef{{Service: key("fz"), Port: 80, Weight: 1}}},
			{Backends: []*discoveryv1.BackendRef{{Service: key("fz"), Port: 80, Weight: 1}}},
		}}}})
	ci := &ConnInfo{Source: netip.MustParseAddr("127.0.0.1"), Target: e.vipFor("fz", 80)}
	f.Fuzz(func(t *testing.T, path, hname, hval, auth string) {
		u, err := url.Parse("http://fz" + path)
		if err != nil || u.Path == "" {
			return
		}
		r := &http.Request{Method: "GET", URL: u, Host: "fz", Header: http.Header{}, Proto: "HTTP/1.1", ProtoMajor: 1, ProtoMinor: 1}
		if hname != "" {
			r.Header[http.CanonicalHeaderKey(hname)] = []string{hval}
		}
		if auth != "" {
			r.Header.Set("Authorization", auth)
		}
		r = r.WithContext(WithConn(context.Background(), ci))
		w := httptest.NewRecorder()
		mu.Lock()
		seen = seen[:0]
		mu.Unlock()
		e.proxy.ServeHTTP(w, r)
		switch w.Code {
		case 200, 400, 401, 403, 404, 503:
		default:
			t.Fatalf("status %d for path %q header %q=%q", w.Code, path, hname, hval)
		}
		mu.Lock()
		reached := len(seen) > 0
		p := ""
		if reached {
			p = seen[0]
		}
		mu.Unlock()
		if reached {
			if n, err := route.Normalize(p); err != nil || n != p || strings.HasPrefix(p, "/admin") {
				t.Fatalf("forwarded path %q (from %q)", p, path)
			}
		}
	})
}
