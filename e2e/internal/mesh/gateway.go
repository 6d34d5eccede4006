package mesh

import (
	"context"
	"fmt"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"

	"github.com/amesh-dev/amesh/e2e/internal/kube"
)

// Gateway API resources the suite reads.
var (
	GatewaysGVR   = schema.GroupVersionResource{Group: "gateway.networking.k8s.io", Version: "v1", Resource: "gateways"}
	HTTPRoutesGVR = schema.GroupVersionResource{Group: "gateway.networking.k8s.io", Version: "v1", Resource: "httproutes"}
)

// LabelGatewayName is the label the deployer puts on a waypoint's pods.
const LabelGatewayName = "gateway.networking.k8s.io/gateway-name"

// Waypoint creates (or updates) a waypoint Gateway named name in ns, with
// extra labels and annotations (amesh.dev/waypoint-for,
// amesh.dev/for-service-account), and waits until the controller reports
// it Programmed and its pod is Ready; it returns the pod.
func Waypoint(ctx context.Context, c *kube.Client, ns, name string, labels, annotations map[string]string, timeout time.Duration) (*corev1.Pod, error) {
	gw := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "gateway.networking.k8s.io/v1",
		"kind":       "Gateway",
		"metadata":   map[string]any{"name": name, "namespace": ns},
		"spec": map[string]any{
			"gatewayClassName": WaypointClass,
			"listeners":        []any{map[string]any{"name": "mesh", "port": int64(PortHBONE), "protocol": "HBONE"}},
		},
	}}
	if len(labels) > 0 {
		gw.SetLabels(labels)
	}
	if len(annotations) > 0 {
		gw.SetAnnotations(annotations)
	}
	if err := c.Apply(ctx, gw); err != nil {
		return nil, err
	}
	err := kube.Poll(ctx, time.Second, timeout, func(ctx context.Context) (bool, error) {
		u, err := c.Dynamic.Resource(GatewaysGVR).Namespace(ns).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		return conditionTrue(u.Object, "Programmed", u.GetGeneration())
	})
	if err != nil {
		return nil, fmt.Errorf("waypoint %s/%s not programmed: %w", ns, name, err)
	}
	pods, err := c.WaitPods(ctx, ns, LabelGatewayName+"="+name, 1, timeout)
	if err != nil {
		return nil, err
	}
	return &pods[0], nil
}

// conditionTrue reports whether status.conditions holds type=True for
// the object's current generation.
func conditionTrue(obj map[string]any, typ string, generation int64) (bool, error) {
	conds, _, _ := unstructured.NestedSlice(obj, "status", "conditions")
	for _, c := range conds {
		cm, _ := c.(map[string]any)
		if cm["type"] != typ {
			continue
		}
		og, _, _ := unstructured.NestedInt64(cm, "observedGeneration")
		if cm["status"] != "True" || og < generation {
			return false, fmt.Errorf("%s=%v (%v: %v) for generation %d of %d", typ, cm["status"], cm["reason"], cm["message"], og, generation)
		}
		return true, nil
	}
	return false, fmt.Errorf("no %s condition yet", typ)
}

// RouteAccepted reports whether every parent of a route (an HTTPRoute or
// GRPCRoute object) reports Accepted for the route's current generation.
func RouteAccepted(obj map[string]any, generation int64) (bool, error) {
	parents, _, _ := unstructured.NestedSlice(obj, "status", "parents")
	if len(parents) == 0 {
		return false, fmt.Errorf("no parent status yet")
	}
	for _, p := range parents {
		pm, _ := p.(map[string]any)
		if ok, err := conditionTrue(map[string]any{"status": pm}, "Accepted", generation); !ok {
			return false, fmt.Errorf("parent %v: %w", pm["parentRef"], err)
		}
	}
	return true, nil
}

// WaitRouteAccepted waits until an HTTPRoute is Accepted by all its parents.
func WaitRouteAccepted(ctx context.Context, c *kube.Client, ns, name string, timeout time.Duration) error {
	err := kube.Poll(ctx, time.Second, timeout, func(ctx context.Context) (bool, error) {
		u, err := c.Dynamic.Resource(HTTPRoutesGVR).Namespace(ns).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		return RouteAccepted(u.Object, u.GetGeneration())
	})
	if err != nil {
		return fmt.Errorf("HTTPRoute %s/%s not accepted: %w", ns, name, err)
	}
	return nil
}
