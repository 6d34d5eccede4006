package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// WorkloadSelector selects the pods of the policy's namespace (of every
// namespace when the policy lives in the mesh root namespace) whose labels
// contain all of matchLabels.
type WorkloadSelector struct {
	// MatchLabels are the labels a pod must carry to be selected. An empty
	// map selects every pod in scope.
	// +optional
	// +kubebuilder:validation:MaxProperties=64
	MatchLabels map[string]string `json:"matchLabels,omitempty"`
}

// PolicyTargetReference names the object a policy attaches to, in the
// Gateway API policy-attachment style: a waypoint Gateway or a Service in the
// policy's namespace.
//
// +kubebuilder:validation:XValidation:rule="(self.group == 'gateway.networking.k8s.io' && self.kind == 'Gateway') || (size(self.group) == 0 && self.kind == 'Service')",message="targetRefs may name a Gateway (group gateway.networking.k8s.io) or a Service (core group)"
type PolicyTargetReference struct {
	// Group of the target: "gateway.networking.k8s.io" or "" (core).
	// +kubebuilder:validation:MaxLength=253
	// +kubebuilder:validation:Pattern=`^$|^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$`
	// +required
	Group string `json:"group"`
	// Kind of the target: "Gateway" or "Service".
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=63
	// +required
	Kind string `json:"kind"`
	// Name of the target.
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=253
	// +required
	Name string `json:"name"`
}

// PolicyStatus is the observed state of a policy.
type PolicyStatus struct {
	// ObservedGeneration is the metadata.generation the status was computed
	// for.
	// +optional
	ObservedGeneration int64 `json:"observedGeneration,omitempty"`
	// Conditions describe whether and where the policy is enforced.
	// +optional
	// +listType=map
	// +listMapKey=type
	// +kubebuilder:validation:MaxItems=8
	Conditions []metav1.Condition `json:"conditions,omitempty"`
}

// Condition types reported in PolicyStatus.
const (
	// ConditionAccepted is True when the policy is valid and translated.
	ConditionAccepted = "Accepted"
	// ConditionZtunnelAccepted reports whether ztunnel enforces the whole
	// policy. It is False with reason ReasonWaypointRequired when rules
	// matching HTTP attributes had to be dropped (ALLOW) or narrowed to
	// their L4 part (DENY) for ztunnel.
	ConditionZtunnelAccepted = "ZtunnelAccepted"
	// ConditionWaypointAccepted reports whether the waypoints the policy
	// targets enforce it.
	ConditionWaypointAccepted = "WaypointAccepted"
	// ConditionConflicted is True when another policy takes precedence
	// over this one for some of the workloads it selects.
	ConditionConflicted = "Conflicted"
)

// Condition reasons reported in PolicyStatus.
const (
	ReasonAccepted         = "Accepted"
	ReasonInvalid          = "Invalid"
	ReasonWaypointRequired = "WaypointRequired"
	ReasonNotApplicable    = "NotApplicable"
	ReasonTargetNotFound   = "TargetNotFound"
	ReasonConflicted       = "Conflicted"
	ReasonNoConflict       = "NoConflict"
	ReasonEnforced         = "Enforced"
)
