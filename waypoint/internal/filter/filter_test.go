package filter

import (
	"net/http"
	"net/http/httptest"
	"reflect"
	"testing"

	discoveryv1 "github.com/amesh-dev/amesh/api/discovery/v1"
)

func TestReplacePrefix(t *testing.T) {
	// The table from the Gateway API HTTPPathModifier documentation.
	tests := []struct{ path, prefix, repl, want string }{
		{"/foo/bar", "/foo", "/xyz", "/xyz/bar"},
		{"/foo/bar", "/foo", "/xyz/", "/xyz/bar"},
		{"/foo/bar", "/foo/", "/xyz", "/xyz/bar"},
		{"/foo/bar", "/foo/", "/xyz/", "/xyz/bar"},
		{"/foo", "/foo", "/xyz", "/xyz"},
		{"/foo/", "/foo", "/xyz", "/xyz/"},
		{"/foo/bar", "/foo", "", "/bar"},
		{"/foo/", "/foo", "", "/"},
		{"/foo", "/foo", "", "/"},
		{"/foo/", "/foo", "/", "/"},
		{"/foo", "/foo", "/", "/"},
		{"/anything", "/", "/api", "/api/anything"},
	}
	for _, tt := range tests {
		m := &discoveryv1.PathModifier{Kind: &discoveryv1.PathModifier_ReplacePrefixMatch{ReplacePrefixMatch: tt.repl}}
		if got := ReplacePath(tt.path, tt.prefix, m); got != tt.want {
			t.Errorf("path %q prefix %q repl %q = %q, want %q", tt.path, tt.prefix, tt.repl, got, tt.want)
		}
	}
	full := &discoveryv1.PathModifier{Kind: &discoveryv1.PathModifier_ReplaceFullPath{ReplaceFullPath: "/new"}}
	if got := ReplacePath("/old/x", "/old", full); got != "/new" {
		t.Errorf("full = %q", got)
	}
}

func TestModifyHeaders(t *testing.T) {
	h := http.Header{"X-Keep": {"1"}, "X-Set": {"old"}, "X-Add": {"a"}, "X-Remove": {"gone"}}
	host := "svc"
	ModifyHeaders(h, &discoveryv1.HeaderModifier{
		Set:    []*discoveryv1.Header{{Name: "x-set", Value: "new"}, {Name: "Host", Value: "rewritten"}},
		Add:    []*discoveryv1.Header{{Name: "x-add", Value: "b"}},
		Remove: []string{"x-remove"},
	}, &host)
	want := http.Header{"X-Keep": {"1"}, "X-Set": {"new"}, "X-Add": {"a", "b"}}
	if !reflect.DeepEqual(h, want) || host != "rewritten" {
		t.Fatalf("headers %v host %q", h, host)
	}
}

func TestRedirect(t *testing.T) {
	tests := []struct {
		name   string
		target string
		rd     *discoveryv1.RequestRedirect
		want   string
		code   int
	}{
		{"scheme https drops well-known port", "http://reviews:9080/a?x=1",
			&discoveryv1.RequestRedirect{Scheme: "https"}, "https://reviews/a?x=1", 302},
		{"hostname and 301 keep listener port", "http://reviews:9080/a",
			&discoveryv1.RequestRedirect{Hostname: "ratings", StatusCode: 301}, "http://ratings:9080/a", 301},
		{"explicit port", "http://reviews/a",
			&discoveryv1.RequestRedirect{Port: 8443, Scheme: "https"}, "https://reviews:8443/a", 302},
		{"prefix replace", "http://reviews:9080/v1/items",
			&discoveryv1.RequestRedirect{Path: &discoveryv1.PathModifier{Kind: &discoveryv1.PathModifier_ReplacePrefixMatch{ReplacePrefixMatch: "/v2"}}}, "http://reviews:9080/v2/items", 302},
		// The Location carries the path escaped: a decoded "?" or "#" would
		// start a query or fragment, a CR LF would split the header.
		{"escaped path kept", "http://reviews:9080/a%3Fb%23c%20d?q=%3F",
			&discoveryv1.RequestRedirect{Hostname: "ratings"}, "http://ratings:9080/a%3Fb%23c%20d?q=%3F", 302},
		{"escaped rest after prefix replace", "http://reviews:9080/v1/a%3Fb%0D%0Ax",
			&discoveryv1.RequestRedirect{Path: &discoveryv1.PathModifier{Kind: &discoveryv1.PathModifier_ReplacePrefixMatch{ReplacePrefixMatch: "/v 2"}}}, "http://reviews:9080/v%202/a%3Fb%0D%0Ax", 302},
		{"full path replaced and escaped", "http://reviews:9080/x",
			&discoveryv1.RequestRedirect{Path: &discoveryv1.PathModifier{Kind: &discoveryv1.PathModifier_ReplaceFullPath{ReplaceFullPath: "/new?"}}}, "http://reviews:9080/new%3F", 302},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := httptest.NewRequest("GET", tt.target, nil)
			loc, code := Redirect(r, tt.rd, "http", 9080, r.URL.Path, "/v1")
			if loc != tt.want || code != tt.code {
				t.Fatalf("got %s %d, want %s %d", loc, code, tt.want, tt.code)
			}
		})
	}
}

// FuzzModifyHeaders applies fuzzed modifiers to fuzzed headers: never panics,
// and removed headers are gone.
func FuzzModifyHeaders(f *testing.F) {
	f.Add("x-a", "v", "x-b", "x-a")
	f.Add("Host", "h\r\nx", "", "host")
	f.Fuzz(func(t *testing.T, setName, setVal, addName, rm string) {
		h := http.Header{}
		h.Add(setName, "orig")
		host := ""
		ModifyHeaders(h, &discoveryv1.HeaderModifier{
			Set:    []*discoveryv1.Header{{Name: setName, Value: setVal}},
			Add:    []*discoveryv1.Header{{Name: addName, Value: setVal}},
			Remove: []string{rm},
		}, &host)
		if rm != "" && len(h.Values(rm)) != 0 {
			t.Fatalf("%q still present: %v", rm, h)
		}
	})
}
