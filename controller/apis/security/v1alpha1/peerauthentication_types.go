package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// MutualTLSMode says which inbound traffic a workload admits.
// +kubebuilder:validation:Enum=UNSET;DISABLE;PERMISSIVE;STRICT
type MutualTLSMode string

// Mutual TLS modes.
const (
	// MTLSUnset inherits the mode of the parent scope (port → workload →
	// namespace → mesh root namespace → PERMISSIVE).
	MTLSUnset MutualTLSMode = "UNSET"
	// MTLSDisable admits plaintext; in ambient mode it behaves as
	// PERMISSIVE (ztunnel still speaks HBONE to mesh peers).
	MTLSDisable MutualTLSMode = "DISABLE"
	// MTLSPermissive admits both HBONE and plaintext.
	MTLSPermissive MutualTLSMode = "PERMISSIVE"
	// MTLSStrict admits only HBONE (mutual TLS).
	MTLSStrict MutualTLSMode = "STRICT"
)

// PeerAuthenticationMutualTLS holds a mutual TLS mode.
type PeerAuthenticationMutualTLS struct {
	// Mode; UNSET inherits from the parent scope.
	// +optional
	// +kubebuilder:default=UNSET
	Mode MutualTLSMode `json:"mode,omitempty"`
}

// PeerAuthenticationSpec is the desired behaviour of a PeerAuthentication.
// Precedence: a policy with a selector beats the namespace policy (no
// selector), which beats the mesh policy (no selector, root namespace);
// among several policies at one level the oldest wins.
//
// +kubebuilder:validation:XValidation:rule="!has(self.portLevelMtls) || (has(self.selector) && size(self.selector.matchLabels) > 0)",message="portLevelMtls requires a selector with matchLabels"
type PeerAuthenticationSpec struct {
	// Selector picks the workloads; absent means the whole namespace.
	// +optional
	Selector *WorkloadSelector `json:"selector,omitempty"`
	// Mtls is the mode for the selected workloads.
	// +optional
	Mtls *PeerAuthenticationMutualTLS `json:"mtls,omitempty"`
	// PortLevelMtls overrides the mode per workload (container) port; keys
	// are port numbers.
	// +optional
	// +kubebuilder:validation:MaxProperties=64
	// +kubebuilder:validation:XValidation:rule="self.all(k, k.matches('^[0-9]{1,5}$') && int(k) >= 1 && int(k) <= 65535)",message="portLevelMtls keys must be port numbers 1-65535"
	PortLevelMtls map[string]PeerAuthenticationMutualTLS `json:"portLevelMtls,omitempty"`
}

// PeerAuthentication sets whether workloads accept plaintext traffic
// (PERMISSIVE) or only mutual TLS through HBONE (STRICT).
//
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:resource:shortName=pa,categories=amesh
// +kubebuilder:printcolumn:name="Mode",type=string,JSONPath=`.spec.mtls.mode`
// +kubebuilder:printcolumn:name="Accepted",type=string,JSONPath=`.status.conditions[?(@.type=="Accepted")].status`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type PeerAuthentication struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	// +required
	Spec PeerAuthenticationSpec `json:"spec"`
	// +optional
	Status PolicyStatus `json:"status,omitempty"`
}

// PeerAuthenticationList is a list of PeerAuthentication.
//
// +kubebuilder:object:root=true
type PeerAuthenticationList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []PeerAuthentication `json:"items"`
}
