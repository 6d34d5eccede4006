package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// RequestAuthenticationSpec is the desired behaviour of a
// RequestAuthentication. JWT validation happens at waypoints, so the policy
// attaches with targetRefs; a selector is accepted for Istio compatibility
// but has no effect in ambient mode (the status says so).
//
// +kubebuilder:validation:XValidation:rule="!(has(self.selector) && has(self.targetRefs))",message="selector and targetRefs are mutually exclusive"
type RequestAuthenticationSpec struct {
	// +optional
	Selector *WorkloadSelector `json:"selector,omitempty"`
	// TargetRefs attach the policy to a waypoint Gateway or to the waypoint
	// serving a Service.
	// +optional
	// +listType=atomic
	// +kubebuilder:validation:MinItems=1
	// +kubebuilder:validation:MaxItems=16
	TargetRefs []PolicyTargetReference `json:"targetRefs,omitempty"`
	// JWTRules: a request with a token must satisfy one of them; a request
	// without a token passes (use an AuthorizationPolicy on
	// requestPrincipals to require one).
	// +optional
	// +listType=atomic
	// +kubebuilder:validation:MaxItems=64
	JWTRules []JWTRule `json:"jwtRules,omitempty"`
}

// JWTRule says how to validate tokens of one issuer.
//
// +kubebuilder:validation:XValidation:rule="has(self.jwks) != has(self.jwksUri)",message="exactly one of jwks and jwksUri is required"
type JWTRule struct {
	// Issuer is the expected "iss" claim.
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=1024
	// +required
	Issuer string `json:"issuer"`
	// Audiences accepted in "aud"; empty accepts any audience.
	// +optional
	// +listType=atomic
	// +kubebuilder:validation:MaxItems=64
	// +kubebuilder:validation:items:MaxLength=1024
	Audiences []string `json:"audiences,omitempty"`
	// JWKSURI is fetched (and cached) for the signing keys.
	// +optional
	// +kubebuilder:validation:MaxLength=2048
	// +kubebuilder:validation:XValidation:rule="isURL(self) && (self.startsWith('https://') || self.startsWith('http://'))",message="jwksUri must be an http(s) URL"
	JWKSURI string `json:"jwksUri,omitempty"`
	// JWKS is an inline JSON Web Key Set.
	// +optional
	// +kubebuilder:validation:MaxLength=65536
	JWKS string `json:"jwks,omitempty"`
	// FromHeaders lists where to look for the token; default
	// "Authorization: Bearer <token>".
	// +optional
	// +listType=atomic
	// +kubebuilder:validation:MaxItems=16
	FromHeaders []JWTHeader `json:"fromHeaders,omitempty"`
	// FromParams lists query parameters carrying the token.
	// +optional
	// +listType=atomic
	// +kubebuilder:validation:MaxItems=16
	// +kubebuilder:validation:items:MinLength=1
	// +kubebuilder:validation:items:MaxLength=256
	FromParams []string `json:"fromParams,omitempty"`
	// ForwardOriginalToken keeps the token in the forwarded request.
	// +optional
	ForwardOriginalToken bool `json:"forwardOriginalToken,omitempty"`
	// OutputPayloadToHeader names a header that receives the verified
	// payload, base64url-encoded.
	// +optional
	// +kubebuilder:validation:MaxLength=256
	// +kubebuilder:validation:Pattern=`^[A-Za-z0-9!#$%&'*+.^_|~-]+$`
	OutputPayloadToHeader string `json:"outputPayloadToHeader,omitempty"`
}

// JWTHeader is a header carrying a token.
type JWTHeader struct {
	// Name of the header.
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=256
	// +kubebuilder:validation:Pattern=`^[A-Za-z0-9!#$%&'*+.^_|~-]+$`
	// +required
	Name string `json:"name"`
	// Prefix before the token, e.g. "Bearer ".
	// +optional
	// +kubebuilder:validation:MaxLength=64
	Prefix string `json:"prefix,omitempty"`
}

// RequestAuthentication validates JWTs presented to the waypoints it
// targets.
//
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:resource:shortName=ra,categories=amesh
// +kubebuilder:printcolumn:name="Accepted",type=string,JSONPath=`.status.conditions[?(@.type=="Accepted")].status`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type RequestAuthentication struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	// +required
	Spec RequestAuthenticationSpec `json:"spec"`
	// +optional
	Status PolicyStatus `json:"status,omitempty"`
}

// RequestAuthenticationList is a list of RequestAuthentication.
//
// +kubebuilder:object:root=true
type RequestAuthenticationList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []RequestAuthentication `json:"items"`
}
