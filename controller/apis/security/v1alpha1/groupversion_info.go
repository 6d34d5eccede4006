// Package v1alpha1 holds the security.amesh.dev/v1alpha1 API: mesh
// authorization (AuthorizationPolicy), peer authentication
// (PeerAuthentication) and request authentication (RequestAuthentication),
// shaped after the Istio security APIs of the same names so that existing
// manifests translate with at most a change of apiVersion.
//
// +kubebuilder:object:generate=true
// +groupName=security.amesh.dev
package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

// GroupVersion is the API group and version of this package.
var GroupVersion = schema.GroupVersion{Group: "security.amesh.dev", Version: "v1alpha1"}

// AddToScheme registers this package's types with s.
func AddToScheme(s *runtime.Scheme) error {
	s.AddKnownTypes(GroupVersion,
		&AuthorizationPolicy{}, &AuthorizationPolicyList{},
		&PeerAuthentication{}, &PeerAuthenticationList{},
		&RequestAuthentication{}, &RequestAuthenticationList{},
	)
	metav1.AddToGroupVersion(s, GroupVersion)
	return nil
}
