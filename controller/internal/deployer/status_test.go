package deployer

import (
	"flag"
	"strings"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	corev1ac "k8s.io/client-go/applyconfigurations/core/v1"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
)

func gateway(name string, mutate func(*gwv1.Gateway)) *gwv1.Gateway {
	gw := &gwv1.Gateway{
		ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: name, Generation: 3},
		Spec: gwv1.GatewaySpec{
			GatewayClassName: "amesh-waypoint",
			Listeners:        []gwv1.Listener{{Name: "mesh", Port: 15008, Protocol: "HBONE"}},
		},
	}
	if mutate != nil {
		mutate(gw)
	}
	return gw
}

func TestEvaluate(t *testing.T) {
	for _, tc := range []struct {
		name      string
		gw        *gwv1.Gateway
		accepted  bool
		reason    string
		msg       string
		listeners map[gwv1.SectionName]gwv1.ListenerConditionReason
	}{
		{
			name: "mesh listener", gw: gateway("waypoint", nil), accepted: true, reason: "Accepted",
			listeners: map[gwv1.SectionName]gwv1.ListenerConditionReason{"mesh": "Accepted"},
		},
		{
			name: "any name for HBONE on 15008",
			gw: gateway("waypoint", func(g *gwv1.Gateway) {
				g.Spec.Listeners[0].Name = "hbone"
			}),
			accepted: true, reason: "Accepted",
			listeners: map[gwv1.SectionName]gwv1.ListenerConditionReason{"hbone": "Accepted"},
		},
		{
			name: "extra listeners are rejected, the waypoint is accepted",
			gw: gateway("waypoint", func(g *gwv1.Gateway) {
				g.Spec.Listeners = append(g.Spec.Listeners,
					gwv1.Listener{Name: "http", Port: 80, Protocol: gwv1.HTTPProtocolType},
					gwv1.Listener{Name: "alt", Port: 15009, Protocol: "HBONE"},
					gwv1.Listener{Name: "tls", Port: 15008, Protocol: "HBONE", Hostname: ptrTo(gwv1.Hostname("x.example")),
						TLS: &gwv1.ListenerTLSConfig{}},
				)
			}),
			accepted: true, reason: "ListenersNotValid", msg: "http, alt, tls",
			listeners: map[gwv1.SectionName]gwv1.ListenerConditionReason{
				"mesh": "Accepted", "http": "UnsupportedProtocol", "alt": "PortUnavailable", "tls": "UnsupportedValue",
			},
		},
		{
			name: "no mesh listener",
			gw: gateway("waypoint", func(g *gwv1.Gateway) {
				g.Spec.Listeners = []gwv1.Listener{{Name: "tcp", Port: 15008, Protocol: gwv1.TCPProtocolType}}
			}),
			reason: "ListenersNotValid", msg: "{name: mesh, port: 15008, protocol: HBONE}",
			listeners: map[gwv1.SectionName]gwv1.ListenerConditionReason{"tcp": "UnsupportedProtocol"},
		},
		{
			name: "name that cannot name a Service", gw: gateway("1waypoint", nil),
			reason: "Invalid", msg: "DNS-1035",
		},
		{
			name: "addresses",
			gw: gateway("waypoint", func(g *gwv1.Gateway) {
				g.Spec.Addresses = []gwv1.GatewaySpecAddress{{Value: "10.0.0.1"}}
			}),
			reason: "UnsupportedAddress",
		},
		{
			name: "parameters",
			gw: gateway("waypoint", func(g *gwv1.Gateway) {
				g.Spec.Infrastructure = &gwv1.GatewayInfrastructure{ParametersRef: &gwv1.LocalParametersReference{Kind: "ConfigMap", Name: "p"}}
			}),
			reason: "InvalidParameters", msg: "ConfigMap p",
		},
		{
			name: "service account annotation that is no name",
			gw: gateway("waypoint", func(g *gwv1.Gateway) {
				g.Annotations = map[string]string{"amesh.dev/for-service-account": "Not_A_Name"}
			}),
			reason: "Invalid", msg: "Not_A_Name",
		},
		{
			name: "unknown waypoint-for is said, not hidden",
			gw: gateway("waypoint", func(g *gwv1.Gateway) {
				g.Labels = map[string]string{"amesh.dev/waypoint-for": "everything"}
			}),
			accepted: true, reason: "Accepted", msg: `"everything" is not service, workload, all or none`,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v := evaluate(tc.gw)
			if v.accepted.status != tc.accepted || v.accepted.reason != tc.reason || !strings.Contains(v.accepted.message, tc.msg) {
				t.Errorf("accepted = %v/%s %q, want %v/%s containing %q", v.accepted.status, v.accepted.reason, v.accepted.message,
					tc.accepted, tc.reason, tc.msg)
			}
			if v.deploy() != tc.accepted {
				t.Errorf("deploy = %v", v.deploy())
			}
			if tc.listeners == nil {
				return
			}
			if len(v.listeners) != len(tc.listeners) {
				t.Fatalf("listeners %+v", v.listeners)
			}
			for _, l := range v.listeners {
				if want := tc.listeners[l.name]; l.reason != want || l.ok != (want == "Accepted") {
					t.Errorf("listener %s: %v/%s %q, want %s", l.name, l.ok, l.reason, l.msg, want)
				}
			}
		})
	}
}

func ptrTo[T any](v T) *T { return &v }

func TestProgrammed(t *testing.T) {
	ok := evaluate(gateway("waypoint", nil))
	bad := evaluate(gateway("1bad", nil))
	for _, tc := range []struct {
		name   string
		v      verdict
		o      observed
		status bool
		reason string
		msg    string
	}{
		{"not accepted", bad, observed{}, false, "Invalid", "not accepted"},
		{"blocked", ok, observed{conflict: "Service ns/waypoint exists"}, false, "Invalid", "Service ns/waypoint exists"},
		{"no address", ok, observed{}, false, "AddressNotAssigned", "cluster IP"},
		{"no replica", ok, observed{clusterIP: "10.0.0.9", desired: 2}, false, "Pending", "0 of 2 replicas available"},
		{"no root certificate", ok, observed{clusterIP: "10.0.0.9", desired: 1, missingRootCert: "amesh-root-cert"}, false, "Pending",
			"cannot start before the ConfigMap amesh-root-cert exists in the namespace (the amesh controller's leader publishes it in every namespace holding a waypoint)"},
		{"serving", ok, observed{clusterIP: "10.0.0.9", desired: 2, available: 1}, true, "Programmed", "10.0.0.9:15008 (1 of 2"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := programmed(tc.v, tc.o)
			if c.status != tc.status || c.reason != tc.reason || !strings.Contains(c.message, tc.msg) {
				t.Errorf("programmed = %v/%s %q, want %v/%s containing %q", c.status, c.reason, c.message, tc.status, tc.reason, tc.msg)
			}
		})
	}
}

func TestForServiceAccount(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	mk := func(name, sa string, created time.Time, mutate func(*gwv1.Gateway)) gwv1.Gateway {
		g := gateway(name, func(g *gwv1.Gateway) {
			g.CreationTimestamp = metav1.NewTime(created)
			if sa != "" {
				g.Annotations = map[string]string{"amesh.dev/for-service-account": sa}
			}
			if mutate != nil {
				mutate(g)
			}
		})
		return *g
	}
	old := mk("old", "reviews", t0, nil)
	young := mk("young", "reviews", t0.Add(time.Minute), nil)
	twinA := mk("twin-a", "ratings", t0, nil)
	twinB := mk("twin-b", "ratings", t0, nil)
	other := mk("other", "details", t0.Add(-time.Hour), nil)
	none := mk("none", "reviews", t0.Add(-time.Hour), func(g *gwv1.Gateway) { g.Labels = map[string]string{"amesh.dev/waypoint-for": "none"} })
	gone := mk("gone", "reviews", t0.Add(-time.Hour), func(g *gwv1.Gateway) { g.DeletionTimestamp = ptrTo(metav1.NewTime(t0)) })
	foreign := mk("foreign", "reviews", t0.Add(-time.Hour), func(g *gwv1.Gateway) { g.Spec.GatewayClassName = "other" })
	elsewhere := mk("elsewhere", "reviews", t0.Add(-time.Hour), func(g *gwv1.Gateway) { g.Namespace = "ns2" })
	rejected := mk("rejected", "orders", t0.Add(-2*time.Hour), func(g *gwv1.Gateway) {
		g.Spec.Addresses = []gwv1.GatewaySpecAddress{{Value: "10.0.0.1"}}
	})
	young2 := mk("young2", "orders", t0.Add(-90*time.Minute), nil)
	forServices := mk("for-services", "reviews", t0.Add(-2*time.Hour), func(g *gwv1.Gateway) {
		g.Labels = map[string]string{"amesh.dev/waypoint-for": "service"}
	})
	all := []gwv1.Gateway{old, young, twinA, twinB, other, none, gone, foreign, elsewhere, rejected, young2, forServices}

	for _, tc := range []struct {
		name   string
		gw     gwv1.Gateway
		want   *cond
		substr string
	}{
		{"no annotation", mk("plain", "", t0, nil), nil, ""},
		{"older serves and names the newer", old, &cond{status: true, reason: ReasonServing}, "young"},
		{"newer is conflicted", young, &cond{status: false, reason: ReasonConflicted}, "older waypoint old"},
		{"same second: name decides", twinB, &cond{status: false, reason: ReasonConflicted}, "twin-a"},
		{"alone", other, &cond{status: true, reason: ReasonServing}, "details"},
		{"waypoint-for none serves nothing", none, &cond{status: false, reason: ReasonNotServing}, "none"},
		{"waypoint-for service does not serve the service account's workloads, nor claims it", forServices,
			&cond{status: false, reason: ReasonWaypointForMismatch}, "does not serve workload-addressed traffic"},
		{"the claimant that wins is not accepted: its service account's traffic is refused", rejected,
			&cond{status: false, reason: ReasonWaypointUnavailable}, "service account orders is refused"},
		{"an older claimant that is not accepted still wins", young2, &cond{status: false, reason: ReasonConflicted}, "older waypoint rejected"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var unavailable string
			if v := evaluate(&tc.gw); !v.deploy() {
				unavailable = v.accepted.message
			}
			got := forServiceAccount(&tc.gw, all, "amesh-waypoint", unavailable)
			if tc.want == nil {
				if got != nil {
					t.Fatalf("got %+v, want none", got)
				}
				return
			}
			if got == nil || got.typ != ConditionForServiceAccount || got.status != tc.want.status || got.reason != tc.want.reason ||
				!strings.Contains(got.message, tc.substr) {
				t.Fatalf("got %+v, want %v/%s containing %q", got, tc.want.status, tc.want.reason, tc.substr)
			}
		})
	}
}

func TestApplyCondKeepsTransitionTime(t *testing.T) {
	then := metav1.NewTime(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC))
	now := then.Add(time.Hour)
	old := []metav1.Condition{{Type: "Programmed", Status: metav1.ConditionFalse, LastTransitionTime: then}}
	same := applyCond(old, cond{"Programmed", false, "Pending", "still waiting"}, 4, now)
	if !same.LastTransitionTime.Equal(&then) || *same.ObservedGeneration != 4 || *same.Message != "still waiting" {
		t.Errorf("unchanged status: %+v, want the old transition time", same)
	}
	flipped := applyCond(old, cond{"Programmed", true, "Programmed", "ok"}, 4, now)
	if !flipped.LastTransitionTime.Time.Equal(now) {
		t.Errorf("changed status: transition time %v, want %v", flipped.LastTransitionTime, now)
	}
	fresh := applyCond(nil, cond{"Accepted", true, "Accepted", "ok"}, 1, now)
	if !fresh.LastTransitionTime.Time.Equal(now) {
		t.Errorf("new condition: transition time %v, want %v", fresh.LastTransitionTime, now)
	}
}

func TestGatewayClassAccepted(t *testing.T) {
	for _, tc := range []struct {
		name   string
		gc     gwv1.GatewayClass
		status bool
		reason string
	}{
		{"the waypoint class", gwv1.GatewayClass{ObjectMeta: metav1.ObjectMeta{Name: "amesh-waypoint"}}, true, "Accepted"},
		{"another class naming amesh", gwv1.GatewayClass{ObjectMeta: metav1.ObjectMeta{Name: "x"}}, false, "Unsupported"},
		{"parameters", gwv1.GatewayClass{ObjectMeta: metav1.ObjectMeta{Name: "amesh-waypoint"},
			Spec: gwv1.GatewayClassSpec{ParametersRef: &gwv1.ParametersReference{Kind: "ConfigMap", Name: "p"}}}, false, "InvalidParameters"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := gatewayClassAccepted(&tc.gc, "amesh-waypoint")
			if c.status != tc.status || c.reason != tc.reason {
				t.Errorf("got %v/%s %q, want %v/%s", c.status, c.reason, c.message, tc.status, tc.reason)
			}
		})
	}
}

func TestOptions(t *testing.T) {
	if err := DefaultOptions().Validate(); err != nil {
		t.Fatalf("defaults: %v", err)
	}
	for _, tc := range []struct {
		name string
		args []string
		err  string
	}{
		{"flags", []string{"-waypoint-image=r.example/wp:v1", "-waypoint-cpu-request=250m", "-waypoint-memory-limit=0", "-waypoint-image-pull-policy=Always"}, ""},
		{"bad quantity", []string{"-waypoint-cpu-request=lots"}, "waypoint-cpu-request"},
		{"empty image", []string{"-waypoint-image="}, "image"},
		{"bad pull policy", []string{"-waypoint-image-pull-policy=Sometimes"}, "pull policy"},
		{"limit under request", []string{"-waypoint-memory-request=2Gi", "-waypoint-memory-limit=1Gi"}, "below its request"},
		{"drain", []string{"-waypoint-drain-timeout=0s"}, "drain timeout"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := DefaultOptions()
			fs := flag.NewFlagSet("t", flag.ContinueOnError)
			fs.SetOutput(new(strings.Builder))
			o.AddFlags(fs)
			err := fs.Parse(tc.args)
			if err == nil {
				err = o.Validate()
			}
			switch {
			case tc.err == "" && err != nil:
				t.Fatalf("unexpected error: %v", err)
			case tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err)):
				t.Fatalf("error %v, want one containing %q", err, tc.err)
			}
		})
	}
	o := DefaultOptions()
	o.Controller = "nohost"
	o.TrustDomain = "Bad_Domain"
	err := o.Validate()
	if err == nil || !strings.Contains(err.Error(), "controller address") || !strings.Contains(err.Error(), "trust domain") {
		t.Errorf("every error at once: got %v", err)
	}
}

func TestInfrastructureLabelsCannotOverrideOwn(t *testing.T) {
	gw := gateway("waypoint", func(g *gwv1.Gateway) {
		g.Spec.Infrastructure = &gwv1.GatewayInfrastructure{Labels: map[gwv1.LabelKey]gwv1.LabelValue{
			"gateway.networking.k8s.io/gateway-name": "other",
			"amesh.dev/dataplane-mode":               "ambient",
			"team":                                   "a",
		}}
	})
	d := deployment(gw, DefaultOptions())
	pod := d.Spec.Template.Labels
	if pod["gateway.networking.k8s.io/gateway-name"] != "waypoint" || pod["amesh.dev/dataplane-mode"] != "none" || pod["team"] != "a" {
		t.Errorf("pod labels %v: the deployer's own labels must win, others pass through", pod)
	}
	if sel := d.Spec.Selector.MatchLabels; len(sel) != 1 || sel["gateway.networking.k8s.io/gateway-name"] != "waypoint" {
		t.Errorf("selector %v", sel)
	}
	if l := service(gw).Labels; l["gateway.networking.k8s.io/gateway-name"] != "waypoint" || l["team"] != "a" {
		t.Errorf("service labels %v", l)
	}
}

// TestGOMEMLIMIT: GOMEMLIMIT follows the container's memory limit (bytes,
// through the downward API) and is absent without a limit, where the
// downward API would give the node's allocatable memory.
func TestGOMEMLIMIT(t *testing.T) {
	for _, tc := range []struct {
		limit string
		want  bool
	}{{"1Gi", true}, {"0", false}} {
		o := DefaultOptions()
		o.MemoryLimit = resource.MustParse(tc.limit)
		c := deployment(gateway("waypoint", nil), o).Spec.Template.Spec.Containers[0]
		var ref *corev1ac.ResourceFieldSelectorApplyConfiguration
		for _, e := range c.Env {
			if *e.Name == "GOMEMLIMIT" {
				ref = e.ValueFrom.ResourceFieldRef
			}
		}
		if !tc.want {
			if ref != nil {
				t.Errorf("limit %s: GOMEMLIMIT set from %+v", tc.limit, ref)
			}
			continue
		}
		if ref == nil || *ref.ContainerName != *c.Name || *ref.Resource != "limits.memory" || ref.Divisor.Value() != 1 {
			t.Errorf("limit %s: GOMEMLIMIT from %+v, want limits.memory of %s with divisor 1", tc.limit, ref, *c.Name)
		}
		if l := c.Resources.Limits.Memory(); l.Cmp(o.MemoryLimit) != 0 {
			t.Errorf("limit %s: container limit %v", tc.limit, l)
		}
	}
}
