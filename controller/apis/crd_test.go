package apis_test

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
	"sigs.k8s.io/yaml"
)

// TestCRDAdmission installs the generated CRDs into a real kube-apiserver
// (envtest) and checks that valid policies are stored and invalid ones are
// refused with the schema's or CEL rule's message.
func TestCRDAdmission(t *testing.T) {
	if os.Getenv("KUBEBUILDER_ASSETS") == "" {
		t.Skip("KUBEBUILDER_ASSETS is unset: needs the kube-apiserver and etcd binaries (make kube-bins; make unit sets it)")
	}
	env := &envtest.Environment{
		CRDDirectoryPaths:     []string{filepath.Join("..", "..", "manifests", "base", "crds")},
		ErrorIfCRDPathMissing: true,
	}
	cfg, err := env.Start()
	if err != nil {
		// A failed start (say, a CRD the apiserver refuses) leaves the
		// control plane running.
		_ = env.Stop()
		t.Fatalf("start envtest: %v", err)
	}
	t.Cleanup(func() {
		if err := env.Stop(); err != nil {
			t.Errorf("stop envtest: %v", err)
		}
	})
	if n := len(env.CRDs); n != 4 {
		t.Fatalf("installed %d CRDs, want 4", n)
	}
	c, err := client.New(cfg, client.Options{})
	if err != nil {
		t.Fatal(err)
	}

	// Every policy used by the translator's golden tests must be valid,
	// except those marked as stored before admission refused them, which
	// must now be refused.
	files, err := filepath.Glob(filepath.Join("..", "internal", "translate", "testdata", "*.in.yaml"))
	if err != nil || len(files) == 0 {
		t.Fatalf("golden inputs: %v (%d files)", err, len(files))
	}
	valid, refused := 0, 0
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for doc := range strings.SplitSeq(string(b), "\n---\n") {
			u := decode(t, doc)
			if !strings.HasSuffix(u.GroupVersionKind().Group, "amesh.dev") {
				continue
			}
			u.SetNamespace("default")
			u.SetName(u.GetName() + "-" + strings.TrimSuffix(filepath.Base(f), ".in.yaml"))
			u.SetCreationTimestamp(metav1.Time{})
			u.SetGeneration(0)
			err := c.Create(context.Background(), u, client.FieldValidation("Strict"))
			if u.GetAnnotations()[refusedAnnotation] == "refused" {
				if err == nil {
					t.Errorf("%s: %s %s accepted; it is marked %s: refused", f, u.GetKind(), u.GetName(), refusedAnnotation)
				}
				refused++
				continue
			}
			if err != nil {
				t.Errorf("%s: %s %s refused: %v", f, u.GetKind(), u.GetName(), err)
			}
			valid++
		}
	}
	if valid < 15 || refused < 3 {
		t.Fatalf("only %d valid and %d refused policies in the golden inputs", valid, refused)
	}

	// Defaults the schema fills in.
	t.Run("defaults", func(t *testing.T) {
		u := decode(t, `
apiVersion: traffic.amesh.dev/v1alpha1
kind: BackendTrafficPolicy
spec:
  targetRefs: [{group: "", kind: Service, name: a}]
  outlierDetection: {consecutive5xx: 1}`)
		u.SetNamespace("default")
		u.SetName("defaults")
		if err := c.Create(context.Background(), u, client.FieldValidation("Strict")); err != nil {
			t.Fatal(err)
		}
		if got, _, _ := unstructured.NestedString(u.Object, "spec", "outlierDetection", "maxEjectionTime"); got != "300s" {
			t.Errorf("outlierDetection.maxEjectionTime defaulted to %q, want 300s", got)
		}
	})

	for _, tc := range []struct{ name, doc, want string }{
		{"selector and targetRefs", `
apiVersion: security.amesh.dev/v1alpha1
kind: AuthorizationPolicy
spec:
  selector: {matchLabels: {app: a}}
  targetRefs: [{group: "", kind: Service, name: a}]`, "selector and targetRefs are mutually exclusive"},
		{"unknown action", `
apiVersion: security.amesh.dev/v1alpha1
kind: AuthorizationPolicy
spec:
  action: AUDIT`, `Unsupported value: "AUDIT"`},
		{"port out of range", `
apiVersion: security.amesh.dev/v1alpha1
kind: AuthorizationPolicy
spec:
  rules: [{to: [{operation: {ports: ["70000"]}}]}]`, "spec.rules[0].to[0].operation.ports[0]"},
		{"port zero", `
apiVersion: security.amesh.dev/v1alpha1
kind: AuthorizationPolicy
spec:
  rules: [{to: [{operation: {notPorts: ["0"]}}]}]`, "spec.rules[0].to[0].operation.notPorts[0]"},
		{"bad ip block", `
apiVersion: security.amesh.dev/v1alpha1
kind: AuthorizationPolicy
spec:
  rules: [{from: [{source: {ipBlocks: ["10.0.0.0/33"]}}]}]`, "must be an IP address or a CIDR"},
		{"empty source", `
apiVersion: security.amesh.dev/v1alpha1
kind: AuthorizationPolicy
spec:
  rules: [{from: [{source: {}}]}]`, "a source needs at least one field"},
		{"service account without namespace", `
apiVersion: security.amesh.dev/v1alpha1
kind: AuthorizationPolicy
spec:
  rules: [{from: [{source: {serviceAccounts: [teller]}}]}]`, "spec.rules[0].from[0].source.serviceAccounts[0]"},
		{"service account as a principal", `
apiVersion: security.amesh.dev/v1alpha1
kind: AuthorizationPolicy
spec:
  rules: [{from: [{source: {notServiceAccounts: [cluster.local/ns/bank/sa/teller]}}]}]`, "spec.rules[0].from[0].source.notServiceAccounts[0]"},
		{"service account wildcard", `
apiVersion: security.amesh.dev/v1alpha1
kind: AuthorizationPolicy
spec:
  rules: [{from: [{source: {serviceAccounts: [bank/ok, "bank/*"]}}]}]`, "spec.rules[0].from[0].source.serviceAccounts[1]"},
		{"service accounts with principals", `
apiVersion: security.amesh.dev/v1alpha1
kind: AuthorizationPolicy
spec:
  rules: [{from: [{source: {serviceAccounts: [bank/teller], principals: [cluster.local/ns/bank/sa/teller]}}]}]`,
			"serviceAccounts and notServiceAccounts cannot be combined with principals, notPrincipals, namespaces or notNamespaces"},
		{"service accounts with namespaces", `
apiVersion: security.amesh.dev/v1alpha1
kind: AuthorizationPolicy
spec:
  rules: [{from: [{source: {notServiceAccounts: [bank/teller], namespaces: [bank]}}]}]`,
			"serviceAccounts and notServiceAccounts cannot be combined with principals, notPrincipals, namespaces or notNamespaces"},
		{"empty operation", `
apiVersion: security.amesh.dev/v1alpha1
kind: AuthorizationPolicy
spec:
  rules: [{to: [{operation: {}}]}]`, "an operation needs at least one field"},
		{"unknown condition key", `
apiVersion: security.amesh.dev/v1alpha1
kind: AuthorizationPolicy
spec:
  rules: [{when: [{key: request.body, values: [x]}]}]`, "spec.rules[0].when[0].key"},
		{"condition without values", `
apiVersion: security.amesh.dev/v1alpha1
kind: AuthorizationPolicy
spec:
  rules: [{when: [{key: source.namespace}]}]`, "a condition needs values or notValues"},
		{"destination.port not a port", `
apiVersion: security.amesh.dev/v1alpha1
kind: AuthorizationPolicy
spec:
  rules: [{when: [{key: destination.port, values: ["http"]}]}]`, "destination.port values must be port numbers"},
		{"source.ip not an IP", `
apiVersion: security.amesh.dev/v1alpha1
kind: AuthorizationPolicy
spec:
  rules: [{when: [{key: source.ip, notValues: ["somewhere"]}]}]`, "IP conditions need IP addresses or CIDRs"},
		{"target kind", `
apiVersion: security.amesh.dev/v1alpha1
kind: AuthorizationPolicy
spec:
  targetRefs: [{group: "", kind: Pod, name: a}]`, "targetRefs may name a Gateway"},
		{"unknown field", `
apiVersion: security.amesh.dev/v1alpha1
kind: AuthorizationPolicy
spec:
  rules: [{from: [{source: {remoteIpBlocks: ["1.2.3.4"]}}]}]`, `unknown field "spec.rules[0].from[0].source.remoteIpBlocks"`},
		{"port level without selector", `
apiVersion: security.amesh.dev/v1alpha1
kind: PeerAuthentication
spec:
  mtls: {mode: STRICT}
  portLevelMtls: {"8080": {mode: PERMISSIVE}}`, "portLevelMtls requires a selector"},
		{"port level key", `
apiVersion: security.amesh.dev/v1alpha1
kind: PeerAuthentication
spec:
  selector: {matchLabels: {app: a}}
  portLevelMtls: {"http": {mode: PERMISSIVE}}`, "portLevelMtls keys must be port numbers"},
		{"mtls mode", `
apiVersion: security.amesh.dev/v1alpha1
kind: PeerAuthentication
spec:
  mtls: {mode: OPTIONAL}`, `Unsupported value: "OPTIONAL"`},
		{"jwks and jwksUri", `
apiVersion: security.amesh.dev/v1alpha1
kind: RequestAuthentication
spec:
  jwtRules: [{issuer: i, jwks: "{}", jwksUri: "https://i/jwks"}]`, "exactly one of jwks and jwksUri is required"},
		{"neither jwks nor jwksUri", `
apiVersion: security.amesh.dev/v1alpha1
kind: RequestAuthentication
spec:
  jwtRules: [{issuer: i}]`, "exactly one of jwks and jwksUri is required"},
		{"jwksUri not a URL", `
apiVersion: security.amesh.dev/v1alpha1
kind: RequestAuthentication
spec:
  jwtRules: [{issuer: i, jwksUri: "file:///etc/passwd"}]`, "jwksUri must be an http(s) URL"},
		{"no targetRefs", `
apiVersion: traffic.amesh.dev/v1alpha1
kind: BackendTrafficPolicy
spec:
  loadBalancer: {type: Random}`, "spec.targetRefs: Required value"},
		{"no setting", `
apiVersion: traffic.amesh.dev/v1alpha1
kind: BackendTrafficPolicy
spec:
  targetRefs: [{group: "", kind: Service, name: a}]`, "a policy needs at least one setting"},
		{"hash without consistentHash type", `
apiVersion: traffic.amesh.dev/v1alpha1
kind: BackendTrafficPolicy
spec:
  targetRefs: [{group: "", kind: Service, name: a}]
  loadBalancer: {type: RoundRobin, consistentHash: {type: SourceIP}}`, "consistentHash is required with, and only allowed with"},
		{"hash header missing", `
apiVersion: traffic.amesh.dev/v1alpha1
kind: BackendTrafficPolicy
spec:
  targetRefs: [{group: "", kind: Service, name: a}]
  loadBalancer: {type: ConsistentHash, consistentHash: {type: Header}}`, "header is required with, and only allowed with, type Header"},
		{"tokens per fill", `
apiVersion: traffic.amesh.dev/v1alpha1
kind: BackendTrafficPolicy
spec:
  targetRefs: [{group: "", kind: Service, name: a}]
  localRateLimit: {maxTokens: 5, tokensPerFill: 6, fillInterval: 1s}`, "tokensPerFill must not exceed maxTokens"},
		{"duration", `
apiVersion: traffic.amesh.dev/v1alpha1
kind: BackendTrafficPolicy
spec:
  targetRefs: [{group: "", kind: Service, name: a}]
  localRateLimit: {maxTokens: 5, fillInterval: 1.5s}`, "spec.localRateLimit.fillInterval"},
		{"fraction", `
apiVersion: traffic.amesh.dev/v1alpha1
kind: BackendTrafficPolicy
spec:
  targetRefs: [{group: "", kind: Service, name: a}]
  faultInjection: {abort: {fraction: {numerator: 3, denominator: 2}, httpStatus: 503}}`, "numerator must not exceed denominator"},
		{"percent and fraction", `
apiVersion: traffic.amesh.dev/v1alpha1
kind: BackendTrafficPolicy
spec:
  targetRefs: [{group: "", kind: Service, name: a}]
  faultInjection: {delay: {percent: 5, fraction: {numerator: 1}, fixedDelay: 1s}}`, "percent and fraction are mutually exclusive"},
		{"http status", `
apiVersion: traffic.amesh.dev/v1alpha1
kind: BackendTrafficPolicy
spec:
  targetRefs: [{group: "", kind: Service, name: a}]
  faultInjection: {abort: {httpStatus: 700}}`, "spec.faultInjection.abort.httpStatus"},
		{"outlier without threshold", `
apiVersion: traffic.amesh.dev/v1alpha1
kind: BackendTrafficPolicy
spec:
  targetRefs: [{group: "", kind: Service, name: a}]
  outlierDetection: {interval: 1s}`, "consecutive5xx or consecutiveGatewayErrors is required"},
		{"max ejection time zero", `
apiVersion: traffic.amesh.dev/v1alpha1
kind: BackendTrafficPolicy
spec:
  targetRefs: [{group: "", kind: Service, name: a}]
  outlierDetection: {consecutive5xx: 1, maxEjectionTime: 0s}`, "maxEjectionTime must be positive"},
		{"fill interval zero", `
apiVersion: traffic.amesh.dev/v1alpha1
kind: BackendTrafficPolicy
spec:
  targetRefs: [{group: "", kind: Service, name: a}]
  localRateLimit: {maxTokens: 5, fillInterval: 0ms}`, "fillInterval must be positive"},
		{"no fill interval", `
apiVersion: traffic.amesh.dev/v1alpha1
kind: BackendTrafficPolicy
spec:
  targetRefs: [{group: "", kind: Service, name: a}]
  localRateLimit: {maxTokens: 5}`, "spec.localRateLimit.fillInterval: Required value"},
		{"no max tokens", `
apiVersion: traffic.amesh.dev/v1alpha1
kind: BackendTrafficPolicy
spec:
  targetRefs: [{group: "", kind: Service, name: a}]
  localRateLimit: {fillInterval: 1s}`, "spec.localRateLimit.maxTokens: Required value"},
		{"zero max tokens", `
apiVersion: traffic.amesh.dev/v1alpha1
kind: BackendTrafficPolicy
spec:
  targetRefs: [{group: "", kind: Service, name: a}]
  localRateLimit: {maxTokens: 0, fillInterval: 1s}`, "spec.localRateLimit.maxTokens"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			u := decode(t, tc.doc)
			u.SetNamespace("default")
			u.SetName("invalid")
			err := c.Create(context.Background(), u, client.FieldValidation("Strict"))
			if err == nil {
				t.Fatalf("accepted; want refusal mentioning %q", tc.want)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("refused with %v; want it to mention %q", err, tc.want)
			}
		})
	}
}

// refusedAnnotation marks a golden input object as one stored before
// admission refused it: the translator must cope, the CRD must refuse it.
const refusedAnnotation = "test.amesh.dev/admission"

func decode(t *testing.T, doc string) *unstructured.Unstructured {
	t.Helper()
	var m map[string]any
	if err := yaml.Unmarshal([]byte(doc), &m); err != nil {
		t.Fatalf("yaml: %v\n%s", err, doc)
	}
	return &unstructured.Unstructured{Object: m}
}
