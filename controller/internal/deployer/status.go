package deployer

import (
	"fmt"
	"slices"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	metav1ac "k8s.io/client-go/applyconfigurations/meta/v1"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
	gwac "sigs.k8s.io/gateway-api/applyconfiguration/apis/v1"

	"github.com/amesh-dev/amesh/controller/internal/gatewayclass"
	"github.com/amesh-dev/amesh/controller/internal/label"
)

// ConditionForServiceAccount is the Gateway condition type that says
// whether a waypoint annotated amesh.dev/for-service-account serves that
// service account's workloads (False with ReasonConflicted when an older
// waypoint claims it).
const (
	ConditionForServiceAccount = "amesh.dev/ForServiceAccount"
	ReasonServing              = "Serving"
	ReasonConflicted           = "Conflicted"
	ReasonNotServing           = "NotServing"
	// ReasonWaypointForMismatch: the waypoint claims the service account
	// but its waypoint-for label says it serves no workload traffic.
	ReasonWaypointForMismatch = "WaypointForMismatch"
	// ReasonWaypointUnavailable: the waypoint claims the service account
	// but cannot run (not accepted, or blocked by another object of its
	// name); the workloads' traffic is refused.
	ReasonWaypointUnavailable = "WaypointUnavailable"
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
}

func (v verdict) deploy() bool { return v.accepted.status }

// evaluate checks a waypoint Gateway against what amesh implements, by the
// rule the translator and the authorizer share (gatewayclass.CheckGateway).
func evaluate(gw *gwv1.Gateway) verdict {
	cv := gatewayclass.CheckGateway(gw)
	v := verdict{accepted: cond{string(gwv1.GatewayConditionAccepted), cv.Accepted, string(cv.Reason), cv.Message}}
	for _, l := range cv.Listeners {
		v.listeners = append(v.listeners, listenerVerdict{name: l.Name, ok: l.OK, reason: l.Reason, msg: l.Message})
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
// as the translator decides, whether or not it can be deployed: a claimant
// that cannot (unavailable says why) keeps its claim, and the translator
// refuses the service account's traffic rather than let it bypass the
// waypoint.
func forServiceAccount(gw *gwv1.Gateway, siblings []gwv1.Gateway, class, unavailable string) *cond {
	sa, ok := gw.Annotations[label.ForServiceAccount]
	if !ok {
		return nil
	}
	switch f := gatewayclass.Serves(gw); {
	case f == label.WaypointForNone:
		return &cond{ConditionForServiceAccount, false, ReasonNotServing,
			fmt.Sprintf("label %s=none: the waypoint serves no workloads of service account %s", label.WaypointFor, sa)}
	case !gatewayclass.ServesWorkloads(f):
		// Reported, not resolved either way: the label decides.
		return &cond{ConditionForServiceAccount, false, ReasonWaypointForMismatch,
			fmt.Sprintf("label %s=%s: the waypoint does not serve workload-addressed traffic, so the workloads running as service account %s "+
				"do not go through it; set the label to %s or %s (or remove it) for them to",
				label.WaypointFor, f, sa, label.WaypointForWorkload, label.WaypointForAll)}
	}
	var claims []metav1.ObjectMeta
	for i := range siblings {
		s := &siblings[i]
		if s.Namespace != gw.Namespace || string(s.Spec.GatewayClassName) != class || s.DeletionTimestamp != nil ||
			s.Annotations[label.ForServiceAccount] != sa || !gatewayclass.ServesWorkloads(gatewayclass.Serves(s)) {
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
	if unavailable != "" {
		return &cond{ConditionForServiceAccount, false, ReasonWaypointUnavailable,
			fmt.Sprintf("the waypoint cannot run (%s): the traffic of the workloads running as service account %s "+
				"is refused until it can (or loses the annotation %s)", unavailable, sa, label.ForServiceAccount)}
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
