package app_test

import (
	"bytes"
	"context"
	"crypto/x509"
	"io"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"sigs.k8s.io/controller-runtime/pkg/client"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	pb "github.com/amesh-dev/amesh/api/discovery/v1"
	"github.com/amesh-dev/amesh/api/identity"
	"github.com/amesh-dev/amesh/controller/apis/security/v1alpha1"
)

// pushDeadline is how fast a change must reach subscribers (issue 3).
const pushDeadline = time.Second

// TestDiscovery runs the controller against a real apiserver and checks
// that a real xDS client receives the right resources within a second of
// each change, that a waypoint sees its own configuration and ztunnel does
// not, and that the leader writes policy status and root ConfigMaps.
func TestDiscovery(t *testing.T) {
	e := startEnv(t, nil)
	ctx := context.Background()
	e.node("node-a")
	zt := e.pod("amesh-system", "ztunnel-a", "ztunnel", "node-a", "10.1.0.2", nil, nil)
	e.create(&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "shop", Labels: map[string]string{
		"amesh.dev/dataplane-mode": "ambient",
	}}})
	e.serviceAccount("shop", "web")

	m := e.subscribe(e.token("amesh-system", "ztunnel", zt, "amesh"), map[string]string{
		"kind": "ztunnel", "node": "node-a", "namespace": "amesh-system", "pod": "ztunnel-a",
	})
	select {
	case <-m.client.Synced():
	case <-time.After(10 * time.Second):
		t.Fatal("xds client not synced within 10s")
	}
	// The trust bundle carries the root of the CA Secret.
	var sec corev1.Secret
	e.get("amesh-system", "amesh-ca", &sec)
	tb, _ := m.get(pb.TrustBundleType, "cluster.local").(*pb.TrustBundle)
	if tb == nil || len(tb.RootsPem) != 1 || strings.TrimSpace(tb.RootsPem[0]) != strings.TrimSpace(string(sec.Data["ca.crt"])) {
		t.Fatalf("trust bundle %v does not carry the CA secret's root", tb)
	}

	// A Service appears with its cluster IP.
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "web"},
		Spec: corev1.ServiceSpec{
			Selector: map[string]string{"app": "web"},
			Ports:    []corev1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromString("http")}},
		},
	}
	e.create(svc)
	svcKey := "shop/web.shop.svc.cluster.local"
	d := within(t, pushDeadline, m, func() bool {
		s, _ := m.get(pb.ServiceType, svcKey).(*pb.Service)
		return s != nil && len(s.Addresses) == 1 && len(s.Ports) == 1 && s.Ports[0].AppProtocol == "http"
	}, func() string { return "service " + describe(m.get(pb.ServiceType, svcKey)) })
	t.Logf("service pushed in %v", d)

	// A redirected pod appears as an HBONE workload with its resolved
	// target port.
	web := e.pod("shop", "web-1", "web", "node-a", "10.1.1.5", map[string]string{"app": "web"},
		map[string]string{"amesh.dev/redirection": "enabled"})
	uid := string(web.UID)
	d = within(t, pushDeadline, m, func() bool {
		w, _ := m.get(pb.WorkloadType, uid).(*pb.Workload)
		return w != nil && w.TunnelProtocol == pb.TunnelProtocol_TUNNEL_PROTOCOL_HBONE &&
			w.Node == "node-a" && w.ServiceAccount == "web" && bytes.Equal(w.Addresses[0], []byte{10, 1, 1, 5}) &&
			w.Services[svcKey] != nil && proto.Equal(w.Services[svcKey], &pb.PortList{Ports: []*pb.Port{{ServicePort: 80, TargetPort: 8080}}})
	}, func() string { return "workload " + describe(m.get(pb.WorkloadType, uid)) })
	t.Logf("pod pushed in %v", d)

	// Opting the pod out turns it into plain TCP.
	web.Labels["amesh.dev/dataplane-mode"] = "none"
	if err := e.c.Update(ctx, web); err != nil {
		t.Fatal(err)
	}
	d = within(t, pushDeadline, m, func() bool {
		w, _ := m.get(pb.WorkloadType, uid).(*pb.Workload)
		return w != nil && w.TunnelProtocol == pb.TunnelProtocol_TUNNEL_PROTOCOL_NONE
	}, func() string { return "workload " + describe(m.get(pb.WorkloadType, uid)) })
	t.Logf("opt-out pushed in %v", d)

	// An ALLOW policy with an L7 rule: ztunnel gets the L4 rule only, and
	// the leader writes status saying a waypoint is needed.
	ap := &v1alpha1.AuthorizationPolicy{
		ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "web"},
		Spec: v1alpha1.AuthorizationPolicySpec{
			Selector: &v1alpha1.WorkloadSelector{MatchLabels: map[string]string{"app": "web"}},
			Rules: []v1alpha1.Rule{
				{From: []v1alpha1.RuleFrom{{Source: v1alpha1.Source{Namespaces: []string{"shop"}}}}},
				{To: []v1alpha1.RuleTo{{Operation: v1alpha1.Operation{Methods: []string{"GET"}}}}},
			},
		},
	}
	e.create(ap)
	d = within(t, pushDeadline, m, func() bool {
		a, _ := m.get(pb.AuthorizationType, "shop/web").(*pb.Authorization)
		w, _ := m.get(pb.WorkloadType, uid).(*pb.Workload)
		return a != nil && len(a.Rules) == 1 && a.L7Dropped && w != nil && slices.Equal(w.AuthorizationPolicies, []string{"shop/web"})
	}, func() string { return "authorization " + describe(m.get(pb.AuthorizationType, "shop/web")) })
	t.Logf("policy pushed in %v", d)
	within(t, 10*time.Second, nil, func() bool {
		var got v1alpha1.AuthorizationPolicy
		e.get("shop", "web", &got)
		for _, c := range got.Status.Conditions {
			if c.Type == v1alpha1.ConditionZtunnelAccepted && c.Status == metav1.ConditionFalse &&
				c.Reason == v1alpha1.ReasonWaypointRequired && c.ObservedGeneration == got.Generation &&
				!c.LastTransitionTime.IsZero() {
				return got.Status.ObservedGeneration == got.Generation
			}
		}
		return false
	}, func() string { return "no ZtunnelAccepted=False status" })

	// Root ConfigMaps in the enrolled namespace and the system namespace.
	for _, ns := range []string{"shop", "amesh-system"} {
		within(t, 10*time.Second, nil, func() bool {
			var cm corev1.ConfigMap
			err := e.c.Get(ctx, client.ObjectKey{Namespace: ns, Name: "amesh-root-cert"}, &cm)
			return err == nil && cm.Data["root-cert.pem"] == string(sec.Data["ca.crt"])
		}, func() string { return "no root ConfigMap in " + ns })
	}

	// A waypoint: the Service binds to it; the waypoint sees the
	// Service's WaypointService, ztunnel does not.
	e.create(&gwv1.Gateway{
		ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "waypoint"},
		Spec: gwv1.GatewaySpec{
			GatewayClassName: "amesh-waypoint",
			Listeners:        []gwv1.Listener{{Name: "mesh", Port: 15008, Protocol: "HBONE"}},
		},
	})
	svc.Labels = map[string]string{"amesh.dev/use-waypoint": "waypoint"}
	if err := e.c.Update(ctx, svc); err != nil {
		t.Fatal(err)
	}
	d = within(t, pushDeadline, m, func() bool {
		s, _ := m.get(pb.ServiceType, svcKey).(*pb.Service)
		return s != nil && s.Waypoint.GetGateway() == "shop/waypoint"
	}, func() string { return "service " + describe(m.get(pb.ServiceType, svcKey)) })
	t.Logf("waypoint binding pushed in %v", d)
	// The deployer's Deployment runs the waypoint pod (its ServiceAccount
	// is the deployer's too).
	wpPod := e.waypointPod("shop", "waypoint", "waypoint-1", "node-a", "10.1.1.9")
	wm := e.subscribe(e.token("shop", "waypoint", wpPod, "amesh"), map[string]string{
		"kind": "waypoint", "namespace": "shop", "pod": "waypoint-1", "gateway": "shop/waypoint",
	})
	within(t, 10*time.Second, wm, func() bool {
		ws, _ := wm.get(pb.WaypointServiceType, svcKey).(*pb.WaypointService)
		wg, _ := wm.get(pb.WaypointGatewayType, "shop/waypoint").(*pb.WaypointGateway)
		return ws != nil && ws.Gateway == "shop/waypoint" && wg != nil
	}, func() string {
		return "waypoint has " + strings.Join(wm.names(pb.WaypointServiceType), ",") + " and " + strings.Join(wm.names(pb.WaypointGatewayType), ",")
	})
	if n := m.names(pb.WaypointServiceType); len(n) != 0 {
		t.Errorf("ztunnel sees WaypointServices %v", n)
	}
	if n := m.names(pb.WaypointGatewayType); len(n) != 0 {
		t.Errorf("ztunnel sees WaypointGateways %v", n)
	}
	// The waypoint pod is one to ztunnel: HBONE natively, implementing the
	// Gateway. A pod that only carries the Gateway's label is not, and is
	// no endpoint of the waypoint's Service.
	impostor := e.pod("shop", "impostor", "waypoint", "node-a", "10.1.1.10",
		map[string]string{"gateway.networking.k8s.io/gateway-name": "waypoint", "amesh.dev/dataplane-mode": "none"}, nil)
	within(t, pushDeadline, m, func() bool {
		w, _ := m.get(pb.WorkloadType, string(wpPod.UID)).(*pb.Workload)
		i, _ := m.get(pb.WorkloadType, string(impostor.UID)).(*pb.Workload)
		return w != nil && w.WaypointForGateway == "shop/waypoint" && w.Services["shop/waypoint.shop.svc.cluster.local"] != nil &&
			i != nil && i.WaypointForGateway == "" && len(i.Services) == 0
	}, func() string {
		return "waypoint " + describe(m.get(pb.WorkloadType, string(wpPod.UID))) + "; impostor " + describe(m.get(pb.WorkloadType, string(impostor.UID)))
	})
	// Nor does it read the waypoint's configuration.
	im := e.subscribe(e.token("shop", "waypoint", impostor, "amesh"), map[string]string{
		"kind": "waypoint", "namespace": "shop", "pod": "impostor", "gateway": "shop/waypoint",
	})
	select {
	case <-im.client.Synced():
		t.Fatal("a pod with only the waypoint's label got discovery resources")
	case <-time.After(500 * time.Millisecond):
	}

	// Health, readiness and the discovery metrics.
	for _, path := range []string{"/healthz", "/readyz"} {
		resp, err := http.Get("http://" + e.app.HTTPAddr() + path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Errorf("%s: %s", path, resp.Status)
		}
	}
	resp, err := http.Get("http://" + e.app.HTTPAddr() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{
		"amesh_xds_connected_clients 2",
		"amesh_xds_pushes_total{",
		"amesh_xds_push_latency_seconds_bucket{",
		"amesh_controller_translation_duration_seconds_count",
		"amesh_controller_change_to_publish_seconds_count",
		"amesh_token_review_cache_hits_total",
		"go_goroutines",
	} {
		if !strings.Contains(string(body), want) {
			t.Errorf("metrics lack %q:\n%s", want, grepLines(string(body), "amesh_"))
		}
	}

	// Deleting the pod removes its workload.
	if err := e.c.Delete(ctx, web, client.GracePeriodSeconds(0)); err != nil {
		t.Fatal(err)
	}
	d = within(t, pushDeadline, m, func() bool { return m.get(pb.WorkloadType, uid) == nil },
		func() string { return "workload still there" })
	t.Logf("pod removal pushed in %v", d)
}

// TestCertificates checks the CA's authorization (DESIGN.md §4) with real
// projected tokens reviewed by the apiserver: a ztunnel gets certificates
// for pods on its node only; a waypoint only its own identity; unknown
// service accounts, tokens for another audience and tokens not bound to a
// pod are refused; refusals are counted.
func TestCertificates(t *testing.T) {
	e := startEnv(t, nil)
	e.node("node-a")
	e.node("node-b")
	ztA := e.pod("amesh-system", "ztunnel-a", "ztunnel", "node-a", "10.2.0.2", nil, nil)
	e.create(&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "shop", Labels: map[string]string{
		"amesh.dev/dataplane-mode": "ambient",
	}}})
	for _, sa := range []string{"web", "db", "stranger"} {
		e.serviceAccount("shop", sa)
	}
	e.pod("shop", "web-1", "web", "node-a", "10.2.1.1", map[string]string{"app": "web"}, nil)
	e.pod("shop", "db-1", "db", "node-b", "10.2.2.1", map[string]string{"app": "db"}, nil)
	stranger := e.pod("shop", "stranger-1", "stranger", "node-a", "10.2.1.2", nil, nil)
	e.waypointGateway("shop", "waypoint", nil, nil)
	wp := e.waypointPod("shop", "waypoint", "waypoint-1", "node-a", "10.2.1.9")
	// Runs as the waypoint's service account and carries its label, but
	// no Deployment of the Gateway owns it.
	impostor := e.pod("shop", "impostor", "waypoint", "node-a", "10.2.1.10",
		map[string]string{"gateway.networking.k8s.io/gateway-name": "waypoint"}, nil)

	ztTok := e.token("amesh-system", "ztunnel", ztA, "amesh")
	for _, tc := range []struct {
		name     string
		token    string
		identity string
		want     codes.Code
	}{
		{"ztunnel, pod on its node", ztTok, "spiffe://cluster.local/ns/shop/sa/web", codes.OK},
		{"ztunnel, pod on another node", ztTok, "spiffe://cluster.local/ns/shop/sa/db", codes.PermissionDenied},
		{"ztunnel, no such pod", ztTok, "spiffe://cluster.local/ns/shop/sa/ghost", codes.PermissionDenied},
		{"ztunnel, other trust domain", ztTok, "spiffe://evil.example/ns/shop/sa/web", codes.InvalidArgument},
		{"unknown service account, own identity", e.token("shop", "stranger", stranger, "amesh"),
			"spiffe://cluster.local/ns/shop/sa/stranger", codes.PermissionDenied},
		{"ztunnel token for another audience", e.token("amesh-system", "ztunnel", ztA, "other"),
			"spiffe://cluster.local/ns/shop/sa/web", codes.Unauthenticated},
		{"ztunnel token not bound to a pod", e.token("amesh-system", "ztunnel", nil, "amesh"),
			"spiffe://cluster.local/ns/shop/sa/web", codes.PermissionDenied},
		{"no token", "", "spiffe://cluster.local/ns/shop/sa/web", codes.Unauthenticated},
		{"garbage token", "not-a-token", "spiffe://cluster.local/ns/shop/sa/web", codes.Unauthenticated},
		{"waypoint, own identity", e.token("shop", "waypoint", wp, "amesh"), "spiffe://cluster.local/ns/shop/sa/waypoint", codes.OK},
		{"waypoint, another identity", e.token("shop", "waypoint", wp, "amesh"), "spiffe://cluster.local/ns/shop/sa/web", codes.PermissionDenied},
		{"pod with only the waypoint's label", e.token("shop", "waypoint", impostor, "amesh"),
			"spiffe://cluster.local/ns/shop/sa/waypoint", codes.PermissionDenied},
	} {
		t.Run(tc.name, func(t *testing.T) {
			id, err := spiffeid.FromString(tc.identity)
			if err != nil {
				t.Fatal(err)
			}
			key, err := identity.NewKey()
			if err != nil {
				t.Fatal(err)
			}
			csr, err := identity.NewCSR(key, id)
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			res, err := e.caClient(tc.token).Create(ctx, id, csr, time.Hour)
			if got := status.Code(err); got != tc.want {
				t.Fatalf("code %v (%v), want %v", got, err, tc.want)
			}
			if tc.want != codes.OK {
				return
			}
			leaf := res.Chain[0]
			if len(leaf.URIs) != 1 || leaf.URIs[0].String() != tc.identity {
				t.Fatalf("leaf SANs %v", leaf.URIs)
			}
			if _, err := leaf.Verify(x509.VerifyOptions{Roots: e.roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
				t.Fatalf("leaf does not verify against the mesh root: %v", err)
			}
		})
	}

	// Discovery refuses the unknown service account too.
	m := e.subscribe(e.token("shop", "stranger", stranger, "amesh"), map[string]string{"kind": "ztunnel", "pod": "stranger-1"})
	select {
	case <-m.client.Synced():
		t.Fatal("an unknown service account got discovery resources")
	case <-time.After(500 * time.Millisecond):
	}

	// Every refusal is counted.
	resp, err := http.Get("http://" + e.app.HTTPAddr() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("/metrics: %s\n%s", resp.Status, body)
	}
	for _, want := range []string{
		`amesh_ca_certificates_issued_total 2`,
		`amesh_ca_certificates_refused_total{code="PermissionDenied"} 6`,
		`amesh_ca_certificates_refused_total{code="Unauthenticated"} 3`,
		`amesh_ca_certificates_refused_total{code="InvalidArgument"} 1`,
		`amesh_xds_clients_refused_total{code="PermissionDenied"}`,
	} {
		if !strings.Contains(string(body), want) {
			t.Errorf("metrics lack %q:\n%s", want, grepLines(string(body), "amesh_"))
		}
	}
}

func grepLines(s, sub string) string {
	var out []string
	for l := range strings.SplitSeq(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}
