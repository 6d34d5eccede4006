// Package v1alpha1 holds the traffic.amesh.dev/v1alpha1 API:
// BackendTrafficPolicy, the resilience and load-balancing settings a
// waypoint applies to traffic for a Service, attached with targetRefs in the
// Gateway API policy-attachment style.
//
// +kubebuilder:object:generate=true
// +groupName=traffic.amesh.dev
package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

// GroupVersion is the API group and version of this package.
var GroupVersion = schema.GroupVersion{Group: "traffic.amesh.dev", Version: "v1alpha1"}

// AddToScheme registers this package's types with s.
func AddToScheme(s *runtime.Scheme) error {
	s.AddKnownTypes(GroupVersion,
		&BackendTrafficPolicy{}, &BackendTrafficPolicyList{},
	)
	metav1.AddToGroupVersion(s, GroupVersion)
	return nil
}
