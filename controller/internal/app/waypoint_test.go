package app_test

import (
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	eventsv1 "k8s.io/api/events/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/util/retry"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
	gwv1beta1 "sigs.k8s.io/gateway-api/apis/v1beta1"

	pb "github.com/amesh-dev/amesh/api/discovery/v1"
	"github.com/amesh-dev/amesh/controller/internal/app"
)

const testWaypointImage = "registry.example/amesh/waypoint:test"

// startWaypointEnv runs the controller with the deployer (image from the
// environment, as the manifests pass it).
func startWaypointEnv(t *testing.T) *env {
	t.Helper()
	return startEnv(t, func(c *app.Config) {
		c.ApplyEnv(func(k string) string {
			if k == "WAYPOINT_IMAGE" {
				return testWaypointImage
			}
			return ""
		})
	})
}

// TestWaypointDeployer: the controller runs the deployer on its leader. The
// GatewayClass is accepted; a waypoint Gateway becomes a Deployment running
// the configured image with the arguments the waypoint binary needs to reach
// this controller, and the Gateway is Accepted.
func TestWaypointDeployer(t *testing.T) {
	e := startWaypointEnv(t)
	within(t, 20*time.Second, nil, func() bool {
		var gc gwv1.GatewayClass
		if err := e.c.Get(t.Context(), types.NamespacedName{Name: "amesh-waypoint"}, &gc); err != nil {
			return false
		}
		return meta.IsStatusConditionTrue(gc.Status.Conditions, string(gwv1.GatewayClassConditionStatusAccepted))
	}, func() string { return "GatewayClass amesh-waypoint not accepted" })

	e.create(&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "shop", Labels: map[string]string{
		"amesh.dev/dataplane-mode": "ambient",
	}}})
	gw := e.waypointGateway("shop", "waypoint", nil, nil)

	var dep appsv1.Deployment
	within(t, 20*time.Second, nil, func() bool {
		err := e.c.Get(t.Context(), types.NamespacedName{Namespace: "shop", Name: "waypoint"}, &dep)
		if err != nil && !apierrors.IsNotFound(err) {
			t.Fatal(err)
		}
		return err == nil
	}, func() string { return "no Deployment shop/waypoint" })
	if ref := metav1.GetControllerOf(&dep); ref == nil || ref.UID != gw.UID || ref.Kind != "Gateway" {
		t.Errorf("Deployment controller %+v, want the Gateway %s", ref, gw.UID)
	}
	c := dep.Spec.Template.Spec.Containers[0]
	if c.Image != testWaypointImage {
		t.Errorf("waypoint image %q, want %q (from WAYPOINT_IMAGE)", c.Image, testWaypointImage)
	}
	for _, want := range []string{
		"-gateway=shop/waypoint",
		"-controller=amesh-controller.amesh-system.svc:15012",
		"-controller-server-name=amesh-controller.amesh-system.svc",
		"-trust-domain=cluster.local",
		"-root-cert=/var/run/secrets/amesh/root-cert.pem",
		"-token-file=/var/run/secrets/tokens/amesh-token",
	} {
		if !slices.Contains(c.Args, want) {
			t.Errorf("waypoint args lack %q:\n%s", want, strings.Join(c.Args, "\n"))
		}
	}
	var audience string
	for _, v := range dep.Spec.Template.Spec.Volumes {
		if v.Projected != nil {
			for _, s := range v.Projected.Sources {
				if s.ServiceAccountToken != nil {
					audience = s.ServiceAccountToken.Audience
				}
			}
		}
	}
	if audience != "amesh" {
		t.Errorf("projected token audience %q, want amesh", audience)
	}
	within(t, 20*time.Second, nil, func() bool {
		var got gwv1.Gateway
		e.get("shop", "waypoint", &got)
		return meta.IsStatusConditionTrue(got.Status.Conditions, string(gwv1.GatewayConditionAccepted))
	}, func() string { return "Gateway shop/waypoint not Accepted" })

	// A Gateway is a waypoint only while its class is amesh's: without
	// the GatewayClass the deployer removes the waypoint and, in step,
	// the binding reports it unavailable (its traffic is refused); with
	// the class back, both return.
	e.create(&corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "reviews", Labels: map[string]string{"amesh.dev/use-waypoint": "waypoint"}},
		Spec:       corev1.ServiceSpec{Selector: map[string]string{"app": "reviews"}, Ports: []corev1.ServicePort{{Name: "http", Port: 80}}},
	})
	bound := func(status metav1.ConditionStatus, msg string) {
		t.Helper()
		var last []metav1.Condition
		within(t, 20*time.Second, nil, func() bool {
			var svc corev1.Service
			e.get("shop", "reviews", &svc)
			last = svc.Status.Conditions
			c := meta.FindStatusCondition(svc.Status.Conditions, "amesh.dev/WaypointBound")
			return c != nil && c.Status == status && strings.Contains(c.Message, msg)
		}, func() string { return fmt.Sprintf("WaypointBound %s %q; have %+v", status, msg, last) })
	}
	bound(metav1.ConditionTrue, "bound to waypoint shop/waypoint")
	var gc gwv1.GatewayClass
	e.get("", "amesh-waypoint", &gc)
	if err := e.c.Delete(t.Context(), &gc); err != nil {
		t.Fatal(err)
	}
	bound(metav1.ConditionFalse, "(the GatewayClass amesh-waypoint does not exist): traffic bound to it is refused")
	within(t, 20*time.Second, nil, func() bool {
		err := e.c.Get(t.Context(), types.NamespacedName{Namespace: "shop", Name: "waypoint"}, &appsv1.Deployment{})
		return apierrors.IsNotFound(err)
	}, func() string { return "the Deployment of a Gateway without its class is still there" })
	e.applyFile(filepath.Join("..", "..", "..", "manifests", "base", "gatewayclass.yaml"))
	bound(metav1.ConditionTrue, "bound to waypoint shop/waypoint")
}

// TestWaypointConfiguration runs routes, bindings and per-service-account
// waypoints through the controller against a real apiserver: a waypoint
// (its pod owned by the deployer's Deployment) receives its own
// WaypointGateway and the WaypointService of each Service bound to it,
// with the HTTPRoutes attached to that Service; the leader writes amesh's
// route parent status next to another controller's entry, the Services'
// WaypointBound condition, a Warning event for a pod bound to a waypoint
// that does not serve workloads; the oldest of two waypoints claiming a
// service account serves it and the other reports the conflict.
func TestWaypointConfiguration(t *testing.T) {
	e := startWaypointEnv(t)
	ctx := t.Context()
	e.node("node-a")
	e.create(&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "shop", Labels: map[string]string{
		"amesh.dev/dataplane-mode": "ambient", "amesh.dev/use-waypoint": "waypoint",
	}}})
	e.create(&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "other", Labels: map[string]string{
		"amesh.dev/dataplane-mode": "ambient",
	}}})
	service := func(ns, name string, labels map[string]string) *corev1.Service {
		s := &corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Labels: labels},
			Spec: corev1.ServiceSpec{
				Selector: map[string]string{"app": name},
				Ports:    []corev1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromInt32(8080)}},
			},
		}
		e.create(s)
		return s
	}
	reviews := service("shop", "reviews", nil)
	service("shop", "reviews-v1", nil)
	service("shop", "reviews-v2", nil)
	service("shop", "lost", map[string]string{"amesh.dev/use-waypoint": "ghost"})
	service("other", "shared", nil)
	e.waypointGateway("shop", "waypoint", nil, nil)

	wpPod := e.waypointPod("shop", "waypoint", "waypoint-1", "node-a", "10.3.1.9")
	wm := e.subscribe(e.token("shop", "waypoint", wpPod, "amesh"), map[string]string{
		"kind": "waypoint", "namespace": "shop", "pod": "waypoint-1", "gateway": "shop/waypoint",
	})
	reviewsKey := "shop/reviews.shop.svc.cluster.local"
	within(t, 10*time.Second, wm, func() bool {
		wg, _ := wm.get(pb.WaypointGatewayType, "shop/waypoint").(*pb.WaypointGateway)
		return wg != nil && wm.get(pb.WaypointServiceType, reviewsKey) != nil
	}, func() string { return "waypoint has no WaypointGateway or no WaypointService for reviews" })

	// A route with weighted backends, an experimental-channel retry and a
	// backend in another namespace without a ReferenceGrant.
	route := &gwv1.HTTPRoute{
		ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "reviews"},
		Spec: gwv1.HTTPRouteSpec{
			CommonRouteSpec: gwv1.CommonRouteSpec{ParentRefs: []gwv1.ParentReference{{
				Group: ptr.To(gwv1.Group("")), Kind: ptr.To(gwv1.Kind("Service")), Name: "reviews", Port: ptr.To[int32](80),
			}}},
			Rules: []gwv1.HTTPRouteRule{
				{
					Matches: []gwv1.HTTPRouteMatch{{Path: &gwv1.HTTPPathMatch{Type: ptr.To(gwv1.PathMatchPathPrefix), Value: ptr.To("/shared")}}},
					BackendRefs: []gwv1.HTTPBackendRef{{BackendRef: gwv1.BackendRef{BackendObjectReference: gwv1.BackendObjectReference{
						Name: "shared", Namespace: ptr.To(gwv1.Namespace("other")), Port: ptr.To[int32](80),
					}}}},
				},
				{
					Retry: &gwv1.HTTPRouteRetry{Attempts: ptr.To(3), Codes: []gwv1.HTTPRouteRetryStatusCode{503}},
					BackendRefs: []gwv1.HTTPBackendRef{
						{BackendRef: gwv1.BackendRef{BackendObjectReference: gwv1.BackendObjectReference{Name: "reviews-v1", Port: ptr.To[int32](80)}, Weight: ptr.To[int32](80)}},
						{BackendRef: gwv1.BackendRef{BackendObjectReference: gwv1.BackendObjectReference{Name: "reviews-v2", Port: ptr.To[int32](80)}, Weight: ptr.To[int32](20)}},
					},
				},
			},
		},
	}
	e.create(route)
	// Another mesh's entry, which amesh must keep.
	other := gwv1.RouteParentStatus{
		ParentRef:      route.Spec.ParentRefs[0],
		ControllerName: "other.example/mesh-controller",
		Conditions: []metav1.Condition{{Type: "Accepted", Status: metav1.ConditionTrue, Reason: "Accepted",
			LastTransitionTime: metav1.Now(), ObservedGeneration: route.Generation}},
	}
	err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		var r gwv1.HTTPRoute
		e.get("shop", "reviews", &r)
		r.Status.Parents = append(r.Status.Parents, other)
		return e.c.Status().Update(ctx, &r)
	})
	if err != nil {
		t.Fatal(err)
	}
	d := within(t, pushDeadline, wm, func() bool {
		ws, _ := wm.get(pb.WaypointServiceType, reviewsKey).(*pb.WaypointService)
		if ws == nil || len(ws.HttpRoutes) != 1 || len(ws.HttpRoutes[0].Rules) != 2 {
			return false
		}
		r := ws.HttpRoutes[0]
		shared, weighted := r.Rules[0], r.Rules[1]
		return slices.Equal(r.Ports, []uint32{80}) &&
			shared.InvalidBackends && len(shared.Backends) == 1 && shared.Backends[0].Service == "" &&
			len(weighted.Backends) == 2 && weighted.Backends[0].Weight == 80 && weighted.Backends[1].Weight == 20 &&
			weighted.Backends[0].Service == "shop/reviews-v1.shop.svc.cluster.local" &&
			weighted.Retry.GetAttempts() == 3 && slices.Equal(weighted.Retry.GetCodes(), []uint32{503})
	}, func() string { return "WaypointService " + describe(wm.get(pb.WaypointServiceType, reviewsKey)) })
	t.Logf("route pushed to the waypoint in %v", d)
	routeParent := func(want func(accepted, resolved *metav1.Condition) bool) {
		t.Helper()
		within(t, 10*time.Second, nil, func() bool {
			var r gwv1.HTTPRoute
			e.get("shop", "reviews", &r)
			var mine, theirs *gwv1.RouteParentStatus
			for i := range r.Status.Parents {
				switch r.Status.Parents[i].ControllerName {
				case "amesh.dev/waypoint-controller":
					mine = &r.Status.Parents[i]
				case other.ControllerName:
					theirs = &r.Status.Parents[i]
				}
			}
			if mine == nil || theirs == nil || len(r.Status.Parents) != 2 {
				return false
			}
			acc := meta.FindStatusCondition(mine.Conditions, "Accepted")
			res := meta.FindStatusCondition(mine.Conditions, "ResolvedRefs")
			return acc != nil && res != nil && acc.ObservedGeneration == r.Generation && !acc.LastTransitionTime.IsZero() && want(acc, res)
		}, func() string {
			var r gwv1.HTTPRoute
			e.get("shop", "reviews", &r)
			return fmt.Sprintf("route status %+v", r.Status.Parents)
		})
	}
	routeParent(func(acc, res *metav1.Condition) bool {
		return acc.Status == metav1.ConditionTrue && res.Status == metav1.ConditionFalse && res.Reason == "RefNotPermitted"
	})

	// A ReferenceGrant lets the route use the other namespace's Service.
	e.create(&gwv1beta1.ReferenceGrant{
		ObjectMeta: metav1.ObjectMeta{Namespace: "other", Name: "from-shop"},
		Spec: gwv1beta1.ReferenceGrantSpec{
			From: []gwv1beta1.ReferenceGrantFrom{{Group: gwv1.GroupName, Kind: "HTTPRoute", Namespace: "shop"}},
			To:   []gwv1beta1.ReferenceGrantTo{{Group: "", Kind: "Service"}},
		},
	})
	within(t, pushDeadline, wm, func() bool {
		ws, _ := wm.get(pb.WaypointServiceType, reviewsKey).(*pb.WaypointService)
		if ws == nil || len(ws.HttpRoutes) != 1 {
			return false
		}
		r := ws.HttpRoutes[0].Rules[0]
		return !r.InvalidBackends && r.Backends[0].Service == "other/shared.other.svc.cluster.local"
	}, func() string { return "WaypointService " + describe(wm.get(pb.WaypointServiceType, reviewsKey)) })
	routeParent(func(acc, res *metav1.Condition) bool {
		return acc.Status == metav1.ConditionTrue && res.Status == metav1.ConditionTrue
	})

	// Service binding status: from the namespace's label, and a Service's
	// own label naming a Gateway that does not exist.
	serviceBound := func(name string, want func(*metav1.Condition) bool) {
		t.Helper()
		within(t, 10*time.Second, nil, func() bool {
			var s corev1.Service
			e.get("shop", name, &s)
			return want(meta.FindStatusCondition(s.Status.Conditions, "amesh.dev/WaypointBound"))
		}, func() string {
			var s corev1.Service
			e.get("shop", name, &s)
			return fmt.Sprintf("Service %s conditions %+v", name, s.Status.Conditions)
		})
	}
	serviceBound("reviews", func(c *metav1.Condition) bool {
		return c != nil && c.Status == metav1.ConditionTrue && c.Reason == "Bound"
	})
	serviceBound("lost", func(c *metav1.Condition) bool {
		return c != nil && c.Status == metav1.ConditionFalse && c.Reason == "GatewayNotFound" && strings.Contains(c.Message, "shop/ghost")
	})

	// Taking the Service off the waypoint: the route is no longer
	// accepted (amesh needs a waypoint for routes), the waypoint loses the
	// Service, and the Service's condition goes.
	err = retry.RetryOnConflict(retry.DefaultRetry, func() error {
		e.get("shop", "reviews", reviews)
		reviews.Labels = map[string]string{"amesh.dev/use-waypoint": "none"}
		return e.c.Update(ctx, reviews)
	})
	if err != nil {
		t.Fatal(err)
	}
	within(t, pushDeadline, wm, func() bool { return wm.get(pb.WaypointServiceType, reviewsKey) == nil },
		func() string { return "waypoint still has the WaypointService of reviews" })
	routeParent(func(acc, _ *metav1.Condition) bool {
		return acc.Status == metav1.ConditionFalse && acc.Reason == "WaypointRequired"
	})
	serviceBound("reviews", func(c *metav1.Condition) bool { return c == nil })

	// A pod bound to a waypoint that serves services only: a Warning event.
	e.serviceAccount("shop", "misbound")
	misbound := e.pod("shop", "misbound", "misbound", "node-a", "10.3.1.20",
		map[string]string{"amesh.dev/use-waypoint": "waypoint"}, nil)
	within(t, 10*time.Second, nil, func() bool {
		var evs eventsv1.EventList
		if err := e.c.List(ctx, &evs, client.InNamespace("shop")); err != nil {
			t.Fatal(err)
		}
		for _, ev := range evs.Items {
			if ev.Regarding.UID == misbound.UID && ev.Type == corev1.EventTypeWarning && ev.Reason == "WaypointForMismatch" {
				return true
			}
		}
		return false
	}, func() string { return "no WaypointForMismatch event for pod shop/misbound" })

	// Two waypoints claim the service account "payments": the older one
	// serves it; the newer one says it is in conflict.
	first := e.waypointGateway("shop", "payments-a", nil, map[string]string{"amesh.dev/for-service-account": "payments"})
	time.Sleep(1100 * time.Millisecond) // creation timestamps have second resolution
	e.waypointGateway("shop", "payments-b", nil, map[string]string{"amesh.dev/for-service-account": "payments"})
	e.serviceAccount("shop", "payments")
	zt := e.pod("amesh-system", "ztunnel-a", "ztunnel", "node-a", "10.3.0.2", nil, nil)
	m := e.subscribe(e.token("amesh-system", "ztunnel", zt, "amesh"), map[string]string{
		"kind": "ztunnel", "node": "node-a", "namespace": "amesh-system", "pod": "ztunnel-a",
	})
	pay := e.pod("shop", "payments-1", "payments", "node-a", "10.3.1.30", map[string]string{"app": "payments"},
		map[string]string{"amesh.dev/redirection": "enabled"})
	within(t, 10*time.Second, m, func() bool {
		w, _ := m.get(pb.WorkloadType, string(pay.UID)).(*pb.Workload)
		return w != nil && w.Waypoint.GetGateway() == "shop/"+first.Name
	}, func() string { return "payments workload " + describe(m.get(pb.WorkloadType, string(pay.UID))) })
	gwCond := func(name string) *metav1.Condition {
		var g gwv1.Gateway
		e.get("shop", name, &g)
		return meta.FindStatusCondition(g.Status.Conditions, "amesh.dev/ForServiceAccount")
	}
	within(t, 20*time.Second, nil, func() bool {
		a, b := gwCond("payments-a"), gwCond("payments-b")
		return a != nil && a.Status == metav1.ConditionTrue && b != nil && b.Status == metav1.ConditionFalse && b.Reason == "Conflicted"
	}, func() string {
		return fmt.Sprintf("payments-a %+v, payments-b %+v", gwCond("payments-a"), gwCond("payments-b"))
	})
}

// TestRootCertFollowsWaypoints: the root certificate ConfigMap, which a
// waypoint's pods mount, is published in a namespace holding a waypoint
// Gateway even when the namespace is not enrolled (and the Gateway's
// Programmed message stops pointing at it), and removed once the namespace
// neither holds a waypoint nor is enrolled; a ConfigMap of that name that
// the controller did not create is never touched.
func TestRootCertFollowsWaypoints(t *testing.T) {
	e := startWaypointEnv(t)
	rootCM := func(ns string) (*corev1.ConfigMap, error) {
		var cm corev1.ConfigMap
		err := e.c.Get(t.Context(), types.NamespacedName{Namespace: ns, Name: "amesh-root-cert"}, &cm)
		return &cm, err
	}
	published := func(ns string) {
		t.Helper()
		within(t, 20*time.Second, nil, func() bool {
			cm, err := rootCM(ns)
			return err == nil && strings.Contains(cm.Data["root-cert.pem"], "BEGIN CERTIFICATE")
		}, func() string { return "no root ConfigMap in " + ns })
	}
	gone := func(ns string) {
		t.Helper()
		within(t, 20*time.Second, nil, func() bool {
			_, err := rootCM(ns)
			return apierrors.IsNotFound(err)
		}, func() string { return "root ConfigMap still in " + ns })
	}
	for _, ns := range []string{"edge", "byhand"} {
		e.create(&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}})
	}
	e.create(&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "shop", Labels: map[string]string{
		"amesh.dev/dataplane-mode": "ambient",
	}}})
	// An operator's own ConfigMap of that name in a namespace amesh does
	// not need.
	e.create(&corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Namespace: "byhand", Name: "amesh-root-cert"},
		Data: map[string]string{"root-cert.pem": "the operator's"}})

	published("shop")
	gw := e.waypointGateway("edge", "waypoint", nil, nil)
	published("edge")
	within(t, 20*time.Second, nil, func() bool {
		var got gwv1.Gateway
		e.get("edge", "waypoint", &got)
		c := meta.FindStatusCondition(got.Status.Conditions, string(gwv1.GatewayConditionProgrammed))
		return c != nil && c.ObservedGeneration == got.Generation && !strings.Contains(c.Message, "ConfigMap")
	}, func() string { return "Programmed of edge/waypoint still waits for the root ConfigMap" })

	// The waypoint goes: so does the ConfigMap of its namespace.
	if err := e.c.Delete(t.Context(), gw); err != nil {
		t.Fatal(err)
	}
	gone("edge")
	// The namespace is no longer enrolled: likewise.
	var shop corev1.Namespace
	e.get("", "shop", &shop)
	delete(shop.Labels, "amesh.dev/dataplane-mode")
	if err := e.c.Update(t.Context(), &shop); err != nil {
		t.Fatal(err)
	}
	gone("shop")
	published("amesh-system")
	if cm, err := rootCM("byhand"); err != nil || cm.Data["root-cert.pem"] != "the operator's" {
		t.Errorf("the operator's ConfigMap: %v %v", cm.Data, err)
	}
}
