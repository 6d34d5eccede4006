package auth

import (
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	appsv1 "k8s.io/api/apps/v1"
	authnv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"sigs.k8s.io/controller-runtime/pkg/client"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	"github.com/amesh-dev/amesh/controller/internal/kubetest"
)

// TestWaypointNeedsItsClass: on a real apiserver, a pod of a waypoint
// Gateway — controlled through its ReplicaSet by the Deployment the
// Gateway controls, with a pod-bound token — is identified as that
// waypoint only while the Gateway's class exists, names amesh's
// controller, is not being deleted and is accepted, and while the Gateway
// itself is accepted (gatewayclass.CheckGateway); otherwise it is refused
// (PermissionDenied) like any other pod, as the deployer would not run it.
func TestWaypointNeedsItsClass(t *testing.T) {
	k := kubetest.Start(t, kubetest.Options{})
	s := runtime.NewScheme()
	if err := clientgoscheme.AddToScheme(s); err != nil {
		t.Fatal(err)
	}
	if err := gwv1.Install(s); err != nil {
		t.Fatal(err)
	}
	c, err := client.New(k.Config, client.Options{Scheme: s})
	if err != nil {
		t.Fatal(err)
	}
	kc, err := kubernetes.NewForConfig(k.Config)
	if err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()
	create := func(o client.Object) {
		t.Helper()
		if err := c.Create(ctx, o); err != nil {
			t.Fatalf("create %T %s: %v", o, o.GetName(), err)
		}
	}
	controller := func(o client.Object, kind string) []metav1.OwnerReference {
		gvk, err := c.GroupVersionKindFor(o)
		if err != nil {
			t.Fatal(err)
		}
		return []metav1.OwnerReference{{APIVersion: gvk.GroupVersion().String(), Kind: kind, Name: o.GetName(), UID: o.GetUID(),
			Controller: new(true)}}
	}
	create(&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "shop"}})
	create(&corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "waypoint"}})
	gw := &gwv1.Gateway{ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "waypoint"},
		Spec: gwv1.GatewaySpec{GatewayClassName: "amesh-waypoint",
			Listeners: []gwv1.Listener{{Name: "mesh", Port: 15008, Protocol: "HBONE"}}}}
	create(gw)
	labels := map[string]string{"gateway.networking.k8s.io/gateway-name": "waypoint"}
	tpl := corev1.PodTemplateSpec{ObjectMeta: metav1.ObjectMeta{Labels: labels},
		Spec: corev1.PodSpec{ServiceAccountName: "waypoint", Containers: []corev1.Container{{Name: "waypoint", Image: "waypoint"}}}}
	dep := &appsv1.Deployment{ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "waypoint", OwnerReferences: controller(gw, "Gateway")},
		Spec: appsv1.DeploymentSpec{Selector: &metav1.LabelSelector{MatchLabels: labels}, Template: tpl}}
	create(dep)
	rs := &appsv1.ReplicaSet{ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "waypoint-1", Labels: labels,
		OwnerReferences: controller(dep, "Deployment")},
		Spec: appsv1.ReplicaSetSpec{Selector: &metav1.LabelSelector{MatchLabels: labels}, Template: tpl}}
	create(rs)
	pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "waypoint-1-a", Labels: labels,
		OwnerReferences: controller(rs, "ReplicaSet")}, Spec: tpl.Spec}
	create(pod)
	tr, err := kc.CoreV1().ServiceAccounts("shop").CreateToken(ctx, "waypoint", &authnv1.TokenRequest{Spec: authnv1.TokenRequestSpec{
		Audiences:      []string{"amesh"},
		BoundObjectRef: &authnv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: pod.Name, UID: pod.UID},
	}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	a := NewAuthorizer(NewReviewer(kc.AuthenticationV1().TokenReviews(), ReviewerOptions{}), c, nil,
		AuthorizerOptions{TrustDomain: spiffeid.RequireTrustDomainFromString("cluster.local")})
	call := metadata.NewIncomingContext(ctx, metadata.Pairs("authorization", "Bearer "+tr.Status.Token))

	setClass := func(gc *gwv1.GatewayClass) {
		t.Helper()
		var old gwv1.GatewayClass
		if err := c.Get(ctx, client.ObjectKey{Name: "amesh-waypoint"}, &old); err == nil {
			old.Finalizers = nil
			if err := c.Update(ctx, &old); err != nil {
				t.Fatal(err)
			}
			if err := c.Delete(ctx, &old); client.IgnoreNotFound(err) != nil {
				t.Fatal(err)
			}
			deadline := time.Now().Add(10 * time.Second)
			for c.Get(ctx, client.ObjectKey{Name: "amesh-waypoint"}, &old) == nil {
				if time.Now().After(deadline) {
					t.Fatal("the GatewayClass is not deleted")
				}
				time.Sleep(20 * time.Millisecond)
			}
		}
		if gc != nil {
			create(gc)
		}
	}
	class := func(mutate func(*gwv1.GatewayClass)) *gwv1.GatewayClass {
		gc := &gwv1.GatewayClass{ObjectMeta: metav1.ObjectMeta{Name: "amesh-waypoint"},
			Spec: gwv1.GatewayClassSpec{ControllerName: "amesh.dev/waypoint-controller"}}
		if mutate != nil {
			mutate(gc)
		}
		return gc
	}
	for _, tc := range []struct {
		name   string
		class  *gwv1.GatewayClass
		delete bool // then delete it (a finalizer holds it)
		why    string
	}{
		{"amesh's", class(nil), false, ""},
		{"missing", nil, false, "the GatewayClass amesh-waypoint does not exist"},
		{"another controller's", class(func(gc *gwv1.GatewayClass) { gc.Spec.ControllerName = "example.com/gateway" }), false,
			"belongs to controller example.com/gateway"},
		{"with parameters", class(func(gc *gwv1.GatewayClass) {
			gc.Spec.ParametersRef = &gwv1.ParametersReference{Group: "", Kind: "ConfigMap", Name: "p", Namespace: new(gwv1.Namespace("shop"))}
		}), false, "is not accepted"},
		{"being deleted", class(func(gc *gwv1.GatewayClass) { gc.Finalizers = []string{"example.com/hold"} }), true, "is being deleted"},
		{"amesh's again", class(nil), false, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			setClass(tc.class)
			if tc.delete {
				if err := c.Delete(ctx, tc.class); err != nil {
					t.Fatal(err)
				}
			}
			role, err := a.Identify(call)
			if tc.why == "" {
				if err != nil || role.Kind != Waypoint || role.Gateway != "shop/waypoint" {
					t.Fatalf("Identify = %v, %v; want waypoint shop/waypoint", role, err)
				}
				return
			}
			if status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), tc.why) {
				t.Fatalf("Identify = %v, %v; want PermissionDenied saying %q", role, err, tc.why)
			}
		})
	}

	// The class is amesh's; the Gateway itself is rejected (spec.addresses),
	// then fixed.
	setAddresses := func(addrs []gwv1.GatewaySpecAddress) {
		t.Helper()
		if err := c.Get(ctx, client.ObjectKeyFromObject(gw), gw); err != nil {
			t.Fatal(err)
		}
		gw.Spec.Addresses = addrs
		if err := c.Update(ctx, gw); err != nil {
			t.Fatal(err)
		}
	}
	setAddresses([]gwv1.GatewaySpecAddress{{Type: new(gwv1.IPAddressType), Value: "10.0.0.1"}})
	within := func(ok func(*Role, error) bool) (*Role, error) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for {
			role, err := a.Identify(call)
			if ok(role, err) || time.Now().After(deadline) {
				return role, err
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	if role, err := within(func(_ *Role, err error) bool { return status.Code(err) == codes.PermissionDenied }); status.Code(err) != codes.PermissionDenied ||
		!strings.Contains(err.Error(), "spec.addresses is not supported") {
		t.Fatalf("Gateway with spec.addresses: Identify = %v, %v; want PermissionDenied saying why", role, err)
	}
	setAddresses(nil)
	if role, err := within(func(_ *Role, err error) bool { return err == nil }); err != nil || role.Kind != Waypoint {
		t.Fatalf("Gateway fixed: Identify = %v, %v; want the waypoint", role, err)
	}
}
