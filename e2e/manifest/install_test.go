package manifest

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	authorizationv1 "k8s.io/api/authorization/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
)

// startAPIServer runs a real kube-apiserver and etcd (the pinned builds
// in KUBEBUILDER_ASSETS) until the test ends.
func startAPIServer(t *testing.T) *rest.Config {
	t.Helper()
	if os.Getenv("KUBEBUILDER_ASSETS") == "" {
		t.Skip("needs a kube-apiserver and etcd: set KUBEBUILDER_ASSETS=$(make -s print-kube-bin) (make unit does)")
	}
	env := &envtest.Environment{ControlPlaneStartTimeout: 2 * time.Minute}
	cfg, err := env.Start()
	if err != nil {
		t.Fatalf("envtest: %v", err)
	}
	t.Cleanup(func() {
		if err := env.Stop(); err != nil {
			t.Errorf("envtest stop: %v", err)
		}
	})
	return cfg
}

// TestInstallOnAPIServer installs the local overlay, the sample and its
// routes on a real apiserver with server-side apply and strict field
// validation, then checks what the RBAC grants each component, that the
// ztunnel token is good for the controller (audience amesh) and nothing
// else, and that uninstalling removes what it installed.
func TestInstallOnAPIServer(t *testing.T) {
	cfg := startAPIServer(t)
	r := root(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	a, err := NewApplier(cfg, "")
	if err != nil {
		t.Fatal(err)
	}
	amesh := render(t, DirOverlayLocal)
	sample := render(t, DirOverlayLocal+"/bookinfo")
	canary, err := ReadFile(filepath.Join(r, DirSampleRoutes, "reviews-canary.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	routes := render(t, DirSampleRoutes)
	applied := 0
	a.Progress = func(string, *unstructured.Unstructured) { applied++ }
	for _, objs := range [][]*unstructured.Unstructured{amesh, sample, canary, routes} {
		if err := a.Apply(ctx, objs, ApplyOptions{}); err != nil {
			t.Fatalf("apply: %v", err)
		}
	}
	if want := len(amesh) + len(sample) + len(canary) + len(routes); applied != want {
		t.Errorf("applied %d objects, want %d", applied, want)
	}

	// Everything is there, as applied.
	dyn := dynamic.NewForConfigOrDie(cfg)
	for _, u := range append(append([]*unstructured.Unstructured{}, amesh...), sample...) {
		ri, err := a.resource(u)
		if err != nil {
			t.Fatal(err)
		}
		got, err := ri.Get(ctx, u.GetName(), metav1.GetOptions{})
		if err != nil {
			t.Errorf("%s: %v", Key(u), err)
			continue
		}
		if IsCRD(u) && !established(got) {
			t.Errorf("%s is not Established", Key(u))
		}
	}
	route, err := dyn.Resource(schema.GroupVersionResource{Group: "gateway.networking.k8s.io", Version: "v1", Resource: "httproutes"}).
		Namespace(SampleNamespace).Get(ctx, "reviews", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if rules, _, _ := unstructured.NestedSlice(route.Object, "spec", "rules"); len(rules) != 2 {
		t.Errorf("HTTPRoute reviews has %d rules after the header route, want 2", len(rules))
	}

	// Re-applying is a no-op that succeeds; a dry run too.
	if err := a.Apply(ctx, amesh, ApplyOptions{}); err != nil {
		t.Fatalf("re-apply: %v", err)
	}
	if err := a.Apply(ctx, amesh, ApplyOptions{DryRun: true}); err != nil {
		t.Fatalf("dry-run apply: %v", err)
	}

	// Strict field validation: a misspelt field is refused, not dropped.
	bad := find(t, render(t, DirOverlayLocal), "DaemonSet", "ztunnel")
	if err := unstructured.SetNestedField(bad.Object, true, "spec", "template", "spec", "hostNetwrok"); err != nil {
		t.Fatal(err)
	}
	if err := a.Apply(ctx, []*unstructured.Unstructured{bad}, ApplyOptions{DryRun: true}); err == nil || !strings.Contains(err.Error(), "hostNetwrok") {
		t.Errorf("apply with an unknown field: %v, want a strict validation error", err)
	}

	cs := kubernetes.NewForConfigOrDie(cfg)
	t.Run("rbac", func(t *testing.T) { checkRBAC(ctx, t, cs) })
	t.Run("tokens", func(t *testing.T) { checkTokens(ctx, t, cfg, cs) })
	t.Run("agent-policy", func(t *testing.T) { checkAgentPolicy(ctx, t, cfg, cs) })

	// Uninstall: everything but the CRDs goes (namespaces terminate; no
	// namespace controller runs here to finish them).
	a.Progress = nil
	if err := a.Delete(ctx, append(sample, amesh...), DeleteOptions{}); err != nil {
		t.Fatalf("delete: %v", err)
	}
	gc := find(t, amesh, "GatewayClass", "amesh-waypoint")
	ri, _ := a.resource(gc)
	if _, err := ri.Get(ctx, gc.GetName(), metav1.GetOptions{}); !apierrors.IsNotFound(err) {
		t.Errorf("GatewayClass after delete: %v", err)
	}
	if _, err := cs.RbacV1().ClusterRoles().Get(ctx, "amesh-controller", metav1.GetOptions{}); !apierrors.IsNotFound(err) {
		t.Errorf("ClusterRole after delete: %v", err)
	}
	crd := find(t, amesh, "CustomResourceDefinition", "httproutes.gateway.networking.k8s.io")
	ri, _ = a.resource(crd)
	if _, err := ri.Get(ctx, crd.GetName(), metav1.GetOptions{}); err != nil {
		t.Errorf("CRDs must survive an uninstall without DeleteOptions.CRDs: %v", err)
	}
	// Deleting again finds nothing to do.
	if err := a.Delete(ctx, amesh, DeleteOptions{}); err != nil {
		t.Errorf("second delete: %v", err)
	}
}

// access is one SubjectAccessReview question.
type access struct {
	verb, group, resource, subresource, namespace string
	allowed                                       bool
}

func serviceAccount(name string) (string, []string) {
	return "system:serviceaccount:" + SystemNamespace + ":" + name,
		[]string{"system:serviceaccounts", "system:serviceaccounts:" + SystemNamespace, "system:authenticated"}
}

// checkRBAC asks the apiserver's authorizer what each component may do:
// what it needs is allowed, the rest is not.
func checkRBAC(ctx context.Context, t *testing.T, cs kubernetes.Interface) {
	cases := map[string][]access{
		"amesh-controller": {
			{verb: "watch", resource: "pods", allowed: true},
			{verb: "list", resource: "namespaces", allowed: true},
			{verb: "watch", group: "discovery.k8s.io", resource: "endpointslices", allowed: true},
			{verb: "create", group: "authentication.k8s.io", resource: "tokenreviews", allowed: true},
			{verb: "create", group: "apps", resource: "deployments", namespace: "bookinfo", allowed: true},
			{verb: "create", resource: "serviceaccounts", namespace: "bookinfo", allowed: true},
			{verb: "create", resource: "configmaps", namespace: "bookinfo", allowed: true},
			{verb: "patch", group: "gateway.networking.k8s.io", resource: "gateways", subresource: "status", namespace: "bookinfo", allowed: true},
			{verb: "update", group: "gateway.networking.k8s.io", resource: "httproutes", subresource: "status", namespace: "bookinfo", allowed: true},
			{verb: "watch", group: "security.amesh.dev", resource: "authorizationpolicies", allowed: true},
			{verb: "patch", group: "traffic.amesh.dev", resource: "backendtrafficpolicies", subresource: "status", namespace: "bookinfo", allowed: true},
			{verb: "create", resource: "secrets", namespace: SystemNamespace, allowed: true},
			{verb: "update", group: "coordination.k8s.io", resource: "leases", namespace: SystemNamespace, allowed: true},
			{verb: "get", resource: "secrets", namespace: "bookinfo"},
			{verb: "get", resource: "secrets", namespace: "kube-system"},
			{verb: "delete", resource: "pods", namespace: "bookinfo"},
			{verb: "update", group: "gateway.networking.k8s.io", resource: "gateways", namespace: "bookinfo"},
			// It removes the amesh-root-cert ConfigMaps it published where no
			// longer needed (only its own: labelled, with preconditions).
			{verb: "delete", resource: "configmaps", namespace: "bookinfo", allowed: true},
			{verb: "delete", resource: "secrets", namespace: "bookinfo"},
			{verb: "delete", resource: "services", namespace: "bookinfo", allowed: true},
			{verb: "create", group: "rbac.authorization.k8s.io", resource: "rolebindings", namespace: "bookinfo"},
			{verb: "impersonate", resource: "serviceaccounts"},
		},
		// ztunnel holds no Kubernetes permission at all.
		"ztunnel": {
			{verb: "list", resource: "pods"},
			{verb: "get", resource: "configmaps", namespace: SystemNamespace},
			{verb: "create", group: "authentication.k8s.io", resource: "tokenreviews"},
		},
		"amesh-cni-agent": {
			{verb: "watch", resource: "pods", allowed: true},
			{verb: "patch", resource: "pods", namespace: "bookinfo", allowed: true},
			{verb: "watch", resource: "namespaces", allowed: true},
			{verb: "delete", resource: "pods", namespace: "bookinfo"},
			{verb: "create", resource: "pods", namespace: "bookinfo"},
			{verb: "patch", resource: "namespaces"},
			{verb: "get", resource: "secrets", namespace: SystemNamespace},
			{verb: "list", resource: "services"},
		},
	}
	for sa, checks := range cases {
		user, groups := serviceAccount(sa)
		for _, c := range checks {
			sar := &authorizationv1.SubjectAccessReview{Spec: authorizationv1.SubjectAccessReviewSpec{
				User: user, Groups: groups,
				ResourceAttributes: &authorizationv1.ResourceAttributes{
					Verb: c.verb, Group: c.group, Resource: c.resource, Subresource: c.subresource, Namespace: c.namespace,
				},
			}}
			got, err := cs.AuthorizationV1().SubjectAccessReviews().Create(ctx, sar, metav1.CreateOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if got.Status.Allowed != c.allowed {
				t.Errorf("%s %s %s.%s/%s in %q: allowed=%v, want %v", sa, c.verb, c.resource, c.group, c.subresource, c.namespace, got.Status.Allowed, c.allowed)
			}
		}
	}
}

// checkTokens checks the contract of ztunnel's projected token: audience
// amesh passes the controller's TokenReview as the ztunnel service
// account; the same token is refused by the Kubernetes API itself.
func checkTokens(ctx context.Context, t *testing.T, cfg *rest.Config, cs kubernetes.Interface) {
	exp := int64(600)
	tr, err := cs.CoreV1().ServiceAccounts(SystemNamespace).CreateToken(ctx, "ztunnel", &authenticationv1.TokenRequest{
		Spec: authenticationv1.TokenRequestSpec{Audiences: []string{"amesh"}, ExpirationSeconds: &exp},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	token := tr.Status.Token
	review := func(audience string) *authenticationv1.TokenReview {
		rv, err := cs.AuthenticationV1().TokenReviews().Create(ctx, &authenticationv1.TokenReview{
			Spec: authenticationv1.TokenReviewSpec{Token: token, Audiences: []string{audience}},
		}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		return rv
	}
	user, _ := serviceAccount("ztunnel")
	if rv := review("amesh"); !rv.Status.Authenticated || rv.Status.User.Username != user {
		t.Errorf("TokenReview audience amesh: %+v", rv.Status)
	}
	if rv := review("not-amesh"); rv.Status.Authenticated {
		t.Errorf("TokenReview with another audience authenticated the token: %+v", rv.Status)
	}
	anon := rest.AnonymousClientConfig(cfg)
	anon.BearerToken = token
	_, err = kubernetes.NewForConfigOrDie(anon).CoreV1().Pods("").List(ctx, metav1.ListOptions{})
	if !apierrors.IsUnauthorized(err) {
		t.Errorf("the amesh-audience token against the Kubernetes API: %v, want 401", err)
	}
}

// checkAgentPolicy checks the admission policy that confines the node
// agent to the redirection annotation of pods on its own node, with a real
// token bound to an agent pod (the apiserver adds the pod's node to it).
func checkAgentPolicy(ctx context.Context, t *testing.T, cfg *rest.Config, cs kubernetes.Interface) {
	for _, n := range []string{"node-a", "node-b"} {
		if _, err := cs.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: n}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	mkpod := func(ns, name, node, sa string) *corev1.Pod {
		p, err := cs.CoreV1().Pods(ns).Create(ctx, &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{"app": name}},
			Spec: corev1.PodSpec{NodeName: node, ServiceAccountName: sa,
				Containers: []corev1.Container{{Name: "c", Image: "ghcr.io/amesh-dev/sampleapp:dev"}}},
		}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	agent := mkpod(SystemNamespace, "agent-a", "node-a", "amesh-cni-agent")
	mkpod(SampleNamespace, "pod-a", "node-a", "default")
	mkpod(SampleNamespace, "pod-b", "node-b", "default")

	token := func(bound bool) kubernetes.Interface {
		exp := int64(600)
		req := &authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{ExpirationSeconds: &exp}}
		if bound {
			req.Spec.BoundObjectRef = &authenticationv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: agent.Name, UID: agent.UID}
		}
		tr, err := cs.CoreV1().ServiceAccounts(SystemNamespace).CreateToken(ctx, "amesh-cni-agent", req, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		c := rest.AnonymousClientConfig(cfg)
		c.BearerToken = tr.Status.Token
		return kubernetes.NewForConfigOrDie(c)
	}
	patch := func(c kubernetes.Interface, pod, body string) error {
		_, err := c.CoreV1().Pods(SampleNamespace).Patch(ctx, pod, types.MergePatchType, []byte(body), metav1.PatchOptions{})
		return err
	}
	annotate := func(v string) string { return `{"metadata":{"annotations":{"amesh.dev/redirection":` + v + `}}}` }
	ac := token(true)

	// The policy takes effect once the apiserver has loaded it.
	deadline := time.Now().Add(20 * time.Second)
	for {
		err := patch(ac, "pod-b", annotate(`"enabled"`))
		if apierrors.IsForbidden(err) && strings.Contains(err.Error(), "own node") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("agent annotating a pod on another node: %v, want Forbidden by the policy", err)
		}
		time.Sleep(200 * time.Millisecond)
	}
	if err := patch(ac, "pod-a", annotate(`"enabled"`)); err != nil {
		t.Errorf("agent annotating a pod on its node: %v", err)
	}
	if err := patch(ac, "pod-a", annotate("null")); err != nil {
		t.Errorf("agent removing the annotation: %v", err)
	}
	for name, body := range map[string]string{
		"label":            `{"metadata":{"labels":{"amesh.dev/dataplane-mode":"none"}}}`,
		"other annotation": `{"metadata":{"annotations":{"amesh.dev/use-waypoint":"x"}}}`,
		"spec":             `{"spec":{"activeDeadlineSeconds":5}}`,
	} {
		if err := patch(ac, "pod-a", body); !apierrors.IsForbidden(err) {
			t.Errorf("agent changing a pod's %s: %v, want Forbidden", name, err)
		}
	}
	// A token that names no node is refused (fail closed).
	if err := patch(token(false), "pod-a", annotate(`"enabled"`)); !apierrors.IsForbidden(err) {
		t.Errorf("agent token without a node: %v, want Forbidden", err)
	}
	// Nobody else is affected.
	if err := patch(cs, "pod-b", `{"metadata":{"labels":{"x":"y"}}}`); err != nil {
		t.Errorf("admin patching a pod: %v", err)
	}
}
