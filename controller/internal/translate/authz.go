package translate

import (
	"cmp"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"

	pb "github.com/amesh-dev/amesh/api/discovery/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/amesh-dev/amesh/controller/apis/security/v1alpha1"
)

// l4ConditionKey reports whether ztunnel understands a "when" key.
func l4ConditionKey(k string) bool {
	switch k {
	case "source.ip", "source.namespace", "source.principal", "destination.port":
		return true
	}
	return false
}

// authorizations translates the AuthorizationPolicies ztunnel enforces
// (selector, namespace and mesh scope) into their L4 form, and keeps those
// with targetRefs, in full, for the waypoints they attach to.
func (t *translator) authorizations() []*pb.Authorization {
	var out []*pb.Authorization
	for _, ap := range t.in.AuthorizationPolicies {
		if ap.DeletionTimestamp != nil {
			continue
		}
		if len(ap.Spec.TargetRefs) > 0 {
			t.waypointAuthorization(ap)
			continue
		}
		a, res := t.translateAuthorization(ap, true)
		name := a.Namespace + "/" + a.Name
		sel := ap.Spec.Selector
		switch {
		case sel == nil || len(sel.MatchLabels) == 0:
			a.Scope = pb.Authorization_SCOPE_NAMESPACE
			if ap.Namespace == t.cfg.RootNamespace {
				a.Scope = pb.Authorization_SCOPE_GLOBAL
			}
		default:
			a.Scope = pb.Authorization_SCOPE_WORKLOAD
			t.indexSelector(ap.Namespace, name, sel.MatchLabels)
		}
		out = append(out, a)
		t.acceptedCondition(v1alpha1.ConditionAccepted, ap, res)
		switch {
		case len(res.l7) == 0:
			t.setCondition(KindAuthorizationPolicy, ap.ObjectMeta, condition(v1alpha1.ConditionZtunnelAccepted, true,
				v1alpha1.ReasonEnforced, "ztunnel enforces every rule of the policy"))
		case ap.Spec.Action == v1alpha1.ActionDeny:
			t.setCondition(KindAuthorizationPolicy, ap.ObjectMeta, condition(v1alpha1.ConditionZtunnelAccepted, false,
				v1alpha1.ReasonWaypointRequired, fmt.Sprintf(
					"ztunnel cannot match HTTP attributes (%s): the DENY rules using them are enforced on their L4 part only, "+
						"which denies more than requested; use a waypoint and targetRefs to enforce them as written",
					strings.Join(res.l7, ", "))))
		default:
			t.setCondition(KindAuthorizationPolicy, ap.ObjectMeta, condition(v1alpha1.ConditionZtunnelAccepted, false,
				v1alpha1.ReasonWaypointRequired, fmt.Sprintf(
					"ztunnel cannot match HTTP attributes (%s): the ALLOW rules using them are omitted, "+
						"which allows less than requested; use a waypoint and targetRefs to enforce them as written",
					strings.Join(res.l7, ", "))))
		}
	}
	slices.SortFunc(out, func(a, b *pb.Authorization) int {
		return cmp.Or(cmp.Compare(a.Namespace, b.Namespace), cmp.Compare(a.Name, b.Name))
	})
	return out
}

// indexSelector records a WORKLOAD-scope policy under its smallest label:
// a pod can match only if it carries that exact label.
func (t *translator) indexSelector(ns, name string, labels map[string]string) {
	k := slices.Min(slices.Collect(maps.Keys(labels)))
	kv := k + "=" + labels[k]
	sel := apSelector{name: name, labels: labels}
	if ns == t.cfg.RootNamespace {
		t.apRoot[kv] = append(t.apRoot[kv], sel)
		return
	}
	idx := t.apSelectors[ns]
	if idx == nil {
		idx = map[string][]apSelector{}
		t.apSelectors[ns] = idx
	}
	idx[kv] = append(idx[kv], sel)
}

// podAuthorizations lists the WORKLOAD-scope policies selecting pod: those
// of its namespace, and those of the root namespace (which select in every
// namespace).
func (t *translator) podAuthorizations(pod *corev1.Pod) []string {
	if len(t.apRoot) == 0 && len(t.apSelectors[pod.Namespace]) == 0 {
		return nil
	}
	var out []string
	idx := t.apSelectors[pod.Namespace]
	for k, v := range pod.Labels {
		kv := k + "=" + v
		for _, l := range [][]apSelector{idx[kv], t.apRoot[kv]} {
			for _, s := range l {
				if selects(s.labels, pod.Labels) {
					out = append(out, s.name)
				}
			}
		}
	}
	slices.Sort(out)
	return slices.Compact(out)
}

// translation collects what a policy translation had to change.
type translation struct {
	// l7 lists the L7 attributes found (for ztunnel: dropped or narrowed).
	l7 []string
	// invalid lists values that could not be translated.
	invalid []string
}

func (r *translation) addL7(attr string) {
	if !slices.Contains(r.l7, attr) {
		r.l7 = append(r.l7, attr)
	}
}

func (t *translator) acceptedCondition(typ string, ap *v1alpha1.AuthorizationPolicy, res translation) {
	if len(res.invalid) > 0 {
		t.setCondition(KindAuthorizationPolicy, ap.ObjectMeta, condition(typ, false, v1alpha1.ReasonInvalid,
			"invalid values ("+strings.Join(res.invalid, "; ")+"): ALLOW rules using them are omitted and DENY rules ignore them"))
		return
	}
	t.setCondition(KindAuthorizationPolicy, ap.ObjectMeta, condition(typ, true, v1alpha1.ReasonAccepted, "the policy is valid"))
}

// translateAuthorization converts a policy. With l4Only, attributes
// ztunnel cannot see are handled fail-safe: an ALLOW rule using any of them
// is omitted (it can only allow less), a DENY rule loses them (it can only
// deny more). Invalid values are handled the same way.
func (t *translator) translateAuthorization(ap *v1alpha1.AuthorizationPolicy, l4Only bool) (*pb.Authorization, translation) {
	var res translation
	a := &pb.Authorization{
		Name:      ap.Name,
		Namespace: ap.Namespace,
		Action:    pb.Authorization_ACTION_ALLOW,
	}
	deny := ap.Spec.Action == v1alpha1.ActionDeny
	if deny {
		a.Action = pb.Authorization_ACTION_DENY
	}
	for _, r := range ap.Spec.Rules {
		var rr translation
		rule := convertRule(r, t.cfg.TrustDomain, l4Only, &rr)
		res.l7 = append(res.l7, rr.l7...)
		res.invalid = append(res.invalid, rr.invalid...)
		if !deny && (len(rr.invalid) > 0 || (l4Only && len(rr.l7) > 0)) {
			a.L7Dropped = a.L7Dropped || (l4Only && len(rr.l7) > 0)
			continue // an ALLOW rule that cannot be enforced as written allows nothing
		}
		if l4Only && len(rr.l7) > 0 {
			a.L7Dropped = true
		}
		a.Rules = append(a.Rules, rule)
	}
	slices.Sort(res.l7)
	res.l7 = slices.Compact(res.l7)
	return a, res
}

// convertRule converts one rule; with l4Only it leaves out L7 attributes
// and records them in res. td is the mesh's trust domain (service accounts
// become principals in it).
func convertRule(r v1alpha1.Rule, td string, l4Only bool, res *translation) *pb.Rule {
	out := &pb.Rule{}
	for _, f := range r.From {
		s := f.Source
		src := &pb.Source{
			Principals:    principals(s.Principals),
			NotPrincipals: principals(s.NotPrincipals),
			Namespaces:    slices.Clone(s.Namespaces),
			NotNamespaces: slices.Clone(s.NotNamespaces),
			IpBlocks:      slices.Clone(s.IPBlocks),
			NotIpBlocks:   slices.Clone(s.NotIPBlocks),
		}
		// Service accounts are principals in the mesh's trust domain,
		// understood by ztunnel and waypoints alike. Both lists match
		// exactly what they name (a service account name has no "*").
		sas := serviceAccountPrincipals(s.ServiceAccounts, td, res)
		if len(s.ServiceAccounts) > 0 && len(s.Principals) > 0 {
			// The peer would have to match both lists, which one list
			// of principals cannot say (admission refuses this): the
			// service accounts are ignored, so an ALLOW rule is
			// omitted and a DENY rule denies more, never less.
			res.invalid = append(res.invalid, "serviceAccounts together with principals")
		} else {
			src.Principals = append(src.Principals, sas...)
		}
		// Not one of the principals and not one of the service
		// accounts: one list of exclusions says both.
		src.NotPrincipals = append(src.NotPrincipals, serviceAccountPrincipals(s.NotServiceAccounts, td, res)...)
		if len(s.RequestPrincipals) > 0 {
			res.addL7("requestPrincipals")
		}
		if len(s.NotRequestPrincipals) > 0 {
			res.addL7("notRequestPrincipals")
		}
		if !l4Only {
			src.RequestPrincipals = slices.Clone(s.RequestPrincipals)
			src.NotRequestPrincipals = slices.Clone(s.NotRequestPrincipals)
		}
		out.From = append(out.From, src)
	}
	for _, to := range r.To {
		o := to.Operation
		op := &pb.Operation{
			Ports:    ports(o.Ports, res),
			NotPorts: ports(o.NotPorts, res),
		}
		for _, f := range []struct {
			name string
			v    []string
			dst  *[]string
		}{
			{"hosts", o.Hosts, &op.Hosts},
			{"notHosts", o.NotHosts, &op.NotHosts},
			{"methods", o.Methods, &op.Methods},
			{"notMethods", o.NotMethods, &op.NotMethods},
			{"paths", o.Paths, &op.Paths},
			{"notPaths", o.NotPaths, &op.NotPaths},
		} {
			if len(f.v) == 0 {
				continue
			}
			res.addL7(f.name)
			if !l4Only {
				*f.dst = slices.Clone(f.v)
			}
		}
		out.To = append(out.To, op)
	}
	for _, c := range r.When {
		if !l4ConditionKey(c.Key) {
			res.addL7("when " + c.Key)
			if l4Only {
				continue
			}
		}
		cond := &pb.Condition{
			Key:       c.Key,
			Values:    slices.Clone(c.Values),
			NotValues: slices.Clone(c.NotValues),
		}
		if c.Key == "source.principal" {
			cond.Values, cond.NotValues = principals(c.Values), principals(c.NotValues)
		}
		out.When = append(out.When, cond)
	}
	return out
}

// principals returns peer principals in the data plane's form, without the
// "spiffe://" scheme: ztunnel and waypoints compare them with the peer's
// SPIFFE ID stripped of it. A principal written as a full SPIFFE ID
// ("spiffe://cluster.local/ns/a/sa/b", a natural way to name a peer) would
// otherwise never match — a DENY silently not enforced — so the scheme is
// removed (in any letter case: the scheme is case-insensitive, the data
// plane's IDs are lower case). Patterns keep their wildcards
// ("spiffe://cluster.local/*" becomes "cluster.local/*").
func principals(ps []string) []string {
	if ps == nil {
		return nil
	}
	out := make([]string, len(ps))
	for i, p := range ps {
		if len(p) >= len(spiffeScheme) && strings.EqualFold(p[:len(spiffeScheme)], spiffeScheme) {
			p = p[len(spiffeScheme):]
		}
		out[i] = p
	}
	return out
}

const spiffeScheme = "spiffe://"

// serviceAccountPrincipals turns "<namespace>/<name>" service accounts into
// principals "<td>/ns/<namespace>/sa/<name>"; malformed ones are recorded
// in res and left out.
func serviceAccountPrincipals(sas []string, td string, res *translation) []string {
	var out []string
	for _, sa := range sas {
		ns, name, ok := strings.Cut(sa, "/")
		if !ok || len(validation.IsDNS1123Label(ns)) > 0 || len(validation.IsDNS1123Subdomain(name)) > 0 {
			res.invalid = append(res.invalid, fmt.Sprintf("service account %q (want <namespace>/<name>)", sa))
			continue
		}
		out = append(out, td+"/ns/"+ns+"/sa/"+name)
	}
	return out
}

// ports parses port strings; bad ones are recorded and left out.
func ports(ps []v1alpha1.Port, res *translation) []uint32 {
	var out []uint32
	for _, p := range ps {
		n, err := strconv.ParseUint(string(p), 10, 16)
		if err != nil || n == 0 {
			res.invalid = append(res.invalid, fmt.Sprintf("port %q", p))
			continue
		}
		out = append(out, uint32(n))
	}
	return out
}
