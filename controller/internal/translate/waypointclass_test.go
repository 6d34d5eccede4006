package translate

import (
	pb "github.com/amesh-dev/amesh/api/discovery/v1"
	"strings"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
)

// TestWaypointNeedsItsClass: a Gateway of the waypoint class is a
// waypoint — configured (WaypointGateway), reachable at its address, its
// namespace given the root certificate — only while its GatewayClass
// exists, names amesh's controller, is not being deleted and is accepted
// (no parameters), as the deployer requires to run it. Otherwise what is
// bound to it stays bound to an address-less waypoint that no pod
// implements, so that ztunnel refuses the traffic instead of letting it
// bypass the waypoint's policies, and the status says why. A long-lived
// Translator follows the class coming and going.
func TestWaypointNeedsItsClass(t *testing.T) {
	base := loadInput(t, "testdata/waypointclass-missing.in.yaml")
	now := metav1.Now()
	class := func(mutate func(*gwv1.GatewayClass)) []*gwv1.GatewayClass {
		gc := &gwv1.GatewayClass{ObjectMeta: metav1.ObjectMeta{Name: "amesh-waypoint"},
			Spec: gwv1.GatewayClassSpec{ControllerName: "amesh.dev/waypoint-controller"}}
		if mutate != nil {
			mutate(gc)
		}
		return []*gwv1.GatewayClass{gc}
	}
	tr := NewTranslator(Config{})
	for _, tc := range []struct {
		name    string
		classes []*gwv1.GatewayClass
		want    bool
		why     string
	}{
		{"missing", nil, false, "the GatewayClass amesh-waypoint does not exist"},
		{"amesh's", class(nil), true, ""},
		{"another controller's", class(func(gc *gwv1.GatewayClass) { gc.Spec.ControllerName = "example.com/gw" }), false,
			"belongs to controller example.com/gw"},
		{"amesh's again", class(nil), true, ""},
		{"being deleted", class(func(gc *gwv1.GatewayClass) { gc.DeletionTimestamp = &now }), false, "is being deleted"},
		{"not accepted (parameters)", class(func(gc *gwv1.GatewayClass) {
			gc.Spec.ParametersRef = &gwv1.ParametersReference{Kind: "ConfigMap", Name: "p"}
		}), false, "is not accepted"},
		{"another class of amesh's controller only", []*gwv1.GatewayClass{{ObjectMeta: metav1.ObjectMeta{Name: "other"},
			Spec: gwv1.GatewayClassSpec{ControllerName: "amesh.dev/waypoint-controller"}}}, false, "does not exist"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			in := *base
			in.GatewayClasses = tc.classes
			for _, out := range []*Output{Translate(Config{}, &in), tr.Translate(&in)} {
				// Bound either way (fail-closed); an address only when
				// it runs.
				var bound, addressed bool
				for _, s := range out.Services {
					if s.Name == "api" {
						bound = s.Waypoint.GetGateway() == "app/waypoint"
						addressed = len(s.Waypoint.GetAddress()) == 4
					}
				}
				var saBound, saAddressed bool
				for _, w := range out.Workloads {
					if w.Name == "api-0" {
						saBound = w.Waypoint.GetGateway() == "app/waypoint"
						saAddressed = len(w.Waypoint.GetAddress()) == 4
					}
				}
				if !bound || !saBound || addressed != tc.want || saAddressed != tc.want {
					t.Errorf("service bound %v (address %v), per-service-account binding %v (address %v); want bound, with an address: %v",
						bound, addressed, saBound, saAddressed, tc.want)
				}
				if (len(out.WaypointGateways) == 2) != tc.want || (len(out.WaypointServices) == 1) != tc.want {
					t.Errorf("%d WaypointGateways, %d WaypointServices; want configuration: %v",
						len(out.WaypointGateways), len(out.WaypointServices), tc.want)
				}
				edgeCert := false
				for _, ns := range out.RootCertNamespaces {
					edgeCert = edgeCert || ns == "edge"
				}
				if edgeCert != tc.want {
					t.Errorf("root certificate in the namespace of the edge Gateway: %v, want %v", edgeCert, tc.want)
				}
				var reason, msg string
				for _, s := range out.ServiceStatuses {
					if s.Name == "api" && len(s.Conditions) == 1 {
						reason, msg = s.Conditions[0].Reason, s.Conditions[0].Message
					}
				}
				wantReason := ReasonBound
				if !tc.want {
					wantReason = ReasonWaypointUnavailable
				}
				if reason != wantReason || !strings.Contains(msg, tc.why) {
					t.Errorf("WaypointBound %s %q, want %s saying %q", reason, msg, wantReason, tc.why)
				}
			}
		})
	}
}

// TestBindingOutlivesItsGateway: a use-waypoint binding is refused, never
// sent around the waypoint, while its Gateway is being deleted or missing
// (kubectl waypoint delete, then apply), and bound again once it is back;
// a long-lived Translator follows it.
func TestBindingOutlivesItsGateway(t *testing.T) {
	base := loadInput(t, "testdata/waypoint-gone.in.yaml")
	now := metav1.Now()
	live := base.Gateways[0].DeepCopy()
	if live.Namespace+"/"+live.Name != "app/waypoint" {
		t.Fatalf("first Gateway of the input is %s/%s", live.Namespace, live.Name)
	}
	live.DeletionTimestamp, live.Finalizers = nil, nil
	deleting := live.DeepCopy()
	deleting.DeletionTimestamp = &now
	tr := NewTranslator(Config{})
	for _, tc := range []struct {
		name    string
		gw      *gwv1.Gateway
		reason  string
		address bool
	}{
		{"running", live, ReasonBound, true},
		{"being deleted", deleting, ReasonWaypointUnavailable, false},
		{"gone", nil, ReasonGatewayNotFound, false},
		{"re-created", live, ReasonBound, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			in := *base
			in.Gateways = append([]*gwv1.Gateway(nil), base.Gateways[1:]...)
			if tc.gw != nil {
				in.Gateways = append(in.Gateways, tc.gw)
			}
			for _, out := range []*Output{Translate(Config{}, &in), tr.Translate(&in)} {
				var svc *pb.Service
				for _, s := range out.Services {
					if s.Namespace == "app" && s.Name == "reviews" {
						svc = s
					}
				}
				if svc.GetWaypoint().GetGateway() != "app/waypoint" {
					t.Fatalf("reviews: waypoint %v, want bound to app/waypoint whatever happens to it", svc.GetWaypoint())
				}
				wantService := "app/waypoint.app.svc.cluster.local"
				if !tc.address {
					wantService = "app/waypoint.unavailable-waypoint.invalid"
				}
				if got := svc.GetWaypoint().GetService(); got != wantService {
					t.Errorf("reviews: waypoint service %q, want %q", got, wantService)
				}
				var reason string
				for _, s := range out.ServiceStatuses {
					if s.Namespace == "app" && s.Name == "reviews" && len(s.Conditions) == 1 {
						reason = s.Conditions[0].Reason
					}
				}
				if reason != tc.reason {
					t.Errorf("reviews: WaypointBound reason %q, want %q", reason, tc.reason)
				}
				if (len(out.WaypointServices) > 0) != tc.address {
					t.Errorf("%d WaypointServices, want some: %v", len(out.WaypointServices), tc.address)
				}
			}
		})
	}
}
