package auth

import (
	"context"
	"fmt"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	"github.com/amesh-dev/amesh/api/bearer"
	"github.com/amesh-dev/amesh/api/identity"
	"github.com/amesh-dev/amesh/controller/internal/gatewayclass"
	"github.com/amesh-dev/amesh/controller/internal/label"
)

// Kind is what a data-plane caller is.
type Kind int

// Caller kinds.
const (
	Ztunnel Kind = iota + 1
	Waypoint
)

func (k Kind) String() string {
	switch k {
	case Ztunnel:
		return "ztunnel"
	case Waypoint:
		return "waypoint"
	}
	return "unknown"
}

// Role is an identified data-plane caller.
type Role struct {
	Kind   Kind
	Caller *Caller
	// Node the ztunnel runs on.
	Node string
	// Gateway "<namespace>/<name>" the waypoint implements.
	Gateway string
}

// ID names the role for logs and the xDS server: "ztunnel/<node>/<pod>" or
// "waypoint/<ns>/<gateway>/<pod>".
func (r *Role) ID() string {
	if r.Kind == Ztunnel {
		return "ztunnel/" + r.Node + "/" + r.Caller.PodName
	}
	return "waypoint/" + r.Gateway + "/" + r.Caller.PodName
}

// NodeNameIndex is the pod field index the Authorizer lists by.
const NodeNameIndex = "spec.nodeName"

// IndexPods registers NodeNameIndex with a cache's field indexer; call it
// before the cache starts.
func IndexPods(ctx context.Context, fi client.FieldIndexer) error {
	return fi.IndexField(ctx, &corev1.Pod{}, NodeNameIndex, func(o client.Object) []string {
		if n := o.(*corev1.Pod).Spec.NodeName; n != "" {
			return []string{n}
		}
		return nil
	})
}

// Authorizer identifies data-plane callers and decides which identities
// they may obtain certificates for. It implements ca.Authorizer.
type Authorizer struct {
	reviewer *Reviewer
	// cache is the informer cache (with NodeNameIndex on pods); api reads
	// the apiserver directly when the cache has not seen an object yet.
	cache, api client.Reader
	opts       AuthorizerOptions
}

// AuthorizerOptions configures an Authorizer.
type AuthorizerOptions struct {
	TrustDomain spiffeid.TrustDomain
	// ZtunnelNamespace and ZtunnelServiceAccount name the ztunnel's
	// service account; default amesh-system/ztunnel.
	ZtunnelNamespace      string
	ZtunnelServiceAccount string
	// WaypointClass is the GatewayClass of waypoints; default
	// amesh-waypoint. A Gateway of that class is a waypoint only while
	// the class exists, names WaypointController and is accepted
	// (package gatewayclass), as the deployer requires to run it.
	WaypointClass string
	// WaypointController is the class's controllerName; default
	// amesh.dev/waypoint-controller.
	WaypointController string
}

// NewAuthorizer returns an Authorizer. api may be nil (no fallback).
func NewAuthorizer(r *Reviewer, cache, api client.Reader, opts AuthorizerOptions) *Authorizer {
	if opts.ZtunnelNamespace == "" {
		opts.ZtunnelNamespace = label.SystemNamespace
	}
	if opts.ZtunnelServiceAccount == "" {
		opts.ZtunnelServiceAccount = "ztunnel"
	}
	if opts.WaypointClass == "" {
		opts.WaypointClass = label.WaypointClass
	}
	if opts.WaypointController == "" {
		opts.WaypointController = label.WaypointController
	}
	return &Authorizer{reviewer: r, cache: cache, api: api, opts: opts}
}

// Identify authenticates the bearer token of an incoming gRPC call and
// returns the caller's role. Callers that are neither the ztunnel service
// account (with a pod-bound token) nor a waypoint pod are refused with
// PermissionDenied.
func (a *Authorizer) Identify(ctx context.Context) (*Role, error) {
	tok, err := bearer.FromIncoming(ctx)
	if err != nil {
		return nil, err
	}
	c, err := a.reviewer.Review(ctx, tok)
	if err != nil {
		return nil, err
	}
	if c.Namespace == a.opts.ZtunnelNamespace && c.ServiceAccount == a.opts.ZtunnelServiceAccount {
		node := c.NodeName
		if node == "" {
			pod, err := a.callerPod(ctx, c)
			if err != nil {
				return nil, err
			}
			node = pod.Spec.NodeName
		}
		if node == "" {
			return nil, errorf(codes.PermissionDenied, "ztunnel %s: the pod is not scheduled on a node", c)
		}
		return &Role{Kind: Ztunnel, Caller: c, Node: node}, nil
	}
	pod, err := a.callerPod(ctx, c)
	if err != nil {
		return nil, err
	}
	gw := pod.Labels[label.GatewayName]
	if gw == "" {
		return nil, errorf(codes.PermissionDenied, "%s is neither ztunnel nor a waypoint", c)
	}
	g, err := getGateway(ctx, a.cache, a.api, c.Namespace, gw)
	if err != nil {
		return nil, err
	}
	if g == nil || string(g.Spec.GatewayClassName) != a.opts.WaypointClass {
		return nil, errorf(codes.PermissionDenied, "%s: Gateway %s/%s is not a waypoint (class %s)", c, c.Namespace, gw, a.opts.WaypointClass)
	}
	gc, err := getGatewayClass(ctx, a.cache, a.api, a.opts.WaypointClass)
	if err != nil {
		return nil, err
	}
	if ok, why := gatewayclass.Waypoint(gc, a.opts.WaypointClass, a.opts.WaypointController); !ok {
		return nil, errorf(codes.PermissionDenied, "%s: Gateway %s/%s is not a waypoint: %s", c, c.Namespace, gw, why)
	}
	if v := gatewayclass.CheckGateway(g); !v.Accepted {
		return nil, errorf(codes.PermissionDenied, "%s: Gateway %s/%s is not a waypoint: it is not accepted: %s", c, c.Namespace, gw, v.Message)
	}
	if err := a.waypointOwned(ctx, c, pod, g); err != nil {
		return nil, err
	}
	return &Role{Kind: Waypoint, Caller: c, Gateway: c.Namespace + "/" + gw}, nil
}

// waypointOwned checks that pod is one of the Gateway's waypoint pods: its
// controller is a ReplicaSet whose controller is the Deployment named after
// the Gateway (the deployer's), which the Gateway controls. A pod that only
// carries the Gateway's label does not read the waypoint's configuration.
func (a *Authorizer) waypointOwned(ctx context.Context, c *Caller, pod *corev1.Pod, gw *gwv1.Gateway) error {
	deny := func(why string) error {
		return errorf(codes.PermissionDenied, "%s: pod %s/%s is not a pod of waypoint %s/%s: %s", c, pod.Namespace, pod.Name, gw.Namespace, gw.Name, why)
	}
	rsRef := metav1.GetControllerOfNoCopy(pod)
	if rsRef == nil || rsRef.Kind != "ReplicaSet" {
		return deny("it is not controlled by a ReplicaSet")
	}
	var rs appsv1.ReplicaSet
	found, err := getObject(ctx, a.cache, a.api, pod.Namespace, rsRef.Name, rsRef.UID, &rs)
	if err != nil {
		return err
	}
	if !found {
		return deny("its ReplicaSet " + rsRef.Name + " was not found")
	}
	depRef := metav1.GetControllerOfNoCopy(&rs)
	if depRef == nil || depRef.Kind != "Deployment" || depRef.Name != gw.Name {
		return deny("its ReplicaSet " + rs.Name + " is not controlled by the Deployment " + gw.Name)
	}
	var dep appsv1.Deployment
	found, err = getObject(ctx, a.cache, a.api, pod.Namespace, depRef.Name, depRef.UID, &dep)
	if err != nil {
		return err
	}
	if !found {
		return deny("its Deployment " + depRef.Name + " was not found")
	}
	if ref := metav1.GetControllerOfNoCopy(&dep); ref == nil || ref.Kind != "Gateway" || ref.UID != gw.UID {
		return deny("the Deployment " + dep.Name + " is not controlled by the Gateway")
	}
	return nil
}

// getObject reads ns/name into obj from the cache, else from the
// apiserver, and reports whether it exists with the given UID.
func getObject(ctx context.Context, cache, api client.Reader, ns, name string, uid types.UID, obj client.Object) (bool, error) {
	for _, r := range []client.Reader{cache, api} {
		if r == nil {
			continue
		}
		err := r.Get(ctx, types.NamespacedName{Namespace: ns, Name: name}, obj)
		switch {
		case apierrors.IsNotFound(err):
			continue
		case err != nil:
			return false, errorf(codes.Unavailable, "get %T %s/%s: %v", obj, ns, name, err)
		case obj.GetUID() != uid:
			continue // another object of the same name: ask the apiserver
		}
		return true, nil
	}
	return false, nil
}

// callerPod returns the pod a token is bound to, checking its UID.
func (a *Authorizer) callerPod(ctx context.Context, c *Caller) (*corev1.Pod, error) {
	if c.PodName == "" {
		return nil, errorf(codes.PermissionDenied, "%s: the token is not bound to a pod", c)
	}
	pod, err := getPod(ctx, a.cache, a.api, c.Namespace, c.PodName, c.PodUID)
	if err != nil {
		return nil, err
	}
	if pod == nil {
		return nil, errorf(codes.PermissionDenied, "%s: pod not found", c)
	}
	if pod.Spec.ServiceAccountName != c.ServiceAccount {
		return nil, errorf(codes.PermissionDenied, "%s: the pod runs as %s", c, pod.Spec.ServiceAccountName)
	}
	return pod, nil
}

// Authorize lets a ztunnel obtain identities of pods running on its node,
// and a waypoint its own identity; it refuses everything else with a gRPC
// status error (DESIGN.md §4).
func (a *Authorizer) Authorize(ctx context.Context, id spiffeid.ID) error {
	if id.TrustDomain() != a.opts.TrustDomain {
		return errorf(codes.PermissionDenied, "%s is not of trust domain %s", id, a.opts.TrustDomain)
	}
	w, err := identity.FromID(id)
	if err != nil {
		return errorf(codes.InvalidArgument, "%s: %v", id, err)
	}
	role, err := a.Identify(ctx)
	if err != nil {
		return err
	}
	switch role.Kind {
	case Ztunnel:
		ok, err := a.runsOn(ctx, w.Namespace, w.ServiceAccount, role.Node)
		if err != nil {
			return err
		}
		if !ok {
			return errorf(codes.PermissionDenied, "ztunnel on node %s: no pod runs as %s/%s on that node",
				role.Node, w.Namespace, w.ServiceAccount)
		}
		return nil
	case Waypoint:
		if w.Namespace != role.Caller.Namespace || w.ServiceAccount != role.Caller.ServiceAccount {
			return errorf(codes.PermissionDenied, "waypoint %s may obtain only its own identity, not %s/%s",
				role.Caller, w.Namespace, w.ServiceAccount)
		}
		return nil
	}
	return errorf(codes.PermissionDenied, "unknown caller")
}

// runsOn reports whether a pod of namespace ns running as sa is scheduled
// on node (and not finished). The cache is asked first, then the apiserver.
func (a *Authorizer) runsOn(ctx context.Context, ns, sa, node string) (bool, error) {
	for _, r := range []client.Reader{a.cache, a.api} {
		if r == nil {
			continue
		}
		var pods corev1.PodList
		if err := r.List(ctx, &pods, client.InNamespace(ns), client.MatchingFields{NodeNameIndex: node}); err != nil {
			return false, errorf(codes.Unavailable, "list pods on node %s: %v", node, err)
		}
		for i := range pods.Items {
			p := &pods.Items[i]
			if p.Spec.NodeName == node && serviceAccountOf(p) == sa &&
				p.Status.Phase != corev1.PodSucceeded && p.Status.Phase != corev1.PodFailed {
				return true, nil
			}
		}
	}
	return false, nil
}

func serviceAccountOf(p *corev1.Pod) string {
	if p.Spec.ServiceAccountName == "" {
		return "default"
	}
	return p.Spec.ServiceAccountName
}

// getPod reads a pod from the cache, else from the apiserver; nil if it
// does not exist (or exists with another UID than uid, when uid is set).
func getPod(ctx context.Context, cache, api client.Reader, ns, name, uid string) (*corev1.Pod, error) {
	for _, r := range []client.Reader{cache, api} {
		if r == nil {
			continue
		}
		var p corev1.Pod
		err := r.Get(ctx, types.NamespacedName{Namespace: ns, Name: name}, &p)
		switch {
		case apierrors.IsNotFound(err):
			continue
		case err != nil:
			return nil, errorf(codes.Unavailable, "get pod %s/%s: %v", ns, name, err)
		case uid != "" && string(p.UID) != uid:
			continue // a newer pod of the same name: ask the apiserver
		}
		return &p, nil
	}
	return nil, nil
}

func getGateway(ctx context.Context, cache, api client.Reader, ns, name string) (*gwv1.Gateway, error) {
	for _, r := range []client.Reader{cache, api} {
		if r == nil {
			continue
		}
		var g gwv1.Gateway
		err := r.Get(ctx, types.NamespacedName{Namespace: ns, Name: name}, &g)
		switch {
		case apierrors.IsNotFound(err):
			continue
		case err != nil:
			return nil, errorf(codes.Unavailable, "get gateway %s/%s: %v", ns, name, err)
		}
		return &g, nil
	}
	return nil, nil
}

// getGatewayClass reads a GatewayClass from the cache, else from the
// apiserver; nil when it does not exist.
func getGatewayClass(ctx context.Context, cache, api client.Reader, name string) (*gwv1.GatewayClass, error) {
	for _, r := range []client.Reader{cache, api} {
		if r == nil {
			continue
		}
		var gc gwv1.GatewayClass
		err := r.Get(ctx, types.NamespacedName{Name: name}, &gc)
		switch {
		case apierrors.IsNotFound(err):
			continue
		case err != nil:
			return nil, errorf(codes.Unavailable, "get gatewayclass %s: %v", name, err)
		}
		return &gc, nil
	}
	return nil, nil
}

// String describes a role.
func (r *Role) String() string { return fmt.Sprintf("%s %s", r.Kind, r.Caller) }
