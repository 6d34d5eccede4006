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
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	k8sdisc "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
	gwv1beta1 "sigs.k8s.io/gateway-api/apis/v1beta1"

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
	// WaypointController is the controllerName that class must name;
	// default "amesh.dev/waypoint-controller". A Gateway is a waypoint
	// only when its class exists, names it and is accepted (package
	// gatewayclass), as the deployer requires to run it.
	WaypointController string
}

// WithDefaults returns c with empty fields set to their defaults.
func (c Config) WithDefaults() Config {
	c.TrustDomain = cmp.Or(c.TrustDomain, "cluster.local")
	c.ClusterDomain = cmp.Or(c.ClusterDomain, "cluster.local")
	c.RootNamespace = cmp.Or(c.RootNamespace, label.SystemNamespace)
	c.ClusterID = cmp.Or(c.ClusterID, "Kubernetes")
	c.WaypointClass = cmp.Or(c.WaypointClass, label.WaypointClass)
	c.WaypointController = cmp.Or(c.WaypointController, label.WaypointController)
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
	Namespaces     []*corev1.Namespace
	Pods           []*corev1.Pod
	Services       []*corev1.Service
	EndpointSlices []*k8sdisc.EndpointSlice
	Gateways       []*gwv1.Gateway
	// GatewayClasses decide which Gateways are waypoints (only the
	// waypoint class matters).
	GatewayClasses  []*gwv1.GatewayClass
	HTTPRoutes      []*gwv1.HTTPRoute
	GRPCRoutes      []*gwv1.GRPCRoute
	ReferenceGrants []*gwv1beta1.ReferenceGrant
	// ReplicaSets and Deployments of waypoints: a pod is a waypoint only
	// when one of these chains it to its Gateway. Others may be left out.
	ReplicaSets            []*appsv1.ReplicaSet
	Deployments            []*appsv1.Deployment
	AuthorizationPolicies  []*v1alpha1.AuthorizationPolicy
	PeerAuthentications    []*v1alpha1.PeerAuthentication
	RequestAuthentications []*v1alpha1.RequestAuthentication
	BackendTrafficPolicies []*trafficv1alpha1.BackendTrafficPolicy
	// RootCertificates are the PEM-encoded mesh roots.
	RootCertificates []string
}

// Output is the translation of an Input. Every list is sorted by resource
// name. Outputs of one Translator share unchanged parts (messages, lists):
// they are read-only.
type Output struct {
	Workloads        []*pb.Workload
	Services         []*pb.Service
	Authorizations   []*pb.Authorization
	TrustBundles     []*pb.TrustBundle
	WaypointServices []*pb.WaypointService
	// WaypointGateways has exactly one entry per waypoint Gateway.
	WaypointGateways []*pb.WaypointGateway
	// Statuses is the status every amesh policy of the input should have.
	Statuses []Status
	// RouteStatuses has one entry per HTTPRoute and GRPCRoute: the parent
	// statuses amesh owns.
	RouteStatuses []RouteStatus
	// ServiceStatuses are the Services whose WaypointBound condition must
	// change: set (one condition) or removed (none).
	ServiceStatuses []Status
	// BindingProblems are use-waypoint labels of pods and namespaces that
	// bind to nothing.
	BindingProblems []BindingProblem
	// RootCertNamespaces are the namespaces that need the root certificate
	// ConfigMap: the enrolled ones, those holding a waypoint Gateway (its
	// pods mount the ConfigMap) and the root namespace.
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
	return NewTranslator(cfg).Translate(in)
}

// Translator translates successive snapshots. It reuses the per-pod
// results of the previous translation for every pod whose object is the
// same (informers replace an object on every change, so pointer identity
// means "unchanged") as long as no other input changed: a pod update costs
// one pod's translation, not the mesh's. The output is always exactly what
// Translate would return. Not safe for concurrent use.
type Translator struct {
	cfg Config
	// others is the identity of every non-pod input of the cached context.
	others map[any]struct{}
	roots  []string
	ctx    *translator
	pods   map[string]*podEntry // pod UID → cached result
	gen    uint64
	// sorted is the previous output's workloads.
	sorted []*pb.Workload
	// endpoints is the previous output's endpoint workloads (those no
	// pod's address claims).
	endpoints []*pb.Workload
}

type podEntry struct {
	pod *corev1.Pod
	res *podResult
	gen uint64 // last translation that saw the pod
}

// NewTranslator returns a Translator for cfg.
func NewTranslator(cfg Config) *Translator {
	return &Translator{cfg: cfg.WithDefaults(), pods: map[string]*podEntry{}}
}

// Translate computes the output for in, reusing what it can.
func (tr *Translator) Translate(in *Input) *Output {
	others := nonPodObjects(in)
	if tr.ctx == nil || !sameSet(others, tr.others) || !slices.Equal(in.RootCertificates, tr.roots) {
		tr.ctx = newTranslator(tr.cfg, in)
		tr.ctx.prepare()
		tr.others, tr.roots = others, slices.Clone(in.RootCertificates)
		clear(tr.pods)
		tr.sorted, tr.endpoints = nil, nil
	}
	t := tr.ctx
	tr.gen++
	out := &Output{
		Services:         t.outServices,
		Authorizations:   t.outAuthorizations,
		WaypointServices: t.outWaypointServices,
		WaypointGateways: t.outWaypointGateways,
		TrustBundles:     t.outTrustBundles,
	}
	results := make([]*podResult, 0, len(in.Pods))
	// The previous output order stays valid when pods only changed in
	// place (same UIDs) and the endpoint workloads are the same: the
	// commonest case, worth skipping a sort.
	inPlace := tr.sorted != nil
	var replaced map[string]*pb.Workload
	for _, pod := range in.Pods {
		key := string(pod.UID)
		if key == "" {
			key = pod.Namespace + "/" + pod.Name
		}
		e, ok := tr.pods[key]
		if !ok || e.pod != pod {
			var old *podResult
			if ok {
				old = e.res
			}
			e = &podEntry{pod: pod, res: t.pod(pod)}
			tr.pods[key] = e
			switch {
			case !ok || old.workload == nil || e.res.workload == nil || old.workload.Uid != e.res.workload.Uid:
				inPlace = false
			default:
				if replaced == nil {
					replaced = map[string]*pb.Workload{}
				}
				replaced[e.res.workload.Uid] = e.res.workload
			}
		}
		e.gen = tr.gen
		results = append(results, e.res)
	}
	if len(tr.pods) != len(in.Pods) {
		for key, e := range tr.pods {
			if e.gen != tr.gen {
				delete(tr.pods, key)
				inPlace = false
			}
		}
	}
	endpoints := t.unclaimedEndpoints(results)
	if !slices.Equal(endpoints, tr.endpoints) {
		inPlace = false
	}
	tr.endpoints = endpoints
	if inPlace {
		out.Workloads = slices.Clone(tr.sorted)
		for i, w := range out.Workloads {
			if r := replaced[w.Uid]; r != nil {
				out.Workloads[i] = r
			}
		}
	} else {
		out.Workloads = make([]*pb.Workload, 0, len(results)+len(endpoints))
		for _, r := range results {
			if r.workload != nil {
				out.Workloads = append(out.Workloads, r.workload)
			}
		}
		out.Workloads = append(out.Workloads, endpoints...)
		slices.SortFunc(out.Workloads, func(a, b *pb.Workload) int { return cmp.Compare(a.Uid, b.Uid) })
	}
	tr.sorted = out.Workloads
	out.Statuses = t.statuses(results)
	out.RouteStatuses = t.outRouteStatuses
	out.ServiceStatuses = t.outServiceStatuses
	out.BindingProblems = t.bindingProblems(results)
	out.RootCertNamespaces = t.rootCertNamespaces(results)
	return out
}

// nonPodObjects is the set of every input object except pods.
func nonPodObjects(in *Input) map[any]struct{} {
	n := len(in.Namespaces) + len(in.Services) + len(in.EndpointSlices) + len(in.Gateways) + len(in.GatewayClasses) +
		len(in.HTTPRoutes) + len(in.GRPCRoutes) + len(in.ReferenceGrants) + len(in.ReplicaSets) + len(in.Deployments) + len(in.AuthorizationPolicies) + len(in.PeerAuthentications) +
		len(in.RequestAuthentications) + len(in.BackendTrafficPolicies)
	set := make(map[any]struct{}, n)
	add := func(o any) { set[o] = struct{}{} }
	for _, o := range in.Namespaces {
		add(o)
	}
	for _, o := range in.Services {
		add(o)
	}
	for _, o := range in.EndpointSlices {
		add(o)
	}
	for _, o := range in.Gateways {
		add(o)
	}
	for _, o := range in.GatewayClasses {
		add(o)
	}
	for _, o := range in.HTTPRoutes {
		add(o)
	}
	for _, o := range in.GRPCRoutes {
		add(o)
	}
	for _, o := range in.ReferenceGrants {
		add(o)
	}
	for _, o := range in.ReplicaSets {
		add(o)
	}
	for _, o := range in.Deployments {
		add(o)
	}
	for _, o := range in.AuthorizationPolicies {
		add(o)
	}
	for _, o := range in.PeerAuthentications {
		add(o)
	}
	for _, o := range in.RequestAuthentications {
		add(o)
	}
	for _, o := range in.BackendTrafficPolicies {
		add(o)
	}
	return set
}

func sameSet(a, b map[any]struct{}) bool {
	if len(a) != len(b) {
		return false
	}
	for k := range a {
		if _, ok := b[k]; !ok {
			return false
		}
	}
	return true
}

// podResult is everything the translation derives from one pod.
type podResult struct {
	// workload is nil when the pod is not a workload (no IP, host
	// network, finished).
	workload *pb.Workload
	// peer authentication: the policy that applies to the pod's
	// workload-level mode and the selector policies it beat.
	paWinner *v1alpha1.PeerAuthentication
	paLosers []*v1alpha1.PeerAuthentication
	// enrolledByLabel: the pod opted in with its own label.
	enrolledByLabel bool
	namespace       string
	// problem is the pod's broken use-waypoint label, if any.
	problem *BindingProblem
}

// translator holds the translation of the non-pod inputs and the indexes
// the per-pod translation uses. After prepare it is read-only.
type translator struct {
	cfg Config
	in  *Input

	namespaces map[string]*corev1.Namespace
	// Services by namespace/name, and selector index per namespace.
	svcByName   map[string]*corev1.Service
	svcSelector map[string]map[string][]*corev1.Service
	waypoints   map[string]*waypoint
	// notWaypointClass says why Gateways of the waypoint class are not
	// waypoints (the class is missing, not amesh's or not accepted);
	// empty when they are. They are then in unavailable instead.
	notWaypointClass string
	// unavailable holds the Gateways of the waypoint class that nobody
	// runs (see waypoint.unavailable), by "<ns>/<name>".
	unavailable map[string]*waypoint
	// bound memoizes boundWaypoint.
	bound map[binding]*waypoint
	// gateways holds every Gateway by "<ns>/<name>".
	gateways map[string]*gwv1.Gateway
	// ReplicaSets and Deployments by UID.
	replicaSets map[types.UID]*appsv1.ReplicaSet
	deployments map[types.UID]*appsv1.Deployment
	// perSA maps "<ns>/<sa>" to the waypoints claiming it, oldest first.
	perSA map[string][]*waypoint
	// serviceWaypoints maps a bound service's resource name to its waypoint.
	serviceWaypoints map[string]*waypoint
	// refusedServices maps a service bound to an unavailable waypoint
	// (its traffic is refused) to that waypoint.
	refusedServices map[string]*waypoint
	// apSelectors indexes WORKLOAD-scope authorizations by namespace and
	// by their smallest "<key>=<value>"; those of the root namespace
	// select in every namespace.
	apSelectors map[string]map[string][]apSelector
	apRoot      map[string][]apSelector
	// Peer authentication policies by level.
	pa peerAuthIndex
	// endpointPorts maps "<ns>/<pod>" to the selector-less Services whose
	// EndpointSlices name that pod, with their ports.
	endpointPorts map[string]map[string][]*pb.Port
	// endpointByAddr indexes outEndpoints by address (raw bytes).
	endpointByAddr map[string][]*pb.Workload
	// Per bound service (resource name): what its waypoint enforces.
	wpAuthz        map[string][]*pb.Authorization
	wpRequestAuthn map[string][]*pb.RequestAuthentication
	wpTraffic      map[string]*pb.TrafficPolicy
	// Per waypoint Gateway ("<ns>/<name>"): the policies targeting it.
	gwAuthz        map[string][]*pb.Authorization
	gwRequestAuthn map[string][]*pb.RequestAuthentication
	gwTraffic      map[string]*pb.TrafficPolicy
	// Per bound service: the routes attached to it and the services
	// they send to.
	wpHTTPRoutes  map[string][]*pb.HTTPRoute
	wpGRPCRoutes  map[string][]*pb.GRPCRoute
	routeBackends map[string][]string
	// status accumulates conditions per "<kind>/<ns>/<name>" (all but
	// those that depend on pods).
	status map[string]*Status

	// The translation of the non-pod inputs.
	outServices         []*pb.Service
	outAuthorizations   []*pb.Authorization
	outWaypointServices []*pb.WaypointService
	outWaypointGateways []*pb.WaypointGateway
	outTrustBundles     []*pb.TrustBundle
	outEndpoints        []*pb.Workload
	outStatuses         []Status
	outRouteStatuses    []RouteStatus
	outServiceStatuses  []Status
	// outNamespaceProblems are the namespaces' binding problems.
	outNamespaceProblems []BindingProblem
}

type apSelector struct {
	name   string
	labels map[string]string
}

func newTranslator(cfg Config, full *Input) *translator {
	in := *full
	in.Pods = nil // per-pod work happens outside the context
	t := &translator{
		cfg:              cfg,
		in:               &in,
		namespaces:       make(map[string]*corev1.Namespace, len(in.Namespaces)),
		svcByName:        make(map[string]*corev1.Service, len(in.Services)),
		svcSelector:      map[string]map[string][]*corev1.Service{},
		waypoints:        map[string]*waypoint{},
		unavailable:      map[string]*waypoint{},
		bound:            map[binding]*waypoint{},
		gateways:         make(map[string]*gwv1.Gateway, len(in.Gateways)),
		replicaSets:      make(map[types.UID]*appsv1.ReplicaSet, len(in.ReplicaSets)),
		deployments:      make(map[types.UID]*appsv1.Deployment, len(in.Deployments)),
		perSA:            map[string][]*waypoint{},
		serviceWaypoints: map[string]*waypoint{},
		refusedServices:  map[string]*waypoint{},
		apSelectors:      map[string]map[string][]apSelector{},
		apRoot:           map[string][]apSelector{},
		endpointPorts:    map[string]map[string][]*pb.Port{},
		endpointByAddr:   map[string][]*pb.Workload{},
		wpAuthz:          map[string][]*pb.Authorization{},
		wpRequestAuthn:   map[string][]*pb.RequestAuthentication{},
		wpTraffic:        map[string]*pb.TrafficPolicy{},
		gwAuthz:          map[string][]*pb.Authorization{},
		gwRequestAuthn:   map[string][]*pb.RequestAuthentication{},
		gwTraffic:        map[string]*pb.TrafficPolicy{},
		wpHTTPRoutes:     map[string][]*pb.HTTPRoute{},
		wpGRPCRoutes:     map[string][]*pb.GRPCRoute{},
		routeBackends:    map[string][]string{},
		status:           map[string]*Status{},
	}
	for _, ns := range in.Namespaces {
		t.namespaces[ns.Name] = ns
	}
	for _, g := range in.Gateways {
		t.gateways[g.Namespace+"/"+g.Name] = g
	}
	for _, rs := range in.ReplicaSets {
		t.replicaSets[rs.UID] = rs
	}
	for _, d := range in.Deployments {
		t.deployments[d.UID] = d
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

// prepare translates the non-pod inputs.
func (t *translator) prepare() {
	t.outServices = t.translateServices()
	t.outAuthorizations = t.authorizations()
	t.pa = t.indexPeerAuthentications()
	t.outEndpoints = t.endpointWorkloads()
	t.routes()
	t.outWaypointServices = t.waypointServices(t.outServices)
	t.outWaypointGateways = t.waypointGateways()
	t.outTrustBundles = []*pb.TrustBundle{{
		TrustDomain: t.cfg.TrustDomain,
		RootsPem:    slices.Clone(t.in.RootCertificates),
	}}
	t.outStatuses = t.contextStatuses()
	t.outServiceStatuses = t.serviceStatuses()
	t.outNamespaceProblems = t.namespaceProblems()
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

func (t *translator) rootCertNamespaces(pods []*podResult) []string {
	set := map[string]bool{t.cfg.RootNamespace: true}
	for _, ns := range t.in.Namespaces {
		if t.namespaceEnrolled(ns.Name) && ns.DeletionTimestamp == nil {
			set[ns.Name] = true
		}
	}
	for _, p := range pods {
		if p.enrolledByLabel {
			set[p.namespace] = true
		}
	}
	// A waypoint's pods mount the ConfigMap, enrolled namespace or not.
	for _, w := range t.waypoints {
		set[w.gw.Namespace] = true
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

// statuses returns every policy's status: the context's (sorted once, in
// prepare), merged with those of PeerAuthentications, which depend on the
// pods.
func (t *translator) statuses(pods []*podResult) []Status {
	pa := t.peerAuthStatuses(pods)
	if len(pa) == 0 {
		return t.outStatuses
	}
	sortStatuses(pa)
	out := make([]Status, 0, len(t.outStatuses)+len(pa))
	a, b := t.outStatuses, pa
	for len(a) > 0 && len(b) > 0 {
		if compareStatus(a[0], b[0]) <= 0 {
			out, a = append(out, a[0]), a[1:]
		} else {
			out, b = append(out, b[0]), b[1:]
		}
	}
	return append(append(out, a...), b...)
}

// contextStatuses sorts the statuses accumulated from the non-pod inputs.
func (t *translator) contextStatuses() []Status {
	out := make([]Status, 0, len(t.status))
	for _, s := range t.status {
		out = append(out, *s)
	}
	sortStatuses(out)
	return out
}

func sortStatuses(l []Status) {
	for i := range l {
		slices.SortFunc(l[i].Conditions, func(a, b metav1.Condition) int { return cmp.Compare(a.Type, b.Type) })
	}
	slices.SortFunc(l, compareStatus)
}

func compareStatus(a, b Status) int {
	return cmp.Or(cmp.Compare(a.Kind, b.Kind), cmp.Compare(a.Namespace, b.Namespace), cmp.Compare(a.Name, b.Name))
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
