package push

import (
	"sync"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	k8sdisc "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	toolscache "k8s.io/client-go/tools/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
	gwv1beta1 "sigs.k8s.io/gateway-api/apis/v1beta1"

	securityv1alpha1 "github.com/amesh-dev/amesh/controller/apis/security/v1alpha1"
	trafficv1alpha1 "github.com/amesh-dev/amesh/controller/apis/traffic/v1alpha1"
	"github.com/amesh-dev/amesh/controller/internal/translate"
)

// store mirrors the informer caches as maps of the cached objects (shared
// with the informers, never modified), so that a snapshot costs no copy.
type store struct {
	mu   sync.Mutex
	objs map[string]map[string]client.Object // kind → "<ns>/<name>" → object
}

func newStore() *store { return &store{objs: map[string]map[string]client.Object{}} }

// watched is one kind the loop watches: a prototype object, and for
// updates, whether a change can be ignored (it still replaces the stored
// object; it just does not start a translation by itself).
type watched struct {
	obj    client.Object
	ignore func(old, cur client.Object) bool
}

// kinds lists what is watched. Objects whose status the controller writes
// itself or that change often without mattering are translated again only
// when their generation, deletion timestamp or owner references change;
// Services when anything but their status changes (the controller writes
// their WaypointBound condition). ReplicaSets and Deployments are those of
// waypoints only (the cache is restricted to them): they chain a
// waypoint's pods to its Gateway.
func kinds() []watched {
	return []watched{
		{&corev1.Namespace{}, nil},
		{&corev1.Pod{}, nil},
		{&corev1.Service{}, statusOnly},
		{&k8sdisc.EndpointSlice{}, nil},
		{&gwv1.Gateway{}, nil},
		{&gwv1.GatewayClass{}, sameGeneration},
		{&gwv1.HTTPRoute{}, sameGeneration},
		{&gwv1.GRPCRoute{}, sameGeneration},
		{&gwv1beta1.ReferenceGrant{}, sameGeneration},
		{&appsv1.ReplicaSet{}, sameGeneration},
		{&appsv1.Deployment{}, sameGeneration},
		{&securityv1alpha1.AuthorizationPolicy{}, sameGeneration},
		{&securityv1alpha1.PeerAuthentication{}, sameGeneration},
		{&securityv1alpha1.RequestAuthentication{}, sameGeneration},
		{&trafficv1alpha1.BackendTrafficPolicy{}, sameGeneration},
	}
}

// sameGeneration: a status or metadata-only change.
func sameGeneration(old, cur client.Object) bool {
	return old.GetGeneration() == cur.GetGeneration() &&
		old.GetDeletionTimestamp().Equal(cur.GetDeletionTimestamp()) &&
		equality.Semantic.DeepEqual(old.GetOwnerReferences(), cur.GetOwnerReferences())
}

// statusOnly: a Service whose status alone changed.
func statusOnly(old, cur client.Object) bool {
	o, ok1 := old.(*corev1.Service)
	c, ok2 := cur.(*corev1.Service)
	return ok1 && ok2 &&
		o.DeletionTimestamp.Equal(c.DeletionTimestamp) &&
		equality.Semantic.DeepEqual(o.Labels, c.Labels) &&
		equality.Semantic.DeepEqual(o.Annotations, c.Annotations) &&
		equality.Semantic.DeepEqual(o.OwnerReferences, c.OwnerReferences) &&
		equality.Semantic.DeepEqual(o.Spec, c.Spec)
}

func kindOf(o client.Object) string {
	switch o.(type) {
	case *corev1.Namespace:
		return "Namespace"
	case *corev1.Pod:
		return "Pod"
	case *corev1.Service:
		return "Service"
	case *k8sdisc.EndpointSlice:
		return "EndpointSlice"
	case *gwv1.Gateway:
		return "Gateway"
	case *gwv1.GatewayClass:
		return "GatewayClass"
	case *gwv1.HTTPRoute:
		return "HTTPRoute"
	case *gwv1.GRPCRoute:
		return "GRPCRoute"
	case *gwv1beta1.ReferenceGrant:
		return "ReferenceGrant"
	case *appsv1.ReplicaSet:
		return "ReplicaSet"
	case *appsv1.Deployment:
		return "Deployment"
	case *securityv1alpha1.AuthorizationPolicy:
		return "AuthorizationPolicy"
	case *securityv1alpha1.PeerAuthentication:
		return "PeerAuthentication"
	case *securityv1alpha1.RequestAuthentication:
		return "RequestAuthentication"
	case *trafficv1alpha1.BackendTrafficPolicy:
		return "BackendTrafficPolicy"
	}
	return ""
}

func (s *store) put(o client.Object) {
	k := kindOf(o)
	s.mu.Lock()
	defer s.mu.Unlock()
	m := s.objs[k]
	if m == nil {
		m = map[string]client.Object{}
		s.objs[k] = m
	}
	m[o.GetNamespace()+"/"+o.GetName()] = o
}

func (s *store) del(o client.Object) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.objs[kindOf(o)], o.GetNamespace()+"/"+o.GetName())
}

// handler keeps the store in step with one informer and calls changed
// after every change that matters (an update that ignore accepts does not).
func (s *store) handler(ignore func(old, cur client.Object) bool, changed func()) toolscache.ResourceEventHandler {
	return toolscache.ResourceEventHandlerFuncs{
		AddFunc: func(obj any) {
			if o, ok := obj.(client.Object); ok {
				s.put(o)
				changed()
			}
		},
		UpdateFunc: func(oldObj, newObj any) {
			o, ok := newObj.(client.Object)
			if !ok {
				return
			}
			s.put(o)
			if old, ok := oldObj.(client.Object); ok && ignore != nil && ignore(old, o) {
				return
			}
			changed()
		},
		DeleteFunc: func(obj any) {
			if t, ok := obj.(toolscache.DeletedFinalStateUnknown); ok {
				obj = t.Obj
			}
			if o, ok := obj.(client.Object); ok {
				s.del(o)
				changed()
			}
		},
	}
}

// snapshot returns the current objects as a translator input.
func (s *store) snapshot(roots []string) *translate.Input {
	s.mu.Lock()
	defer s.mu.Unlock()
	in := &translate.Input{RootCertificates: roots}
	for _, o := range s.objs["Namespace"] {
		in.Namespaces = append(in.Namespaces, o.(*corev1.Namespace))
	}
	in.Pods = make([]*corev1.Pod, 0, len(s.objs["Pod"]))
	for _, o := range s.objs["Pod"] {
		in.Pods = append(in.Pods, o.(*corev1.Pod))
	}
	for _, o := range s.objs["Service"] {
		in.Services = append(in.Services, o.(*corev1.Service))
	}
	for _, o := range s.objs["EndpointSlice"] {
		in.EndpointSlices = append(in.EndpointSlices, o.(*k8sdisc.EndpointSlice))
	}
	for _, o := range s.objs["Gateway"] {
		in.Gateways = append(in.Gateways, o.(*gwv1.Gateway))
	}
	for _, o := range s.objs["GatewayClass"] {
		in.GatewayClasses = append(in.GatewayClasses, o.(*gwv1.GatewayClass))
	}
	for _, o := range s.objs["HTTPRoute"] {
		in.HTTPRoutes = append(in.HTTPRoutes, o.(*gwv1.HTTPRoute))
	}
	for _, o := range s.objs["GRPCRoute"] {
		in.GRPCRoutes = append(in.GRPCRoutes, o.(*gwv1.GRPCRoute))
	}
	for _, o := range s.objs["ReferenceGrant"] {
		in.ReferenceGrants = append(in.ReferenceGrants, o.(*gwv1beta1.ReferenceGrant))
	}
	for _, o := range s.objs["ReplicaSet"] {
		in.ReplicaSets = append(in.ReplicaSets, o.(*appsv1.ReplicaSet))
	}
	for _, o := range s.objs["Deployment"] {
		in.Deployments = append(in.Deployments, o.(*appsv1.Deployment))
	}
	for _, o := range s.objs["AuthorizationPolicy"] {
		in.AuthorizationPolicies = append(in.AuthorizationPolicies, o.(*securityv1alpha1.AuthorizationPolicy))
	}
	for _, o := range s.objs["PeerAuthentication"] {
		in.PeerAuthentications = append(in.PeerAuthentications, o.(*securityv1alpha1.PeerAuthentication))
	}
	for _, o := range s.objs["RequestAuthentication"] {
		in.RequestAuthentications = append(in.RequestAuthentications, o.(*securityv1alpha1.RequestAuthentication))
	}
	for _, o := range s.objs["BackendTrafficPolicy"] {
		in.BackendTrafficPolicies = append(in.BackendTrafficPolicies, o.(*trafficv1alpha1.BackendTrafficPolicy))
	}
	return in
}
