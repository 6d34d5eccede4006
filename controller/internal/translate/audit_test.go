package translate

import (
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/amesh-dev/amesh/controller/apis/security/v1alpha1"
)

// crossNamespaceEndpoints: namespace "evil" owns a selector-less Service
// bound to its own waypoint, and an EndpointSlice whose endpoint names a
// pod of namespace "victim" by targetRef. Kubernetes accepts such a slice
// (and the EndpointSlice mirroring controller writes one from a plain
// Endpoints object, which the namespace "edit" role may create).
const crossNamespaceEndpoints = `
apiVersion: v1
kind: Namespace
metadata: {name: victim, labels: {amesh.dev/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: evil, labels: {amesh.dev/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata:
  name: db
  namespace: victim
  uid: 11111111-1111-1111-1111-111111111111
  labels: {app: db}
  annotations: {amesh.dev/redirection: enabled}
spec:
  nodeName: node-1
  serviceAccountName: db
  containers: [{name: db, image: db}]
status:
  phase: Running
  podIP: 10.0.0.5
  podIPs: [{ip: 10.0.0.5}]
  conditions: [{type: Ready, status: "True"}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp, namespace: evil, uid: 22222222-2222-2222-2222-222222222222}
spec:
  gatewayClassName: amesh-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: v1
kind: Service
metadata:
  name: grab
  namespace: evil
  labels: {amesh.dev/use-waypoint: wp}
spec:
  clusterIP: 10.96.0.50
  ports: [{name: pg, port: 5432, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: grab-1
  namespace: evil
  labels: {kubernetes.io/service-name: grab}
addressType: IPv4
ports: [{name: pg, port: 5432, protocol: TCP}]
endpoints:
- addresses: [10.0.0.5]
  conditions: {ready: true}
  targetRef: {kind: Pod, namespace: victim, name: db}
`

// TestAuditEndpointSliceCannotAdoptPodOfAnotherNamespace: a pod's services
// map decides which waypoints its ztunnel admits without applying the
// pod's own L4 policies (route.Router.Waypoints). A slice in another
// namespace must not put that namespace's Service (and its waypoint) on
// the pod.
func TestAuditEndpointSliceCannotAdoptPodOfAnotherNamespace(t *testing.T) {
	f := filepath.Join(t.TempDir(), "x.in.yaml")
	if err := os.WriteFile(f, []byte(crossNamespaceEndpoints), 0o644); err != nil {
		t.Fatal(err)
	}
	out := Translate(Config{}, loadInput(t, f))
	found := false
	for _, w := range out.Workloads {
		if w.Namespace != "victim" || w.Name != "db" {
			continue
		}
		found = true
		for svc := range w.Services {
			if strings.HasPrefix(svc, "evil/") {
				t.Errorf("victim/db lists %s among its services: the waypoint of namespace evil is then admitted by victim/db's ztunnel without victim's L4 policies", svc)
			}
		}
	}
	if !found {
		t.Fatal("no workload for victim/db")
	}
}

// TestAuditEndpointAddressOfPodNotAnExternalWorkload: the same slice as
// crossNamespaceEndpoints without the targetRef. The address is a captured
// pod's; publishing it as an external (plaintext) workload lets ztunnel
// pick that claim for the pod's IP (see ztunnel route audit test).
func TestAuditEndpointAddressOfPodNotAnExternalWorkload(t *testing.T) {
	f := filepath.Join(t.TempDir(), "x.in.yaml")
	in := strings.Replace(crossNamespaceEndpoints, "  targetRef: {kind: Pod, namespace: victim, name: db}\n", "", 1)
	if in == crossNamespaceEndpoints {
		t.Fatal("fixture unchanged")
	}
	if err := os.WriteFile(f, []byte(in), 0o644); err != nil {
		t.Fatal(err)
	}
	out := Translate(Config{}, loadInput(t, f))
	for _, w := range out.Workloads {
		if w.WorkloadType == "endpoint" && len(w.Addresses) == 1 && netipString(w.Addresses[0]) == "10.0.0.5" {
			t.Errorf("external workload %s (tunnel %v) claims 10.0.0.5, the address of captured pod victim/db", w.Uid, w.TunnelProtocol)
		}
	}
}

func netipString(b []byte) string {
	if a, ok := netip.AddrFromSlice(b); ok {
		return a.Unmap().String()
	}
	return ""
}

// TestEndpointAddressOfPod: an endpoint address without targetRef that
// is a pod's address makes the pod an endpoint of the Service when the
// slice is of the pod's namespace, and is ignored otherwise; it is never
// published as a workload of its own. An address no pod has still is.
func TestEndpointAddressOfPod(t *testing.T) {
	noRef := strings.Replace(crossNamespaceEndpoints, "  targetRef: {kind: Pod, namespace: victim, name: db}\n", "", 1)
	sameNS := strings.NewReplacer("namespace: evil\n  labels: {amesh.dev/use-waypoint: wp}", "namespace: victim\n  labels: {amesh.dev/use-waypoint: wp}",
		"name: grab-1\n  namespace: evil", "name: grab-1\n  namespace: victim").Replace(noRef)
	outside := strings.Replace(noRef, "- addresses: [10.0.0.5]", "- addresses: [192.168.7.7]", 1)
	for _, tc := range []struct {
		name, in string
		// podServices are the services of victim/db's workload; endpoint
		// the address of the endpoint workload expected ("" none).
		podServices []string
		endpoint    string
	}{
		{"other namespace", noRef, nil, ""},
		{"same namespace", sameNS, []string{"victim/grab.victim.svc.cluster.local"}, ""},
		{"address of no pod", outside, nil, "192.168.7.7"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.in == crossNamespaceEndpoints || tc.in == noRef && tc.name != "other namespace" {
				t.Fatal("fixture unchanged")
			}
			f := filepath.Join(t.TempDir(), "x.in.yaml")
			if err := os.WriteFile(f, []byte(tc.in), 0o644); err != nil {
				t.Fatal(err)
			}
			out := Translate(Config{}, loadInput(t, f))
			var endpoints []string
			var pod []string
			for _, w := range out.Workloads {
				switch {
				case w.WorkloadType == "endpoint":
					endpoints = append(endpoints, netipString(w.Addresses[0]))
				case w.Namespace == "victim" && w.Name == "db":
					for s := range w.Services {
						pod = append(pod, s)
					}
				}
			}
			if want := tc.podServices; strings.Join(pod, ",") != strings.Join(want, ",") {
				t.Errorf("victim/db services = %v, want %v", pod, want)
			}
			var want []string
			if tc.endpoint != "" {
				want = []string{tc.endpoint}
			}
			if strings.Join(endpoints, ",") != strings.Join(want, ",") {
				t.Errorf("endpoint workloads at %v, want %v", endpoints, want)
			}
		})
	}
}

const spiffePrincipalDeny = `
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {amesh.dev/dataplane-mode: ambient}}
---
apiVersion: security.amesh.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: deny-evil, namespace: shop}
spec:
  action: DENY
  rules:
  - from: [{source: {principals: ["spiffe://cluster.local/ns/evil/sa/attacker"]}}]
`

// TestAuditSpiffePrincipalNotSilentlyIgnored: ztunnel and the waypoint
// compare principals with the peer's ID without its "spiffe://" scheme
// (store.Principal). A DENY naming the peer by its full SPIFFE ID then
// never matches: the policy must be normalised, or reported invalid, not
// accepted as "enforced".
func TestAuditSpiffePrincipalNotSilentlyIgnored(t *testing.T) {
	f := filepath.Join(t.TempDir(), "x.in.yaml")
	if err := os.WriteFile(f, []byte(spiffePrincipalDeny), 0o644); err != nil {
		t.Fatal(err)
	}
	out := Translate(Config{}, loadInput(t, f))
	var principals []string
	for _, a := range out.Authorizations {
		if a.Name == "deny-evil" {
			for _, r := range a.Rules {
				for _, s := range r.From {
					principals = append(principals, s.Principals...)
				}
			}
		}
	}
	accepted := false
	for _, s := range out.Statuses {
		if s.Name == "deny-evil" {
			for _, c := range s.Conditions {
				if c.Type == "Accepted" && c.Status == "True" {
					accepted = true
				}
			}
		}
	}
	for _, p := range principals {
		if strings.HasPrefix(p, "spiffe://") && accepted {
			t.Errorf("DENY principal %q reaches the data plane unchanged and the policy is Accepted: it never matches a peer", p)
		}
	}
}

// TestPrincipalsWithoutScheme: principals written as SPIFFE IDs reach
// the data plane without their scheme, in sources and source.principal
// conditions, for ztunnel and for waypoints, DENY and ALLOW alike.
func TestPrincipalsWithoutScheme(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"spiffe://cluster.local/ns/evil/sa/attacker", "cluster.local/ns/evil/sa/attacker"},
		{"SPIFFE://cluster.local/ns/evil/sa/attacker", "cluster.local/ns/evil/sa/attacker"},
		{"spiffe://cluster.local/ns/evil/*", "cluster.local/ns/evil/*"},
		{"cluster.local/ns/evil/sa/attacker", "cluster.local/ns/evil/sa/attacker"},
		{"*", "*"},
		{"spiffe:/x", "spiffe:/x"},
	} {
		got := principals([]string{tc.in})
		if len(got) != 1 || got[0] != tc.want {
			t.Errorf("principals(%q) = %q, want %q", tc.in, got, tc.want)
		}
		var res translation
		r := convertRule(v1alpha1.Rule{
			From: []v1alpha1.RuleFrom{{Source: v1alpha1.Source{Principals: []string{tc.in}, NotPrincipals: []string{tc.in}}}},
			When: []v1alpha1.Condition{{Key: "source.principal", Values: []string{tc.in}, NotValues: []string{tc.in}}},
		}, "cluster.local", false, &res)
		for _, v := range [][]string{r.From[0].Principals, r.From[0].NotPrincipals, r.When[0].Values, r.When[0].NotValues} {
			if len(v) != 1 || v[0] != tc.want {
				t.Errorf("%q translated to %q, want %q", tc.in, v, tc.want)
			}
		}
	}
	if principals(nil) != nil {
		t.Error("nil principals became non-nil")
	}
}

// TestServiceAccountSources: serviceAccounts and notServiceAccounts become
// principals in the configured trust domain, for ztunnel and waypoints;
// what admission refuses (combined with principals, malformed) is handled
// fail-safe if it gets through: an ALLOW rule is omitted, a DENY rule
// denies more.
func TestServiceAccountSources(t *testing.T) {
	policy := func(action v1alpha1.AuthorizationAction, src v1alpha1.Source) *v1alpha1.AuthorizationPolicy {
		return &v1alpha1.AuthorizationPolicy{
			ObjectMeta: metav1.ObjectMeta{Namespace: "bank", Name: "p"},
			Spec: v1alpha1.AuthorizationPolicySpec{Action: action, Rules: []v1alpha1.Rule{
				{From: []v1alpha1.RuleFrom{{Source: src}}},
			}},
		}
	}
	tr := newTranslator(Config{TrustDomain: "example.org"}.WithDefaults(), &Input{})
	for _, tc := range []struct {
		name          string
		ap            *v1alpha1.AuthorizationPolicy
		rules         int
		principals    []string
		notPrincipals []string
		invalid       bool
	}{
		{"allow by service account", policy(v1alpha1.ActionAllow, v1alpha1.Source{ServiceAccounts: []string{"bank/teller"}}),
			1, []string{"example.org/ns/bank/sa/teller"}, nil, false},
		{"deny all but one", policy(v1alpha1.ActionDeny, v1alpha1.Source{NotServiceAccounts: []string{"bank/teller", "audit/a.b"}}),
			1, nil, []string{"example.org/ns/bank/sa/teller", "example.org/ns/audit/sa/a.b"}, false},
		{"exclusions merge", policy(v1alpha1.ActionDeny, v1alpha1.Source{NotPrincipals: []string{"x/ns/y/sa/z"},
			NotServiceAccounts: []string{"bank/teller"}}),
			1, nil, []string{"x/ns/y/sa/z", "example.org/ns/bank/sa/teller"}, false},
		{"allow with principals too: omitted", policy(v1alpha1.ActionAllow, v1alpha1.Source{Principals: []string{"example.org/ns/a/sa/b"},
			ServiceAccounts: []string{"bank/teller"}}), 0, nil, nil, true},
		{"deny with principals too: the principals alone", policy(v1alpha1.ActionDeny, v1alpha1.Source{
			Principals: []string{"example.org/ns/a/sa/b"}, ServiceAccounts: []string{"bank/teller"}}),
			1, []string{"example.org/ns/a/sa/b"}, nil, true},
		{"malformed allow: omitted", policy(v1alpha1.ActionAllow, v1alpha1.Source{ServiceAccounts: []string{"teller"}}), 0, nil, nil, true},
		{"malformed deny: any peer", policy(v1alpha1.ActionDeny, v1alpha1.Source{ServiceAccounts: []string{"Bank/teller"}}), 1, nil, nil, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, l4 := range []bool{true, false} {
				a, res := tr.translateAuthorization(tc.ap, l4)
				if (len(res.invalid) > 0) != tc.invalid {
					t.Errorf("l4 %v: invalid %q, want some: %v", l4, res.invalid, tc.invalid)
				}
				if len(a.Rules) != tc.rules {
					t.Fatalf("l4 %v: %d rules, want %d", l4, len(a.Rules), tc.rules)
				}
				if tc.rules == 0 {
					continue
				}
				src := a.Rules[0].From[0]
				if !slices.Equal(src.Principals, tc.principals) || !slices.Equal(src.NotPrincipals, tc.notPrincipals) {
					t.Errorf("l4 %v: principals %q, not %q; want %q, not %q", l4, src.Principals, src.NotPrincipals, tc.principals, tc.notPrincipals)
				}
			}
		})
	}
}
