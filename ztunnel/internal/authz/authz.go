// Package authz evaluates L4 authorization policies (discovery
// Authorization resources) against one connection, with the semantics
// documented on amesh.discovery.v1.Authorization: any matching DENY denies;
// otherwise, with no applicable ALLOW policy the connection is allowed, and
// with some it is allowed only if one of them matches.
//
// ztunnel only sees connection attributes (source IP and identity,
// destination address). Fields that can only be evaluated at L7 should have
// been removed by the controller; when one is present anyway the evaluation
// is fail-safe: in an ALLOW policy it never matches, in a DENY policy it
// always matches.
package authz

import (
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"strings"

	discoveryv1 "github.com/amesh-dev/amesh/api/discovery/v1"
)

// ErrInvalid marks a policy that cannot be compiled.
var ErrInvalid = errors.New("invalid authorization policy")

// Conn holds the attributes of one connection that L4 policy can see.
type Conn struct {
	// SourceIP is the peer's address (the original client for plaintext,
	// the HBONE peer otherwise).
	SourceIP netip.Addr
	// Principal is the verified peer identity without the "spiffe://"
	// scheme ("<td>/ns/<ns>/sa/<sa>"); empty for plaintext peers.
	Principal string
	// Namespace is the peer's namespace taken from its identity; empty for
	// plaintext peers.
	Namespace string
	// DestinationIP and DestinationPort are the workload address the
	// connection is for.
	DestinationIP   netip.Addr
	DestinationPort uint16
}

// Decision is the result of an evaluation.
type Decision struct {
	Allowed bool
	// Policy names the policy that decided ("<namespace>/<name>"): the
	// matching DENY policy, or the matching ALLOW policy. Empty when no
	// policy applied (allowed by default) or when no ALLOW policy matched.
	Policy string
	// Reason is a short human-readable explanation for logs.
	Reason string
}

// Policy is a compiled Authorization.
type Policy struct {
	Name      string // "<namespace>/<name>"
	Namespace string
	Scope     discoveryv1.Authorization_Scope
	Deny      bool
	rules     []rule
}

type rule struct {
	from []source
	to   []operation
	when []condition
}

type source struct {
	principals, notPrincipals []pattern
	namespaces, notNamespaces []pattern
	ipBlocks, notIPBlocks     []netip.Prefix
	l7                        bool // request principals: L4 cannot evaluate
}

type operation struct {
	ports, notPorts []uint16
	l7              bool // hosts, methods, paths: L4 cannot evaluate
}

type condition struct {
	key        string
	values     []pattern // source.namespace / source.principal values
	notValues  []pattern
	prefixes   []netip.Prefix // source.ip / destination.ip values
	notPrefix  []netip.Prefix
	ports      []uint16 // destination.port values
	notPorts   []uint16
	unknownKey bool
}

// pattern is an Istio string match: exact, "prefix*", "*suffix" or "*".
type pattern struct {
	kind  byte // '=' exact, 'p' prefix, 's' suffix, '*' any non-empty
	value string
}

func parsePattern(s string) pattern {
	switch {
	case s == "*":
		return pattern{kind: '*'}
	case strings.HasSuffix(s, "*"):
		return pattern{kind: 'p', value: strings.TrimSuffix(s, "*")}
	case strings.HasPrefix(s, "*"):
		return pattern{kind: 's', value: strings.TrimPrefix(s, "*")}
	default:
		return pattern{kind: '=', value: s}
	}
}

func (p pattern) match(v string) bool {
	switch p.kind {
	case '*':
		return v != ""
	case 'p':
		return strings.HasPrefix(v, p.value)
	case 's':
		return strings.HasSuffix(v, p.value)
	default:
		return v == p.value
	}
}

func patterns(in []string) []pattern {
	if len(in) == 0 {
		return nil
	}
	out := make([]pattern, len(in))
	for i, s := range in {
		out[i] = parsePattern(s)
	}
	return out
}

func anyPattern(ps []pattern, v string) bool {
	for _, p := range ps {
		if p.match(v) {
			return true
		}
	}
	return false
}

// parsePrefix accepts a CIDR or a single address.
func parsePrefix(s string) (netip.Prefix, error) {
	if strings.Contains(s, "/") {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return netip.Prefix{}, err
		}
		return p.Masked(), nil
	}
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Prefix{}, err
	}
	return netip.PrefixFrom(a, a.BitLen()), nil
}

func prefixes(in []string) ([]netip.Prefix, error) {
	if len(in) == 0 {
		return nil, nil
	}
	out := make([]netip.Prefix, len(in))
	for i, s := range in {
		p, err := parsePrefix(s)
		if err != nil {
			return nil, fmt.Errorf("%w: ip block %q: %v", ErrInvalid, s, err)
		}
		out[i] = p
	}
	return out, nil
}

func anyPrefix(ps []netip.Prefix, a netip.Addr) bool {
	if !a.IsValid() {
		return false
	}
	a = a.Unmap()
	for _, p := range ps {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

func ports(in []uint32) ([]uint16, error) {
	if len(in) == 0 {
		return nil, nil
	}
	out := make([]uint16, len(in))
	for i, p := range in {
		if p == 0 || p > 65535 {
			return nil, fmt.Errorf("%w: port %d out of range", ErrInvalid, p)
		}
		out[i] = uint16(p)
	}
	return out, nil
}

func portStrings(in []string) ([]uint16, error) {
	if len(in) == 0 {
		return nil, nil
	}
	out := make([]uint16, len(in))
	for i, s := range in {
		p, err := strconv.ParseUint(s, 10, 16)
		if err != nil || p == 0 {
			return nil, fmt.Errorf("%w: port %q", ErrInvalid, s)
		}
		out[i] = uint16(p)
	}
	return out, nil
}

func hasPort(ps []uint16, p uint16) bool {
	for _, q := range ps {
		if q == p {
			return true
		}
	}
	return false
}

// Compile validates a discovery Authorization and prepares it for
// evaluation. Malformed values (bad CIDRs, ports out of range) are errors
// wrapping ErrInvalid.
func Compile(a *discoveryv1.Authorization) (*Policy, error) {
	if a.GetName() == "" || a.GetNamespace() == "" {
		return nil, fmt.Errorf("%w: name and namespace are required", ErrInvalid)
	}
	p := &Policy{
		Name:      a.GetNamespace() + "/" + a.GetName(),
		Namespace: a.GetNamespace(),
		Scope:     a.GetScope(),
		Deny:      a.GetAction() == discoveryv1.Authorization_ACTION_DENY,
	}
	switch a.GetScope() {
	case discoveryv1.Authorization_SCOPE_WORKLOAD, discoveryv1.Authorization_SCOPE_NAMESPACE, discoveryv1.Authorization_SCOPE_GLOBAL:
	default:
		return nil, fmt.Errorf("%w: %s: unknown scope %d", ErrInvalid, p.Name, a.GetScope())
	}
	switch a.GetAction() {
	case discoveryv1.Authorization_ACTION_ALLOW, discoveryv1.Authorization_ACTION_DENY:
	default:
		return nil, fmt.Errorf("%w: %s: unknown action %d", ErrInvalid, p.Name, a.GetAction())
	}
	for i, r := range a.GetRules() {
		cr, err := compileRule(r)
		if err != nil {
			return nil, fmt.Errorf("%s: rule %d: %w", p.Name, i, err)
		}
		p.rules = append(p.rules, cr)
	}
	return p, nil
}

func compileRule(r *discoveryv1.Rule) (rule, error) {
	var out rule
	for _, s := range r.GetFrom() {
		ip, err := prefixes(s.GetIpBlocks())
		if err != nil {
			return out, err
		}
		nip, err := prefixes(s.GetNotIpBlocks())
		if err != nil {
			return out, err
		}
		out.from = append(out.from, source{
			principals:    patterns(s.GetPrincipals()),
			notPrincipals: patterns(s.GetNotPrincipals()),
			namespaces:    patterns(s.GetNamespaces()),
			notNamespaces: patterns(s.GetNotNamespaces()),
			ipBlocks:      ip,
			notIPBlocks:   nip,
			l7:            len(s.GetRequestPrincipals()) > 0 || len(s.GetNotRequestPrincipals()) > 0,
		})
	}
	for _, o := range r.GetTo() {
		ps, err := ports(o.GetPorts())
		if err != nil {
			return out, err
		}
		nps, err := ports(o.GetNotPorts())
		if err != nil {
			return out, err
		}
		out.to = append(out.to, operation{
			ports:    ps,
			notPorts: nps,
			l7: len(o.GetHosts())+len(o.GetNotHosts())+len(o.GetMethods())+len(o.GetNotMethods())+
				len(o.GetPaths())+len(o.GetNotPaths()) > 0,
		})
	}
	for _, c := range r.GetWhen() {
		cc := condition{key: c.GetKey()}
		var err error
		switch c.GetKey() {
		case "source.ip", "destination.ip":
			if cc.prefixes, err = prefixes(c.GetValues()); err != nil {
				return out, err
			}
			if cc.notPrefix, err = prefixes(c.GetNotValues()); err != nil {
				return out, err
			}
		case "destination.port":
			if cc.ports, err = portStrings(c.GetValues()); err != nil {
				return out, err
			}
			if cc.notPorts, err = portStrings(c.GetNotValues()); err != nil {
				return out, err
			}
		case "source.namespace", "source.principal":
			cc.values, cc.notValues = patterns(c.GetValues()), patterns(c.GetNotValues())
		default:
			cc.unknownKey = true
		}
		out.when = append(out.when, cc)
	}
	return out, nil
}

// DenyAll returns a DENY policy with one empty rule: it matches, and so
// denies, every connection to the workloads its scope selects. It stands
// in for a policy that could not be compiled.
func DenyAll(name, namespace string, scope discoveryv1.Authorization_Scope) *Policy {
	return &Policy{Name: name, Namespace: namespace, Scope: scope, Deny: true, rules: []rule{{}}}
}

// Rules reports how many rules the policy has.
func (p *Policy) Rules() int { return len(p.rules) }

// matches reports whether any rule of the policy matches c. deny selects
// the fail-safe answer for attributes L4 cannot evaluate.
func (p *Policy) matches(c *Conn) bool {
	for i := range p.rules {
		if p.rules[i].match(c, p.Deny) {
			return true
		}
	}
	return false
}

func (r *rule) match(c *Conn, deny bool) bool {
	if len(r.from) > 0 {
		ok := false
		for i := range r.from {
			if r.from[i].match(c, deny) {
				ok = true
				break
			}
		}
		if !ok {
			return false
		}
	}
	if len(r.to) > 0 {
		ok := false
		for i := range r.to {
			if r.to[i].match(c, deny) {
				ok = true
				break
			}
		}
		if !ok {
			return false
		}
	}
	if len(r.when) > 0 {
		// Conditions are ANDed (each one is an entry that must hold).
		for i := range r.when {
			if !r.when[i].match(c, deny) {
				return false
			}
		}
	}
	return true
}

func (s *source) match(c *Conn, deny bool) bool {
	if s.l7 && !deny {
		return false
	}
	if len(s.principals) > 0 && !anyPattern(s.principals, c.Principal) {
		return false
	}
	if len(s.notPrincipals) > 0 && anyPattern(s.notPrincipals, c.Principal) {
		return false
	}
	if len(s.namespaces) > 0 && !anyPattern(s.namespaces, c.Namespace) {
		return false
	}
	if len(s.notNamespaces) > 0 && anyPattern(s.notNamespaces, c.Namespace) {
		return false
	}
	if len(s.ipBlocks) > 0 && !anyPrefix(s.ipBlocks, c.SourceIP) {
		return false
	}
	if len(s.notIPBlocks) > 0 && anyPrefix(s.notIPBlocks, c.SourceIP) {
		return false
	}
	return true
}

func (o *operation) match(c *Conn, deny bool) bool {
	if o.l7 && !deny {
		return false
	}
	if len(o.ports) > 0 && !hasPort(o.ports, c.DestinationPort) {
		return false
	}
	if len(o.notPorts) > 0 && hasPort(o.notPorts, c.DestinationPort) {
		return false
	}
	return true
}

func (w *condition) match(c *Conn, deny bool) bool {
	if w.unknownKey {
		return deny
	}
	switch w.key {
	case "source.ip", "destination.ip":
		a := c.SourceIP
		if w.key == "destination.ip" {
			a = c.DestinationIP
		}
		if len(w.prefixes) > 0 && !anyPrefix(w.prefixes, a) {
			return false
		}
		if len(w.notPrefix) > 0 && anyPrefix(w.notPrefix, a) {
			return false
		}
	case "destination.port":
		if len(w.ports) > 0 && !hasPort(w.ports, c.DestinationPort) {
			return false
		}
		if len(w.notPorts) > 0 && hasPort(w.notPorts, c.DestinationPort) {
			return false
		}
	case "source.namespace", "source.principal":
		v := c.Namespace
		if w.key == "source.principal" {
			v = c.Principal
		}
		if len(w.values) > 0 && !anyPattern(w.values, v) {
			return false
		}
		if len(w.notValues) > 0 && anyPattern(w.notValues, v) {
			return false
		}
	}
	return true
}

// Evaluate applies the applicable policies to one connection: DENY first,
// then ALLOW.
func Evaluate(policies []*Policy, c *Conn) Decision {
	haveAllow := false
	for _, p := range policies {
		if p.Deny {
			if p.matches(c) {
				return Decision{Allowed: false, Policy: p.Name, Reason: "denied by " + p.Name}
			}
			continue
		}
		haveAllow = true
	}
	if !haveAllow {
		return Decision{Allowed: true, Reason: "no allow policy applies"}
	}
	for _, p := range policies {
		if !p.Deny && p.matches(c) {
			return Decision{Allowed: true, Policy: p.Name, Reason: "allowed by " + p.Name}
		}
	}
	return Decision{Allowed: false, Reason: "no allow policy matched"}
}
