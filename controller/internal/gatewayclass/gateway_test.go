package gatewayclass

import (
	"strings"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
)

// TestCheckGateway: the rule the deployer, the translator and the
// authorizer share. The deployer's status tests cover the listener details.
func TestCheckGateway(t *testing.T) {
	gateway := func(name string, mutate func(*gwv1.Gateway)) *gwv1.Gateway {
		gw := &gwv1.Gateway{
			ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: name},
			Spec: gwv1.GatewaySpec{
				GatewayClassName: class,
				Listeners:        []gwv1.Listener{{Name: "mesh", Port: 15008, Protocol: "HBONE"}},
			},
		}
		if mutate != nil {
			mutate(gw)
		}
		return gw
	}
	for _, tc := range []struct {
		name     string
		gw       *gwv1.Gateway
		accepted bool
		reason   gwv1.GatewayConditionReason
		msg      string
	}{
		{"waypoint", gateway("waypoint", nil), true, gwv1.GatewayReasonAccepted, "accepted"},
		{"an extra listener is ignored", gateway("waypoint", func(g *gwv1.Gateway) {
			g.Spec.Listeners = append(g.Spec.Listeners, gwv1.Listener{Name: "http", Port: 80, Protocol: gwv1.HTTPProtocolType})
		}), true, gwv1.GatewayReasonListenersNotValid, "listeners http are not valid and are ignored"},
		{"no HBONE listener on 15008", gateway("waypoint", func(g *gwv1.Gateway) { g.Spec.Listeners[0].Port = 15009 }),
			false, gwv1.GatewayReasonListenersNotValid, "needs the listener"},
		{"no listener", gateway("waypoint", func(g *gwv1.Gateway) { g.Spec.Listeners = nil }),
			false, gwv1.GatewayReasonListenersNotValid, "needs the listener"},
		{"not DNS-1035", gateway("wp.v2", nil), false, gwv1.GatewayReasonInvalid, "DNS-1035"},
		{"addresses", gateway("waypoint", func(g *gwv1.Gateway) {
			g.Spec.Addresses = []gwv1.GatewaySpecAddress{{Value: "10.0.0.1"}}
		}), false, gwv1.GatewayReasonUnsupportedAddress, "spec.addresses"},
		{"parameters", gateway("waypoint", func(g *gwv1.Gateway) {
			g.Spec.Infrastructure = &gwv1.GatewayInfrastructure{ParametersRef: &gwv1.LocalParametersReference{Kind: "ConfigMap", Name: "p"}}
		}), false, gwv1.GatewayReasonInvalidParameters, "ConfigMap p"},
		{"service account annotation that is no name", gateway("waypoint", func(g *gwv1.Gateway) {
			g.Annotations = map[string]string{"amesh.dev/for-service-account": "Not_A_Name"}
		}), false, gwv1.GatewayReasonInvalid, "Not_A_Name"},
		{"unknown waypoint-for is said", gateway("waypoint", func(g *gwv1.Gateway) {
			g.Labels = map[string]string{"amesh.dev/waypoint-for": "everything"}
		}), true, gwv1.GatewayReasonAccepted, `"everything" is not service, workload, all or none`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v := CheckGateway(tc.gw)
			if v.Accepted != tc.accepted || v.Reason != tc.reason || !strings.Contains(v.Message, tc.msg) {
				t.Errorf("CheckGateway = %v/%s %q, want %v/%s containing %q", v.Accepted, v.Reason, v.Message, tc.accepted, tc.reason, tc.msg)
			}
		})
	}
}

// TestServes: the waypoint-for label decides; without a valid one a
// waypoint serves services, a per-service-account waypoint workloads.
func TestServes(t *testing.T) {
	for _, tc := range []struct {
		labels, annotations map[string]string
		want                string
		workloads           bool
	}{
		{nil, nil, "service", false},
		{map[string]string{"amesh.dev/waypoint-for": "all"}, nil, "all", true},
		{map[string]string{"amesh.dev/waypoint-for": "everything"}, nil, "service", false},
		{nil, map[string]string{"amesh.dev/for-service-account": "sa"}, "workload", true},
		{map[string]string{"amesh.dev/waypoint-for": "bogus"}, map[string]string{"amesh.dev/for-service-account": "sa"}, "workload", true},
		{map[string]string{"amesh.dev/waypoint-for": "service"}, map[string]string{"amesh.dev/for-service-account": "sa"}, "service", false},
		{map[string]string{"amesh.dev/waypoint-for": "none"}, map[string]string{"amesh.dev/for-service-account": "sa"}, "none", false},
	} {
		gw := &gwv1.Gateway{ObjectMeta: metav1.ObjectMeta{Name: "w", Labels: tc.labels, Annotations: tc.annotations}}
		if got := Serves(gw); got != tc.want || ServesWorkloads(got) != tc.workloads {
			t.Errorf("labels %v annotations %v: Serves = %q (workloads %v), want %q (%v)", tc.labels, tc.annotations,
				got, ServesWorkloads(got), tc.want, tc.workloads)
		}
	}
}

// TestAdmitsNamespace: which namespaces may bind to a waypoint in another
// namespace, as Gateway API listeners admit routes.
func TestAdmitsNamespace(t *testing.T) {
	listener := func(port gwv1.PortNumber, protocol gwv1.ProtocolType, ar *gwv1.AllowedRoutes) gwv1.Listener {
		return gwv1.Listener{Name: "l", Port: port, Protocol: protocol, AllowedRoutes: ar}
	}
	from := func(f gwv1.FromNamespaces, sel *metav1.LabelSelector) *gwv1.AllowedRoutes {
		return &gwv1.AllowedRoutes{Namespaces: &gwv1.RouteNamespaces{From: &f, Selector: sel}}
	}
	shop := &metav1.LabelSelector{MatchLabels: map[string]string{"team": "shop"}}
	bad := &metav1.LabelSelector{MatchExpressions: []metav1.LabelSelectorRequirement{{Key: "team", Operator: "Bogus"}}}
	for _, tc := range []struct {
		name      string
		listeners []gwv1.Listener
		ns        string
		labels    map[string]string
		want      bool
	}{
		{"own namespace, default", []gwv1.Listener{listener(15008, "HBONE", nil)}, "shared", nil, true},
		{"other namespace, default (Same)", []gwv1.Listener{listener(15008, "HBONE", nil)}, "app", nil, false},
		{"explicit Same", []gwv1.Listener{listener(15008, "HBONE", from(gwv1.NamespacesFromSame, nil))}, "app", nil, false},
		{"All", []gwv1.Listener{listener(15008, "HBONE", from(gwv1.NamespacesFromAll, nil))}, "app", nil, true},
		{"Selector matches", []gwv1.Listener{listener(15008, "HBONE", from(gwv1.NamespacesFromSelector, shop))},
			"app", map[string]string{"team": "shop"}, true},
		{"Selector does not match", []gwv1.Listener{listener(15008, "HBONE", from(gwv1.NamespacesFromSelector, shop))},
			"app", map[string]string{"team": "ads"}, false},
		{"Selector missing", []gwv1.Listener{listener(15008, "HBONE", from(gwv1.NamespacesFromSelector, nil))},
			"app", map[string]string{"team": "shop"}, false},
		{"invalid selector admits nobody", []gwv1.Listener{listener(15008, "HBONE", from(gwv1.NamespacesFromSelector, bad))},
			"app", map[string]string{"team": "shop"}, false},
		{"an ignored listener admits nothing", []gwv1.Listener{
			listener(15008, "HBONE", nil), listener(80, gwv1.HTTPProtocolType, from(gwv1.NamespacesFromAll, nil)),
		}, "app", nil, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			gw := &gwv1.Gateway{
				ObjectMeta: metav1.ObjectMeta{Namespace: "shared", Name: "central"},
				Spec:       gwv1.GatewaySpec{GatewayClassName: class, Listeners: tc.listeners},
			}
			if got := AdmitsNamespace(gw, tc.ns, tc.labels); got != tc.want {
				t.Errorf("AdmitsNamespace(%s) = %v, want %v", tc.ns, got, tc.want)
			}
		})
	}
}
