package authz

import (
	"errors"
	"net/netip"
	"testing"

	discoveryv1 "github.com/amesh-dev/amesh/api/discovery/v1"
)

const (
	sleepPrincipal = "cluster.local/ns/foo/sa/sleep"
	otherPrincipal = "cluster.local/ns/bar/sa/other"
)

func conn(principal, ns, src string, port uint16) *Conn {
	c := &Conn{Principal: principal, Namespace: ns, DestinationIP: netip.MustParseAddr("10.0.0.9"), DestinationPort: port}
	if src != "" {
		c.SourceIP = netip.MustParseAddr(src)
	}
	return c
}

func pol(t *testing.T, name string, action discoveryv1.Authorization_Action, rules ...*discoveryv1.Rule) *Policy {
	t.Helper()
	p, err := Compile(&discoveryv1.Authorization{Name: name, Namespace: "ns", Action: action, Rules: rules})
	if err != nil {
		t.Fatalf("compile %s: %v", name, err)
	}
	return p
}

const (
	allow = discoveryv1.Authorization_ACTION_ALLOW
	deny  = discoveryv1.Authorization_ACTION_DENY
)

func TestEvaluate(t *testing.T) {
	fromPrincipal := func(ps ...string) *discoveryv1.Rule {
		return &discoveryv1.Rule{From: []*discoveryv1.Source{{Principals: ps}}}
	}
	toPorts := func(ps ...uint32) *discoveryv1.Rule {
		return &discoveryv1.Rule{To: []*discoveryv1.Operation{{Ports: ps}}}
	}
	tests := []struct {
		name     string
		policies func(t *testing.T) []*Policy
		conn     *Conn
		allowed  bool
		by       string
	}{
		{
			name:     "no policies allows",
			policies: func(t *testing.T) []*Policy { return nil },
			conn:     conn(sleepPrincipal, "foo", "10.0.0.1", 80),
			allowed:  true,
		},
		{
			name:     "allow with no rules denies everything",
			policies: func(t *testing.T) []*Policy { return []*Policy{pol(t, "nothing", allow)} },
			conn:     conn(sleepPrincipal, "foo", "10.0.0.1", 80),
			allowed:  false,
		},
		{
			name:     "allow with one empty rule allows everything",
			policies: func(t *testing.T) []*Policy { return []*Policy{pol(t, "all", allow, &discoveryv1.Rule{})} },
			conn:     conn("", "", "10.0.0.1", 80),
			allowed:  true,
			by:       "ns/all",
		},
		{
			name:     "deny with no rules denies nothing",
			policies: func(t *testing.T) []*Policy { return []*Policy{pol(t, "d", deny)} },
			conn:     conn(sleepPrincipal, "foo", "10.0.0.1", 80),
			allowed:  true,
		},
		{
			name: "deny wins over allow",
			policies: func(t *testing.T) []*Policy {
				return []*Policy{pol(t, "a", allow, fromPrincipal(sleepPrincipal)), pol(t, "d", deny, toPorts(80))}
			},
			conn:    conn(sleepPrincipal, "foo", "10.0.0.1", 80),
			allowed: false,
			by:      "ns/d",
		},
		{
			name: "deny not matching, allow matching",
			policies: func(t *testing.T) []*Policy {
				return []*Policy{pol(t, "a", allow, fromPrincipal(sleepPrincipal)), pol(t, "d", deny, toPorts(81))}
			},
			conn:    conn(sleepPrincipal, "foo", "10.0.0.1", 80),
			allowed: true,
			by:      "ns/a",
		},
		{
			name:     "allow principal mismatch",
			policies: func(t *testing.T) []*Policy { return []*Policy{pol(t, "a", allow, fromPrincipal(sleepPrincipal))} },
			conn:     conn(otherPrincipal, "bar", "10.0.0.1", 80),
			allowed:  false,
		},
		{
			name: "principal prefix",
			policies: func(t *testing.T) []*Policy {
				return []*Policy{pol(t, "a", allow, fromPrincipal("cluster.local/ns/foo/*"))}
			},
			conn:    conn(sleepPrincipal, "foo", "10.0.0.1", 80),
			allowed: true,
			by:      "ns/a",
		},
		{
			name:     "principal suffix",
			policies: func(t *testing.T) []*Policy { return []*Policy{pol(t, "a", allow, fromPrincipal("*/sa/sleep"))} },
			conn:     conn(sleepPrincipal, "foo", "10.0.0.1", 80),
			allowed:  true,
			by:       "ns/a",
		},
		{
			name:     "principal presence rejects plaintext",
			policies: func(t *testing.T) []*Policy { return []*Policy{pol(t, "a", allow, fromPrincipal("*"))} },
			conn:     conn("", "", "10.0.0.1", 80),
			allowed:  false,
		},
		{
			name:     "principal presence admits mTLS",
			policies: func(t *testing.T) []*Policy { return []*Policy{pol(t, "a", allow, fromPrincipal("*"))} },
			conn:     conn(otherPrincipal, "bar", "10.0.0.1", 80),
			allowed:  true,
			by:       "ns/a",
		},
		{
			name: "not_principals in deny",
			policies: func(t *testing.T) []*Policy {
				return []*Policy{pol(t, "d", deny, &discoveryv1.Rule{From: []*discoveryv1.Source{{NotPrincipals: []string{sleepPrincipal}}}})}
			},
			conn:    conn(otherPrincipal, "bar", "10.0.0.1", 80),
			allowed: false,
			by:      "ns/d",
		},
		{
			name: "namespaces",
			policies: func(t *testing.T) []*Policy {
				return []*Policy{pol(t, "a", allow, &discoveryv1.Rule{From: []*discoveryv1.Source{{Namespaces: []string{"foo"}}}})}
			},
			conn:    conn(otherPrincipal, "bar", "10.0.0.1", 80),
			allowed: false,
		},
		{
			name: "not namespaces",
			policies: func(t *testing.T) []*Policy {
				return []*Policy{pol(t, "a", allow, &discoveryv1.Rule{From: []*discoveryv1.Source{{NotNamespaces: []string{"foo"}}}})}
			},
			conn:    conn(otherPrincipal, "bar", "10.0.0.1", 80),
			allowed: true,
			by:      "ns/a",
		},
		{
			name: "ip block cidr",
			policies: func(t *testing.T) []*Policy {
				return []*Policy{pol(t, "a", allow, &discoveryv1.Rule{From: []*discoveryv1.Source{{IpBlocks: []string{"10.1.0.0/16"}}}})}
			},
			conn:    conn("", "", "10.1.200.3", 80),
			allowed: true,
			by:      "ns/a",
		},
		{
			name: "ip block single address mismatch",
			policies: func(t *testing.T) []*Policy {
				return []*Policy{pol(t, "a", allow, &discoveryv1.Rule{From: []*discoveryv1.Source{{IpBlocks: []string{"10.1.0.7"}}}})}
			},
			conn:    conn("", "", "10.1.0.8", 80),
			allowed: false,
		},
		{
			name: "not ip block",
			policies: func(t *testing.T) []*Policy {
				return []*Policy{pol(t, "d", deny, &discoveryv1.Rule{From: []*discoveryv1.Source{{NotIpBlocks: []string{"10.0.0.0/8"}}}})}
			},
			conn:    conn("", "", "192.168.1.1", 80),
			allowed: false,
			by:      "ns/d",
		},
		{
			name: "ipv4-mapped source matches v4 block",
			policies: func(t *testing.T) []*Policy {
				return []*Policy{pol(t, "a", allow, &discoveryv1.Rule{From: []*discoveryv1.Source{{IpBlocks: []string{"10.1.0.0/16"}}}})}
			},
			conn:    conn("", "", "::ffff:10.1.2.3", 80),
			allowed: true,
			by:      "ns/a",
		},
		{
			name:     "ports",
			policies: func(t *testing.T) []*Policy { return []*Policy{pol(t, "a", allow, toPorts(8080, 9090))} },
			conn:     conn(sleepPrincipal, "foo", "10.0.0.1", 80),
			allowed:  false,
		},
		{
			name: "not ports",
			policies: func(t *testing.T) []*Policy {
				return []*Policy{pol(t, "a", allow, &discoveryv1.Rule{To: []*discoveryv1.Operation{{NotPorts: []uint32{80}}}})}
			},
			conn:    conn(sleepPrincipal, "foo", "10.0.0.1", 8080),
			allowed: true,
			by:      "ns/a",
		},
		{
			name: "from and to both required",
			policies: func(t *testing.T) []*Policy {
				return []*Policy{pol(t, "a", allow, &discoveryv1.Rule{
					From: []*discoveryv1.Source{{Principals: []string{sleepPrincipal}}},
					To:   []*discoveryv1.Operation{{Ports: []uint32{8080}}},
				})}
			},
			conn:    conn(sleepPrincipal, "foo", "10.0.0.1", 80),
			allowed: false,
		},
		{
			name: "any of several from entries",
			policies: func(t *testing.T) []*Policy {
				return []*Policy{pol(t, "a", allow, &discoveryv1.Rule{From: []*discoveryv1.Source{
					{Principals: []string{"nope"}}, {Namespaces: []string{"foo"}},
				}})}
			},
			conn:    conn(sleepPrincipal, "foo", "10.0.0.1", 80),
			allowed: true,
			by:      "ns/a",
		},
		{
			name: "every field of an entry must match",
			policies: func(t *testing.T) []*Policy {
				return []*Policy{pol(t, "a", allow, &discoveryv1.Rule{From: []*discoveryv1.Source{
					{Namespaces: []string{"foo"}, IpBlocks: []string{"10.9.0.0/16"}},
				}})}
			},
			conn:    conn(sleepPrincipal, "foo", "10.0.0.1", 80),
			allowed: false,
		},
		{
			name: "any rule of a policy",
			policies: func(t *testing.T) []*Policy {
				return []*Policy{pol(t, "a", allow, toPorts(1), fromPrincipal(sleepPrincipal))}
			},
			conn:    conn(sleepPrincipal, "foo", "10.0.0.1", 80),
			allowed: true,
			by:      "ns/a",
		},
		{
			name: "any allow policy",
			policies: func(t *testing.T) []*Policy {
				return []*Policy{pol(t, "a1", allow, toPorts(1)), pol(t, "a2", allow, toPorts(80))}
			},
			conn:    conn(sleepPrincipal, "foo", "10.0.0.1", 80),
			allowed: true,
			by:      "ns/a2",
		},
		{
			name: "when source.ip and destination.port",
			policies: func(t *testing.T) []*Policy {
				return []*Policy{pol(t, "a", allow, &discoveryv1.Rule{When: []*discoveryv1.Condition{
					{Key: "source.ip", Values: []string{"10.0.0.0/24"}},
					{Key: "destination.port", Values: []string{"80"}},
				}})}
			},
			conn:    conn("", "", "10.0.0.1", 80),
			allowed: true,
			by:      "ns/a",
		},
		{
			name: "when conditions are all required",
			policies: func(t *testing.T) []*Policy {
				return []*Policy{pol(t, "a", allow, &discoveryv1.Rule{When: []*discoveryv1.Condition{
					{Key: "source.ip", Values: []string{"10.0.0.0/24"}},
					{Key: "destination.port", NotValues: []string{"80"}},
				}})}
			},
			conn:    conn("", "", "10.0.0.1", 80),
			allowed: false,
		},
		{
			name: "when source.namespace and principal",
			policies: func(t *testing.T) []*Policy {
				return []*Policy{pol(t, "d", deny, &discoveryv1.Rule{When: []*discoveryv1.Condition{
					{Key: "source.namespace", Values: []string{"foo"}},
					{Key: "source.principal", NotValues: []string{"*/sa/admin"}},
				}})}
			},
			conn:    conn(sleepPrincipal, "foo", "10.0.0.1", 80),
			allowed: false,
			by:      "ns/d",
		},
		{
			name: "when destination.ip",
			policies: func(t *testing.T) []*Policy {
				return []*Policy{pol(t, "a", allow, &discoveryv1.Rule{When: []*discoveryv1.Condition{
					{Key: "destination.ip", Values: []string{"10.0.0.9"}},
				}})}
			},
			conn:    conn("", "", "10.0.0.1", 80),
			allowed: true,
			by:      "ns/a",
		},
		{
			name: "unknown condition key never matches in allow",
			policies: func(t *testing.T) []*Policy {
				return []*Policy{pol(t, "a", allow, &discoveryv1.Rule{When: []*discoveryv1.Condition{
					{Key: "request.headers[x-user]", Values: []string{"bob"}},
				}})}
			},
			conn:    conn(sleepPrincipal, "foo", "10.0.0.1", 80),
			allowed: false,
		},
		{
			name: "unknown condition key always matches in deny",
			policies: func(t *testing.T) []*Policy {
				return []*Policy{pol(t, "d", deny, &discoveryv1.Rule{When: []*discoveryv1.Condition{
					{Key: "request.auth.claims[group]", Values: []string{"x"}},
				}})}
			},
			conn:    conn(sleepPrincipal, "foo", "10.0.0.1", 80),
			allowed: false,
			by:      "ns/d",
		},
		{
			name: "l7 operation fields fail safe in allow",
			policies: func(t *testing.T) []*Policy {
				return []*Policy{pol(t, "a", allow, &discoveryv1.Rule{To: []*discoveryv1.Operation{{Methods: []string{"GET"}}}})}
			},
			conn:    conn(sleepPrincipal, "foo", "10.0.0.1", 80),
			allowed: false,
		},
		{
			name: "l7 operation fields fail safe in deny",
			policies: func(t *testing.T) []*Policy {
				return []*Policy{pol(t, "d", deny, &discoveryv1.Rule{To: []*discoveryv1.Operation{{Paths: []string{"/admin"}, Ports: []uint32{80}}}})}
			},
			conn:    conn(sleepPrincipal, "foo", "10.0.0.1", 80),
			allowed: false,
			by:      "ns/d",
		},
		{
			name: "l7 deny narrowed by port still needs the port",
			policies: func(t *testing.T) []*Policy {
				return []*Policy{pol(t, "d", deny, &discoveryv1.Rule{To: []*discoveryv1.Operation{{Paths: []string{"/admin"}, Ports: []uint32{81}}}})}
			},
			conn:    conn(sleepPrincipal, "foo", "10.0.0.1", 80),
			allowed: true,
		},
		{
			name: "request principals fail safe in allow",
			policies: func(t *testing.T) []*Policy {
				return []*Policy{pol(t, "a", allow, &discoveryv1.Rule{From: []*discoveryv1.Source{{RequestPrincipals: []string{"*"}}}})}
			},
			conn:    conn(sleepPrincipal, "foo", "10.0.0.1", 80),
			allowed: false,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d := Evaluate(tt.policies(t), tt.conn)
			if d.Allowed != tt.allowed || d.Policy != tt.by {
				t.Fatalf("Evaluate = %+v, want allowed=%v by %q", d, tt.allowed, tt.by)
			}
			if d.Reason == "" {
				t.Fatalf("decision has no reason")
			}
		})
	}
}

func TestCompileErrors(t *testing.T) {
	tests := []struct {
		name string
		in   *discoveryv1.Authorization
	}{
		{"no name", &discoveryv1.Authorization{Namespace: "ns"}},
		{"no namespace", &discoveryv1.Authorization{Name: "x"}},
		{"bad scope", &discoveryv1.Authorization{Name: "x", Namespace: "ns", Scope: 9}},
		{"bad action", &discoveryv1.Authorization{Name: "x", Namespace: "ns", Action: 7}},
		{"bad cidr", &discoveryv1.Authorization{Name: "x", Namespace: "ns", Rules: []*discoveryv1.Rule{{From: []*discoveryv1.Source{{IpBlocks: []string{"10.0.0.0/99"}}}}}}},
		{"bad not ip", &discoveryv1.Authorization{Name: "x", Namespace: "ns", Rules: []*discoveryv1.Rule{{From: []*discoveryv1.Source{{NotIpBlocks: []string{"nope"}}}}}}},
		{"port zero", &discoveryv1.Authorization{Name: "x", Namespace: "ns", Rules: []*discoveryv1.Rule{{To: []*discoveryv1.Operation{{Ports: []uint32{0}}}}}}},
		{"port too big", &discoveryv1.Authorization{Name: "x", Namespace: "ns", Rules: []*discoveryv1.Rule{{To: []*discoveryv1.Operation{{NotPorts: []uint32{70000}}}}}}},
		{"bad when ip", &discoveryv1.Authorization{Name: "x", Namespace: "ns", Rules: []*discoveryv1.Rule{{When: []*discoveryv1.Condition{{Key: "source.ip", Values: []string{"x"}}}}}}},
		{"bad when port", &discoveryv1.Authorization{Name: "x", Namespace: "ns", Rules: []*discoveryv1.Rule{{When: []*discoveryv1.Condition{{Key: "destination.port", NotValues: []string{"http"}}}}}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := Compile(tt.in); !errors.Is(err, ErrInvalid) {
				t.Fatalf("Compile error = %v, want ErrInvalid", err)
			}
		})
	}
}

// FuzzCompile feeds arbitrary strings into the fields that Compile parses:
// it must either reject them with ErrInvalid or produce a policy that
// evaluates without panicking.
func FuzzCompile(f *testing.F) {
	f.Add("10.0.0.0/8", "cluster.local/ns/*", "80", "source.ip")
	f.Add("::1", "*", "65535", "destination.port")
	f.Add("", "", "", "")
	f.Fuzz(func(t *testing.T, ip, principal, port, key string) {
		a := &discoveryv1.Authorization{Name: "x", Namespace: "ns", Action: deny, Rules: []*discoveryv1.Rule{{
			From: []*discoveryv1.Source{{IpBlocks: []string{ip}, Principals: []string{principal}}},
			When: []*discoveryv1.Condition{{Key: key, Values: []string{port, ip, principal}}},
		}}}
		p, err := Compile(a)
		if err != nil {
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("error does not wrap ErrInvalid: %v", err)
			}
			return
		}
		Evaluate([]*Policy{p}, conn(principal, "ns", "10.0.0.1", 80))
	})
}
