package gatewayclass

import (
	"strings"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
)

const (
	class      = "amesh-waypoint"
	controller = "amesh.dev/waypoint-controller"
)

func TestWaypoint(t *testing.T) {
	now := metav1.Now()
	gc := func(mutate func(*gwv1.GatewayClass)) *gwv1.GatewayClass {
		c := &gwv1.GatewayClass{ObjectMeta: metav1.ObjectMeta{Name: class}, Spec: gwv1.GatewayClassSpec{ControllerName: controller}}
		if mutate != nil {
			mutate(c)
		}
		return c
	}
	for _, tc := range []struct {
		name string
		gc   *gwv1.GatewayClass
		ours bool
		ok   bool
		why  string
	}{
		{"amesh's, accepted", gc(nil), true, true, ""},
		{"missing", nil, false, false, "does not exist"},
		{"another controller", gc(func(c *gwv1.GatewayClass) { c.Spec.ControllerName = "example.com/gw" }), false, false, "belongs to controller example.com/gw"},
		{"being deleted", gc(func(c *gwv1.GatewayClass) { c.DeletionTimestamp = &now }), false, false, "being deleted"},
		{"with parameters (not accepted)", gc(func(c *gwv1.GatewayClass) {
			c.Spec.ParametersRef = &gwv1.ParametersReference{Kind: "ConfigMap", Name: "p"}
		}), true, false, "not accepted: amesh waypoints take no parameters"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := Ours(tc.gc, controller); got != tc.ours {
				t.Errorf("Ours = %v, want %v", got, tc.ours)
			}
			ok, why := Waypoint(tc.gc, class, controller)
			if ok != tc.ok || !strings.Contains(why, tc.why) || (tc.ok && why != "") {
				t.Errorf("Waypoint = %v %q, want %v and a reason containing %q", ok, why, tc.ok, tc.why)
			}
		})
	}
}

func TestAccepted(t *testing.T) {
	for _, tc := range []struct {
		name   string
		gc     gwv1.GatewayClass
		ok     bool
		reason gwv1.GatewayClassConditionReason
	}{
		{"the waypoint class", gwv1.GatewayClass{ObjectMeta: metav1.ObjectMeta{Name: class}}, true, gwv1.GatewayClassReasonAccepted},
		{"another class naming amesh", gwv1.GatewayClass{ObjectMeta: metav1.ObjectMeta{Name: "x"}}, false, gwv1.GatewayClassReasonUnsupported},
		{"parameters", gwv1.GatewayClass{ObjectMeta: metav1.ObjectMeta{Name: class},
			Spec: gwv1.GatewayClassSpec{ParametersRef: &gwv1.ParametersReference{Kind: "ConfigMap", Name: "p"}}}, false, gwv1.GatewayClassReasonInvalidParameters},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ok, reason, msg := Accepted(&tc.gc, class)
			if ok != tc.ok || reason != tc.reason || msg == "" {
				t.Errorf("got %v/%s %q, want %v/%s", ok, reason, msg, tc.ok, tc.reason)
			}
		})
	}
}
