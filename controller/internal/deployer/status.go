package deployer

import (
	"fmt"
	"slices"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/validation"
	metav1ac "k8s.io/client-go/applyconfigurations/meta/v1"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
	gwac "sigs.k8s.io/gateway-api/applyconfiguration/apis/v1"

	"github.com/amesh-dev/amesh/controller/internal/gatewayclass"
	"github.com/amesh-dev/amesh/controller/internal/label"
)

// ProtocolHBONE is the protocol of a waypoint's listener.
const ProtocolHBONE gwv1.ProtocolType = "HBONE"

// ConditionForServiceAccount is the Gateway condition type that says
// whether a waypoint annotated amesh.dev/for-service-account serves that
// service account's workloads (False with ReasonConflicted when an older
// waypoint claims it).
const (
	ConditionForServiceAccount = "amesh.dev/ForServiceAccount"
	ReasonServing              = "Serving"
	ReasonConflicted           = "Conflicted"
	ReasonNotServing           = "NotServing"
)

// cond is a condition before it becomes an apply configuration.
type cond struct {
	typ     string
	status  bool
	reason  string
	message string
}

// listenerVerdict is the judgement of one listener.
type listenerVerdict struct {
	name   gwv1.SectionName
	ok     bool
	reason gwv1.ListenerConditionReason
	msg    string
}

// verdict is what the deployer makes of a Gateway before deploying it.
type verdict struct {
	accepted  cond
	listeners []listenerVerdict
	// notes are remarks added to the Accepted message (e.g. an unknown
	// waypoint-for value).
	notes []string
}

func (v verdict) deploy() bool { return v.accepted.status }

// evaluate checks a waypoint Gateway against what amesh implements.
func evaluate(gw *gwv1.Gateway) verdict {
	var v verdict
	for _, l := range gw.Spec.Listeners {
		v.listeners = append(v.listeners, checkListener(l))
	}
	invalid := func(reason gwv1.GatewayConditionReason, format string, a ...any) verdict {
		v.accepted = cond{string(gwv1.GatewayConditionAccepted), false, string(reason), fmt.Sprintf(format, a...)}
		return v
	}
	if msgs := validation.IsDNS1035Label(gw.Name); len(msgs) > 0 {
		return invalid(gwv1.GatewayReasonInvalid,
			"a waypoint's name must be a DNS-1035 label because it names its Service: %s", strings.Join(msgs, "; "))
	}
	if len(gw.Spec.Addresses) > 0 {
		return invalid(gwv1.GatewayReasonUnsupportedAddress,
			"a waypoint's address is the cluster IP of its Service; spec.addresses is not supported")
	}
	if inf := gw.Spec.Infrastructure; inf != nil && inf.ParametersRef != nil {
		return invalid(gwv1.GatewayReasonInvalidParameters,
			"amesh waypoints take no parameters; remove spec.infrastructure.parametersRef (%s %s)", inf.ParametersRef.Kind, inf.ParametersRef.Name)
	}
	if sa, ok := gw.Annotations[label.ForServiceAccount]; ok {
		if msgs := validation.IsDNS1123Subdomain(sa); len(msgs) > 0 {
			return invalid(gwv1.GatewayReasonInvalid, "annotation %s=%q is not a service account name: %s",
				label.ForServiceAccount, sa, strings.Join(msgs, "; "))
		}
	}
	switch f, ok := gw.Labels[label.WaypointFor]; {
	case !ok:
	case f == label.WaypointForService, f == label.WaypointForWorkload, f == label.WaypointForAll, f == label.WaypointForNone:
	default:
		v.notes = append(v.notes, fmt.Sprintf("label %s=%q is not service, workload, all or none: the waypoint serves %q",
			label.WaypointFor, f, label.WaypointForService))
	}

	var good int
	var bad []string
	for _, l := range v.listeners {
		if l.ok {
			good++
		} else {
			bad = append(bad, string(l.name))
		}
	}
	switch {
	case good == 0:
		return invalid(gwv1.GatewayReasonListenersNotValid,
			"a waypoint needs the listener {name: mesh, port: %d, protocol: %s}", portHBONE, ProtocolHBONE)
	case len(bad) > 0:
		v.accepted = cond{string(gwv1.GatewayConditionAccepted), true, string(gwv1.GatewayReasonListenersNotValid),
			fmt.Sprintf("listeners %s are not valid and are ignored; the waypoint serves HBONE on %d", strings.Join(bad, ", "), portHBONE)}
	default:
		v.accepted = cond{string(gwv1.GatewayConditionAccepted), true, string(gwv1.GatewayReasonAccepted), "the waypoint is accepted"}
	}
	if len(v.notes) > 0 {
		v.accepted.message += "; " + strings.Join(v.notes, "; ")
	}
	return v
}

// checkListener accepts only HBONE on 15008.
func checkListener(l gwv1.Listener) listenerVerdict {
	v := listenerVerdict{name: l.Name}
	switch {
	case l.Protocol != ProtocolHBONE:
		v.reason = gwv1.ListenerReasonUnsupportedProtocol
		v.msg = fmt.Sprintf("protocol %s is not supported by waypoints: use %s on port %d", l.Protocol, ProtocolHBONE, portHBONE)
	case l.Port != portHBONE:
		v.reason = gwv1.ListenerReasonPortUnavailable
		v.msg = fmt.Sprintf("waypoints serve %s on port %d only, not %d", ProtocolHBONE, portHBONE, l.Port)
	case l.TLS != nil:
		v.reason = gwv1.ListenerReasonUnsupportedValue
		v.msg = fmt.Sprintf("%s listeners take no tls: the mesh identity secures them", ProtocolHBONE)
	default:
		v.ok = true
		v.reason = gwv1.ListenerReasonAccepted
		v.msg = "the listener is accepted"
	}
	return v
}

// observed is what the deployer found after applying the objects.
type observed struct {
	// conflict, when set, is why the objects could not be deployed.
	conflict string
	// clusterIP of the waypoint's Service, when assigned.
	clusterIP string
	hostname  string
	// available and desired replicas of the Deployment.
	available, desired int32
	// missingRootCert names the root certificate ConfigMap when it is
	// not in the waypoint's namespace (its pods cannot start without it).
	missingRootCert string
	// forSA is the per-service-account condition, when the Gateway has
	// the annotation.
	forSA *cond
}

// programmed is the Gateway's Programmed condition.
func programmed(v verdict, o observed) cond {
	typ := string(gwv1.GatewayConditionProgrammed)
	switch {
	case !v.deploy():
		return cond{typ, false, string(gwv1.GatewayReasonInvalid), "the Gateway is not accepted: " + v.accepted.message}
	case o.conflict != "":
		return cond{typ, false, string(gwv1.GatewayReasonInvalid), o.conflict}
	case o.clusterIP == "":
		return cond{typ, false, string(gwv1.GatewayReasonAddressNotAssigned), "waiting for the cluster IP of the waypoint's Service"}
	case o.available < 1:
		msg := fmt.Sprintf("waiting for the waypoint Deployment: %d of %d replicas available", o.available, o.desired)
		if o.missingRootCert != "" {
			msg += fmt.Sprintf("; its pods cannot start before the ConfigMap %s exists in the namespace "+
				"(the amesh controller's leader publishes it in every namespace holding a waypoint)", o.missingRootCert)
		}
		return cond{typ, false, string(gwv1.GatewayReasonPending), msg}
	}
	return cond{typ, true, string(gwv1.GatewayReasonProgrammed),
		fmt.Sprintf("the waypoint serves HBONE at %s:%d (%d of %d replicas available)", o.clusterIP, portHBONE, o.available, o.desired)}
}

// gatewayStatus is the status the deployer owns on a Gateway: Accepted,
// Programmed, the per-service-account condition, the addresses and the
// listeners. Transition times are kept for conditions whose status did
// not change.
func gatewayStatus(gw *gwv1.Gateway, v verdict, o observed, now time.Time) *gwac.GatewayStatusApplyConfiguration {
	gen := gw.Generation
	prog := programmed(v, o)
	conds := []cond{v.accepted, prog}
	if o.forSA != nil {
		conds = append(conds, *o.forSA)
	}
	st := gwac.GatewayStatus()
	for _, c := range conds {
		st.WithConditions(applyCond(gw.Status.Conditions, c, gen, now))
	}
	if v.deploy() && o.conflict == "" {
		if o.clusterIP != "" && o.clusterIP != corev1.ClusterIPNone {
			st.WithAddresses(gwac.GatewayStatusAddress().WithType(gwv1.IPAddressType).WithValue(o.clusterIP))
		}
		if o.hostname != "" {
			st.WithAddresses(gwac.GatewayStatusAddress().WithType(gwv1.HostnameAddressType).WithValue(o.hostname))
		}
	}
	for _, l := range v.listeners {
		var old []metav1.Condition
		for _, ls := range gw.Status.Listeners {
			if ls.Name == l.name {
				old = ls.Conditions
			}
		}
		lp := cond{string(gwv1.ListenerConditionProgrammed), false, string(gwv1.ListenerReasonInvalid), l.msg}
		if l.ok {
			lp = cond{string(gwv1.ListenerConditionProgrammed), prog.status, string(gwv1.ListenerReasonProgrammed), prog.message}
			if !prog.status {
				lp.reason = string(gwv1.ListenerReasonPending)
				if !v.deploy() || o.conflict != "" {
					lp.reason = string(gwv1.ListenerReasonInvalid)
				}
			}
		}
		ls := gwac.ListenerStatus().
			WithName(l.name).
			WithAttachedRoutes(0).
			WithConditions(
				applyCond(old, cond{string(gwv1.ListenerConditionAccepted), l.ok, string(l.reason), l.msg}, gen, now),
				applyCond(old, lp, gen, now),
				applyCond(old, cond{string(gwv1.ListenerConditionResolvedRefs), true, string(gwv1.ListenerReasonResolvedRefs), "no references to resolve"}, gen, now),
				applyCond(old, cond{string(gwv1.ListenerConditionConflicted), false, string(gwv1.ListenerReasonNoConflicts), "no conflicts"}, gen, now),
			)
		st.WithListeners(ls)
	}
	return st
}

// applyCond turns c into an apply configuration, keeping the transition
// time of the same condition in old when its status is unchanged.
func applyCond(old []metav1.Condition, c cond, gen int64, now time.Time) *metav1ac.ConditionApplyConfiguration {
	status := metav1.ConditionFalse
	if c.status {
		status = metav1.ConditionTrue
	}
	ltt := metav1.NewTime(now.Truncate(time.Second))
	if prev := meta.FindStatusCondition(old, c.typ); prev != nil && prev.Status == status {
		ltt = prev.LastTransitionTime
	}
	return metav1ac.Condition().
		WithType(c.typ).
		WithStatus(status).
		WithReason(c.reason).
		WithMessage(truncate(c.message, 32768)).
		WithObservedGeneration(gen).
		WithLastTransitionTime(ltt)
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n]
}

// forServiceAccount decides the per-service-account condition of gw among
// the waypoints of its namespace: the oldest claimant (then by name) wins,
// as the translator decides.
func forServiceAccount(gw *gwv1.Gateway, siblings []gwv1.Gateway, class string) *cond {
	sa, ok := gw.Annotations[label.ForServiceAccount]
	if !ok {
		return nil
	}
	if gw.Labels[label.WaypointFor] == label.WaypointForNone {
		return &cond{ConditionForServiceAccount, false, ReasonNotServing,
			fmt.Sprintf("label %s=none: the waypoint serves no workloads of service account %s", label.WaypointFor, sa)}
	}
	var claims []metav1.ObjectMeta
	for i := range siblings {
		s := &siblings[i]
		if s.Namespace != gw.Namespace || string(s.Spec.GatewayClassName) != class || s.DeletionTimestamp != nil ||
			s.Annotations[label.ForServiceAccount] != sa || s.Labels[label.WaypointFor] == label.WaypointForNone {
			continue
		}
		claims = append(claims, s.ObjectMeta)
	}
	if !slices.ContainsFunc(claims, func(m metav1.ObjectMeta) bool { return m.Name == gw.Name }) {
		claims = append(claims, gw.ObjectMeta)
	}
	slices.SortFunc(claims, olderFirst)
	if w := claims[0]; w.Name != gw.Name {
		return &cond{ConditionForServiceAccount, false, ReasonConflicted,
			fmt.Sprintf("service account %s is already served by the older waypoint %s; this waypoint does not serve its workloads", sa, w.Name)}
	}
	msg := fmt.Sprintf("the waypoint serves the workloads running as service account %s", sa)
	if len(claims) > 1 {
		var others []string
		for _, c := range claims[1:] {
			others = append(others, c.Name)
		}
		msg += fmt.Sprintf(" (newer waypoints claiming it too: %s)", strings.Join(others, ", "))
	}
	return &cond{ConditionForServiceAccount, true, ReasonServing, msg}
}

// olderFirst orders by creation time, then name (the translator's
// tie-break).
func olderFirst(a, b metav1.ObjectMeta) int {
	if c := a.CreationTimestamp.Compare(b.CreationTimestamp.Time); c != 0 {
		return c
	}
	return strings.Compare(a.Name, b.Name)
}

// gatewayClassAccepted is the Accepted condition of a GatewayClass that
// names this controller.
func gatewayClassAccepted(gc *gwv1.GatewayClass, class string) cond {
	ok, reason, msg := gatewayclass.Accepted(gc, class)
	return cond{string(gwv1.GatewayClassConditionStatusAccepted), ok, string(reason), msg}
}
