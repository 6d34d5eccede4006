// Package route compiles the HTTPRoute and GRPCRoute resources attached to one
// service port into a match table and selects, for each request, the rule that
// the Gateway API specification says wins.
//
// Precedence for HTTPRoute matches across all routes (Gateway API, HTTPRoute
// "matches"): an Exact path match; then a Prefix path match with the most
// characters; then a method match; then the most header matches; then the most
// query parameter matches. Remaining ties go to the oldest route (creation
// timestamp), then to the route first in "<namespace>/<name>" order, then to
// the first matching rule and match in list order. Regular-expression path
// matches have implementation-specific precedence; here they rank below Exact
// and above Prefix, longer patterns first.
//
// GRPCRoute precedence: the most characters in a matching service, then in a
// matching method, then the most header matches; then the same route and rule
// tie-breaks. Route hostnames are ignored: routes attached to a Service (the
// GAMMA mesh profile) already apply only to that Service.
package route

import (
	"errors"
	"fmt"
	"net/http"
	"regexp"
	"slices"
	"strings"
	"time"

	discoveryv1 "github.com/amesh-dev/amesh/api/discovery/v1"
)

// Rule is the action part of one route rule, shared by all of its matches.
type Rule struct {
	// Route is "<namespace>/<name>" of the owning route; empty for the
	// default route.
	Route string
	// Name is the rule's name, or "rule-<index>" when unnamed.
	Name  string
	Index int
	// ID is "<Route>/<Name>", for access logs.
	ID string
	// GRPC is set for GRPCRoute rules.
	GRPC    bool
	Filters []*discoveryv1.HTTPFilter
	// Backends with a positive weight; Invalid marks that the rule named
	// backends which could not be resolved (requests to them get 500).
	Backends       []*discoveryv1.BackendRef
	Invalid        bool
	RequestTimeout time.Duration
	BackendTimeout time.Duration
	Retry          *discoveryv1.RetryPolicy
	// Default is set for the implicit route to the service itself.
	Default bool
}

// Match is the result of a successful lookup.
type Match struct {
	Rule *Rule
	// Prefix is the matched path prefix when the winning match was a Prefix
	// path match (for URLRewrite ReplacePrefixMatch), else "".
	Prefix string
}

// Table is the compiled routing for one service port. It is immutable and
// safe for concurrent use.
type Table struct {
	http   []*entry
	grpc   []*entry
	routed bool // any route attached to this port
	def    *Rule
	errs   []error
}

type pathKind int

const (
	pathPrefix pathKind = iota
	pathExact
	pathRegex
)

type valueMatch struct {
	name  string // canonical header key or query name
	exact string
	re    *regexp.Regexp
}

func (v *valueMatch) ok(s string) bool {
	if v.re != nil {
		return v.re.MatchString(s)
	}
	return s == v.exact
}

// entry is one compiled match of one rule.
type entry struct {
	rule *Rule
	// HTTP
	kind    pathKind
	path    string // exact value, or prefix without trailing slash ("" = "/")
	pathRaw string
	pathRe  *regexp.Regexp
	method  string
	// gRPC
	grpcService, grpcMethod     string
	grpcServiceRe, grpcMethodRe *regexp.Regexp
	grpcRegex                   bool
	headers                     []valueMatch
	query                       []valueMatch
	// tie-breaks
	created  int64
	routeKey string
	ruleIdx  int
	matchIdx int
}

// Compile builds the table for requests addressed to service (resource name
// "<namespace>/<hostname>") on port. Matches that cannot be compiled (an
// invalid regular expression, for instance) are dropped — they match nothing —
// and reported by Errors.
func Compile(service string, port uint32, httpRoutes []*discoveryv1.HTTPRoute, grpcRoutes []*discoveryv1.GRPCRoute) *Table {
	t := &Table{def: &Rule{
		Name:     "default",
		ID:       "/default",
		Default:  true,
		Backends: []*discoveryv1.BackendRef{{Service: service, Port: port, Weight: 1}},
	}}
	for _, hr := range httpRoutes {
		if !attached(hr.GetPorts(), port) {
			continue
		}
		t.routed = true
		key := hr.GetNamespace() + "/" + hr.GetName()
		for ri, r := range hr.GetRules() {
			rule := &Rule{
				Route: key, Name: ruleName(r.GetName(), ri), Index: ri,
				ID:      key + "/" + ruleName(r.GetName(), ri),
				Filters: r.GetFilters(), Invalid: r.GetInvalidBackends(),
				Backends:       weighted(r.GetBackends()),
				RequestTimeout: r.GetRequestTimeout().AsDuration(),
				BackendTimeout: r.GetBackendRequestTimeout().AsDuration(),
				Retry:          r.GetRetry(),
			}
			matches := r.GetMatches()
			if len(matches) == 0 {
				matches = []*discoveryv1.HTTPRouteMatch{{}}
			}
			for mi, m := range matches {
				e, err := compileHTTP(m)
				if err != nil {
					t.errs = append(t.errs, fmt.Errorf("httproute %s rule %d match %d: %w", key, ri, mi, err))
					continue
				}
				e.rule, e.created, e.routeKey, e.ruleIdx, e.matchIdx = rule, hr.GetCreationTimestamp(), key, ri, mi
				t.http = append(t.http, e)
			}
		}
	}
	for _, gr := range grpcRoutes {
		if !attached(gr.GetPorts(), port) {
			continue
		}
		t.routed = true
		key := gr.GetNamespace() + "/" + gr.GetName()
		for ri, r := range gr.GetRules() {
			rule := &Rule{
				Route: key, Name: ruleName(r.GetName(), ri), Index: ri, GRPC: true,
				ID:      key + "/" + ruleName(r.GetName(), ri),
				Filters: r.GetFilters(), Invalid: r.GetInvalidBackends(),
				Backends: weighted(r.GetBackends()),
			}
			matches := r.GetMatches()
			if len(matches) == 0 {
				matches = []*discoveryv1.GRPCRouteMatch{{}}
			}
			for mi, m := range matches {
				e, err := compileGRPC(m)
				if err != nil {
					t.errs = append(t.errs, fmt.Errorf("grpcroute %s rule %d match %d: %w", key, ri, mi, err))
					continue
				}
				e.rule, e.created, e.routeKey, e.ruleIdx, e.matchIdx = rule, gr.GetCreationTimestamp(), key, ri, mi
				t.grpc = append(t.grpc, e)
			}
		}
	}
	slices.SortStableFunc(t.http, compareHTTP)
	slices.SortStableFunc(t.grpc, compareGRPC)
	return t
}

// Errors returns the problems found while compiling.
func (t *Table) Errors() []error { return t.errs }

// Routed reports whether any route is attached to the table's port. Without
// one, every request takes the default route to the service itself.
func (t *Table) Routed() bool { return t.routed }

func ruleName(n string, i int) string {
	if n != "" {
		return n
	}
	return fmt.Sprintf("rule-%d", i)
}

func attached(ports []uint32, port uint32) bool {
	return len(ports) == 0 || slices.Contains(ports, port)
}

func weighted(in []*discoveryv1.BackendRef) []*discoveryv1.BackendRef {
	var out []*discoveryv1.BackendRef
	for _, b := range in {
		if b.GetWeight() > 0 {
			out = append(out, b)
		}
	}
	return out
}

// anchored compiles a regular expression that must match the whole value.
func anchored(pat string) (*regexp.Regexp, error) {
	re, err := regexp.Compile(`^(?:` + pat + `)$`)
	if err != nil {
		return nil, fmt.Errorf("invalid regular expression %q: %w", pat, err)
	}
	return re, nil
}

var errInvalid = errors.New("invalid match")

func compileValues(kind string, header bool, exactType bool, name, value string, seen map[string]bool) (*valueMatch, error) {
	if name == "" {
		return nil, fmt.Errorf("%w: %s match without a name", errInvalid, kind)
	}
	key := name
	if header {
		key = http.CanonicalHeaderKey(name)
	}
	// Only the first entry for an equivalent name is considered.
	if seen[key] {
		return nil, nil
	}
	seen[key] = true
	v := &valueMatch{name: key, exact: value}
	if !exactType {
		re, err := anchored(value)
		if err != nil {
			return nil, err
		}
		v.re = re
	}
	return v, nil
}

func compileHeaders(hs []*discoveryv1.HeaderMatch) ([]valueMatch, error) {
	seen := map[string]bool{}
	var out []valueMatch
	for _, h := range hs {
		v, err := compileValues("header", true, h.GetType() == discoveryv1.HeaderMatch_TYPE_EXACT, h.GetName(), h.GetValue(), seen)
		if err != nil {
			return nil, err
		}
		if v != nil {
			out = append(out, *v)
		}
	}
	return out, nil
}

func compileHTTP(m *discoveryv1.HTTPRouteMatch) (*entry, error) {
	e := &entry{method: strings.ToUpper(m.GetMethod())}
	p := m.GetPath()
	switch p.GetType() {
	case discoveryv1.PathMatch_TYPE_EXACT:
		e.kind, e.path = pathExact, p.GetValue()
		if !strings.HasPrefix(e.path, "/") {
			return nil, fmt.Errorf("%w: exact path %q does not start with /", errInvalid, e.path)
		}
	case discoveryv1.PathMatch_TYPE_REGEX:
		re, err := anchored(p.GetValue())
		if err != nil {
			return nil, err
		}
		e.kind, e.pathRe, e.path = pathRegex, re, p.GetValue()
	default:
		v := p.GetValue()
		if v == "" {
			v = "/"
		}
		if !strings.HasPrefix(v, "/") {
			return nil, fmt.Errorf("%w: path prefix %q does not start with /", errInvalid, v)
		}
		e.kind, e.pathRaw, e.path = pathPrefix, v, strings.TrimRight(v, "/")
	}
	var err error
	if e.headers, err = compileHeaders(m.GetHeaders()); err != nil {
		return nil, err
	}
	seen := map[string]bool{}
	for _, q := range m.GetQueryParams() {
		v, err := compileValues("query", false, q.GetType() == discoveryv1.QueryParamMatch_TYPE_EXACT, q.GetName(), q.GetValue(), seen)
		if err != nil {
			return nil, err
		}
		if v != nil {
			e.query = append(e.query, *v)
		}
	}
	return e, nil
}

func compileGRPC(m *discoveryv1.GRPCRouteMatch) (*entry, error) {
	e := &entry{}
	if mm := m.GetMethod(); mm != nil {
		if mm.GetService() == "" && mm.GetMethod() == "" {
			return nil, fmt.Errorf("%w: gRPC method match names neither service nor method", errInvalid)
		}
		e.grpcService, e.grpcMethod = mm.GetService(), mm.GetMethod()
		if mm.GetType() == discoveryv1.GRPCMethodMatch_TYPE_REGEX {
			e.grpcRegex = true
			var err error
			if e.grpcService != "" {
				if e.grpcServiceRe, err = anchored(e.grpcService); err != nil {
					return nil, err
				}
			}
			if e.grpcMethod != "" {
				if e.grpcMethodRe, err = anchored(e.grpcMethod); err != nil {
					return nil, err
				}
			}
		}
	}
	var err error
	if e.headers, err = compileHeaders(m.GetHeaders()); err != nil {
		return nil, err
	}
	return e, nil
}

func cmpTie(a, b *entry) int {
	if a.created != b.created {
		if a.created < b.created {
			return -1
		}
		return 1
	}
	if c := strings.Compare(a.routeKey, b.routeKey); c != 0 {
		return c
	}
	if a.ruleIdx != b.ruleIdx {
		return a.ruleIdx - b.ruleIdx
	}
	return a.matchIdx - b.matchIdx
}

func pathRank(e *entry) int {
	switch e.kind {
	case pathExact:
		return 2
	case pathRegex:
		return 1
	}
	return 0
}

// compareHTTP orders entries by precedence, highest first.
func compareHTTP(a, b *entry) int {
	if ra, rb := pathRank(a), pathRank(b); ra != rb {
		return rb - ra
	}
	if a.kind != pathExact {
		la, lb := len(a.path), len(b.path)
		if a.kind == pathPrefix {
			la, lb = len(a.pathRaw), len(b.pathRaw)
		}
		if la != lb {
			return lb - la
		}
	}
	if ma, mb := a.method != "", b.method != ""; ma != mb {
		if ma {
			return -1
		}
		return 1
	}
	if len(a.headers) != len(b.headers) {
		return len(b.headers) - len(a.headers)
	}
	if len(a.query) != len(b.query) {
		return len(b.query) - len(a.query)
	}
	return cmpTie(a, b)
}

func compareGRPC(a, b *entry) int {
	if la, lb := len(a.grpcService), len(b.grpcService); la != lb {
		return lb - la
	}
	if la, lb := len(a.grpcMethod), len(b.grpcMethod); la != lb {
		return lb - la
	}
	if len(a.headers) != len(b.headers) {
		return len(b.headers) - len(a.headers)
	}
	return cmpTie(a, b)
}

// IsGRPC reports whether r is a gRPC request (content-type application/grpc*).
func IsGRPC(r *http.Request) bool {
	ct := r.Header.Get("Content-Type")
	return ct == "application/grpc" || strings.HasPrefix(ct, "application/grpc+") || strings.HasPrefix(ct, "application/grpc;")
}

// Lookup returns the winning rule for r, whose path must already be
// normalised (see Normalize). The boolean is false when routes are attached
// but none matches (the caller answers 404).
func (t *Table) Lookup(r *http.Request) (Match, bool) {
	if !t.routed {
		return Match{Rule: t.def}, true
	}
	if len(t.grpc) > 0 && IsGRPC(r) {
		svc, method, ok := grpcPath(r.URL.Path)
		for _, e := range t.grpc {
			if ok && e.matchGRPC(r, svc, method) || !ok && e.grpcService == "" && e.grpcMethod == "" && matchHeaders(e.headers, r) {
				return Match{Rule: e.rule}, true
			}
		}
	}
	path := r.URL.Path
	var query map[string][]string
	for _, e := range t.http {
		if e.method != "" && e.method != r.Method {
			continue
		}
		if !e.matchPath(path) {
			continue
		}
		if !matchHeaders(e.headers, r) {
			continue
		}
		if len(e.query) > 0 {
			if query == nil {
				query = r.URL.Query()
			}
			if !matchQuery(e.query, query) {
				continue
			}
		}
		m := Match{Rule: e.rule}
		if e.kind == pathPrefix {
			m.Prefix = e.pathRaw
		}
		return m, true
	}
	return Match{}, false
}

func (e *entry) matchPath(p string) bool {
	switch e.kind {
	case pathExact:
		return p == e.path
	case pathRegex:
		return e.pathRe.MatchString(p)
	}
	return PrefixMatches(e.path, p)
}

// PrefixMatches reports whether path matches the Gateway API path prefix
// (given without its trailing slash) element-wise: "/foo" matches "/foo",
// "/foo/" and "/foo/bar", not "/foobar".
func PrefixMatches(prefix, path string) bool {
	if prefix == "" {
		return strings.HasPrefix(path, "/")
	}
	if !strings.HasPrefix(path, prefix) {
		return false
	}
	return len(path) == len(prefix) || path[len(prefix)] == '/'
}

func (e *entry) matchGRPC(r *http.Request, svc, method string) bool {
	if e.grpcRegex {
		if e.grpcServiceRe != nil && !e.grpcServiceRe.MatchString(svc) {
			return false
		}
		if e.grpcMethodRe != nil && !e.grpcMethodRe.MatchString(method) {
			return false
		}
	} else {
		if e.grpcService != "" && e.grpcService != svc {
			return false
		}
		if e.grpcMethod != "" && e.grpcMethod != method {
			return false
		}
	}
	return matchHeaders(e.headers, r)
}

// grpcPath splits "/package.Service/Method".
func grpcPath(p string) (svc, method string, ok bool) {
	if !strings.HasPrefix(p, "/") {
		return "", "", false
	}
	svc, method, ok = strings.Cut(p[1:], "/")
	if !ok || svc == "" || method == "" || strings.Contains(method, "/") {
		return "", "", false
	}
	return svc, method, true
}

// HeaderValue returns the value a header match sees: repeated headers are
// joined with "," (RFC 9110 §5.3); "Host" is the request's authority.
func HeaderValue(r *http.Request, canonical string) (string, bool) {
	if canonical == "Host" {
		return r.Host, r.Host != ""
	}
	vs, ok := r.Header[canonical]
	if !ok {
		return "", false
	}
	if len(vs) == 1 {
		return vs[0], true
	}
	return strings.Join(vs, ","), true
}

func matchHeaders(ms []valueMatch, r *http.Request) bool {
	for i := range ms {
		v, ok := HeaderValue(r, ms[i].name)
		if !ok || !ms[i].ok(v) {
			return false
		}
	}
	return true
}

func matchQuery(ms []valueMatch, q map[string][]string) bool {
	for i := range ms {
		vs := q[ms[i].name]
		if len(vs) == 0 || !ms[i].ok(vs[0]) {
			return false
		}
	}
	return true
}
