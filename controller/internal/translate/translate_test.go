package translate

import (
	"bufio"
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	k8sdisc "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
	gwv1beta1 "sigs.k8s.io/gateway-api/apis/v1beta1"
	"sigs.k8s.io/yaml"

	pb "github.com/amesh-dev/amesh/api/discovery/v1"
	"github.com/amesh-dev/amesh/controller/apis/security/v1alpha1"
	trafficv1alpha1 "github.com/amesh-dev/amesh/controller/apis/traffic/v1alpha1"
)

var update = flag.Bool("update", false, "rewrite testdata/*.out.yaml from the translator's output")

// testRoot stands in for the mesh root certificate.
const testRoot = "-----BEGIN CERTIFICATE-----\nMIIBtest\n-----END CERTIFICATE-----\n"

// TestGolden translates every testdata/*.in.yaml and compares the result
// with the matching *.out.yaml (go test -run TestGolden -update rewrites
// them).
func TestGolden(t *testing.T) {
	files, err := filepath.Glob("testdata/*.in.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if len(files) == 0 {
		t.Fatal("no testdata/*.in.yaml")
	}
	for _, f := range files {
		name := strings.TrimSuffix(filepath.Base(f), ".in.yaml")
		t.Run(name, func(t *testing.T) {
			in := loadInput(t, f)
			got := render(t, Translate(Config{}, in))
			golden := strings.TrimSuffix(f, ".in.yaml") + ".out.yaml"
			if *update {
				if err := os.WriteFile(golden, got, 0o644); err != nil {
					t.Fatal(err)
				}
				return
			}
			want, err := os.ReadFile(golden)
			if err != nil {
				t.Fatalf("%v (run with -update to create it)", err)
			}
			if d := cmp.Diff(string(want), string(got)); d != "" {
				t.Errorf("%s differs (-want +got); run with -update if the change is intended:\n%s", golden, d)
			}
		})
	}
}

// TestDeterministic proves the output does not depend on input order: every
// golden input, shuffled, translates to the same bytes.
func TestDeterministic(t *testing.T) {
	files, err := filepath.Glob("testdata/*.in.yaml")
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range files {
		in := loadInput(t, f)
		want := render(t, Translate(Config{}, in))
		r := rand.New(rand.NewPCG(1, 2))
		for range 5 {
			shuffleInput(r, in)
			if got := render(t, Translate(Config{}, in)); !bytes.Equal(got, want) {
				t.Fatalf("%s: output changed with input order:\n%s", f, cmp.Diff(string(want), string(got)))
			}
		}
	}
}

// TestInputUnmodified proves the translator does not write to its input.
func TestInputUnmodified(t *testing.T) {
	files, err := filepath.Glob("testdata/*.in.yaml")
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range files {
		in := loadInput(t, f)
		before, err := json.Marshal(in)
		if err != nil {
			t.Fatal(err)
		}
		Translate(Config{}, in)
		after, err := json.Marshal(in)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(before, after) {
			t.Errorf("%s: Translate modified its input", f)
		}
	}
}

func shuffleInput(r *rand.Rand, in *Input) {
	shuffle := func(n int, swap func(i, j int)) { r.Shuffle(n, swap) }
	shuffle(len(in.Namespaces), func(i, j int) { in.Namespaces[i], in.Namespaces[j] = in.Namespaces[j], in.Namespaces[i] })
	shuffle(len(in.Pods), func(i, j int) { in.Pods[i], in.Pods[j] = in.Pods[j], in.Pods[i] })
	shuffle(len(in.Services), func(i, j int) { in.Services[i], in.Services[j] = in.Services[j], in.Services[i] })
	shuffle(len(in.EndpointSlices), func(i, j int) {
		in.EndpointSlices[i], in.EndpointSlices[j] = in.EndpointSlices[j], in.EndpointSlices[i]
	})
	shuffle(len(in.Gateways), func(i, j int) { in.Gateways[i], in.Gateways[j] = in.Gateways[j], in.Gateways[i] })
	shuffle(len(in.GatewayClasses), func(i, j int) {
		in.GatewayClasses[i], in.GatewayClasses[j] = in.GatewayClasses[j], in.GatewayClasses[i]
	})
	shuffle(len(in.HTTPRoutes), func(i, j int) { in.HTTPRoutes[i], in.HTTPRoutes[j] = in.HTTPRoutes[j], in.HTTPRoutes[i] })
	shuffle(len(in.GRPCRoutes), func(i, j int) { in.GRPCRoutes[i], in.GRPCRoutes[j] = in.GRPCRoutes[j], in.GRPCRoutes[i] })
	shuffle(len(in.ReferenceGrants), func(i, j int) {
		in.ReferenceGrants[i], in.ReferenceGrants[j] = in.ReferenceGrants[j], in.ReferenceGrants[i]
	})
	shuffle(len(in.AuthorizationPolicies), func(i, j int) {
		in.AuthorizationPolicies[i], in.AuthorizationPolicies[j] = in.AuthorizationPolicies[j], in.AuthorizationPolicies[i]
	})
	shuffle(len(in.PeerAuthentications), func(i, j int) {
		in.PeerAuthentications[i], in.PeerAuthentications[j] = in.PeerAuthentications[j], in.PeerAuthentications[i]
	})
	shuffle(len(in.RequestAuthentications), func(i, j int) {
		in.RequestAuthentications[i], in.RequestAuthentications[j] = in.RequestAuthentications[j], in.RequestAuthentications[i]
	})
	shuffle(len(in.BackendTrafficPolicies), func(i, j int) {
		in.BackendTrafficPolicies[i], in.BackendTrafficPolicies[j] = in.BackendTrafficPolicies[j], in.BackendTrafficPolicies[i]
	})
}

func testScheme(t testing.TB) *runtime.Scheme {
	t.Helper()
	s := runtime.NewScheme()
	for _, add := range []func(*runtime.Scheme) error{
		corev1.AddToScheme, appsv1.AddToScheme, k8sdisc.AddToScheme, gwv1.Install, gwv1beta1.Install, v1alpha1.AddToScheme, trafficv1alpha1.AddToScheme,
	} {
		if err := add(s); err != nil {
			t.Fatal(err)
		}
	}
	return s
}

// loadInput decodes a multi-document YAML file of Kubernetes objects.
func loadInput(t testing.TB, path string) *Input {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	dec := serializer.NewCodecFactory(testScheme(t)).UniversalDeserializer()
	in := &Input{RootCertificates: []string{testRoot}}
	rd := utilyaml.NewYAMLReader(bufio.NewReader(f))
	for i := 0; ; i++ {
		doc, err := rd.Read()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("%s: document %d: %v", path, i, err)
		}
		if len(bytes.TrimSpace(doc)) == 0 || string(bytes.TrimSpace(doc)) == "---" {
			continue
		}
		obj, _, err := dec.Decode(doc, nil, nil)
		if err != nil {
			t.Fatalf("%s: document %d: %v", path, i, err)
		}
		switch o := obj.(type) {
		case *corev1.Namespace:
			in.Namespaces = append(in.Namespaces, o)
		case *corev1.Pod:
			in.Pods = append(in.Pods, o)
		case *corev1.Service:
			in.Services = append(in.Services, o)
		case *k8sdisc.EndpointSlice:
			in.EndpointSlices = append(in.EndpointSlices, o)
		case *gwv1.Gateway:
			in.Gateways = append(in.Gateways, o)
		case *gwv1.GatewayClass:
			in.GatewayClasses = append(in.GatewayClasses, o)
		case *gwv1.HTTPRoute:
			in.HTTPRoutes = append(in.HTTPRoutes, o)
		case *gwv1.GRPCRoute:
			in.GRPCRoutes = append(in.GRPCRoutes, o)
		case *gwv1beta1.ReferenceGrant:
			in.ReferenceGrants = append(in.ReferenceGrants, o)
		case *appsv1.ReplicaSet:
			in.ReplicaSets = append(in.ReplicaSets, o)
		case *appsv1.Deployment:
			in.Deployments = append(in.Deployments, o)
		case *v1alpha1.AuthorizationPolicy:
			in.AuthorizationPolicies = append(in.AuthorizationPolicies, o)
		case *v1alpha1.PeerAuthentication:
			in.PeerAuthentications = append(in.PeerAuthentications, o)
		case *v1alpha1.RequestAuthentication:
			in.RequestAuthentications = append(in.RequestAuthentications, o)
		case *trafficv1alpha1.BackendTrafficPolicy:
			in.BackendTrafficPolicies = append(in.BackendTrafficPolicies, o)
		default:
			t.Fatalf("%s: document %d: unexpected %T", path, i, obj)
		}
	}
	return in
}

// render prints an Output as readable YAML: protobufs through protojson
// with addresses shown as IPs.
func render(t testing.TB, out *Output) []byte {
	t.Helper()
	msgs := func(ms ...proto.Message) []any {
		var l []any
		for _, m := range ms {
			b, err := protojson.Marshal(m)
			if err != nil {
				t.Fatal(err)
			}
			var v any
			if err := json.Unmarshal(b, &v); err != nil {
				t.Fatal(err)
			}
			l = append(l, showIPs(v))
		}
		return l
	}
	doc := map[string]any{
		"workloads":          msgs(toMsgs(out.Workloads)...),
		"services":           msgs(toMsgs(out.Services)...),
		"authorizations":     msgs(toMsgs(out.Authorizations)...),
		"trustBundles":       msgs(toMsgs(out.TrustBundles)...),
		"waypointServices":   msgs(toMsgs(out.WaypointServices)...),
		"waypointGateways":   msgs(toMsgs(out.WaypointGateways)...),
		"statuses":           out.Statuses,
		"routeStatuses":      out.RouteStatuses,
		"serviceStatuses":    out.ServiceStatuses,
		"bindingProblems":    out.BindingProblems,
		"rootCertNamespaces": out.RootCertNamespaces,
	}
	b, err := yaml.Marshal(doc)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func toMsgs[M proto.Message](l []M) []proto.Message {
	out := make([]proto.Message, len(l))
	for i, m := range l {
		out[i] = m
	}
	return out
}

// showIPs replaces base64 "address"/"addresses" values by IP strings.
func showIPs(v any) any {
	ip := func(x any) any {
		s, ok := x.(string)
		if !ok {
			return x
		}
		b, err := base64.StdEncoding.DecodeString(s)
		if err != nil {
			return x
		}
		a, ok := netip.AddrFromSlice(b)
		if !ok {
			return fmt.Sprintf("invalid address %x", b)
		}
		return a.String()
	}
	switch x := v.(type) {
	case map[string]any:
		for k, e := range x {
			switch {
			case k == "address":
				x[k] = ip(e)
			case k == "addresses":
				if l, ok := e.([]any); ok {
					for i := range l {
						l[i] = ip(l[i])
					}
				}
			default:
				x[k] = showIPs(e)
			}
		}
	case []any:
		for i := range x {
			x[i] = showIPs(x[i])
		}
	}
	return v
}

// TestLocalRateLimitsComplete: no translation of a golden input sends the
// waypoints a LocalRateLimit without max_tokens or fill_interval (the
// waypoint refuses every request under one), whatever the policies say.
func TestLocalRateLimitsComplete(t *testing.T) {
	files, err := filepath.Glob("testdata/*.in.yaml")
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range files {
		out := Translate(Config{}, loadInput(t, f))
		check := func(where string, tp *pb.TrafficPolicy) {
			rl := tp.GetLocalRateLimit()
			if rl != nil && (rl.GetMaxTokens() == 0 || rl.GetFillInterval().AsDuration() <= 0) {
				t.Errorf("%s: %s: incomplete LocalRateLimit %v", f, where, rl)
			}
		}
		for _, ws := range out.WaypointServices {
			check("WaypointService "+ws.GetService(), ws.GetTrafficPolicy())
			for b, tp := range ws.GetBackendPolicies() {
				check("WaypointService "+ws.GetService()+" backend "+b, tp)
			}
		}
		for _, g := range out.WaypointGateways {
			check("WaypointGateway "+g.GetGateway(), g.GetTrafficPolicy())
		}
	}
}
