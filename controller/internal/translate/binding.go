package translate

import (
	"cmp"
	"fmt"
	"slices"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/amesh-dev/amesh/controller/internal/label"
)

// KindService is the Kind of a Service's Status (its waypoint binding).
const KindService = "Service"

// ConditionWaypointBound is the Service status condition saying whether
// the Service's use-waypoint binding (its own label or its namespace's)
// took effect, like Istio's istio.io/WaypointBound.
const ConditionWaypointBound = "amesh.dev/WaypointBound"

// Reasons of ConditionWaypointBound and of binding problems.
const (
	ReasonBound = "Bound"
	// ReasonGatewayNotFound: the named Gateway does not exist; the
	// traffic bound to it is refused (see translator.boundWaypoint).
	ReasonGatewayNotFound = "GatewayNotFound"
	// ReasonNotAWaypoint: the Gateway is not of the waypoint class; the
	// traffic bound to it is refused (see translator.boundWaypoint).
	ReasonNotAWaypoint = "NotAWaypoint"
	// ReasonNotAllowed: the waypoint is in another namespace and its
	// Gateway's listeners do not admit the bound object's namespace; the
	// traffic bound to it is refused.
	ReasonNotAllowed = "NotAllowedByListeners"
	// ReasonWaypointForMismatch: the waypoint does not serve that kind of
	// traffic (its amesh.dev/waypoint-for label).
	ReasonWaypointForMismatch = "WaypointForMismatch"
	// ReasonWaypointUnavailable: the Gateway is of the waypoint class,
	// but it is being deleted, or that class is missing, not amesh's or
	// not accepted, so no waypoint runs for it: the traffic bound to it is
	// refused.
	ReasonWaypointUnavailable = "WaypointUnavailable"
)

// BindingProblem is a use-waypoint label on a Pod or Namespace that binds
// to nothing; those objects have no status for it, so the controller
// reports it as a Warning event.
type BindingProblem struct {
	Kind      string    `json:"kind"`
	Namespace string    `json:"namespace,omitempty"`
	Name      string    `json:"name"`
	UID       types.UID `json:"uid,omitempty"`
	Reason    string    `json:"reason"`
	Message   string    `json:"message"`
}

// explainBinding says why a binding does not give traffic of that kind
// (services or workloads) a waypoint; ok when it does.
func (t *translator) explainBinding(b binding, services bool) (w *waypoint, reason, msg string) {
	w = t.boundWaypoint(b)
	switch {
	case w.unavailable && w.serving(services):
		return nil, w.reason, w.unavailableMessage()
	case w.serving(services):
		return w, ReasonBound, fmt.Sprintf("bound to waypoint %s", b.key)
	}
	what := "services"
	if !services {
		what = "workloads"
	}
	return nil, ReasonWaypointForMismatch, fmt.Sprintf("waypoint %s does not serve %s (%s=%s): traffic does not go through it",
		b.key, what, label.WaypointFor, w.serves)
}

// serviceStatuses computes the WaypointBound condition of every Service
// whose binding (own label, or its namespace's when that binding is broken
// for every kind of traffic) must be reported, and an empty status for
// Services that carry a stale one. Services whose condition is already as
// desired are left out.
func (t *translator) serviceStatuses() []Status {
	var out []Status
	for _, svc := range t.in.Services {
		if svc.DeletionTimestamp != nil {
			continue
		}
		var want *metav1.Condition
		if c, ok := t.serviceBinding(svc); ok {
			c.ObservedGeneration = svc.Generation
			want = &c
		}
		have := meta.FindStatusCondition(svc.Status.Conditions, ConditionWaypointBound)
		if sameCondition(have, want) {
			continue
		}
		s := Status{Kind: KindService, Namespace: svc.Namespace, Name: svc.Name, Generation: svc.Generation}
		if want != nil {
			s.Conditions = []metav1.Condition{*want}
		}
		out = append(out, s)
	}
	sortStatuses(out)
	return out
}

// serviceBinding is the WaypointBound condition of a Service; ok is false
// when there is nothing to report.
func (t *translator) serviceBinding(svc *corev1.Service) (metav1.Condition, bool) {
	if t.isWaypointService(svc) || svc.Spec.Type == corev1.ServiceTypeExternalName {
		return metav1.Condition{}, false
	}
	own := bindingFrom(svc.Labels, svc.Namespace)
	b := t.bindingFor(svc.Labels, svc.Namespace)
	if !b.set || b.none {
		return metav1.Condition{}, false
	}
	w, reason, msg := t.explainBinding(b, true)
	if !own.set && reason == ReasonWaypointForMismatch {
		// A namespace label naming a waypoint for workloads binds the
		// namespace's workloads: nothing wrong for its Services.
		return metav1.Condition{}, false
	}
	if !own.set {
		msg += " (from the namespace's " + label.UseWaypoint + " label)"
	}
	return condition(ConditionWaypointBound, w != nil, reason, msg), true
}

func sameCondition(have, want *metav1.Condition) bool {
	switch {
	case have == nil || want == nil:
		return have == nil && want == nil
	}
	return have.Status == want.Status && have.Reason == want.Reason && have.Message == want.Message &&
		have.ObservedGeneration == want.ObservedGeneration
}

// namespaceProblems reports namespaces whose use-waypoint label binds to
// nothing at all (no such Gateway, not a waypoint, or one that serves
// nothing).
func (t *translator) namespaceProblems() []BindingProblem {
	var out []BindingProblem
	for _, ns := range t.in.Namespaces {
		b := bindingFrom(ns.Labels, ns.Name)
		if !b.set || b.none || ns.DeletionTimestamp != nil {
			continue
		}
		w, reason, msg := t.explainBinding(b, true)
		if w != nil {
			continue
		}
		if ww, _, _ := t.explainBinding(b, false); ww != nil {
			continue // a waypoint for the namespace's workloads
		}
		if reason == ReasonWaypointForMismatch {
			msg = fmt.Sprintf("waypoint %s serves neither services nor workloads (%s=%s)", b.key, label.WaypointFor, label.WaypointForNone)
		}
		out = append(out, BindingProblem{Kind: "Namespace", Name: ns.Name, UID: ns.UID, Reason: reason,
			Message: fmt.Sprintf("%s=%s: %s", label.UseWaypoint, ns.Labels[label.UseWaypoint], msg)})
	}
	return out
}

// podProblem reports a pod whose own use-waypoint label binds to nothing.
func (t *translator) podProblem(pod *corev1.Pod) *BindingProblem {
	b := bindingFrom(pod.Labels, pod.Namespace)
	if !b.set || b.none || t.waypointPod(pod) != nil {
		return nil
	}
	w, reason, msg := t.explainBinding(b, false)
	if w != nil {
		return nil
	}
	return &BindingProblem{Kind: "Pod", Namespace: pod.Namespace, Name: pod.Name, UID: pod.UID, Reason: reason,
		Message: fmt.Sprintf("%s=%s: %s", label.UseWaypoint, pod.Labels[label.UseWaypoint], msg)}
}

// bindingProblems merges the context's problems with the pods'.
func (t *translator) bindingProblems(pods []*podResult) []BindingProblem {
	out := slices.Clone(t.outNamespaceProblems)
	for _, p := range pods {
		if p.problem != nil {
			out = append(out, *p.problem)
		}
	}
	slices.SortFunc(out, func(a, b BindingProblem) int {
		return cmp.Or(cmp.Compare(a.Kind, b.Kind), cmp.Compare(a.Namespace, b.Namespace), cmp.Compare(a.Name, b.Name))
	})
	return out
}
