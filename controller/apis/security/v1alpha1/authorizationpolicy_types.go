package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// AuthorizationAction is what a matching AuthorizationPolicy does.
// +kubebuilder:validation:Enum=ALLOW;DENY
type AuthorizationAction string

// Authorization actions.
const (
	ActionAllow AuthorizationAction = "ALLOW"
	ActionDeny  AuthorizationAction = "DENY"
)

// AuthorizationPolicySpec is the desired behaviour of an AuthorizationPolicy.
//
// A policy with a selector, or with neither selector nor targetRefs, is
// enforced by ztunnel for the selected workloads (the whole namespace
// without a selector, the whole mesh in the root namespace); ztunnel
// understands only L4 attributes. A policy with targetRefs is enforced by
// the waypoints it names (a waypoint Gateway, or the waypoint serving a
// Service).
//
// Evaluation: if any DENY policy matches, the request is denied; otherwise
// if no ALLOW policy applies it is allowed; otherwise it is allowed only if
// some ALLOW policy matches. A policy matches when any rule matches; an ALLOW
// policy without rules therefore denies everything.
//
// +kubebuilder:validation:XValidation:rule="!(has(self.selector) && has(self.targetRefs))",message="selector and targetRefs are mutually exclusive"
type AuthorizationPolicySpec struct {
	// Selector picks the workloads the policy applies to at ztunnel.
	// +optional
	Selector *WorkloadSelector `json:"selector,omitempty"`
	// TargetRefs attach the policy to waypoints: a waypoint Gateway, or a
	// Service (enforced by the waypoint the Service is bound to).
	// +optional
	// +listType=atomic
	// +kubebuilder:validation:MinItems=1
	// +kubebuilder:validation:MaxItems=16
	TargetRefs []PolicyTargetReference `json:"targetRefs,omitempty"`
	// Action is ALLOW (default) or DENY.
	// +optional
	// +kubebuilder:default=ALLOW
	Action AuthorizationAction `json:"action,omitempty"`
	// Rules; the policy matches when any rule matches. An empty rule
	// matches everything.
	// +optional
	// +listType=atomic
	// +kubebuilder:validation:MaxItems=64
	Rules []Rule `json:"rules,omitempty"`
}

// Rule matches a request when each of its non-empty lists has at least one
// matching entry.
type Rule struct {
	// From lists sources.
	// +optional
	// +listType=atomic
	// +kubebuilder:validation:MaxItems=16
	From []RuleFrom `json:"from,omitempty"`
	// To lists operations.
	// +optional
	// +listType=atomic
	// +kubebuilder:validation:MaxItems=16
	To []RuleTo `json:"to,omitempty"`
	// When lists further conditions.
	// +optional
	// +listType=atomic
	// +kubebuilder:validation:MaxItems=8
	When []Condition `json:"when,omitempty"`
}

// RuleFrom wraps a Source (kept for Istio compatibility).
type RuleFrom struct {
	// +required
	Source Source `json:"source"`
}

// RuleTo wraps an Operation (kept for Istio compatibility).
type RuleTo struct {
	// +required
	Operation Operation `json:"operation"`
}

// Source matches the peer. Every non-empty field must match. String values
// match exactly, by prefix ("abc*"), by suffix ("*abc"), or any present
// value ("*").
//
// +kubebuilder:validation:XValidation:rule="has(self.principals) || has(self.notPrincipals) || has(self.requestPrincipals) || has(self.notRequestPrincipals) || has(self.namespaces) || has(self.notNamespaces) || has(self.serviceAccounts) || has(self.notServiceAccounts) || has(self.ipBlocks) || has(self.notIpBlocks)",message="a source needs at least one field"
// +kubebuilder:validation:XValidation:rule="!(has(self.serviceAccounts) || has(self.notServiceAccounts)) || !(has(self.principals) || has(self.notPrincipals) || has(self.namespaces) || has(self.notNamespaces))",message="serviceAccounts and notServiceAccounts cannot be combined with principals, notPrincipals, namespaces or notNamespaces"
type Source struct {
	// Principals are peer identities written without the "spiffe://"
	// scheme: "<trust-domain>/ns/<namespace>/sa/<service-account>". A
	// leading "spiffe://" is removed (so a full SPIFFE ID matches too),
	// here, in notPrincipals and in source.principal conditions.
	// +optional
	// +listType=atomic
	// +kubebuilder:validation:MaxItems=256
	// +kubebuilder:validation:items:MinLength=1
	// +kubebuilder:validation:items:MaxLength=512
	Principals []string `json:"principals,omitempty"`
	// +optional
	// +listType=atomic
	// +kubebuilder:validation:MaxItems=256
	// +kubebuilder:validation:items:MinLength=1
	// +kubebuilder:validation:items:MaxLength=512
	NotPrincipals []string `json:"notPrincipals,omitempty"`
	// RequestPrincipals are JWT "<issuer>/<subject>" values (L7: waypoint
	// only).
	// +optional
	// +listType=atomic
	// +kubebuilder:validation:MaxItems=256
	// +kubebuilder:validation:items:MinLength=1
	// +kubebuilder:validation:items:MaxLength=1024
	RequestPrincipals []string `json:"requestPrincipals,omitempty"`
	// +optional
	// +listType=atomic
	// +kubebuilder:validation:MaxItems=256
	// +kubebuilder:validation:items:MinLength=1
	// +kubebuilder:validation:items:MaxLength=1024
	NotRequestPrincipals []string `json:"notRequestPrincipals,omitempty"`
	// Namespaces of the peer (from its verified identity).
	// +optional
	// +listType=atomic
	// +kubebuilder:validation:MaxItems=256
	// +kubebuilder:validation:items:MinLength=1
	// +kubebuilder:validation:items:MaxLength=253
	Namespaces []string `json:"namespaces,omitempty"`
	// +optional
	// +listType=atomic
	// +kubebuilder:validation:MaxItems=256
	// +kubebuilder:validation:items:MinLength=1
	// +kubebuilder:validation:items:MaxLength=253
	NotNamespaces []string `json:"notNamespaces,omitempty"`
	// ServiceAccounts are the peer's Kubernetes service accounts, written
	// "<namespace>/<name>" (as Istio's source.serviceAccounts): the peer's
	// verified identity must be
	// "<trust-domain>/ns/<namespace>/sa/<name>" in the mesh's trust
	// domain. Exact match only (no wildcards). They spare writing the
	// trust domain of principals, and cannot be combined with principals
	// or namespaces.
	// +optional
	// +listType=atomic
	// +kubebuilder:validation:MaxItems=64
	// +kubebuilder:validation:items:MaxLength=317
	// +kubebuilder:validation:items:Pattern=`^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?/[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*$`
	ServiceAccounts []string `json:"serviceAccounts,omitempty"`
	// NotServiceAccounts: the peer's service account is none of these
	// ("<namespace>/<name>").
	// +optional
	// +listType=atomic
	// +kubebuilder:validation:MaxItems=64
	// +kubebuilder:validation:items:MaxLength=317
	// +kubebuilder:validation:items:Pattern=`^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?/[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*$`
	NotServiceAccounts []string `json:"notServiceAccounts,omitempty"`
	// IPBlocks are peer source addresses: single IPs or CIDRs.
	// +optional
	// +listType=atomic
	// +kubebuilder:validation:MaxItems=64
	// +kubebuilder:validation:items:MaxLength=48
	// +kubebuilder:validation:items:XValidation:rule="isIP(self) || isCIDR(self)",message="must be an IP address or a CIDR"
	IPBlocks []string `json:"ipBlocks,omitempty"`
	// +optional
	// +listType=atomic
	// +kubebuilder:validation:MaxItems=64
	// +kubebuilder:validation:items:MaxLength=48
	// +kubebuilder:validation:items:XValidation:rule="isIP(self) || isCIDR(self)",message="must be an IP address or a CIDR"
	NotIPBlocks []string `json:"notIpBlocks,omitempty"`
}

// Port is a TCP port number written as a string, as in Istio.
// +kubebuilder:validation:Pattern=`^([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])$`
type Port string

// Operation matches the destination and, at L7, the request. Every
// non-empty field must match.
//
// +kubebuilder:validation:XValidation:rule="has(self.ports) || has(self.notPorts) || has(self.hosts) || has(self.notHosts) || has(self.methods) || has(self.notMethods) || has(self.paths) || has(self.notPaths)",message="an operation needs at least one field"
type Operation struct {
	// Ports are destination (workload) ports.
	// +optional
	// +listType=atomic
	// +kubebuilder:validation:MaxItems=128
	Ports []Port `json:"ports,omitempty"`
	// +optional
	// +listType=atomic
	// +kubebuilder:validation:MaxItems=128
	NotPorts []Port `json:"notPorts,omitempty"`
	// Hosts match the request authority (L7: waypoint only).
	// +optional
	// +listType=atomic
	// +kubebuilder:validation:MaxItems=128
	// +kubebuilder:validation:items:MinLength=1
	// +kubebuilder:validation:items:MaxLength=253
	Hosts []string `json:"hosts,omitempty"`
	// +optional
	// +listType=atomic
	// +kubebuilder:validation:MaxItems=128
	// +kubebuilder:validation:items:MinLength=1
	// +kubebuilder:validation:items:MaxLength=253
	NotHosts []string `json:"notHosts,omitempty"`
	// Methods match the HTTP method, or "/<package>.<service>/<method>"
	// for gRPC (L7: waypoint only).
	// +optional
	// +listType=atomic
	// +kubebuilder:validation:MaxItems=64
	// +kubebuilder:validation:items:MinLength=1
	// +kubebuilder:validation:items:MaxLength=256
	Methods []string `json:"methods,omitempty"`
	// +optional
	// +listType=atomic
	// +kubebuilder:validation:MaxItems=64
	// +kubebuilder:validation:items:MinLength=1
	// +kubebuilder:validation:items:MaxLength=256
	NotMethods []string `json:"notMethods,omitempty"`
	// Paths match the request path without query (L7: waypoint only).
	// +optional
	// +listType=atomic
	// +kubebuilder:validation:MaxItems=128
	// +kubebuilder:validation:items:MinLength=1
	// +kubebuilder:validation:items:MaxLength=1024
	Paths []string `json:"paths,omitempty"`
	// +optional
	// +listType=atomic
	// +kubebuilder:validation:MaxItems=128
	// +kubebuilder:validation:items:MinLength=1
	// +kubebuilder:validation:items:MaxLength=1024
	NotPaths []string `json:"notPaths,omitempty"`
}

// Condition is an Istio-style "when" condition. Keys understood by ztunnel:
// source.ip, source.namespace, source.principal, destination.port. Keys
// understood by waypoints in addition: request.headers[<name>],
// request.auth.principal, request.auth.audiences, request.auth.presenter,
// request.auth.claims[<claim>], destination.ip, remote.ip.
//
// +kubebuilder:validation:XValidation:rule="has(self.values) || has(self.notValues)",message="a condition needs values or notValues"
// +kubebuilder:validation:XValidation:rule="self.key != 'destination.port' || ((!has(self.values) || self.values.all(v, v.matches('^[0-9]{1,5}$') && int(v) >= 1 && int(v) <= 65535)) && (!has(self.notValues) || self.notValues.all(v, v.matches('^[0-9]{1,5}$') && int(v) >= 1 && int(v) <= 65535)))",message="destination.port values must be port numbers"
// +kubebuilder:validation:XValidation:rule="!(self.key in ['source.ip', 'destination.ip', 'remote.ip']) || ((!has(self.values) || self.values.all(v, isIP(v) || isCIDR(v))) && (!has(self.notValues) || self.notValues.all(v, isIP(v) || isCIDR(v))))",message="IP conditions need IP addresses or CIDRs"
type Condition struct {
	// Key names the attribute.
	// +kubebuilder:validation:MaxLength=256
	// +kubebuilder:validation:Pattern=`^(source\.(ip|namespace|principal)|remote\.ip|destination\.(ip|port)|request\.auth\.(principal|audiences|presenter)|request\.headers\[[^\]]+\]|request\.auth\.claims(\[[^\]]+\])+)$`
	// +required
	Key string `json:"key"`
	// Values; the condition matches when any matches.
	// +optional
	// +listType=atomic
	// +kubebuilder:validation:MaxItems=32
	// +kubebuilder:validation:items:MaxLength=192
	Values []string `json:"values,omitempty"`
	// NotValues; the condition matches when none matches.
	// +optional
	// +listType=atomic
	// +kubebuilder:validation:MaxItems=32
	// +kubebuilder:validation:items:MaxLength=192
	NotValues []string `json:"notValues,omitempty"`
}

// AuthorizationPolicy allows or denies traffic to workloads by peer
// identity, namespace, address, port and (at waypoints) HTTP attributes.
//
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:resource:shortName=ap,categories=amesh
// +kubebuilder:printcolumn:name="Action",type=string,JSONPath=`.spec.action`
// +kubebuilder:printcolumn:name="Accepted",type=string,JSONPath=`.status.conditions[?(@.type=="Accepted")].status`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type AuthorizationPolicy struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	// +required
	Spec AuthorizationPolicySpec `json:"spec"`
	// +optional
	Status PolicyStatus `json:"status,omitempty"`
}

// AuthorizationPolicyList is a list of AuthorizationPolicy.
//
// +kubebuilder:object:root=true
type AuthorizationPolicyList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []AuthorizationPolicy `json:"items"`
}
