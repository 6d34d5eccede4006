// Package translate turns a snapshot of Kubernetes objects into the
// Kubernetes-free discovery resources the data plane consumes
// (api/discovery/v1) and into the status the controller writes back to the
// amesh policies. It is pure: no client calls, no I/O, no clock; the same
// input always yields the same output, in a deterministic order.
package translate

import (
	"cmp"
	"errors"
	"fmt"
	"maps"
	"slices"

	pb "github.com/amesh-dev/amesh/api/discovery/v1"
	corev1 "k8s.io/api/core/v1"
	k8sdisc "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	"github.com/amesh-dev/amesh/controller/apis/security/v1alpha1"
	trafficv1alpha1 "github.com/amesh-dev/amesh/controller/apis/traffic/v1alpha1"
	"github.com/amesh-dev/amesh/controller/internal/label"
)

// Config holds the mesh-wide settings of a translation.
type Config struct {
	// TrustDomain of the mesh identities; default "cluster.local".
	TrustDomain string
	// ClusterDomain is the DNS suffix of Services; default "cluster.local".
	ClusterDomain string
	// RootNamespace holds mesh-wide policies; default "amesh-system".
	RootNamespace string
	// ClusterID names this cluster in Workload.cluster_id; default
	// "Kubernetes".
	ClusterID string
	// WaypointClass is the GatewayClass of waypoints; default
	// "amesh-waypoint".
	WaypointClass string
}

// WithDefaults returns c with empty fields set to their defaults.
func (c Config) WithDefaults() Config {
	c.TrustDomain = cmp.Or(c.TrustDomain, "cluster.local")
	c.ClusterDomain = cmp.Or(c.ClusterDomain, "cluster.local")
	c.RootNamespace = cmp.Or(c.RootNamespace, label.SystemNamespace)
	c.ClusterID = cmp.Or(c.ClusterID, "Kubernetes")
	c.WaypointClass = cmp.Or(c.WaypointClass, label.WaypointClass)
	return c
}

// Validate reports a configuration that cannot produce correct output.
func (c Config) Validate() error {
	var errs []error
	if c.TrustDomain == "" {
		errs = append(errs, errors.New("trust domain is empty"))
	}
	if c.ClusterDomain == "" {
		errs = append(errs, errors.New("cluster domain is empty"))
	}
	if c.RootNamespace == "" {
		errs = append(errs, errors.New("root namespace is empty"))
	}
	return errors.Join(errs...)
}

// Input is a snapshot of the watched objects. The translator never modifies
// them; order does not matter.
type Input struct {
	Namespaces             []*corev1.Namespace
	Pods                   []*corev1.Pod
	Services               []*corev1.Service
	EndpointSlices         []*k8sdisc.EndpointSlice
	Gateways               []*gwv1.Gateway
	HTTPRoutes             []*gwv1.HTTPRoute
	GRPCRoutes             []*gwv1.GRPCRoute
	AuthorizationPolicies  []*v1alpha1.AuthorizationPolicy
	PeerAuthentications    []*v1alpha1.PeerAuthentication
	RequestAuthentications []*v1alpha1.RequestAuthentication
	BackendTrafficPolicies []*trafficv1alpha1.BackendTrafficPolicy
	// RootCertificates are the PEM-encoded mesh roots.
	RootCertificates []string
}

// Output is the translation of an Input. Every list is sorted by resource
// name.
type Output struct {
	Workloads        []*pb.Workload
	Services         []*pb.Service
	Authorizations   []*pb.Authorization
	TrustBundles     []*pb.TrustBundle
	WaypointServices []*pb.WaypointService
	// Statuses is the status every amesh policy of the input should have.
	Statuses []Status
	// RootCertNamespaces are the namespaces that need the root certificate
	// ConfigMap: the enrolled ones and the root namespace.
	RootCertNamespaces []string
}

// Kinds of the objects a Status is for.
const (
	KindAuthorizationPolicy   = "AuthorizationPolicy"
	KindPeerAuthentication    = "PeerAuthentication"
	KindRequestAuthentication = "RequestAuthentication"
	KindBackendTrafficPolicy  = "BackendTrafficPolicy"
)

// Status is the desired status of one policy. Conditions carry no
// LastTransitionTime: the writer keeps the existing one when a condition's
// status is unchanged and stamps the time otherwise.
type Status struct {
	Kind       string             `json:"kind"`
	Namespace  string             `json:"namespace"`
	Name       string             `json:"name"`
	Generation int64              `json:"generation"`
	Conditions []metav1.Condition `json:"conditions"`
}

// Translate computes the discovery resources and policy statuses for in.
func Translate(cfg Config, in *Input) *Output {
	cfg = cfg.WithDefaults()
	t := newTranslator(cfg, in)
	out := &Output{}
	out.Services = t.translateServices()
	out.Workloads = t.workloads()
	out.Authorizations = t.authorizations()
	t.peerAuthentications(out.Workloads)
	t.attachAuthorizations(out.Workloads)
	out.WaypointServices = t.waypointServices(out.Services)
	out.TrustBundles = []*pb.TrustBundle{{
		TrustDomain: cfg.TrustDomain,
		RootsPem:    slices.Clone(in.RootCertificates),
	}}
	out.Statuses = t.statuses()
	out.RootCertNamespaces = t.rootCertNamespaces()
	return out
}

// translator carries the indexes of one translation.
type translator struct {
	cfg Config
	in  *Input

	namespaces map[string]*corev1.Namespace
	// services by namespace/name, and selector index per namespace.
	svcByName   map[string]*corev1.Service
	svcSelector map[string]map[string][]*corev1.Service
	waypoints   map[string]*waypoint
	// perSA maps "<ns>/<sa>" to the waypoints claiming it, oldest first.
	perSA map[string][]*waypoint
	// policyWorkloads maps a WORKLOAD-scope authorization name to the pod
	// UIDs it selects; filled by authorizations().
	policyWorkloads map[string][]string
	// serviceWaypoints maps a bound service's resource name to its waypoint.
	serviceWaypoints map[string]*waypoint
	// pods maps workload UIDs to the pods they were made from.
	pods map[string]*corev1.Pod
	// podLabels indexes pod UIDs by namespace, then "<key>=<value>".
	podLabels map[string]map[string][]string
	// Per bound service (resource name): what its waypoint enforces.
	wpAuthz        map[string][]*pb.Authorization
	wpRequestAuthn map[string][]*pb.RequestAuthentication
	wpTraffic      map[string]*pb.TrafficPolicy
	// status accumulates conditions per "<kind>/<ns>/<name>".
	status map[string]*Status
}

func newTranslator(cfg Config, in *Input) *translator {
	t := &translator{
		cfg:              cfg,
		in:               in,
		namespaces:       make(map[string]*corev1.Namespace, len(in.Namespaces)),
		svcByName:        make(map[string]*corev1.Service, len(in.Services)),
		svcSelector:      map[string]map[string][]*corev1.Service{},
		waypoints:        map[string]*waypoint{},
		perSA:            map[string][]*waypoint{},
		policyWorkloads:  map[string][]string{},
		serviceWaypoints: map[string]*waypoint{},
		podLabels:        map[string]map[string][]string{},
		wpAuthz:          map[string][]*pb.Authorization{},
		wpRequestAuthn:   map[string][]*pb.RequestAuthentication{},
		wpTraffic:        map[string]*pb.TrafficPolicy{},
		status:           map[string]*Status{},
	}
	for _, ns := range in.Namespaces {
		t.namespaces[ns.Name] = ns
	}
	for _, s := range in.Services {
		t.svcByName[s.Namespace+"/"+s.Name] = s
		if len(s.Spec.Selector) == 0 || s.Spec.Type == corev1.ServiceTypeExternalName {
			continue
		}
		// Index by the smallest selector key: a pod can match only if it
		// carries that exact label.
		k := slices.Min(slices.Collect(maps.Keys(s.Spec.Selector)))
		idx := t.svcSelector[s.Namespace]
		if idx == nil {
			idx = map[string][]*corev1.Service{}
			t.svcSelector[s.Namespace] = idx
		}
		kv := k + "=" + s.Spec.Selector[k]
		idx[kv] = append(idx[kv], s)
	}
	t.indexWaypoints()
	return t
}

// hostname is the Service's DNS name.
func (t *translator) hostname(ns, name string) string {
	return fmt.Sprintf("%s.%s.svc.%s", name, ns, t.cfg.ClusterDomain)
}

// serviceKey is the resource name of a Service.
func (t *translator) serviceKey(ns, name string) string {
	return ns + "/" + t.hostname(ns, name)
}

// enrolled reports whether a pod is in ambient mode: labelled itself, or in
// a labelled namespace and not opted out.
func (t *translator) enrolled(pod *corev1.Pod) bool {
	switch pod.Labels[label.DataplaneMode] {
	case label.DataplaneModeNone:
		return false
	case label.DataplaneModeAmbient:
		return true
	}
	return t.namespaceEnrolled(pod.Namespace)
}

func (t *translator) namespaceEnrolled(ns string) bool {
	n := t.namespaces[ns]
	return n != nil && n.Labels[label.DataplaneMode] == label.DataplaneModeAmbient
}

func (t *translator) rootCertNamespaces() []string {
	set := map[string]bool{t.cfg.RootNamespace: true}
	for _, ns := range t.in.Namespaces {
		if t.namespaceEnrolled(ns.Name) && ns.DeletionTimestamp == nil {
			set[ns.Name] = true
		}
	}
	for _, p := range t.in.Pods {
		if p.Labels[label.DataplaneMode] == label.DataplaneModeAmbient {
			set[p.Namespace] = true
		}
	}
	return slices.Sorted(maps.Keys(set))
}

// setCondition records a condition for a policy.
func (t *translator) setCondition(kind string, meta metav1.ObjectMeta, c metav1.Condition) {
	key := kind + "/" + meta.Namespace + "/" + meta.Name
	s := t.status[key]
	if s == nil {
		s = &Status{Kind: kind, Namespace: meta.Namespace, Name: meta.Name, Generation: meta.Generation}
		t.status[key] = s
	}
	c.ObservedGeneration = meta.Generation
	for i := range s.Conditions {
		if s.Conditions[i].Type == c.Type {
			s.Conditions[i] = c
			return
		}
	}
	s.Conditions = append(s.Conditions, c)
}

func (t *translator) statuses() []Status {
	out := make([]Status, 0, len(t.status))
	for _, s := range t.status {
		slices.SortFunc(s.Conditions, func(a, b metav1.Condition) int { return cmp.Compare(a.Type, b.Type) })
		out = append(out, *s)
	}
	slices.SortFunc(out, func(a, b Status) int {
		return cmp.Or(cmp.Compare(a.Kind, b.Kind), cmp.Compare(a.Namespace, b.Namespace), cmp.Compare(a.Name, b.Name))
	})
	return out
}

func condition(typ string, ok bool, reason, msg string) metav1.Condition {
	st := metav1.ConditionFalse
	if ok {
		st = metav1.ConditionTrue
	}
	return metav1.Condition{Type: typ, Status: st, Reason: reason, Message: msg}
}

// olderFirst orders objects by creation time, then namespace and name: the
// tie-break Istio and Gateway API use for conflicting configuration.
func olderFirst(a, b metav1.ObjectMeta) int {
	return cmp.Or(
		a.CreationTimestamp.Compare(b.CreationTimestamp.Time),
		cmp.Compare(a.Namespace, b.Namespace),
		cmp.Compare(a.Name, b.Name),
	)
}

// selects reports whether all of sel's labels are in labels.
func selects(sel, labels map[string]string) bool {
	for k, v := range sel {
		if lv, ok := labels[k]; !ok || lv != v {
			return false
		}
	}
	return true
}
