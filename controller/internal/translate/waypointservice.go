package translate

import (
	"cmp"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	pb "github.com/amesh-dev/amesh/api/discovery/v1"
	"google.golang.org/protobuf/types/known/durationpb"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/amesh-dev/amesh/controller/apis/security/v1alpha1"
	trafficv1alpha1 "github.com/amesh-dev/amesh/controller/apis/traffic/v1alpha1"
)

// targetSet is what a policy's targetRefs reach.
type targetSet struct {
	// services are the bound services (resource names) whose waypoint
	// enforces the policy.
	services []string
	// gatewayLevel marks the services reached through a Gateway reference.
	gatewayLevel map[string]bool
	// gateways are the waypoint Gateways ("<ns>/<name>") targeted
	// directly: their WaypointGateway carries the policy.
	gateways []string
	// unresolved describes the references that reach nothing.
	unresolved []string
}

// targets resolves policy targetRefs: a Service bound to a waypoint, or a
// waypoint Gateway (every service bound to it, and the workloads it serves
// through its WaypointGateway).
func (t *translator) targets(ns string, refs []v1alpha1.PolicyTargetReference) targetSet {
	ts := targetSet{gatewayLevel: map[string]bool{}}
	for _, r := range refs {
		switch {
		case r.Group == "gateway.networking.k8s.io" && r.Kind == "Gateway":
			w := t.waypoints[ns+"/"+r.Name]
			if w == nil {
				if t.gateways[ns+"/"+r.Name] == nil {
					ts.unresolved = append(ts.unresolved, fmt.Sprintf("Gateway %s not found", r.Name))
				} else {
					ts.unresolved = append(ts.unresolved, t.notAWaypoint(ns+"/"+r.Name))
				}
				continue
			}
			ts.gateways = append(ts.gateways, w.key())
			for svc, sw := range t.serviceWaypoints {
				if sw == w {
					ts.services = append(ts.services, svc)
					ts.gatewayLevel[svc] = true
				}
			}
		case r.Group == "" && r.Kind == "Service":
			key := t.serviceKey(ns, r.Name)
			switch {
			case t.svcByName[ns+"/"+r.Name] == nil:
				ts.unresolved = append(ts.unresolved, fmt.Sprintf("Service %s not found", r.Name))
			case t.refusedServices[key] != nil:
				ts.unresolved = append(ts.unresolved, fmt.Sprintf("Service %s: %s", r.Name, t.refusedServices[key].unavailableMessage()))
			case t.serviceWaypoints[key] == nil:
				ts.unresolved = append(ts.unresolved, fmt.Sprintf("Service %s is not bound to a waypoint that serves services", r.Name))
			default:
				ts.services = append(ts.services, key)
			}
		default:
			ts.unresolved = append(ts.unresolved, fmt.Sprintf("unsupported target %s/%s %s", r.Group, r.Kind, r.Name))
		}
	}
	slices.Sort(ts.services)
	ts.services = slices.Compact(ts.services)
	slices.Sort(ts.gateways)
	ts.gateways = slices.Compact(ts.gateways)
	return ts
}

// waypointCondition reports where a targetRefs policy is enforced: by
// which waypoint Gateways (for their services and the workloads bound to
// them) and for which services.
func (t *translator) waypointCondition(kind string, meta metav1.ObjectMeta, ts targetSet) {
	var where []string
	for _, g := range ts.gateways {
		where = append(where, "waypoint "+g+" (for every service and workload it serves)")
	}
	var direct []string
	for _, s := range ts.services {
		if !ts.gatewayLevel[s] {
			direct = append(direct, fmt.Sprintf("%s (waypoint %s)", s, t.serviceWaypoints[s].key()))
		}
	}
	if len(direct) > 0 {
		where = append(where, "service "+strings.Join(direct, ", "))
	}
	switch {
	case len(ts.unresolved) > 0 && len(where) > 0:
		t.setCondition(kind, meta, condition(v1alpha1.ConditionWaypointAccepted, false, v1alpha1.ReasonTargetNotFound,
			strings.Join(ts.unresolved, "; ")+"; enforced only by "+strings.Join(where, "; ")))
	case len(ts.unresolved) > 0:
		t.setCondition(kind, meta, condition(v1alpha1.ConditionWaypointAccepted, false, v1alpha1.ReasonTargetNotFound,
			strings.Join(ts.unresolved, "; ")))
	case len(where) == 0:
		t.setCondition(kind, meta, condition(v1alpha1.ConditionWaypointAccepted, false, v1alpha1.ReasonTargetNotFound,
			"the policy has no targets"))
	default:
		t.setCondition(kind, meta, condition(v1alpha1.ConditionWaypointAccepted, true, v1alpha1.ReasonEnforced,
			"enforced by "+strings.Join(where, "; ")))
	}
}

// waypointAuthorization records a targetRefs AuthorizationPolicy, in full,
// for the services it reaches.
func (t *translator) waypointAuthorization(ap *v1alpha1.AuthorizationPolicy) {
	a, res := t.translateAuthorization(ap, false)
	ts := t.targets(ap.Namespace, ap.Spec.TargetRefs)
	for _, s := range ts.services {
		t.wpAuthz[s] = append(t.wpAuthz[s], a)
	}
	for _, g := range ts.gateways {
		t.gwAuthz[g] = append(t.gwAuthz[g], a)
	}
	t.acceptedCondition(v1alpha1.ConditionAccepted, ap, res)
	t.waypointCondition(KindAuthorizationPolicy, ap.ObjectMeta, ts)
}

// requestAuthentications records targetRefs RequestAuthentications for the
// services they reach; selector-based ones are not enforced in ambient mode.
func (t *translator) requestAuthentications() {
	for _, ra := range t.in.RequestAuthentications {
		if ra.DeletionTimestamp != nil {
			continue
		}
		t.setCondition(KindRequestAuthentication, ra.ObjectMeta, condition(v1alpha1.ConditionAccepted, true,
			v1alpha1.ReasonAccepted, "the policy is valid"))
		if len(ra.Spec.TargetRefs) == 0 {
			t.setCondition(KindRequestAuthentication, ra.ObjectMeta, condition(v1alpha1.ConditionWaypointAccepted, false,
				v1alpha1.ReasonNotApplicable, "JWT validation happens at waypoints: attach the policy with targetRefs"))
			continue
		}
		r := &pb.RequestAuthentication{Name: ra.Name, Namespace: ra.Namespace}
		for _, j := range ra.Spec.JWTRules {
			jr := &pb.JWTRule{
				Issuer:                j.Issuer,
				Audiences:             slices.Clone(j.Audiences),
				Jwks:                  j.JWKS,
				JwksUri:               j.JWKSURI,
				FromParams:            slices.Clone(j.FromParams),
				ForwardOriginalToken:  j.ForwardOriginalToken,
				OutputPayloadToHeader: j.OutputPayloadToHeader,
			}
			for _, h := range j.FromHeaders {
				jr.FromHeaders = append(jr.FromHeaders, &pb.JWTHeader{Name: h.Name, Prefix: h.Prefix})
			}
			r.JwtRules = append(r.JwtRules, jr)
		}
		ts := t.targets(ra.Namespace, ra.Spec.TargetRefs)
		for _, s := range ts.services {
			t.wpRequestAuthn[s] = append(t.wpRequestAuthn[s], r)
		}
		for _, g := range ts.gateways {
			t.gwRequestAuthn[g] = append(t.gwRequestAuthn[g], r)
		}
		t.waypointCondition(KindRequestAuthentication, ra.ObjectMeta, ts)
	}
}

// backendTrafficPolicies computes the traffic policy of each bound service:
// the Gateway-level policy, overridden field by field by the Service-level
// one; among policies of one level the oldest wins each field.
func (t *translator) backendTrafficPolicies() {
	btps := slices.Clone(t.in.BackendTrafficPolicies)
	btps = slices.DeleteFunc(btps, func(p *trafficv1alpha1.BackendTrafficPolicy) bool { return p.DeletionTimestamp != nil })
	// Newest first: later merges (older policies) override.
	slices.SortFunc(btps, func(a, b *trafficv1alpha1.BackendTrafficPolicy) int { return -olderFirst(a.ObjectMeta, b.ObjectMeta) })
	gatewayLevel := map[string]*pb.TrafficPolicy{}
	serviceLevel := map[string]*pb.TrafficPolicy{}
	for _, p := range btps {
		tp, bad := trafficPolicy(&p.Spec)
		refs := make([]v1alpha1.PolicyTargetReference, len(p.Spec.TargetRefs))
		for i, r := range p.Spec.TargetRefs {
			refs[i] = v1alpha1.PolicyTargetReference{Group: r.Group, Kind: r.Kind, Name: r.Name}
		}
		ts := t.targets(p.Namespace, refs)
		for _, s := range ts.services {
			level := serviceLevel
			if ts.gatewayLevel[s] {
				level = gatewayLevel
			}
			level[s] = mergeTraffic(level[s], tp)
		}
		for _, g := range ts.gateways {
			t.gwTraffic[g] = mergeTraffic(t.gwTraffic[g], tp)
		}
		if len(bad) > 0 {
			t.setCondition(KindBackendTrafficPolicy, p.ObjectMeta, condition(v1alpha1.ConditionAccepted, false,
				v1alpha1.ReasonInvalid, "invalid values ignored: "+strings.Join(bad, "; ")))
		} else {
			t.setCondition(KindBackendTrafficPolicy, p.ObjectMeta, condition(v1alpha1.ConditionAccepted, true,
				v1alpha1.ReasonAccepted, "the policy is valid"))
		}
		t.waypointCondition(KindBackendTrafficPolicy, p.ObjectMeta, ts)
	}
	for s, tp := range gatewayLevel {
		t.wpTraffic[s] = tp
	}
	for s, tp := range serviceLevel {
		t.wpTraffic[s] = mergeTraffic(t.wpTraffic[s], tp)
	}
}

// mergeTraffic returns base with every setting present in over replacing
// base's.
func mergeTraffic(base, over *pb.TrafficPolicy) *pb.TrafficPolicy {
	out := &pb.TrafficPolicy{}
	if base != nil {
		*out = pb.TrafficPolicy{
			LoadBalancer:     base.LoadBalancer,
			CircuitBreaker:   base.CircuitBreaker,
			OutlierDetection: base.OutlierDetection,
			ConnectionPool:   base.ConnectionPool,
			LocalRateLimit:   base.LocalRateLimit,
			Fault:            base.Fault,
		}
	}
	out.LoadBalancer = cmp.Or(over.LoadBalancer, out.LoadBalancer)
	out.CircuitBreaker = cmp.Or(over.CircuitBreaker, out.CircuitBreaker)
	out.OutlierDetection = cmp.Or(over.OutlierDetection, out.OutlierDetection)
	out.ConnectionPool = cmp.Or(over.ConnectionPool, out.ConnectionPool)
	out.LocalRateLimit = cmp.Or(over.LocalRateLimit, out.LocalRateLimit)
	out.Fault = cmp.Or(over.Fault, out.Fault)
	return out
}

// trafficPolicy converts a BackendTrafficPolicy spec; bad lists values
// that could not be converted (and were left out).
func trafficPolicy(s *trafficv1alpha1.BackendTrafficPolicySpec) (tp *pb.TrafficPolicy, bad []string) {
	dur := func(field string, d *trafficv1alpha1.Duration) *durationpb.Duration {
		if d == nil {
			return nil
		}
		v, err := time.ParseDuration(string(*d))
		if err != nil || v < 0 {
			bad = append(bad, fmt.Sprintf("%s %q", field, *d))
			return nil
		}
		return durationpb.New(v)
	}
	u32 := func(p *int32) uint32 {
		if p == nil || *p < 0 {
			return 0
		}
		return uint32(*p)
	}
	tp = &pb.TrafficPolicy{}
	if lb := s.LoadBalancer; lb != nil {
		l := &pb.LoadBalancer{}
		switch lb.Type {
		case trafficv1alpha1.LoadBalancerLeastRequest:
			l.Type = pb.LoadBalancer_TYPE_LEAST_REQUEST
		case trafficv1alpha1.LoadBalancerRandom:
			l.Type = pb.LoadBalancer_TYPE_RANDOM
		case trafficv1alpha1.LoadBalancerConsistentHash:
			l.Type = pb.LoadBalancer_TYPE_CONSISTENT_HASH
			if ch := lb.ConsistentHash; ch != nil {
				switch {
				case ch.Type == trafficv1alpha1.ConsistentHashHeader && ch.Header != nil:
					l.HashHeader = ch.Header.Name
				case ch.Type == trafficv1alpha1.ConsistentHashCookie && ch.Cookie != nil:
					l.HashCookie = &pb.HashCookie{Name: ch.Cookie.Name, Ttl: dur("loadBalancer.consistentHash.cookie.ttl", ch.Cookie.TTL), Path: ch.Cookie.Path}
				default:
					l.HashSourceIp = true
				}
			} else {
				l.HashSourceIp = true
			}
		}
		tp.LoadBalancer = l
	}
	if cb := s.CircuitBreaker; cb != nil {
		tp.CircuitBreaker = &pb.CircuitBreaker{
			MaxConnections:     u32(cb.MaxConnections),
			MaxPendingRequests: u32(cb.MaxPendingRequests),
			MaxRequests:        u32(cb.MaxRequests),
			MaxRetries:         u32(cb.MaxRetries),
		}
	}
	if od := s.OutlierDetection; od != nil {
		tp.OutlierDetection = &pb.OutlierDetection{
			Consecutive_5Xx:          u32(od.Consecutive5xx),
			ConsecutiveGatewayErrors: u32(od.ConsecutiveGatewayErrors),
			Interval:                 dur("outlierDetection.interval", od.Interval),
			BaseEjectionTime:         dur("outlierDetection.baseEjectionTime", od.BaseEjectionTime),
			MaxEjectionPercent:       u32(od.MaxEjectionPercent),
			MaxEjectionTime:          dur("outlierDetection.maxEjectionTime", od.MaxEjectionTime),
		}
		if od.MaxEjectionPercent == nil {
			tp.OutlierDetection.MaxEjectionPercent = 10
		}
		if od.Interval == nil {
			tp.OutlierDetection.Interval = durationpb.New(10 * time.Second)
		}
		if od.BaseEjectionTime == nil {
			tp.OutlierDetection.BaseEjectionTime = durationpb.New(30 * time.Second)
		}
		// Unset in policies stored before the field had a default; zero
		// only in those stored before it was validated.
		if mx := tp.OutlierDetection.MaxEjectionTime; mx == nil || mx.AsDuration() == 0 {
			if mx != nil {
				bad = append(bad, fmt.Sprintf("outlierDetection.maxEjectionTime %q: must be positive (300s used)", *od.MaxEjectionTime))
			}
			tp.OutlierDetection.MaxEjectionTime = durationpb.New(300 * time.Second)
		}
	}
	if cp := s.ConnectionPool; cp != nil {
		tp.ConnectionPool = &pb.ConnectionPool{
			ConnectTimeout:           dur("connectionPool.connectTimeout", cp.ConnectTimeout),
			IdleTimeout:              dur("connectionPool.idleTimeout", cp.IdleTimeout),
			MaxRequestsPerConnection: u32(cp.MaxRequestsPerConnection),
		}
	}
	if rl := s.LocalRateLimit; rl != nil {
		tp.LocalRateLimit, bad = localRateLimit(rl, bad)
	}
	if f := s.FaultInjection; f != nil {
		fi := &pb.FaultInjection{}
		if d := f.Delay; d != nil {
			fixed := d.FixedDelay
			fi.Delay = &pb.FaultDelay{Percent: percent(d.Percent, d.Fraction), Duration: dur("faultInjection.delay.fixedDelay", &fixed)}
		}
		if a := f.Abort; a != nil {
			fi.Abort = &pb.FaultAbort{Percent: percent(a.Percent, a.Fraction), HttpStatus: uint32(max(a.HTTPStatus, 0)), GrpcStatus: u32(a.GRPCStatus)}
		}
		tp.Fault = fi
	}
	return tp, bad
}

// localRateLimit converts a LocalRateLimit, or returns nil and appends the
// reason to bad if it lacks maxTokens or fillInterval (or has a zero one):
// admission refuses those, but a policy stored before it did may carry
// one. The waypoint would answer every request under such a bucket with
// 503; left out, the rate limit of the next policy that sets a valid one
// (a Service's falls back to its Gateway's) applies, and the policy's
// Accepted condition names the problem.
func localRateLimit(rl *trafficv1alpha1.LocalRateLimit, bad []string) (*pb.LocalRateLimit, []string) {
	var problems []string
	if rl.MaxTokens <= 0 {
		problems = append(problems, fmt.Sprintf("maxTokens %d: must be positive", rl.MaxTokens))
	}
	fill, err := time.ParseDuration(string(rl.FillInterval))
	switch {
	case rl.FillInterval == "":
		problems = append(problems, "fillInterval is required")
	case err != nil:
		problems = append(problems, fmt.Sprintf("fillInterval %q: not a duration", rl.FillInterval))
	case fill <= 0:
		problems = append(problems, fmt.Sprintf("fillInterval %q: must be positive", rl.FillInterval))
	}
	if len(problems) > 0 {
		return nil, append(bad, "localRateLimit not applied: "+strings.Join(problems, ", "))
	}
	out := &pb.LocalRateLimit{MaxTokens: uint32(rl.MaxTokens), TokensPerFill: uint32(rl.MaxTokens), FillInterval: durationpb.New(fill)}
	if rl.TokensPerFill != nil {
		out.TokensPerFill = uint32(max(*rl.TokensPerFill, 0))
	}
	return out, bad
}

// percent converts a percent or fraction (default: all) to 0–100.
func percent(p *int32, f *trafficv1alpha1.Fraction) float64 {
	switch {
	case p != nil:
		return float64(min(max(*p, 0), 100))
	case f != nil && f.Denominator > 0:
		return min(100*float64(f.Numerator)/float64(f.Denominator), 100)
	}
	return 100
}

// waypointServices builds the configuration of every service bound to a
// waypoint.
func (t *translator) waypointServices(services []*pb.Service) []*pb.WaypointService {
	t.requestAuthentications()
	t.backendTrafficPolicies()
	var out []*pb.WaypointService
	for _, s := range services {
		key := s.Namespace + "/" + s.Hostname
		w := t.serviceWaypoints[key]
		if w == nil {
			continue
		}
		ws := &pb.WaypointService{
			Service:                key,
			Gateway:                w.key(),
			HttpRoutes:             t.wpHTTPRoutes[key],
			GrpcRoutes:             t.wpGRPCRoutes[key],
			Authorizations:         t.wpAuthz[key],
			RequestAuthentications: t.wpRequestAuthn[key],
			TrafficPolicy:          t.wpTraffic[key],
		}
		slices.SortFunc(ws.HttpRoutes, func(a, b *pb.HTTPRoute) int {
			return cmp.Or(cmp.Compare(a.Namespace, b.Namespace), cmp.Compare(a.Name, b.Name))
		})
		slices.SortFunc(ws.GrpcRoutes, func(a, b *pb.GRPCRoute) int {
			return cmp.Or(cmp.Compare(a.Namespace, b.Namespace), cmp.Compare(a.Name, b.Name))
		})
		// Traffic policies of the other services the routes send to.
		for _, b := range t.routeBackends[key] {
			if tp := t.wpTraffic[b]; tp != nil && b != key {
				if ws.BackendPolicies == nil {
					ws.BackendPolicies = map[string]*pb.TrafficPolicy{}
				}
				ws.BackendPolicies[b] = tp
			}
		}
		slices.SortFunc(ws.Authorizations, func(a, b *pb.Authorization) int {
			return cmp.Or(cmp.Compare(a.Namespace, b.Namespace), cmp.Compare(a.Name, b.Name))
		})
		slices.SortFunc(ws.RequestAuthentications, func(a, b *pb.RequestAuthentication) int {
			return cmp.Or(cmp.Compare(a.Namespace, b.Namespace), cmp.Compare(a.Name, b.Name))
		})
		out = append(out, ws)
	}
	return out
}

// waypointGateways builds one WaypointGateway per waypoint Gateway, empty
// when no policy targets it: a waypoint that has synced always has its own.
func (t *translator) waypointGateways() []*pb.WaypointGateway {
	out := make([]*pb.WaypointGateway, 0, len(t.waypoints))
	for _, key := range slices.Sorted(maps.Keys(t.waypoints)) {
		g := &pb.WaypointGateway{
			Gateway:                key,
			Authorizations:         slices.Clone(t.gwAuthz[key]),
			RequestAuthentications: slices.Clone(t.gwRequestAuthn[key]),
			TrafficPolicy:          t.gwTraffic[key],
		}
		slices.SortFunc(g.Authorizations, func(a, b *pb.Authorization) int {
			return cmp.Or(cmp.Compare(a.Namespace, b.Namespace), cmp.Compare(a.Name, b.Name))
		})
		slices.SortFunc(g.RequestAuthentications, func(a, b *pb.RequestAuthentication) int {
			return cmp.Or(cmp.Compare(a.Namespace, b.Namespace), cmp.Compare(a.Name, b.Name))
		})
		out = append(out, g)
	}
	return out
}
