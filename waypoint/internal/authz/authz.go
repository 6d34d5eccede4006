// Package authz evaluates L7 authorization policies (discovery Authorization
// resources) for one request: if any DENY policy matches, deny; otherwise, if
// no ALLOW policy applies, allow; otherwise allow only if some ALLOW policy
// matches. Anything the evaluator cannot interpret makes an ALLOW rule match
// nothing and a DENY rule match everything (fail-closed).
package authz

import (
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	discoveryv1 "github.com/amesh-dev/amesh/api/discovery/v1"
)

// Attributes describe one request for policy evaluation.
type Attributes struct {
	// Principal is the mTLS peer identity without "spiffe://"
	// ("<td>/ns/<ns>/sa/<sa>"); Namespace is the peer's namespace.
	Principal string
	Namespace string
	SourceIP  netip.Addr
	Port      uint32
	Host      string
	Method    string
	Path      string
	Header    http.Header
	// Authenticated request (JWT) attributes; RequestPrincipal is
	// "<iss>/<sub>", empty when the request carried no valid token.
	RequestPrincipal string
	Audiences        []string
	Claims           map[string]any
	// L4 marks a connection without HTTP (passthrough): L7 fields cannot
	// be evaluated, so an ALLOW entry that uses them does not match and a
	// DENY entry ignores them (both fail-closed).
	L4 bool
}

// Decision is the outcome of an evaluation.
type Decision struct {
	Allow bool
	// Policy is "<namespace>/<name>" of the deciding policy, or "" when
	// allowed because no ALLOW policy applies, or denied because none matched.
	Policy string
}

// Engine holds compiled policies. Immutable; safe for concurrent use.
type Engine struct {
	deny, allow []*policy
}

type policy struct {
	name  string
	rules []*discoveryv1.Rule
	deny  bool
	cidrs map[string]netip.Prefix // parsed ip_blocks
}

// Compile prepares the policies. Unparseable IP blocks are kept as unusable
// values: they never match (so an ALLOW is narrower, a DENY broader, see
// matchIPs).
func Compile(ps []*discoveryv1.Authorization) *Engine {
	e := &Engine{}
	for _, p := range ps {
		cp := &policy{name: p.GetNamespace() + "/" + p.GetName(), rules: p.GetRules(),
			deny: p.GetAction() == discoveryv1.Authorization_ACTION_DENY, cidrs: map[string]netip.Prefix{}}
		for _, r := range p.GetRules() {
			for _, s := range r.GetFrom() {
				for _, b := range slices.Concat(s.GetIpBlocks(), s.GetNotIpBlocks()) {
					if pf, err := parsePrefix(b); err == nil {
						cp.cidrs[b] = pf
					}
				}
			}
			for _, c := range r.GetWhen() {
				if c.GetKey() != "source.ip" {
					continue
				}
				for _, b := range slices.Concat(c.GetValues(), c.GetNotValues()) {
					if pf, err := parsePrefix(b); err == nil {
						cp.cidrs[b] = pf
					}
				}
			}
		}
		if cp.deny {
			e.deny = append(e.deny, cp)
		} else {
			e.allow = append(e.allow, cp)
		}
	}
	return e
}

func parsePrefix(s string) (netip.Prefix, error) {
	if strings.Contains(s, "/") {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return netip.Prefix{}, fmt.Errorf("ip block %q: %w", s, err)
		}
		return p.Masked(), nil
	}
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("ip block %q: %w", s, err)
	}
	return netip.PrefixFrom(a, a.BitLen()), nil
}

// Evaluate decides for a.
func (e *Engine) Evaluate(a *Attributes) Decision {
	for _, p := range e.deny {
		if p.matches(a) {
			return Decision{Allow: false, Policy: p.name}
		}
	}
	if len(e.allow) == 0 {
		return Decision{Allow: true}
	}
	for _, p := range e.allow {
		if p.matches(a) {
			return Decision{Allow: true, Policy: p.name}
		}
	}
	return Decision{Allow: false}
}

func (p *policy) matches(a *Attributes) bool {
	for _, r := range p.rules {
		if p.ruleMatches(r, a) {
			return true
		}
	}
	return false
}

func (p *policy) ruleMatches(r *discoveryv1.Rule, a *Attributes) bool {
	if len(r.GetFrom()) > 0 && !slices.ContainsFunc(r.GetFrom(), func(s *discoveryv1.Source) bool { return p.sourceMatches(s, a) }) {
		return false
	}
	if len(r.GetTo()) > 0 && !slices.ContainsFunc(r.GetTo(), func(o *discoveryv1.Operation) bool { return p.operationMatches(o, a) }) {
		return false
	}
	for _, c := range r.GetWhen() {
		if !p.conditionMatches(c, a) {
			return false
		}
	}
	return true
}

// field matches one positive list and its negation.
func field(pos, neg []string, v string, present bool, fold bool) bool {
	if len(pos) > 0 && !(present && anyMatch(pos, v, fold)) {
		return false
	}
	if len(neg) > 0 && present && anyMatch(neg, v, fold) {
		return false
	}
	return true
}

func anyMatch(patterns []string, v string, fold bool) bool {
	for _, p := range patterns {
		if Match(p, v, fold) {
			return true
		}
	}
	return false
}

// Match reports whether v matches an Istio-style string pattern: exact,
// "prefix*", "*suffix" or "*" (any, including empty).
func Match(pattern, v string, fold bool) bool {
	if fold {
		pattern, v = strings.ToLower(pattern), strings.ToLower(v)
	}
	switch {
	case pattern == "*":
		return true
	case strings.HasSuffix(pattern, "*"):
		return strings.HasPrefix(v, pattern[:len(pattern)-1])
	case strings.HasPrefix(pattern, "*"):
		return strings.HasSuffix(v, pattern[1:])
	}
	return pattern == v
}

func (p *policy) sourceMatches(s *discoveryv1.Source, a *Attributes) bool {
	if a.L4 && (len(s.GetRequestPrincipals()) > 0 || len(s.GetNotRequestPrincipals()) > 0) {
		if !p.deny {
			return false
		}
		s = &discoveryv1.Source{Principals: s.GetPrincipals(), NotPrincipals: s.GetNotPrincipals(),
			Namespaces: s.GetNamespaces(), NotNamespaces: s.GetNotNamespaces(),
			IpBlocks: s.GetIpBlocks(), NotIpBlocks: s.GetNotIpBlocks()}
	}
	return field(s.GetPrincipals(), s.GetNotPrincipals(), a.Principal, a.Principal != "", false) &&
		field(s.GetNamespaces(), s.GetNotNamespaces(), a.Namespace, a.Namespace != "", false) &&
		p.ipsMatch(s.GetIpBlocks(), s.GetNotIpBlocks(), a.SourceIP) &&
		field(s.GetRequestPrincipals(), s.GetNotRequestPrincipals(), a.RequestPrincipal, a.RequestPrincipal != "", false)
}

func (p *policy) inBlocks(blocks []string, ip netip.Addr) bool {
	for _, b := range blocks {
		if pf, ok := p.cidrs[b]; ok && ip.IsValid() && pf.Contains(ip.Unmap()) {
			return true
		}
	}
	return false
}

// ipsMatch: an unparseable block never matches a positive list; in a
// not_ list it makes the entry fail (fail-closed for ALLOW). For DENY
// policies an unparseable positive block matches (fail-closed).
func (p *policy) ipsMatch(pos, neg []string, ip netip.Addr) bool {
	if len(pos) > 0 {
		if p.deny && p.hasBad(pos) {
			return true
		}
		if !p.inBlocks(pos, ip) {
			return false
		}
	}
	if len(neg) > 0 {
		if p.hasBad(neg) {
			return p.deny
		}
		if p.inBlocks(neg, ip) {
			return false
		}
	}
	return true
}

func (p *policy) hasBad(blocks []string) bool {
	for _, b := range blocks {
		if _, ok := p.cidrs[b]; !ok {
			return true
		}
	}
	return false
}

func (p *policy) operationMatches(o *discoveryv1.Operation, a *Attributes) bool {
	if a.L4 && len(o.GetHosts())+len(o.GetNotHosts())+len(o.GetMethods())+len(o.GetNotMethods())+len(o.GetPaths())+len(o.GetNotPaths()) > 0 {
		if !p.deny {
			return false
		}
		o = &discoveryv1.Operation{Ports: o.GetPorts(), NotPorts: o.GetNotPorts()}
	}
	if len(o.GetPorts()) > 0 && !slices.Contains(o.GetPorts(), a.Port) {
		return false
	}
	if slices.Contains(o.GetNotPorts(), a.Port) {
		return false
	}
	return hostField(o.GetHosts(), o.GetNotHosts(), a.Host) &&
		field(o.GetMethods(), o.GetNotMethods(), a.Method, a.Method != "", false) &&
		field(o.GetPaths(), o.GetNotPaths(), a.Path, a.Path != "", false)
}

// hostField matches hosts case-insensitively; a pattern without a port also
// matches the authority with any port ("reviews" matches "reviews:9080"),
// as Istio generates both forms.
func hostField(pos, neg []string, host string) bool {
	bare := host
	if h, _, err := net.SplitHostPort(host); err == nil {
		bare = h
	}
	match := func(patterns []string) bool {
		for _, p := range patterns {
			if Match(p, host, true) || (!strings.Contains(p, ":") && Match(p, bare, true)) {
				return true
			}
		}
		return false
	}
	if len(pos) > 0 && (host == "" || !match(pos)) {
		return false
	}
	if len(neg) > 0 && host != "" && match(neg) {
		return false
	}
	return true
}

// conditionMatches evaluates a "when" condition. Unknown keys match for
// DENY policies and do not for ALLOW policies.
func (p *policy) conditionMatches(c *discoveryv1.Condition, a *Attributes) bool {
	if a.L4 && strings.HasPrefix(c.GetKey(), "request.") {
		return p.deny
	}
	vals, present, known := p.conditionValues(c.GetKey(), a)
	if !known {
		return p.deny
	}
	anyOf := func(patterns []string) bool {
		for _, v := range vals {
			if anyMatch(patterns, v, false) {
				return true
			}
		}
		return false
	}
	if c.GetKey() == "source.ip" {
		return p.ipsMatch(c.GetValues(), c.GetNotValues(), a.SourceIP)
	}
	if len(c.GetValues()) > 0 && !(present && anyOf(c.GetValues())) {
		return false
	}
	if len(c.GetNotValues()) > 0 && present && anyOf(c.GetNotValues()) {
		return false
	}
	return true
}

func (p *policy) conditionValues(key string, a *Attributes) (vals []string, present, known bool) {
	one := func(s string) ([]string, bool, bool) { return []string{s}, s != "", true }
	switch key {
	case "source.ip":
		return nil, a.SourceIP.IsValid(), true
	case "source.namespace":
		return one(a.Namespace)
	case "source.principal":
		return one(a.Principal)
	case "destination.port":
		return one(strconv.Itoa(int(a.Port)))
	case "request.auth.principal":
		return one(a.RequestPrincipal)
	case "request.auth.audiences":
		return a.Audiences, len(a.Audiences) > 0, true
	}
	if name, ok := bracket(key, "request.headers"); ok {
		vs := a.Header.Values(name)
		return vs, len(vs) > 0, true
	}
	if rest, ok := strings.CutPrefix(key, "request.auth.claims"); ok {
		path, ok := claimPath(rest)
		if !ok {
			return nil, false, false
		}
		vs := claimValues(a.Claims, path)
		return vs, len(vs) > 0, true
	}
	return nil, false, false
}

func bracket(key, prefix string) (string, bool) {
	rest, ok := strings.CutPrefix(key, prefix+"[")
	if !ok || !strings.HasSuffix(rest, "]") || len(rest) < 2 {
		return "", false
	}
	return rest[:len(rest)-1], true
}

// claimPath parses "[a][b]" (nested claims) into its parts.
func claimPath(s string) ([]string, bool) {
	var out []string
	for s != "" {
		if s[0] != '[' {
			return nil, false
		}
		i := strings.IndexByte(s, ']')
		if i <= 1 {
			return nil, false
		}
		out = append(out, s[1:i])
		s = s[i+1:]
	}
	return out, len(out) > 0
}

// claimValues returns the string values of a claim: a string, or the string
// elements of a list.
func claimValues(claims map[string]any, path []string) []string {
	var cur any = claims
	for _, p := range path {
		m, ok := cur.(map[string]any)
		if !ok {
			return nil
		}
		cur = m[p]
	}
	switch v := cur.(type) {
	case string:
		return []string{v}
	case []any:
		var out []string
		for _, e := range v {
			if s, ok := e.(string); ok {
				out = append(out, s)
			}
		}
		return out
	case []string:
		return v
	case bool:
		return []string{strconv.FormatBool(v)}
	case float64:
		return []string{strconv.FormatFloat(v, 'f', -1, 64)}
	}
	return nil
}
