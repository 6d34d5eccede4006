package authz

import (
	"net/http"
	"net/netip"
	"testing"

	discoveryv1 "github.com/amesh-dev/amesh/api/discovery/v1"
)

func allow(name string, rules ...*discoveryv1.Rule) *discoveryv1.Authorization {
	return &discoveryv1.Authorization{Namespace: "default", Name: name, Action: discoveryv1.Authorization_ACTION_ALLOW, Rules: rules}
}
func deny(name string, rules ...*discoveryv1.Rule) *discoveryv1.Authorization {
	return &discoveryv1.Authorization{Namespace: "default", Name: name, Action: discoveryv1.Authorization_ACTION_DENY, Rules: rules}
}

func base() *Attributes {
	return &Attributes{
		Principal: "cluster.local/ns/frontend/sa/web", Namespace: "frontend",
		SourceIP: netip.MustParseAddr("10.1.2.3"), Port: 9080, Host: "reviews.default.svc.cluster.local",
		Method: "GET", Path: "/api/v1/items", Header: http.Header{"X-Env": {"prod"}},
		RequestPrincipal: "https://issuer.example/alice", Audiences: []string{"reviews"},
		Claims: map[string]any{"groups": []any{"admin", "dev"}, "org": map[string]any{"tier": "gold"}},
	}
}

func TestEvaluate(t *testing.T) {
	tests := []struct {
		name     string
		policies []*discoveryv1.Authorization
		mod      func(*Attributes)
		allow    bool
		policy   string
	}{
		{"no policies allows", nil, nil, true, ""},
		{"allow by principal", []*discoveryv1.Authorization{allow("p", &discoveryv1.Rule{From: []*discoveryv1.Source{{Principals: []string{"cluster.local/ns/frontend/sa/web"}}}})}, nil, true, "default/p"},
		{"allow policy present but no match denies", []*discoveryv1.Authorization{allow("p", &discoveryv1.Rule{From: []*discoveryv1.Source{{Principals: []string{"cluster.local/ns/other/sa/x"}}}})}, nil, false, ""},
		{"deny before allow", []*discoveryv1.Authorization{
			allow("a", &discoveryv1.Rule{}),
			deny("d", &discoveryv1.Rule{To: []*discoveryv1.Operation{{Methods: []string{"GET"}, Paths: []string{"/api/*"}}}}),
		}, nil, false, "default/d"},
		{"deny not matching leaves allow", []*discoveryv1.Authorization{
			allow("a", &discoveryv1.Rule{}),
			deny("d", &discoveryv1.Rule{To: []*discoveryv1.Operation{{Methods: []string{"DELETE"}}}}),
		}, nil, true, "default/a"},
		{"empty rule matches everything", []*discoveryv1.Authorization{allow("a", &discoveryv1.Rule{})}, nil, true, "default/a"},
		{"policy without rules matches nothing", []*discoveryv1.Authorization{allow("a")}, nil, false, ""},
		{"namespace prefix", []*discoveryv1.Authorization{allow("a", &discoveryv1.Rule{From: []*discoveryv1.Source{{Namespaces: []string{"front*"}}}})}, nil, true, "default/a"},
		{"not_principals excludes", []*discoveryv1.Authorization{allow("a", &discoveryv1.Rule{From: []*discoveryv1.Source{{NotPrincipals: []string{"*/sa/web"}}}})}, nil, false, ""},
		{"ip block", []*discoveryv1.Authorization{allow("a", &discoveryv1.Rule{From: []*discoveryv1.Source{{IpBlocks: []string{"10.1.0.0/16"}}}})}, nil, true, "default/a"},
		{"not ip block", []*discoveryv1.Authorization{allow("a", &discoveryv1.Rule{From: []*discoveryv1.Source{{NotIpBlocks: []string{"10.1.2.3"}}}})}, nil, false, ""},
		{"bad ip block in allow matches nothing", []*discoveryv1.Authorization{allow("a", &discoveryv1.Rule{From: []*discoveryv1.Source{{IpBlocks: []string{"nonsense"}}}})}, nil, false, ""},
		{"bad ip block in deny denies", []*discoveryv1.Authorization{deny("d", &discoveryv1.Rule{From: []*discoveryv1.Source{{IpBlocks: []string{"nonsense"}}}})}, nil, false, "default/d"},
		{"host is case-insensitive", []*discoveryv1.Authorization{allow("a", &discoveryv1.Rule{To: []*discoveryv1.Operation{{Hosts: []string{"Reviews.default.svc.cluster.local"}}}})}, nil, true, "default/a"},
		{"host pattern without port matches any port", []*discoveryv1.Authorization{allow("a", &discoveryv1.Rule{To: []*discoveryv1.Operation{{Hosts: []string{"reviews.default.svc.cluster.local"}}}})},
			func(a *Attributes) { a.Host = "reviews.default.svc.cluster.local:9080" }, true, "default/a"},
		{"not_hosts with port-less pattern", []*discoveryv1.Authorization{allow("a", &discoveryv1.Rule{To: []*discoveryv1.Operation{{NotHosts: []string{"reviews*"}}}})},
			func(a *Attributes) { a.Host = "reviews:9080" }, false, ""},
		{"host pattern with port is exact", []*discoveryv1.Authorization{allow("a", &discoveryv1.Rule{To: []*discoveryv1.Operation{{Hosts: []string{"reviews:80"}}}})},
			func(a *Attributes) { a.Host = "reviews:9080" }, false, ""},
		{"ports", []*discoveryv1.Authorization{allow("a", &discoveryv1.Rule{To: []*discoveryv1.Operation{{Ports: []uint32{80}}}})}, nil, false, ""},
		{"from and to must both match", []*discoveryv1.Authorization{allow("a", &discoveryv1.Rule{
			From: []*discoveryv1.Source{{Namespaces: []string{"frontend"}}},
			To:   []*discoveryv1.Operation{{Methods: []string{"POST"}}}})}, nil, false, ""},
		{"any entry of a list", []*discoveryv1.Authorization{allow("a", &discoveryv1.Rule{
			To: []*discoveryv1.Operation{{Methods: []string{"POST"}}, {Paths: []string{"/api/v1/items"}}}})}, nil, true, "default/a"},
		{"request principal", []*discoveryv1.Authorization{allow("a", &discoveryv1.Rule{From: []*discoveryv1.Source{{RequestPrincipals: []string{"*"}}}})},
			func(a *Attributes) { a.RequestPrincipal = "" }, false, ""},
		{"when header", []*discoveryv1.Authorization{allow("a", &discoveryv1.Rule{When: []*discoveryv1.Condition{{Key: "request.headers[x-env]", Values: []string{"prod"}}}})}, nil, true, "default/a"},
		{"when claim list", []*discoveryv1.Authorization{allow("a", &discoveryv1.Rule{When: []*discoveryv1.Condition{{Key: "request.auth.claims[groups]", Values: []string{"admin"}}}})}, nil, true, "default/a"},
		{"when nested claim", []*discoveryv1.Authorization{allow("a", &discoveryv1.Rule{When: []*discoveryv1.Condition{{Key: "request.auth.claims[org][tier]", Values: []string{"gold"}}}})}, nil, true, "default/a"},
		{"when audiences not_values", []*discoveryv1.Authorization{allow("a", &discoveryv1.Rule{When: []*discoveryv1.Condition{{Key: "request.auth.audiences", NotValues: []string{"reviews"}}}})}, nil, false, ""},
		{"when source.ip cidr", []*discoveryv1.Authorization{allow("a", &discoveryv1.Rule{When: []*discoveryv1.Condition{{Key: "source.ip", Values: []string{"10.0.0.0/8"}}}})}, nil, true, "default/a"},
		{"unknown key in allow never matches", []*discoveryv1.Authorization{allow("a", &discoveryv1.Rule{When: []*discoveryv1.Condition{{Key: "experimental.foo", Values: []string{"*"}}}})}, nil, false, ""},
		{"unknown key in deny denies", []*discoveryv1.Authorization{deny("d", &discoveryv1.Rule{When: []*discoveryv1.Condition{{Key: "experimental.foo", Values: []string{"x"}}}})}, nil, false, "default/d"},
		{"L4: allow with L7 fields never matches", []*discoveryv1.Authorization{allow("a", &discoveryv1.Rule{To: []*discoveryv1.Operation{{Methods: []string{"GET"}}}})},
			func(a *Attributes) { a.L4 = true }, false, ""},
		{"L4: deny with L7 fields ignores them", []*discoveryv1.Authorization{deny("d", &discoveryv1.Rule{
			From: []*discoveryv1.Source{{Namespaces: []string{"frontend"}}}, To: []*discoveryv1.Operation{{Methods: []string{"DELETE"}}}})},
			func(a *Attributes) { a.L4 = true }, false, "default/d"},
		{"L4: deny with L7 condition denies", []*discoveryv1.Authorization{deny("d", &discoveryv1.Rule{When: []*discoveryv1.Condition{{Key: "request.headers[x]", Values: []string{"y"}}}})},
			func(a *Attributes) { a.L4 = true }, false, "default/d"},
		{"L4: allow by principal still works", []*discoveryv1.Authorization{allow("a", &discoveryv1.Rule{From: []*discoveryv1.Source{{Principals: []string{"cluster.local/ns/frontend/sa/web"}}}, To: []*discoveryv1.Operation{{Ports: []uint32{9080}}}})},
			func(a *Attributes) { a.L4 = true }, true, "default/a"},
		{"plaintext peer has no principal", []*discoveryv1.Authorization{allow("a", &discoveryv1.Rule{From: []*discoveryv1.Source{{NotPrincipals: []string{"cluster.local/ns/bad/sa/x"}}}})},
			func(a *Attributes) { a.Principal = "" }, true, "default/a"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a := base()
			if tt.mod != nil {
				tt.mod(a)
			}
			d := Compile(tt.policies).Evaluate(a)
			if d.Allow != tt.allow || d.Policy != tt.policy {
				t.Fatalf("got %+v, want allow=%v policy=%q", d, tt.allow, tt.policy)
			}
		})
	}
}
