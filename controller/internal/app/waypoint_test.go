package app_test

import (
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	"github.com/amesh-dev/amesh/controller/internal/app"
)

const testWaypointImage = "registry.example/amesh/waypoint:test"

// startWaypointEnv runs the controller with the deployer (image from the
// environment, as the manifests pass it) and installs the waypoint
// GatewayClass exactly as the manifests do.
func startWaypointEnv(t *testing.T) *env {
	t.Helper()
	e := startEnv(t, func(c *app.Config) {
		c.ApplyEnv(func(k string) string {
			if k == "WAYPOINT_IMAGE" {
				return testWaypointImage
			}
			return ""
		})
	})
	e.applyFile(filepath.Join("..", "..", "..", "manifests", "base", "gatewayclass.yaml"))
	return e
}

// waypointGateway creates a waypoint Gateway.
func (e *env) waypointGateway(ns, name string, labels, annotations map[string]string) *gwv1.Gateway {
	e.t.Helper()
	gw := &gwv1.Gateway{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Labels: labels, Annotations: annotations},
		Spec: gwv1.GatewaySpec{
			GatewayClassName: "amesh-waypoint",
			Listeners:        []gwv1.Listener{{Name: "mesh", Port: 15008, Protocol: "HBONE"}},
		},
	}
	e.create(gw)
	return gw
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
}
