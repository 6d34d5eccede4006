package translate

import (
	"cmp"
	"fmt"
	"regexp"
	"slices"
	"strings"
	"time"

	pb "github.com/amesh-dev/amesh/api/discovery/v1"
	"google.golang.org/protobuf/types/known/durationpb"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	"github.com/amesh-dev/amesh/controller/internal/label"
)

// Kinds of the routes a RouteStatus is for.
const (
	KindHTTPRoute = "HTTPRoute"
	KindGRPCRoute = "GRPCRoute"
)

// ReasonWaypointRequired is the Accepted reason of a route whose parent
// Service has no waypoint: amesh applies HTTP and gRPC routes at waypoints.
const ReasonWaypointRequired gwv1.RouteConditionReason = "WaypointRequired"

// ReasonConflicted is the Accepted reason of an HTTPRoute parentRef whose
// Service port a GRPCRoute also takes: GEP-1426 applies one route type per
// Service and port, GRPCRoute first.
const ReasonConflicted gwv1.RouteConditionReason = "Conflicted"

// defaultRetryAttempts is the number of retries of an HTTPRoute retry
// policy that does not say (the Gateway API leaves it to the
// implementation; Istio's default).
const defaultRetryAttempts = 2

// RouteStatus is the part of one route's status that amesh owns: the
// parent entries with controllerName amesh.dev/waypoint-controller, one per
// parentRef that amesh serves (a Service in the mesh, or a waypoint
// Gateway). Parents is empty when amesh serves none of the route's parents:
// the writer then removes amesh's stale entries. Conditions carry no
// LastTransitionTime (the writer keeps or stamps it).
type RouteStatus struct {
	Kind       string                   `json:"kind"`
	Namespace  string                   `json:"namespace"`
	Name       string                   `json:"name"`
	Generation int64                    `json:"generation"`
	Parents    []gwv1.RouteParentStatus `json:"parents"`
}

// refProblem is one backend or filter reference that could not be resolved.
type refProblem struct {
	reason gwv1.RouteConditionReason
	msg    string
}

// routeState accumulates what translating one route's rules found.
type routeState struct {
	kind, ns string
	refs     []refProblem
	// dropped describes the rules left out, "Rule <i> (<name>): why".
	dropped []string
	// droppedReason is the reason of the first dropped rule.
	droppedReason gwv1.RouteConditionReason
	// backends are the services the kept rules send to.
	backends []string
}

func (s *routeState) ref(reason gwv1.RouteConditionReason, format string, a ...any) {
	s.refs = append(s.refs, refProblem{reason, fmt.Sprintf(format, a...)})
}

// errRule is why a rule is dropped.
type errRule struct {
	reason gwv1.RouteConditionReason
	msg    string
}

func (e *errRule) Error() string { return e.msg }

func unsupported(format string, a ...any) *errRule {
	return &errRule{gwv1.RouteReasonUnsupportedValue, fmt.Sprintf(format, a...)}
}

func (s *routeState) drop(i int, name *gwv1.SectionName, err *errRule) {
	id := fmt.Sprintf("Rule %d", i)
	if name != nil && *name != "" {
		id += fmt.Sprintf(" (%s)", *name)
	}
	s.dropped = append(s.dropped, id+": "+err.msg)
	if s.droppedReason == "" {
		s.droppedReason = err.reason
	}
}

// attachment is where a route applies: one bound Service, on some of its
// ports (none: all).
type attachment struct {
	service string
	ports   []uint32
	all     bool
}

// portClaims records, per Service, the ports routes of one type attached
// to, and the first route (namespace/name) that took each.
type portClaims map[string]*portClaim

type portClaim struct {
	all   string            // the route on every port, if any
	ports map[uint32]string // port → route
}

func (c portClaims) claim(a attachment, route string) {
	pc := c[a.service]
	if pc == nil {
		pc = &portClaim{ports: map[uint32]string{}}
		c[a.service] = pc
	}
	if len(a.ports) == 0 {
		pc.all = cmp.Or(pc.all, route)
		return
	}
	for _, p := range a.ports {
		if _, ok := pc.ports[p]; !ok {
			pc.ports[p] = route
		}
	}
}

// taken returns which of ports (nil: every port) of service the claims
// hold, and the route holding the first of them; with ports nil and a
// claim on some ports only, taken lists those.
func (c portClaims) taken(service string, ports []uint32) (taken []uint32, all bool, by string) {
	pc := c[service]
	switch {
	case pc == nil:
		return nil, false, ""
	case pc.all != "":
		return ports, true, pc.all
	case ports == nil:
		for p := range pc.ports {
			taken = append(taken, p)
		}
		slices.Sort(taken)
	default:
		for _, p := range ports {
			if _, ok := pc.ports[p]; ok {
				taken = append(taken, p)
			}
		}
	}
	if len(taken) > 0 {
		by = pc.ports[taken[0]]
	}
	return taken, false, by
}

// routes translates the HTTPRoutes and GRPCRoutes attached to Services
// (GAMMA): their rules go into the WaypointService of each parent Service's
// waypoint, and their status into RouteStatuses.
func (t *translator) routes() {
	// GRPCRoutes first: an HTTPRoute on a Service port a GRPCRoute takes
	// is Conflicted (GEP-1426).
	grpcPorts := portClaims{}
	for _, r := range t.in.GRPCRoutes {
		if r.DeletionTimestamp != nil {
			continue
		}
		st := &routeState{kind: KindGRPCRoute, ns: r.Namespace}
		rules := make([]*pb.GRPCRouteRule, 0, len(r.Spec.Rules))
		for i, rule := range r.Spec.Rules {
			pr, err := t.grpcRule(st, rule)
			if err != nil {
				st.drop(i, rule.Name, err)
				continue
			}
			rules = append(rules, pr)
		}
		parents, attached := t.routeParents(st, r.ObjectMeta, r.Spec.ParentRefs, len(rules) > 0 || len(r.Spec.Rules) == 0, nil)
		for _, a := range attached {
			grpcPorts.claim(a, r.Namespace+"/"+r.Name)
			t.wpGRPCRoutes[a.service] = append(t.wpGRPCRoutes[a.service], &pb.GRPCRoute{
				Name:              r.Name,
				Namespace:         r.Namespace,
				CreationTimestamp: unixTime(r.CreationTimestamp),
				Hostnames:         hostnames(r.Spec.Hostnames),
				Ports:             a.ports,
				Rules:             rules,
			})
			t.routeBackends[a.service] = append(t.routeBackends[a.service], st.backends...)
		}
		t.outRouteStatuses = append(t.outRouteStatuses, RouteStatus{
			Kind: KindGRPCRoute, Namespace: r.Namespace, Name: r.Name, Generation: r.Generation, Parents: parents,
		})
	}
	for _, r := range t.in.HTTPRoutes {
		if r.DeletionTimestamp != nil {
			continue
		}
		st := &routeState{kind: KindHTTPRoute, ns: r.Namespace}
		rules := make([]*pb.HTTPRouteRule, 0, len(r.Spec.Rules))
		for i, rule := range r.Spec.Rules {
			pr, err := t.httpRule(st, rule)
			if err != nil {
				st.drop(i, rule.Name, err)
				continue
			}
			rules = append(rules, pr)
		}
		parents, attached := t.routeParents(st, r.ObjectMeta, r.Spec.ParentRefs, len(rules) > 0 || len(r.Spec.Rules) == 0, grpcPorts)
		for _, a := range attached {
			t.wpHTTPRoutes[a.service] = append(t.wpHTTPRoutes[a.service], &pb.HTTPRoute{
				Name:              r.Name,
				Namespace:         r.Namespace,
				CreationTimestamp: unixTime(r.CreationTimestamp),
				Hostnames:         hostnames(r.Spec.Hostnames),
				Ports:             a.ports,
				Rules:             rules,
			})
			t.routeBackends[a.service] = append(t.routeBackends[a.service], st.backends...)
		}
		t.outRouteStatuses = append(t.outRouteStatuses, RouteStatus{
			Kind: KindHTTPRoute, Namespace: r.Namespace, Name: r.Name, Generation: r.Generation, Parents: parents,
		})
	}
	slices.SortFunc(t.outRouteStatuses, func(a, b RouteStatus) int {
		return cmp.Or(cmp.Compare(a.Kind, b.Kind), cmp.Compare(a.Namespace, b.Namespace), cmp.Compare(a.Name, b.Name))
	})
}

// unixTime is t in Unix seconds, 0 when unset.
func unixTime(t metav1.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return t.Unix()
}

func hostnames(hs []gwv1.Hostname) []string {
	var out []string
	for _, h := range hs {
		out = append(out, string(h))
	}
	return out
}

// parentVerdict is the Accepted condition of one parentRef amesh serves.
type parentVerdict struct {
	ref      gwv1.ParentReference
	accepted bool
	reason   gwv1.RouteConditionReason
	msg      string
	// service and port where the route attaches when accepted (port 0:
	// every port).
	service string
	port    uint32
	// tcpPorts are the Service's TCP ports; keep, when set, the ports
	// the route keeps after conflicts (see resolveConflict).
	tcpPorts, keep []uint32
}

// resolveConflict applies GEP-1426's route type precedence to an accepted
// verdict: the ports conflicts hold are not the route's. With none left it
// is Conflicted; with some, it keeps those (v.keep) and says so.
func (t *translator) resolveConflict(v *parentVerdict, conflicts portClaims) {
	var want []uint32 // nil: every port
	if v.port != 0 {
		want = []uint32{v.port}
	}
	taken, all, by := conflicts.taken(v.service, want)
	if len(taken) == 0 && !all {
		return
	}
	on := "on every port"
	if !all {
		on = "on port " + joinPorts(taken)
	}
	var keep []uint32
	if !all && v.port == 0 {
		for _, p := range v.tcpPorts {
			if !slices.Contains(taken, p) {
				keep = append(keep, p)
			}
		}
	}
	if len(keep) == 0 {
		v.accepted, v.reason = false, ReasonConflicted
		v.msg = fmt.Sprintf("GRPCRoute %s is attached to the same Service %s: when route types conflict on a Service port, "+
			"the GRPCRoute applies (GEP-1426); this route is not applied", by, on)
		return
	}
	v.keep = keep
	v.msg += fmt.Sprintf(" on port %s only: GRPCRoute %s takes port %s (GEP-1426: on a conflicting Service port the GRPCRoute applies)",
		joinPorts(keep), by, joinPorts(taken))
}

func joinPorts(ps []uint32) string {
	s := make([]string, len(ps))
	for i, p := range ps {
		s[i] = fmt.Sprint(p)
	}
	return strings.Join(s, ", ")
}

// routeParents judges the route's parentRefs, returns the parent statuses
// amesh owns and where the route attaches. hasRules is false when every
// rule was dropped (the route is then not accepted anywhere); a route
// written without rules is accepted (it matches nothing). Ports that
// higher-precedence routes hold (conflicts, nil for GRPCRoutes) are left
// to them: a parentRef whose every port is held is Conflicted, one that
// keeps some attaches to those only.
func (t *translator) routeParents(st *routeState, meta metav1.ObjectMeta, refs []gwv1.ParentReference, hasRules bool,
	conflicts portClaims) ([]gwv1.RouteParentStatus, []attachment) {
	var verdicts []parentVerdict
	for _, ref := range refs {
		if v, ours := t.parentVerdict(meta.Namespace, ref); ours {
			verdicts = append(verdicts, v)
		}
	}
	if len(verdicts) == 0 {
		return nil, nil
	}
	resolved := metav1.Condition{
		Type:    string(gwv1.RouteConditionResolvedRefs),
		Status:  metav1.ConditionTrue,
		Reason:  string(gwv1.RouteReasonResolvedRefs),
		Message: "all references resolved",
	}
	if len(st.refs) > 0 {
		msgs := make([]string, len(st.refs))
		for i, p := range st.refs {
			msgs[i] = p.msg
		}
		resolved.Status, resolved.Reason = metav1.ConditionFalse, string(st.refs[0].reason)
		resolved.Message = strings.Join(msgs, "; ")
	}
	resolved.ObservedGeneration = meta.Generation

	byService := map[string]*attachment{}
	var order []string
	out := make([]gwv1.RouteParentStatus, 0, len(verdicts))
	for _, v := range verdicts {
		if v.accepted && hasRules {
			t.resolveConflict(&v, conflicts)
		}
		accepted := metav1.Condition{
			Type:               string(gwv1.RouteConditionAccepted),
			Status:             metav1.ConditionFalse,
			Reason:             string(v.reason),
			Message:            v.msg,
			ObservedGeneration: meta.Generation,
		}
		conds := []metav1.Condition{accepted}
		switch {
		case v.accepted && !hasRules:
			conds[0].Reason = string(cmp.Or(st.droppedReason, gwv1.RouteReasonUnsupportedValue))
			conds[0].Message = "every rule is invalid: " + strings.Join(st.dropped, "; ")
		case v.accepted:
			conds[0].Status = metav1.ConditionTrue
			if len(st.dropped) > 0 {
				conds = append(conds, metav1.Condition{
					Type:               string(gwv1.RouteConditionPartiallyInvalid),
					Status:             metav1.ConditionTrue,
					Reason:             string(gwv1.RouteReasonUnsupportedValue),
					Message:            "Dropped " + strings.Join(st.dropped, "; dropped "),
					ObservedGeneration: meta.Generation,
				})
			}
			a := byService[v.service]
			if a == nil {
				a = &attachment{service: v.service}
				byService[v.service] = a
				order = append(order, v.service)
			}
			switch {
			case v.keep != nil:
				a.ports = append(a.ports, v.keep...)
			case v.port == 0:
				a.all = true
			default:
				a.ports = append(a.ports, v.port)
			}
		}
		conds = append(conds, resolved)
		slices.SortFunc(conds, func(a, b metav1.Condition) int { return cmp.Compare(a.Type, b.Type) })
		out = append(out, gwv1.RouteParentStatus{
			ParentRef:      v.ref,
			ControllerName: gwv1.GatewayController(label.WaypointController),
			Conditions:     conds,
		})
	}
	attached := make([]attachment, 0, len(order))
	for _, s := range order {
		a := byService[s]
		if a.all {
			a.ports = nil
		} else {
			slices.Sort(a.ports)
			a.ports = slices.Compact(a.ports)
		}
		attached = append(attached, *a)
	}
	return out, attached
}

// parentVerdict judges one parentRef of a route in namespace ns; ours is
// false for parents amesh does not serve (their status is left to others).
func (t *translator) parentVerdict(ns string, ref gwv1.ParentReference) (v parentVerdict, ours bool) {
	v.ref = ref
	group, kind := "gateway.networking.k8s.io", "Gateway"
	if ref.Group != nil {
		group = string(*ref.Group)
	}
	if ref.Kind != nil {
		kind = string(*ref.Kind)
	}
	pns := ns
	if ref.Namespace != nil && *ref.Namespace != "" {
		pns = string(*ref.Namespace)
	}
	name := string(ref.Name)
	switch {
	case group == gwv1.GroupName && kind == "Gateway":
		if t.waypoints[pns+"/"+name] == nil {
			return v, false
		}
		v.reason = gwv1.RouteReasonNotAllowedByListeners
		v.msg = fmt.Sprintf("the waypoint %s/%s has only its HBONE listener, which accepts no routes: "+
			"attach the route to the Service it is for (parentRef group \"\", kind Service)", pns, name)
		return v, true
	case group == "" && kind == "Service":
	default:
		return v, false
	}
	svc := t.svcByName[pns+"/"+name]
	if !t.meshService(pns, svc) {
		return v, false
	}
	switch {
	case pns != ns:
		v.reason = gwv1.RouteReasonUnsupportedValue
		v.msg = fmt.Sprintf("consumer routes are not supported: the route must be in the namespace of Service %s/%s "+
			"(amesh applies routes at the Service's waypoint, for every client)", pns, name)
		return v, true
	case svc == nil:
		v.reason = gwv1.RouteReasonNoMatchingParent
		v.msg = fmt.Sprintf("Service %s/%s not found", pns, name)
		return v, true
	}
	if ref.Port != nil || ref.SectionName != nil {
		port, ok := servicePort(svc, ref)
		if !ok {
			v.reason = gwv1.RouteReasonNoMatchingParent
			v.msg = fmt.Sprintf("Service %s/%s has no TCP port%s", pns, name, describePortRef(ref))
			return v, true
		}
		v.port = port
	}
	key := t.serviceKey(pns, name)
	w := t.serviceWaypoints[key]
	if rw := t.refusedServices[key]; rw != nil {
		v.reason = ReasonWaypointUnavailable
		v.msg = fmt.Sprintf("Service %s/%s: %s; the route is not applied", pns, name, rw.unavailableMessage())
		return v, true
	}
	if w == nil {
		v.reason = ReasonWaypointRequired
		v.msg = fmt.Sprintf("Service %s/%s is not bound to a waypoint that serves services, and amesh applies routes at waypoints: "+
			"label the Service or its namespace %s=<waypoint>", pns, name, label.UseWaypoint)
		return v, true
	}
	v.accepted, v.service = true, key
	if v.port == 0 {
		for _, p := range svc.Spec.Ports {
			if isTCP(p.Protocol) {
				v.tcpPorts = append(v.tcpPorts, uint32(p.Port))
			}
		}
	}
	v.reason = gwv1.RouteReasonAccepted
	v.msg = fmt.Sprintf("applied by waypoint %s to traffic for Service %s/%s", w.key(), pns, name)
	if v.port != 0 {
		v.msg += fmt.Sprintf(" on port %d", v.port)
	}
	return v, true
}

// meshService reports whether amesh serves routes for a Service (which may
// not exist) of namespace ns: the namespace is enrolled, or the Service or
// its namespace carries a use-waypoint label. Routes for other Services are
// left to whatever serves them.
func (t *translator) meshService(ns string, svc *corev1.Service) bool {
	if t.namespaceEnrolled(ns) {
		return true
	}
	if svc != nil {
		if _, ok := svc.Labels[label.UseWaypoint]; ok {
			return true
		}
	}
	if n := t.namespaces[ns]; n != nil {
		if _, ok := n.Labels[label.UseWaypoint]; ok {
			return true
		}
	}
	return false
}

// servicePort resolves a parentRef's port and sectionName (a port name)
// against the Service's TCP ports; both must agree when both are set.
func servicePort(svc *corev1.Service, ref gwv1.ParentReference) (uint32, bool) {
	for _, p := range svc.Spec.Ports {
		if !isTCP(p.Protocol) {
			continue
		}
		if ref.Port != nil && p.Port != *ref.Port {
			continue
		}
		if ref.SectionName != nil && p.Name != string(*ref.SectionName) {
			continue
		}
		return uint32(p.Port), true
	}
	return 0, false
}

func describePortRef(ref gwv1.ParentReference) string {
	var s []string
	if ref.Port != nil {
		s = append(s, fmt.Sprintf(" %d", *ref.Port))
	}
	if ref.SectionName != nil {
		s = append(s, fmt.Sprintf(" named %q", *ref.SectionName))
	}
	return strings.Join(s, " and")
}

// httpRule translates one HTTPRoute rule; an error drops the rule.
func (t *translator) httpRule(st *routeState, r gwv1.HTTPRouteRule) (*pb.HTTPRouteRule, *errRule) {
	out := &pb.HTTPRouteRule{}
	if r.Name != nil {
		out.Name = string(*r.Name)
	}
	if r.SessionPersistence != nil {
		return nil, unsupported("sessionPersistence is not supported (use a BackendTrafficPolicy with consistent hashing)")
	}
	for _, m := range r.Matches {
		pm, err := httpMatch(m)
		if err != nil {
			return nil, err
		}
		out.Matches = append(out.Matches, pm)
	}
	filters, invalid, err := t.httpFilters(st, r.Filters, false)
	if err != nil {
		return nil, err
	}
	out.Filters = filters
	var redirect, rewrite bool
	for _, f := range r.Filters {
		redirect = redirect || f.Type == gwv1.HTTPRouteFilterRequestRedirect
		rewrite = rewrite || f.Type == gwv1.HTTPRouteFilterURLRewrite
	}
	if redirect && rewrite {
		return nil, &errRule{gwv1.RouteReasonIncompatibleFilters, "RequestRedirect and URLRewrite cannot be used together"}
	}
	if to := r.Timeouts; to != nil {
		var err *errRule
		if out.RequestTimeout, err = routeDuration("timeouts.request", to.Request); err != nil {
			return nil, err
		}
		if out.BackendRequestTimeout, err = routeDuration("timeouts.backendRequest", to.BackendRequest); err != nil {
			return nil, err
		}
	}
	if rt := r.Retry; rt != nil {
		rp := &pb.RetryPolicy{Attempts: defaultRetryAttempts}
		if rt.Attempts != nil {
			if *rt.Attempts < 0 {
				return nil, unsupported("retry.attempts %d is negative", *rt.Attempts)
			}
			rp.Attempts = uint32(*rt.Attempts)
		}
		for _, c := range rt.Codes {
			rp.Codes = append(rp.Codes, uint32(c))
		}
		var err *errRule
		if rp.Backoff, err = routeDuration("retry.backoff", rt.Backoff); err != nil {
			return nil, err
		}
		out.Retry = rp
	}
	for _, b := range r.BackendRefs {
		ref, ok := t.backend(st, b.BackendObjectReference, b.Weight)
		if !ok {
			out.InvalidBackends = true
		}
		bf, bInvalid, err := t.httpFilters(st, b.Filters, true)
		if err != nil {
			return nil, err
		}
		if bInvalid {
			// A backend whose filter cannot be applied answers 500.
			ref = &pb.BackendRef{Weight: ref.Weight}
			out.InvalidBackends = true
		}
		ref.Filters = bf
		out.Backends = append(out.Backends, ref)
	}
	if invalid {
		// A filter that cannot be applied must not be skipped: the
		// rule's requests answer 500 (no filters, no backends).
		out.Filters, out.Backends, out.InvalidBackends = nil, nil, true
	}
	return out, nil
}

// grpcRule translates one GRPCRoute rule; an error drops the rule.
func (t *translator) grpcRule(st *routeState, r gwv1.GRPCRouteRule) (*pb.GRPCRouteRule, *errRule) {
	out := &pb.GRPCRouteRule{}
	if r.Name != nil {
		out.Name = string(*r.Name)
	}
	if r.SessionPersistence != nil {
		return nil, unsupported("sessionPersistence is not supported (use a BackendTrafficPolicy with consistent hashing)")
	}
	for _, m := range r.Matches {
		pm, err := grpcMatch(m)
		if err != nil {
			return nil, err
		}
		out.Matches = append(out.Matches, pm)
	}
	filters, invalid, err := t.grpcFilters(st, r.Filters)
	if err != nil {
		return nil, err
	}
	out.Filters = filters
	for _, b := range r.BackendRefs {
		ref, ok := t.backend(st, b.BackendObjectReference, b.Weight)
		if !ok {
			out.InvalidBackends = true
		}
		bf, bInvalid, err := t.grpcFilters(st, b.Filters)
		if err != nil {
			return nil, err
		}
		if bInvalid {
			ref = &pb.BackendRef{Weight: ref.Weight}
			out.InvalidBackends = true
		}
		ref.Filters = bf
		out.Backends = append(out.Backends, ref)
	}
	if invalid {
		out.Filters, out.Backends, out.InvalidBackends = nil, nil, true
	}
	return out, nil
}

// routeDuration parses a Gateway API duration; zero means "none".
func routeDuration(field string, d *gwv1.Duration) (*durationpb.Duration, *errRule) {
	if d == nil {
		return nil, nil
	}
	v, err := time.ParseDuration(string(*d))
	if err != nil || v < 0 {
		return nil, unsupported("%s %q is not a duration", field, *d)
	}
	if v == 0 {
		return nil, nil
	}
	return durationpb.New(v), nil
}

func checkRegex(what, re string) *errRule {
	if _, err := regexp.Compile(re); err != nil {
		return unsupported("%s %q is not an RE2 regular expression: %v", what, re, err)
	}
	return nil
}

func httpMatch(m gwv1.HTTPRouteMatch) (*pb.HTTPRouteMatch, *errRule) {
	out := &pb.HTTPRouteMatch{Path: &pb.PathMatch{Type: pb.PathMatch_TYPE_PREFIX, Value: "/"}}
	if p := m.Path; p != nil {
		if p.Value != nil {
			out.Path.Value = *p.Value
		}
		typ := gwv1.PathMatchPathPrefix
		if p.Type != nil {
			typ = *p.Type
		}
		switch typ {
		case gwv1.PathMatchPathPrefix:
		case gwv1.PathMatchExact:
			out.Path.Type = pb.PathMatch_TYPE_EXACT
		case gwv1.PathMatchRegularExpression:
			out.Path.Type = pb.PathMatch_TYPE_REGEX
			if err := checkRegex("path", out.Path.Value); err != nil {
				return nil, err
			}
		default:
			return nil, unsupported("path match type %q", typ)
		}
		if typ != gwv1.PathMatchRegularExpression && !strings.HasPrefix(out.Path.Value, "/") {
			return nil, unsupported("path %q does not start with /", out.Path.Value)
		}
	}
	for _, h := range m.Headers {
		hm := &pb.HeaderMatch{Name: string(h.Name), Value: h.Value}
		if h.Type != nil {
			switch *h.Type {
			case gwv1.HeaderMatchExact:
			case gwv1.HeaderMatchRegularExpression:
				hm.Type = pb.HeaderMatch_TYPE_REGEX
				if err := checkRegex("header "+hm.Name, hm.Value); err != nil {
					return nil, err
				}
			default:
				return nil, unsupported("header match type %q", *h.Type)
			}
		}
		out.Headers = append(out.Headers, hm)
	}
	for _, q := range m.QueryParams {
		qm := &pb.QueryParamMatch{Name: string(q.Name), Value: q.Value}
		if q.Type != nil {
			switch *q.Type {
			case gwv1.QueryParamMatchExact:
			case gwv1.QueryParamMatchRegularExpression:
				qm.Type = pb.QueryParamMatch_TYPE_REGEX
				if err := checkRegex("query parameter "+qm.Name, qm.Value); err != nil {
					return nil, err
				}
			default:
				return nil, unsupported("query parameter match type %q", *q.Type)
			}
		}
		out.QueryParams = append(out.QueryParams, qm)
	}
	if m.Method != nil {
		out.Method = string(*m.Method)
	}
	return out, nil
}

func grpcMatch(m gwv1.GRPCRouteMatch) (*pb.GRPCRouteMatch, *errRule) {
	out := &pb.GRPCRouteMatch{}
	if mm := m.Method; mm != nil {
		pm := &pb.GRPCMethodMatch{}
		if mm.Service != nil {
			pm.Service = *mm.Service
		}
		if mm.Method != nil {
			pm.Method = *mm.Method
		}
		if mm.Type != nil {
			switch *mm.Type {
			case gwv1.GRPCMethodMatchExact:
			case gwv1.GRPCMethodMatchRegularExpression:
				pm.Type = pb.GRPCMethodMatch_TYPE_REGEX
				for _, re := range []string{pm.Service, pm.Method} {
					if err := checkRegex("method match", re); err != nil {
						return nil, err
					}
				}
			default:
				return nil, unsupported("method match type %q", *mm.Type)
			}
		}
		out.Method = pm
	}
	for _, h := range m.Headers {
		hm := &pb.HeaderMatch{Name: string(h.Name), Value: h.Value}
		if h.Type != nil {
			switch *h.Type {
			case gwv1.GRPCHeaderMatchExact:
			case gwv1.GRPCHeaderMatchRegularExpression:
				hm.Type = pb.HeaderMatch_TYPE_REGEX
				if err := checkRegex("header "+hm.Name, hm.Value); err != nil {
					return nil, err
				}
			default:
				return nil, unsupported("header match type %q", *h.Type)
			}
		}
		out.Headers = append(out.Headers, hm)
	}
	return out, nil
}

// httpFilters translates HTTPRoute filters. invalid reports a filter that
// is valid but cannot be applied (an extension amesh does not have): its
// requests must get 500. An error drops the rule. onBackend restricts to
// the filters the waypoint applies per backend.
func (t *translator) httpFilters(st *routeState, fs []gwv1.HTTPRouteFilter, onBackend bool) (out []*pb.HTTPFilter, invalid bool, _ *errRule) {
	for _, f := range fs {
		switch f.Type {
		case gwv1.HTTPRouteFilterRequestHeaderModifier:
			if f.RequestHeaderModifier == nil {
				return nil, false, unsupported("RequestHeaderModifier filter without requestHeaderModifier")
			}
			out = append(out, &pb.HTTPFilter{Kind: &pb.HTTPFilter_RequestHeaderModifier{RequestHeaderModifier: headerModifier(f.RequestHeaderModifier)}})
		case gwv1.HTTPRouteFilterResponseHeaderModifier:
			if f.ResponseHeaderModifier == nil {
				return nil, false, unsupported("ResponseHeaderModifier filter without responseHeaderModifier")
			}
			out = append(out, &pb.HTTPFilter{Kind: &pb.HTTPFilter_ResponseHeaderModifier{ResponseHeaderModifier: headerModifier(f.ResponseHeaderModifier)}})
		case gwv1.HTTPRouteFilterRequestMirror:
			if f.RequestMirror == nil {
				return nil, false, unsupported("RequestMirror filter without requestMirror")
			}
			if m := t.mirror(st, f.RequestMirror); m != nil {
				out = append(out, &pb.HTTPFilter{Kind: &pb.HTTPFilter_RequestMirror{RequestMirror: m}})
			}
		case gwv1.HTTPRouteFilterRequestRedirect:
			if onBackend {
				return nil, false, unsupported("RequestRedirect is not supported as a backendRef filter")
			}
			rr := f.RequestRedirect
			if rr == nil {
				return nil, false, unsupported("RequestRedirect filter without requestRedirect")
			}
			r := &pb.RequestRedirect{}
			if rr.Scheme != nil {
				r.Scheme = *rr.Scheme
			}
			if rr.Hostname != nil {
				r.Hostname = string(*rr.Hostname)
			}
			if rr.Port != nil {
				r.Port = uint32(*rr.Port)
			}
			r.StatusCode = 302
			if rr.StatusCode != nil {
				if *rr.StatusCode != 301 && *rr.StatusCode != 302 {
					return nil, false, unsupported("redirect status code %d (301 or 302)", *rr.StatusCode)
				}
				r.StatusCode = uint32(*rr.StatusCode)
			}
			pm, err := pathModifier(rr.Path)
			if err != nil {
				return nil, false, err
			}
			r.Path = pm
			out = append(out, &pb.HTTPFilter{Kind: &pb.HTTPFilter_RequestRedirect{RequestRedirect: r}})
		case gwv1.HTTPRouteFilterURLRewrite:
			if onBackend {
				return nil, false, unsupported("URLRewrite is not supported as a backendRef filter")
			}
			rw := f.URLRewrite
			if rw == nil {
				return nil, false, unsupported("URLRewrite filter without urlRewrite")
			}
			r := &pb.URLRewrite{}
			if rw.Hostname != nil {
				r.Hostname = string(*rw.Hostname)
			}
			pm, err := pathModifier(rw.Path)
			if err != nil {
				return nil, false, err
			}
			r.Path = pm
			out = append(out, &pb.HTTPFilter{Kind: &pb.HTTPFilter_UrlRewrite{UrlRewrite: r}})
		case gwv1.HTTPRouteFilterExtensionRef:
			describeExtension(st, f.ExtensionRef)
			invalid = true
		case gwv1.HTTPRouteFilterCORS, gwv1.HTTPRouteFilterExternalAuth:
			return nil, false, unsupported("the %s filter is not supported", f.Type)
		default:
			return nil, false, unsupported("unknown filter type %q", f.Type)
		}
	}
	return out, invalid, nil
}

// grpcFilters translates GRPCRoute filters, as httpFilters.
func (t *translator) grpcFilters(st *routeState, fs []gwv1.GRPCRouteFilter) (out []*pb.HTTPFilter, invalid bool, _ *errRule) {
	for _, f := range fs {
		switch f.Type {
		case gwv1.GRPCRouteFilterRequestHeaderModifier:
			if f.RequestHeaderModifier == nil {
				return nil, false, unsupported("RequestHeaderModifier filter without requestHeaderModifier")
			}
			out = append(out, &pb.HTTPFilter{Kind: &pb.HTTPFilter_RequestHeaderModifier{RequestHeaderModifier: headerModifier(f.RequestHeaderModifier)}})
		case gwv1.GRPCRouteFilterResponseHeaderModifier:
			if f.ResponseHeaderModifier == nil {
				return nil, false, unsupported("ResponseHeaderModifier filter without responseHeaderModifier")
			}
			out = append(out, &pb.HTTPFilter{Kind: &pb.HTTPFilter_ResponseHeaderModifier{ResponseHeaderModifier: headerModifier(f.ResponseHeaderModifier)}})
		case gwv1.GRPCRouteFilterRequestMirror:
			if f.RequestMirror == nil {
				return nil, false, unsupported("RequestMirror filter without requestMirror")
			}
			if m := t.mirror(st, f.RequestMirror); m != nil {
				out = append(out, &pb.HTTPFilter{Kind: &pb.HTTPFilter_RequestMirror{RequestMirror: m}})
			}
		case gwv1.GRPCRouteFilterExtensionRef:
			describeExtension(st, f.ExtensionRef)
			invalid = true
		default:
			return nil, false, unsupported("unknown filter type %q", f.Type)
		}
	}
	return out, invalid, nil
}

func describeExtension(st *routeState, ref *gwv1.LocalObjectReference) {
	if ref == nil {
		st.ref(gwv1.RouteReasonInvalidKind, "ExtensionRef filter without extensionRef: its requests get 500")
		return
	}
	st.ref(gwv1.RouteReasonInvalidKind, "filter extension %s/%s %s is not supported by amesh: its requests get 500",
		ref.Group, ref.Kind, ref.Name)
}

func headerModifier(h *gwv1.HTTPHeaderFilter) *pb.HeaderModifier {
	m := &pb.HeaderModifier{Remove: slices.Clone(h.Remove)}
	for _, s := range h.Set {
		m.Set = append(m.Set, &pb.Header{Name: string(s.Name), Value: s.Value})
	}
	for _, a := range h.Add {
		m.Add = append(m.Add, &pb.Header{Name: string(a.Name), Value: a.Value})
	}
	return m
}

func pathModifier(p *gwv1.HTTPPathModifier) (*pb.PathModifier, *errRule) {
	if p == nil {
		return nil, nil
	}
	switch p.Type {
	case gwv1.FullPathHTTPPathModifier:
		if p.ReplaceFullPath == nil {
			return nil, unsupported("ReplaceFullPath without replaceFullPath")
		}
		return &pb.PathModifier{Kind: &pb.PathModifier_ReplaceFullPath{ReplaceFullPath: *p.ReplaceFullPath}}, nil
	case gwv1.PrefixMatchHTTPPathModifier:
		if p.ReplacePrefixMatch == nil {
			return nil, unsupported("ReplacePrefixMatch without replacePrefixMatch")
		}
		return &pb.PathModifier{Kind: &pb.PathModifier_ReplacePrefixMatch{ReplacePrefixMatch: *p.ReplacePrefixMatch}}, nil
	}
	return nil, unsupported("path modifier type %q", p.Type)
}

// mirror translates a RequestMirror filter; nil (the mirror is left out)
// when its backend cannot be resolved.
func (t *translator) mirror(st *routeState, m *gwv1.HTTPRequestMirrorFilter) *pb.RequestMirror {
	ref, ok := t.backend(st, m.BackendRef, nil)
	if !ok {
		return nil
	}
	ref.Weight = 0
	out := &pb.RequestMirror{Backend: ref, Percent: 100}
	switch {
	case m.Percent != nil:
		out.Percent = float64(min(max(*m.Percent, 0), 100))
	case m.Fraction != nil:
		den := int32(100)
		if m.Fraction.Denominator != nil {
			den = *m.Fraction.Denominator
		}
		if den > 0 {
			out.Percent = min(100*float64(max(m.Fraction.Numerator, 0))/float64(den), 100)
		}
	}
	return out
}

// backend resolves a backend reference of a route in st.ns. An
// unresolvable one is carried with an empty service (the waypoint answers
// 500 for the share of requests it would have had) and recorded in st.
func (t *translator) backend(st *routeState, ref gwv1.BackendObjectReference, weight *int32) (*pb.BackendRef, bool) {
	out := &pb.BackendRef{Weight: 1}
	if weight != nil {
		out.Weight = uint32(max(*weight, 0))
	}
	group, kind := "", "Service"
	if ref.Group != nil {
		group = string(*ref.Group)
	}
	if ref.Kind != nil {
		kind = string(*ref.Kind)
	}
	ns := st.ns
	if ref.Namespace != nil && *ref.Namespace != "" {
		ns = string(*ref.Namespace)
	}
	name := string(ref.Name)
	if group != "" || kind != "Service" {
		st.ref(gwv1.RouteReasonInvalidKind, "backend %s %s/%s: only Services (core group) are supported", groupKind(group, kind), ns, name)
		return out, false
	}
	if ns != st.ns && !t.referenceGranted(st.kind, st.ns, ns, name) {
		st.ref(gwv1.RouteReasonRefNotPermitted, "backend Service %s/%s is in another namespace and no ReferenceGrant there allows %ss of %s to refer to it",
			ns, name, st.kind, st.ns)
		return out, false
	}
	svc := t.svcByName[ns+"/"+name]
	switch {
	case svc == nil:
		st.ref(gwv1.RouteReasonBackendNotFound, "backend Service %s/%s not found", ns, name)
		return out, false
	case svc.Spec.Type == corev1.ServiceTypeExternalName:
		st.ref(gwv1.RouteReasonInvalidKind, "backend Service %s/%s is of type ExternalName, which amesh does not route to", ns, name)
		return out, false
	case ref.Port == nil:
		st.ref(gwv1.RouteReasonBackendNotFound, "backend Service %s/%s: no port given", ns, name)
		return out, false
	}
	found := slices.ContainsFunc(svc.Spec.Ports, func(p corev1.ServicePort) bool { return isTCP(p.Protocol) && p.Port == *ref.Port })
	if !found {
		st.ref(gwv1.RouteReasonBackendNotFound, "backend Service %s/%s has no TCP port %d", ns, name, *ref.Port)
		return out, false
	}
	out.Service, out.Port = t.serviceKey(ns, name), uint32(*ref.Port)
	st.backends = append(st.backends, out.Service)
	return out, true
}

func groupKind(group, kind string) string {
	if group == "" {
		return kind
	}
	return kind + "." + group
}

// referenceGranted reports whether a ReferenceGrant in namespace to lets
// routes of kind in namespace from refer to Service name.
func (t *translator) referenceGranted(kind, from, to, name string) bool {
	for _, g := range t.in.ReferenceGrants {
		if g.Namespace != to || g.DeletionTimestamp != nil {
			continue
		}
		okFrom := slices.ContainsFunc(g.Spec.From, func(f gwv1.ReferenceGrantFrom) bool {
			return f.Group == gwv1.GroupName && string(f.Kind) == kind && string(f.Namespace) == from
		})
		if !okFrom {
			continue
		}
		if slices.ContainsFunc(g.Spec.To, func(r gwv1.ReferenceGrantTo) bool {
			return r.Group == "" && r.Kind == "Service" && (r.Name == nil || *r.Name == "" || string(*r.Name) == name)
		}) {
			return true
		}
	}
	return false
}
