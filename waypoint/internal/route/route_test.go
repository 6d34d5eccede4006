package route

import (
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"

	discoveryv1 "github.com/amesh-dev/amesh/api/discovery/v1"
)

const svc = "default/reviews.default.svc.cluster.local"

func prefix(v string) *discoveryv1.PathMatch {
	return &discoveryv1.PathMatch{Type: discoveryv1.PathMatch_TYPE_PREFIX, Value: v}
}
func exact(v string) *discoveryv1.PathMatch {
	return &discoveryv1.PathMatch{Type: discoveryv1.PathMatch_TYPE_EXACT, Value: v}
}
func regex(v string) *discoveryv1.PathMatch {
	return &discoveryv1.PathMatch{Type: discoveryv1.PathMatch_TYPE_REGEX, Value: v}
}
func hdr(n, v string) *discoveryv1.HeaderMatch { return &discoveryv1.HeaderMatch{Name: n, Value: v} }
func qp(n, v string) *discoveryv1.QueryParamMatch {
	return &discoveryv1.QueryParamMatch{Name: n, Value: v}
}

// rule builds a one-backend rule whose rule name identifies it in results.
func rule(name string, ms ...*discoveryv1.HTTPRouteMatch) *discoveryv1.HTTPRouteRule {
	return &discoveryv1.HTTPRouteRule{Name: name, Matches: ms,
		Backends: []*discoveryv1.BackendRef{{Service: "default/" + name, Port: 80, Weight: 1}}}
}

func hroute(ns, name string, created int64, rules ...*discoveryv1.HTTPRouteRule) *discoveryv1.HTTPRoute {
	return &discoveryv1.HTTPRoute{Namespace: ns, Name: name, CreationTimestamp: created, Rules: rules}
}

type req struct {
	method, target string
	headers        map[string]string
}

func (q req) build() *http.Request {
	m := q.method
	if m == "" {
		m = "GET"
	}
	r := httptest.NewRequest(m, "http://reviews"+q.target, nil)
	for k, v := range q.headers {
		if strings.EqualFold(k, "host") {
			r.Host = v
			continue
		}
		r.Header.Add(k, v)
	}
	return r
}

func TestHTTPPrecedence(t *testing.T) {
	tests := []struct {
		name   string
		routes []*discoveryv1.HTTPRoute
		req    req
		want   string // rule name; "" = no match (404)
		prefix string
	}{
		{
			name: "exact beats longer prefix",
			routes: []*discoveryv1.HTTPRoute{hroute("default", "a", 1,
				rule("prefix", &discoveryv1.HTTPRouteMatch{Path: prefix("/foo/bar")}),
				rule("exact", &discoveryv1.HTTPRouteMatch{Path: exact("/foo/bar")}))},
			req: req{target: "/foo/bar"}, want: "exact",
		},
		{
			name: "longest prefix wins across routes",
			routes: []*discoveryv1.HTTPRoute{
				hroute("default", "a", 1, rule("short", &discoveryv1.HTTPRouteMatch{Path: prefix("/foo")})),
				hroute("default", "b", 2, rule("long", &discoveryv1.HTTPRouteMatch{Path: prefix("/foo/bar")})),
			},
			req: req{target: "/foo/bar/baz"}, want: "long", prefix: "/foo/bar",
		},
		{
			name: "prefix is element-wise",
			routes: []*discoveryv1.HTTPRoute{hroute("default", "a", 1,
				rule("foo", &discoveryv1.HTTPRouteMatch{Path: prefix("/foo")}))},
			req: req{target: "/foobar"}, want: "",
		},
		{
			name: "prefix with trailing slash matches the bare path",
			routes: []*discoveryv1.HTTPRoute{hroute("default", "a", 1,
				rule("foo", &discoveryv1.HTTPRouteMatch{Path: prefix("/foo/")}))},
			req: req{target: "/foo"}, want: "foo", prefix: "/foo/",
		},
		{
			name: "method beats headers at equal path",
			routes: []*discoveryv1.HTTPRoute{hroute("default", "a", 1,
				rule("headers", &discoveryv1.HTTPRouteMatch{Path: prefix("/"), Headers: []*discoveryv1.HeaderMatch{hdr("x", "1"), hdr("y", "2")}}),
				rule("method", &discoveryv1.HTTPRouteMatch{Path: prefix("/"), Method: "POST"}))},
			req: req{method: "POST", target: "/", headers: map[string]string{"x": "1", "y": "2"}}, want: "method",
		},
		{
			name: "path beats method",
			routes: []*discoveryv1.HTTPRoute{hroute("default", "a", 1,
				rule("method", &discoveryv1.HTTPRouteMatch{Method: "PATCH"}),
				rule("path", &discoveryv1.HTTPRouteMatch{Path: prefix("/path5")}))},
			req: req{method: "PATCH", target: "/path5"}, want: "path",
		},
		{
			name: "more headers win",
			routes: []*discoveryv1.HTTPRoute{
				hroute("default", "a", 1, rule("one", &discoveryv1.HTTPRouteMatch{Headers: []*discoveryv1.HeaderMatch{hdr("version", "v1")}})),
				hroute("default", "b", 2, rule("two", &discoveryv1.HTTPRouteMatch{Headers: []*discoveryv1.HeaderMatch{hdr("version", "v1"), hdr("color", "blue")}})),
			},
			req: req{target: "/", headers: map[string]string{"Version": "v1", "color": "blue"}}, want: "two",
		},
		{
			name: "headers beat query params",
			routes: []*discoveryv1.HTTPRoute{hroute("default", "a", 1,
				rule("query", &discoveryv1.HTTPRouteMatch{QueryParams: []*discoveryv1.QueryParamMatch{qp("a", "1"), qp("b", "2")}}),
				rule("header", &discoveryv1.HTTPRouteMatch{Headers: []*discoveryv1.HeaderMatch{hdr("h", "1")}}))},
			req: req{target: "/?a=1&b=2", headers: map[string]string{"h": "1"}}, want: "header",
		},
		{
			name: "more query params win",
			routes: []*discoveryv1.HTTPRoute{hroute("default", "a", 1,
				rule("q1", &discoveryv1.HTTPRouteMatch{QueryParams: []*discoveryv1.QueryParamMatch{qp("a", "1")}}),
				rule("q2", &discoveryv1.HTTPRouteMatch{QueryParams: []*discoveryv1.QueryParamMatch{qp("a", "1"), qp("b", "2")}}))},
			req: req{target: "/?b=2&a=1"}, want: "q2",
		},
		{
			name: "oldest route wins a tie",
			routes: []*discoveryv1.HTTPRoute{
				hroute("default", "new", 200, rule("new", &discoveryv1.HTTPRouteMatch{Path: prefix("/x")})),
				hroute("default", "old", 100, rule("old", &discoveryv1.HTTPRouteMatch{Path: prefix("/x")})),
			},
			req: req{target: "/x"}, want: "old",
		},
		{
			name: "alphabetical namespace/name breaks a timestamp tie",
			routes: []*discoveryv1.HTTPRoute{
				hroute("zeta", "a", 5, rule("zeta-a", &discoveryv1.HTTPRouteMatch{Path: prefix("/x")})),
				hroute("alpha", "z", 5, rule("alpha-z", &discoveryv1.HTTPRouteMatch{Path: prefix("/x")})),
			},
			req: req{target: "/x"}, want: "alpha-z",
		},
		{
			name: "first rule in list order within a route",
			routes: []*discoveryv1.HTTPRoute{hroute("default", "a", 1,
				rule("first", &discoveryv1.HTTPRouteMatch{Path: prefix("/x")}),
				rule("second", &discoveryv1.HTTPRouteMatch{Path: prefix("/x")}))},
			req: req{target: "/x/y"}, want: "first",
		},
		{
			name: "rule without matches is prefix /",
			routes: []*discoveryv1.HTTPRoute{hroute("default", "a", 1,
				rule("catchall"), rule("api", &discoveryv1.HTTPRouteMatch{Path: prefix("/api")}))},
			req: req{target: "/other"}, want: "catchall", prefix: "/",
		},
		{
			name: "regex is full match and ranks above prefix",
			routes: []*discoveryv1.HTTPRoute{hroute("default", "a", 1,
				rule("prefix", &discoveryv1.HTTPRouteMatch{Path: prefix("/users/123/profile")}),
				rule("regex", &discoveryv1.HTTPRouteMatch{Path: regex(`/users/[0-9]+/profile`)}))},
			req: req{target: "/users/123/profile"}, want: "regex",
		},
		{
			name: "regex must match the whole path",
			routes: []*discoveryv1.HTTPRoute{hroute("default", "a", 1,
				rule("regex", &discoveryv1.HTTPRouteMatch{Path: regex(`/users/[0-9]+`)}))},
			req: req{target: "/users/12/x"}, want: "",
		},
		{
			name: "header names are case-insensitive, values exact",
			routes: []*discoveryv1.HTTPRoute{hroute("default", "a", 1,
				rule("h", &discoveryv1.HTTPRouteMatch{Headers: []*discoveryv1.HeaderMatch{hdr("X-Env", "Canary")}}))},
			req: req{target: "/", headers: map[string]string{"x-env": "canary"}}, want: "",
		},
		{
			name: "header regex",
			routes: []*discoveryv1.HTTPRoute{hroute("default", "a", 1,
				rule("h", &discoveryv1.HTTPRouteMatch{Headers: []*discoveryv1.HeaderMatch{{Type: discoveryv1.HeaderMatch_TYPE_REGEX, Name: "user-agent", Value: ".*Firefox.*"}}}))},
			req: req{target: "/", headers: map[string]string{"User-Agent": "Mozilla/5.0 Firefox/120"}}, want: "h",
		},
		{
			name: "only the first of duplicate header names counts",
			routes: []*discoveryv1.HTTPRoute{hroute("default", "a", 1,
				rule("h", &discoveryv1.HTTPRouteMatch{Headers: []*discoveryv1.HeaderMatch{hdr("x", "1"), hdr("X", "2")}}))},
			req: req{target: "/", headers: map[string]string{"x": "1"}}, want: "h",
		},
		{
			name: "query names are case-sensitive",
			routes: []*discoveryv1.HTTPRoute{hroute("default", "a", 1,
				rule("q", &discoveryv1.HTTPRouteMatch{QueryParams: []*discoveryv1.QueryParamMatch{qp("Color", "red")}}))},
			req: req{target: "/?color=red"}, want: "",
		},
		{
			name: "method mismatch",
			routes: []*discoveryv1.HTTPRoute{hroute("default", "a", 1,
				rule("m", &discoveryv1.HTTPRouteMatch{Method: "DELETE"}))},
			req: req{target: "/"}, want: "",
		},
		{
			name: "host header match sees the authority",
			routes: []*discoveryv1.HTTPRoute{hroute("default", "a", 1,
				rule("host", &discoveryv1.HTTPRouteMatch{Headers: []*discoveryv1.HeaderMatch{hdr("host", "reviews:9080")}}))},
			req: req{target: "/", headers: map[string]string{"host": "reviews:9080"}}, want: "host",
		},
		{
			name: "invalid regex matches nothing",
			routes: []*discoveryv1.HTTPRoute{hroute("default", "a", 1,
				rule("bad", &discoveryv1.HTTPRouteMatch{Path: regex(`/(`)}))},
			req: req{target: "/("}, want: "",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tab := Compile(svc, 9080, tt.routes, nil)
			m, ok := tab.Lookup(tt.req.build())
			got := ""
			if ok {
				got = m.Rule.Name
			}
			if got != tt.want {
				t.Fatalf("rule = %q, want %q", got, tt.want)
			}
			if ok && tt.prefix != "" && m.Prefix != tt.prefix {
				t.Errorf("prefix = %q, want %q", m.Prefix, tt.prefix)
			}
		})
	}
}

func TestDefaultRouteAndPorts(t *testing.T) {
	routes := []*discoveryv1.HTTPRoute{{Namespace: "default", Name: "only-9090", Ports: []uint32{9090},
		Rules: []*discoveryv1.HTTPRouteRule{rule("r", &discoveryv1.HTTPRouteMatch{Path: exact("/x")})}}}
	tab := Compile(svc, 9080, routes, nil)
	if tab.Routed() {
		t.Fatal("route for port 9090 attached to 9080")
	}
	m, ok := tab.Lookup(req{target: "/anything"}.build())
	if !ok || !m.Rule.Default || len(m.Rule.Backends) != 1 || m.Rule.Backends[0].GetService() != svc || m.Rule.Backends[0].GetPort() != 9080 {
		t.Fatalf("default route = %+v, %v", m.Rule, ok)
	}
	tab = Compile(svc, 9090, routes, nil)
	if _, ok := tab.Lookup(req{target: "/y"}.build()); ok {
		t.Fatal("unmatched request on a routed port must not fall back to the default route")
	}
	if m, ok := tab.Lookup(req{target: "/x"}.build()); !ok || m.Rule.Name != "r" {
		t.Fatalf("got %+v", m)
	}
}

func grule(name string, ms ...*discoveryv1.GRPCRouteMatch) *discoveryv1.GRPCRouteRule {
	return &discoveryv1.GRPCRouteRule{Name: name, Matches: ms,
		Backends: []*discoveryv1.BackendRef{{Service: "default/" + name, Port: 80, Weight: 1}}}
}
func gm(svc, method string) *discoveryv1.GRPCRouteMatch {
	return &discoveryv1.GRPCRouteMatch{Method: &discoveryv1.GRPCMethodMatch{Service: svc, Method: method}}
}

func TestGRPCPrecedence(t *testing.T) {
	routes := []*discoveryv1.GRPCRoute{
		{Namespace: "default", Name: "a", CreationTimestamp: 1, Rules: []*discoveryv1.GRPCRouteRule{
			grule("any"),
			grule("service", gm("helloworld.Greeter", "")),
			grule("method", gm("", "SayHello")),
			grule("both", gm("helloworld.Greeter", "SayHello")),
			grule("regex", &discoveryv1.GRPCRouteMatch{Method: &discoveryv1.GRPCMethodMatch{Type: discoveryv1.GRPCMethodMatch_TYPE_REGEX, Service: `grpc\.health\.v1\..*`}}),
			grule("header", &discoveryv1.GRPCRouteMatch{Method: &discoveryv1.GRPCMethodMatch{Service: "helloworld.Greeter"}, Headers: []*discoveryv1.HeaderMatch{hdr("x-canary", "1")}}),
		}},
	}
	tab := Compile(svc, 9080, nil, routes)
	tests := []struct {
		path    string
		headers map[string]string
		want    string
	}{
		{"/helloworld.Greeter/SayHello", nil, "both"},
		{"/helloworld.Greeter/SayGoodbye", nil, "service"},
		{"/helloworld.Greeter/SayGoodbye", map[string]string{"x-canary": "1"}, "header"},
		{"/other.Svc/SayHello", nil, "method"},
		{"/other.Svc/Other", nil, "any"},
		{"/grpc.health.v1.Health/Check", nil, "regex"},
	}
	for _, tt := range tests {
		t.Run(tt.path, func(t *testing.T) {
			q := req{method: "POST", target: tt.path, headers: map[string]string{"content-type": "application/grpc"}}
			for k, v := range tt.headers {
				q.headers[k] = v
			}
			m, ok := tab.Lookup(q.build())
			if !ok || m.Rule.Name != tt.want || !m.Rule.GRPC {
				t.Fatalf("got %+v %v, want %s", m.Rule, ok, tt.want)
			}
		})
	}
}

func TestNormalize(t *testing.T) {
	tests := []struct {
		in, want string
		err      bool
	}{
		{"", "/", false},
		{"/a/b", "/a/b", false},
		{"/a/./b", "/a/b", false},
		{"/a/../b", "/b", false},
		{"/../../etc", "/etc", false},
		{"/a/b/..", "/a/", false},
		{"/a/%2e%2e/admin", "/admin", false},
		{"/a%2Fb", "", true},
		{"/a%5cb", "", true},
		{"/a\\b", "", true},
		{"a", "", true},
		{"/v1.2/x", "/v1.2/x", false},
	}
	for _, tt := range tests {
		got, err := Normalize(tt.in)
		if (err != nil) != tt.err || got != tt.want {
			t.Errorf("Normalize(%q) = %q, %v; want %q, err=%v", tt.in, got, err, tt.want, tt.err)
		}
	}
}

// FuzzLookup compiles routes from fuzzed match values and looks up fuzzed
// requests: it must never panic, and a path match must be consistent with
// PrefixMatches.
func FuzzLookup(f *testing.F) {
	f.Add("/foo", "/foo/bar", "x", "1", "a=1", uint8(0))
	f.Add("/(", "/((", "", "", "", uint8(2))
	f.Add("/a.*", "/abc", "h", "v", "b=%zz", uint8(2))
	f.Fuzz(func(t *testing.T, pathVal, reqPath, hname, hval, rawQuery string, kind uint8) {
		pm := &discoveryv1.PathMatch{Type: discoveryv1.PathMatch_Type(kind % 3), Value: pathVal}
		routes := []*discoveryv1.HTTPRoute{hroute("ns", "r", 1,
			rule("fuzz", &discoveryv1.HTTPRouteMatch{Path: pm, Headers: []*discoveryv1.HeaderMatch{{Name: hname, Value: hval}},
				QueryParams: []*discoveryv1.QueryParamMatch{{Name: "a", Value: "1"}}}),
			rule("fallback"))}
		tab := Compile(svc, 80, routes, nil)
		p, err := Normalize(reqPath)
		if err != nil {
			return
		}
		r := &http.Request{Method: "GET", Header: http.Header{}, Host: "h"}
		r.URL = &url.URL{Path: p, RawQuery: rawQuery}
		if hname != "" {
			r.Header.Set(hname, hval)
		}
		m, ok := tab.Lookup(r)
		if !ok {
			t.Fatalf("fallback rule must always match %q", p)
		}
		if m.Rule.Name == "fuzz" && pm.Type == discoveryv1.PathMatch_TYPE_PREFIX && !PrefixMatches(strings.TrimRight(pm.Value, "/"), p) {
			t.Fatalf("prefix %q matched %q", pm.Value, p)
		}
		if m.Rule.Name == "fuzz" && pm.Type == discoveryv1.PathMatch_TYPE_EXACT && p != pm.Value {
			t.Fatalf("exact %q matched %q", pm.Value, p)
		}
	})
}

// FuzzNormalize: the result is absolute, free of dot segments and encoded
// separators, and normalising it again changes nothing.
func FuzzNormalize(f *testing.F) {
	for _, s := range []string{"/a/../b", "/%2e%2e/x", "/a/./b/", "//x//..", "/a%2Fb", "/.%2E/"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, p string) {
		n, err := Normalize(p)
		if err != nil {
			return
		}
		if !strings.HasPrefix(n, "/") {
			t.Fatalf("%q → %q not absolute", p, n)
		}
		for _, seg := range strings.Split(n, "/") {
			if l := strings.ToLower(seg); l == ".." || l == "." || l == "%2e%2e" || l == "%2e" || l == ".%2e" || l == "%2e." {
				t.Fatalf("%q → %q keeps dot segment", p, n)
			}
		}
		if again, err := Normalize(n); err != nil || again != n {
			t.Fatalf("not idempotent: %q → %q → %q (%v)", p, n, again, err)
		}
	})
}
