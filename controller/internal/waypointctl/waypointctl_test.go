package waypointctl_test

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/cli-runtime/pkg/genericiooptions"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
	"sigs.k8s.io/yaml"

	"github.com/amesh-dev/amesh/controller/internal/deployer"
	"github.com/amesh-dev/amesh/controller/internal/kubetest"
	"github.com/amesh-dev/amesh/controller/internal/waypointctl"
)

// plugin runs `kubectl waypoint` in-process against a kubeconfig.
type plugin struct {
	t          *testing.T
	kubeconfig string
}

// result is one run of the plugin.
type result struct {
	out, errOut string
	err         error
}

func (r result) String() string {
	return "stdout:\n" + r.out + "stderr:\n" + r.errOut + "error: " + errString(r.err)
}

func errString(err error) string {
	if err == nil {
		return "<nil>"
	}
	return err.Error()
}

func (p *plugin) run(args ...string) result {
	p.t.Helper()
	var out, errOut bytes.Buffer
	cmd := waypointctl.NewCommand(genericiooptions.IOStreams{In: strings.NewReader(""), Out: &out, ErrOut: &errOut})
	cmd.SetArgs(append([]string{"--kubeconfig", p.kubeconfig, "--poll-interval", "50ms"}, args...))
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	err := cmd.ExecuteContext(ctx)
	return result{out: out.String(), errOut: errOut.String(), err: err}
}

// ok runs the plugin and fails the test if it fails.
func (p *plugin) ok(args ...string) result {
	p.t.Helper()
	r := p.run(args...)
	if r.err != nil {
		p.t.Fatalf("kubectl waypoint %s: %s", strings.Join(args, " "), r)
	}
	return r
}

// fails runs the plugin, expects an error containing want, and returns the
// result.
func (p *plugin) fails(want string, args ...string) result {
	p.t.Helper()
	r := p.run(args...)
	if r.err == nil || !strings.Contains(r.err.Error(), want) {
		p.t.Fatalf("kubectl waypoint %s: want an error containing %q, got %s", strings.Join(args, " "), want, r)
	}
	return r
}

func contains(t *testing.T, what, s string, subs ...string) {
	t.Helper()
	for _, sub := range subs {
		if !strings.Contains(s, sub) {
			t.Errorf("%s does not contain %q:\n%s", what, sub, s)
		}
	}
}

// userKubeconfig writes a kubeconfig for a user of the test apiserver.
func userKubeconfig(t *testing.T, k *kubetest.Env, name string, groups ...string) string {
	t.Helper()
	u, err := k.Environment.AddUser(envtest.User{Name: name, Groups: groups}, nil)
	if err != nil {
		t.Fatal(err)
	}
	kc, err := u.KubeConfig()
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), name+".kubeconfig")
	if err := os.WriteFile(path, kc, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func testScheme(t *testing.T) *runtime.Scheme {
	s := runtime.NewScheme()
	if err := clientgoscheme.AddToScheme(s); err != nil {
		t.Fatal(err)
	}
	if err := gwv1.Install(s); err != nil {
		t.Fatal(err)
	}
	return s
}

// startDeployer runs the real waypoint deployer.
func startDeployer(t *testing.T, k *kubetest.Env, s *runtime.Scheme) {
	t.Helper()
	mgr, err := ctrl.NewManager(k.Config, ctrl.Options{
		Scheme:                 s,
		Metrics:                metricsserver.Options{BindAddress: "0"},
		HealthProbeBindAddress: "0",
		Cache:                  cache.Options{ByObject: deployer.CacheByObject()},
	})
	if err != nil {
		t.Fatal(err)
	}
	opts := deployer.DefaultOptions()
	if err := deployer.Setup(mgr, opts, zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel))); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- mgr.Start(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("manager: %v", err)
			}
		case <-time.After(20 * time.Second):
			t.Error("manager did not stop within 20s")
		}
	})
}

// kubelet plays the Deployment controller and kubelet for one waypoint:
// once its Deployment exists, it reports a ready replica.
func kubelet(t *testing.T, c client.Client, ns, name string) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		for ctx.Err() == nil {
			var d appsv1.Deployment
			if err := c.Get(ctx, types.NamespacedName{Namespace: ns, Name: name}, &d); err == nil {
				d.Status = appsv1.DeploymentStatus{ObservedGeneration: d.Generation, Replicas: 1, UpdatedReplicas: 1, ReadyReplicas: 1, AvailableReplicas: 1}
				if err := c.Status().Update(ctx, &d); err == nil {
					return
				}
			}
			time.Sleep(50 * time.Millisecond)
		}
	}()
	t.Cleanup(func() {
		cancel()
		<-done
	})
}

// TestPlugin runs `kubectl waypoint` against a real apiserver: without
// the CRDs, without amesh, then with the deployer running.
func TestPlugin(t *testing.T) {
	k := kubetest.Start(t, kubetest.Options{NoCRDs: true})
	ctx := context.Background()
	s := testScheme(t)
	c, err := client.New(k.Config, client.Options{Scheme: s})
	if err != nil {
		t.Fatal(err)
	}
	p := &plugin{t: t, kubeconfig: userKubeconfig(t, k, "admin", "system:masters")}
	create := func(o client.Object) {
		t.Helper()
		if err := c.Create(ctx, o); err != nil {
			t.Fatalf("create %T %s: %v", o, o.GetName(), err)
		}
	}
	namespace := func(name string, labels map[string]string) {
		t.Helper()
		create(&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels}})
	}
	gateway := func(ns, name string) (*gwv1.Gateway, error) {
		var gw gwv1.Gateway
		err := c.Get(ctx, types.NamespacedName{Namespace: ns, Name: name}, &gw)
		return &gw, err
	}
	nsLabels := func(name string) map[string]string {
		t.Helper()
		var n corev1.Namespace
		if err := c.Get(ctx, types.NamespacedName{Name: name}, &n); err != nil {
			t.Fatal(err)
		}
		return n.Labels
	}

	t.Run("no cluster", func(t *testing.T) {
		p := &plugin{t: t, kubeconfig: filepath.Join(t.TempDir(), "closed.kubeconfig")}
		cfg := "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://127.0.0.1:1\n" +
			"contexts:\n- name: c\n  context:\n    cluster: c\ncurrent-context: c\n"
		if err := os.WriteFile(p.kubeconfig, []byte(cfg), 0o600); err != nil {
			t.Fatal(err)
		}
		p.fails("cannot reach the Kubernetes API server at https://127.0.0.1:1", "list")
		p.kubeconfig = filepath.Join(t.TempDir(), "missing")
		p.fails("no such file", "list")
	})

	t.Run("credentials rejected", func(t *testing.T) {
		kc := clientcmdapi.NewConfig()
		kc.Clusters["c"] = &clientcmdapi.Cluster{Server: k.Config.Host, CertificateAuthorityData: k.Config.CAData}
		kc.AuthInfos["u"] = &clientcmdapi.AuthInfo{Token: "not-a-token"}
		kc.Contexts["c"] = &clientcmdapi.Context{Cluster: "c", AuthInfo: "u"}
		kc.CurrentContext = "c"
		p := &plugin{t: t, kubeconfig: filepath.Join(t.TempDir(), "bad-token.kubeconfig")}
		if err := clientcmd.WriteToFile(*kc, p.kubeconfig); err != nil {
			t.Fatal(err)
		}
		p.fails("rejected your credentials", "list")
	})

	t.Run("no configuration at all", func(t *testing.T) {
		t.Setenv("KUBECONFIG", "")
		t.Setenv("HOME", t.TempDir())
		var out, errOut bytes.Buffer
		cmd := waypointctl.NewCommand(genericiooptions.IOStreams{In: strings.NewReader(""), Out: &out, ErrOut: &errOut})
		cmd.SetArgs([]string{"list"})
		if err := cmd.Execute(); err == nil || !strings.Contains(err.Error(), "no Kubernetes configuration found") {
			t.Fatalf("got %v", err)
		}
	})

	t.Run("Gateway API CRDs missing", func(t *testing.T) {
		p := &plugin{t: t, kubeconfig: p.kubeconfig}
		p.fails("the Gateway API CRDs (gateway.networking.k8s.io/v1) are not installed", "apply", "-n", "default")
		p.fails("the Gateway API CRDs (gateway.networking.k8s.io/v1) are not installed", "list")
	})

	dirs, err := kubetest.CRDDirs()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := envtest.InstallCRDs(k.Config, envtest.CRDInstallOptions{Paths: dirs, ErrorIfPathMissing: true}); err != nil {
		t.Fatal(err)
	}

	t.Run("amesh missing", func(t *testing.T) {
		p := &plugin{t: t, kubeconfig: p.kubeconfig}
		p.fails("the GatewayClass amesh-waypoint does not exist: amesh is not installed", "apply", "-n", "default")
		if _, err := gateway("default", "waypoint"); !apierrors.IsNotFound(err) {
			t.Errorf("a Gateway was created without amesh (%v)", err)
		}
	})

	raw, err := os.ReadFile(filepath.Join("..", "..", "..", "manifests", "base", "gatewayclass.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var gc gwv1.GatewayClass
	if err := yaml.UnmarshalStrict(raw, &gc); err != nil {
		t.Fatal(err)
	}
	create(&gc)
	startDeployer(t, k, s)

	t.Run("apply enrols the namespace and waits until programmed", func(t *testing.T) {
		p := &plugin{t: t, kubeconfig: p.kubeconfig}
		namespace("shop", map[string]string{"amesh.dev/dataplane-mode": "ambient"})
		kubelet(t, c, "shop", "waypoint")
		r := p.ok("apply", "-n", "shop", "--enroll-namespace", "--wait", "--timeout", "30s")
		contains(t, "output", r.out,
			"waypoint shop/waypoint created",
			"namespace shop labelled amesh.dev/use-waypoint=waypoint",
			"waypoint shop/waypoint is programmed: the waypoint serves HBONE at ")
		if r.errOut != "" {
			t.Errorf("warnings for an enrolled namespace: %s", r.errOut)
		}
		gw, err := gateway("shop", "waypoint")
		if err != nil {
			t.Fatal(err)
		}
		if gw.Spec.GatewayClassName != "amesh-waypoint" || len(gw.Spec.Listeners) != 1 || gw.Spec.Listeners[0].Name != "mesh" ||
			gw.Spec.Listeners[0].Port != 15008 || gw.Spec.Listeners[0].Protocol != "HBONE" || gw.Labels["amesh.dev/waypoint-for"] != "service" {
			t.Errorf("gateway %+v %+v", gw.Labels, gw.Spec)
		}
		if l := nsLabels("shop"); l["amesh.dev/use-waypoint"] != "waypoint" {
			t.Errorf("namespace labels %v", l)
		}

		r = p.ok("apply", "-n", "shop", "--enroll-namespace")
		contains(t, "second apply", r.out, "waypoint shop/waypoint unchanged", "namespace shop already uses waypoint waypoint")

		r = p.ok("apply", "-n", "shop", "--for", "all", "-o", "json")
		contains(t, "apply --for all", r.out, "waypoint shop/waypoint configured")
		var printed gwv1.Gateway
		if err := json.Unmarshal([]byte(r.out[strings.Index(r.out, "{"):]), &printed); err != nil {
			t.Fatalf("apply -o json: %v\n%s", err, r.out)
		}
		if printed.Labels["amesh.dev/waypoint-for"] != "all" || printed.Kind != "Gateway" {
			t.Errorf("printed %v %v", printed.TypeMeta, printed.Labels)
		}
	})

	t.Run("waypoint for a service account", func(t *testing.T) {
		p := &plugin{t: t, kubeconfig: p.kubeconfig}
		r := p.ok("apply", "-n", "shop", "--service-account", "reviews")
		contains(t, "output", r.out, "waypoint shop/reviews-waypoint created")
		gw, err := gateway("shop", "reviews-waypoint")
		if err != nil {
			t.Fatal(err)
		}
		if gw.Annotations["amesh.dev/for-service-account"] != "reviews" || gw.Labels["amesh.dev/waypoint-for"] != "workload" {
			t.Errorf("annotations %v, labels %v; want the service account, for workloads", gw.Annotations, gw.Labels)
		}
		p.fails("service account reviews in namespace shop is already served by waypoint reviews-waypoint",
			"apply", "-n", "shop", "--name", "reviews-2", "--service-account", "reviews")
		if _, err := gateway("shop", "reviews-2"); !apierrors.IsNotFound(err) {
			t.Errorf("the refused waypoint exists (%v)", err)
		}
	})

	t.Run("a namespace bound elsewhere is refused without --overwrite", func(t *testing.T) {
		p := &plugin{t: t, kubeconfig: p.kubeconfig}
		namespace("cart", map[string]string{"amesh.dev/use-waypoint": "legacy"})
		r := p.fails("namespace cart is already bound to waypoint legacy; pass --overwrite", "apply", "-n", "cart", "--enroll-namespace")
		contains(t, "warnings", r.errOut, "Warning: namespace cart is bound to waypoint legacy")
		if _, err := gateway("cart", "waypoint"); !apierrors.IsNotFound(err) {
			t.Errorf("a refused apply created the Gateway (%v)", err)
		}
		if l := nsLabels("cart"); l["amesh.dev/use-waypoint"] != "legacy" {
			t.Errorf("a refused apply relabelled the namespace: %v", l)
		}
		r = p.ok("apply", "-n", "cart", "--enroll-namespace", "--overwrite")
		contains(t, "warnings", r.errOut,
			"Warning: namespace cart was bound to waypoint legacy; binding it to waypoint",
			"Warning: namespace cart is not enrolled in ambient mode (label amesh.dev/dataplane-mode=ambient)")
		if l := nsLabels("cart"); l["amesh.dev/use-waypoint"] != "waypoint" {
			t.Errorf("namespace labels %v", l)
		}

		namespace("remote", map[string]string{
			"amesh.dev/dataplane-mode": "ambient", "amesh.dev/use-waypoint": "waypoint", "amesh.dev/use-waypoint-namespace": "shop",
		})
		p.fails("namespace remote is already bound to waypoint shop/waypoint", "apply", "-n", "remote", "--enroll-namespace")
		p.ok("apply", "-n", "remote", "--enroll-namespace", "--overwrite")
		l := nsLabels("remote")
		if _, ok := l["amesh.dev/use-waypoint-namespace"]; ok || l["amesh.dev/use-waypoint"] != "waypoint" {
			t.Errorf("namespace labels %v: want the local waypoint only", l)
		}

		namespace("optout", map[string]string{"amesh.dev/dataplane-mode": "ambient", "amesh.dev/use-waypoint": "none"})
		p.fails("namespace optout is already bound to no waypoint (amesh.dev/use-waypoint=none)", "apply", "-n", "optout", "--enroll-namespace")
	})

	t.Run("list", func(t *testing.T) {
		p := &plugin{t: t, kubeconfig: p.kubeconfig}
		r := p.ok("list", "-n", "shop")
		lines := strings.Split(strings.TrimSpace(r.out), "\n")
		if len(lines) != 3 || !strings.HasPrefix(lines[0], "NAME") || !strings.HasPrefix(lines[1], "reviews-waypoint") ||
			!strings.HasPrefix(lines[2], "waypoint") {
			t.Fatalf("list -n shop:\n%s", r.out)
		}
		contains(t, "header", lines[0], "FOR", "SERVICE ACCOUNT", "ADDRESS", "PROGRAMMED", "AGE")
		if f := strings.Fields(lines[2]); f[1] != "all" || f[2] != "-" || f[4] != "True" {
			t.Errorf("row %q: want for=all, no service account, programmed", lines[2])
		}
		if f := strings.Fields(lines[1]); f[1] != "workload" || f[2] != "reviews" {
			t.Errorf("row %q: want for=workload (a service account's waypoint) and the service account", lines[1])
		}

		r = p.ok("list", "-A")
		contains(t, "list -A", r.out, "NAMESPACE", "cart ", "remote ", "shop ")

		r = p.ok("list", "-n", "empty")
		contains(t, "list of an empty namespace", r.errOut, "No waypoints found in namespace empty.")

		r = p.ok("list", "-n", "shop", "-o", "json")
		var list struct {
			Kind  string
			Items []gwv1.Gateway
		}
		if err := json.Unmarshal([]byte(r.out), &list); err != nil {
			t.Fatal(err)
		}
		if list.Kind != "GatewayList" || len(list.Items) != 2 {
			t.Errorf("list -o json: kind %q, %d items", list.Kind, len(list.Items))
		}
		r = p.ok("list", "-n", "shop", "-o", "yaml")
		if err := yaml.Unmarshal([]byte(r.out), &list); err != nil || len(list.Items) != 2 {
			t.Errorf("list -o yaml: %v, %d items", err, len(list.Items))
		}
		p.fails(`--output "wide": must be yaml or json`, "list", "-o", "wide")
	})

	t.Run("status", func(t *testing.T) {
		p := &plugin{t: t, kubeconfig: p.kubeconfig}
		create(&corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "ratings", Labels: map[string]string{"amesh.dev/use-waypoint": "waypoint"}},
			Spec:       corev1.ServiceSpec{Ports: []corev1.ServicePort{{Port: 80}}},
		})
		namespace("far", map[string]string{"amesh.dev/use-waypoint": "waypoint", "amesh.dev/use-waypoint-namespace": "shop"})
		r := p.ok("status", "-n", "shop", "waypoint")
		contains(t, "status", r.out,
			"Waypoint:", "shop/waypoint", "Serves:", "all traffic", "Deployment:", "1/1 ready",
			"namespace far (refused: the listeners' allowedRoutes.namespaces do not admit it)", "namespace shop", "service ratings",
			"Accepted", "Programmed", "True", "mesh", "15008", "HBONE")
		for _, other := range []string{"namespace cart", "namespace remote"} {
			if strings.Contains(r.out, other) {
				t.Errorf("status lists %s, bound to its own waypoint:\n%s", other, r.out)
			}
		}
		r = p.ok("status", "-n", "shop")
		contains(t, "status of the namespace", r.out, "shop/waypoint", "shop/reviews-waypoint", "For service account:", "reviews")

		r = p.ok("status", "-n", "shop", "waypoint", "-o", "yaml")
		contains(t, "status -o yaml", r.out, "apiVersion: gateway.networking.k8s.io/v1", "kind: Gateway", "type: Programmed")
		if strings.Contains(r.out, "managedFields") {
			t.Error("status -o yaml prints managed fields")
		}
		p.fails("waypoint shop/nope not found", "status", "-n", "shop", "nope")
		p.fails("no waypoints in namespace empty", "status", "-n", "empty")
	})

	t.Run("other namespaces are admitted with --allow-namespaces", func(t *testing.T) {
		p := &plugin{t: t, kubeconfig: p.kubeconfig}
		from := func() (string, string) {
			t.Helper()
			gw, err := gateway("shop", "waypoint")
			if err != nil {
				t.Fatal(err)
			}
			ar := gw.Spec.Listeners[0].AllowedRoutes
			if ar == nil || ar.Namespaces == nil || ar.Namespaces.From == nil {
				return "", ""
			}
			sel := ""
			if ar.Namespaces.Selector != nil {
				sel = metav1.FormatLabelSelector(ar.Namespaces.Selector)
			}
			return string(*ar.Namespaces.From), sel
		}
		p.fails(`--allow-namespaces "team in (": must be same, all or a label selector`, "apply", "-n", "shop", "--allow-namespaces", "team in (")
		r := p.ok("apply", "-n", "shop", "--allow-namespaces", "kubernetes.io/metadata.name=far")
		contains(t, "apply --allow-namespaces", r.out, "waypoint shop/waypoint configured")
		if f, sel := from(); f != "Selector" || sel != "kubernetes.io/metadata.name=far" {
			t.Fatalf("allowedRoutes from %q selector %q", f, sel)
		}
		r = p.ok("status", "-n", "shop", "waypoint")
		if strings.Contains(r.out, "namespace far (refused") || !strings.Contains(r.out, "namespace far") {
			t.Errorf("namespace far not shown as admitted:\n%s", r.out)
		}
		// Without the flag the setting stays.
		r = p.ok("apply", "-n", "shop")
		contains(t, "apply without --allow-namespaces", r.out, "waypoint shop/waypoint unchanged")
		if f, sel := from(); f != "Selector" || sel != "kubernetes.io/metadata.name=far" {
			t.Fatalf("after an apply without the flag: allowedRoutes from %q selector %q", f, sel)
		}
		p.ok("apply", "-n", "shop", "--allow-namespaces", "all")
		if f, _ := from(); f != "All" {
			t.Fatalf("allowedRoutes from %q, want All", f)
		}
		p.ok("apply", "-n", "shop", "--allow-namespaces", "same")
		if f, _ := from(); f != "Same" {
			t.Fatalf("allowedRoutes from %q, want Same", f)
		}
		r = p.ok("status", "-n", "shop", "waypoint")
		contains(t, "status after --allow-namespaces same", r.out, "namespace far (refused")
	})

	t.Run("Gateways of other classes are not touched", func(t *testing.T) {
		p := &plugin{t: t, kubeconfig: p.kubeconfig}
		create(&gwv1.Gateway{
			ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "ingress"},
			Spec: gwv1.GatewaySpec{GatewayClassName: "other", Listeners: []gwv1.Listener{
				{Name: "http", Port: 80, Protocol: gwv1.HTTPProtocolType},
			}},
		})
		p.fails("a Gateway shop/ingress exists and is not a waypoint (class other)", "apply", "-n", "shop", "--name", "ingress")
		p.fails("shop/ingress is a Gateway of class other, not a waypoint: not deleted", "delete", "-n", "shop", "ingress")
		gw, err := gateway("shop", "ingress")
		if err != nil || gw.Spec.GatewayClassName != "other" || len(gw.Spec.Listeners) != 1 {
			t.Errorf("the foreign Gateway changed: %v %+v", err, gw.Spec)
		}
		if r := p.ok("list", "-n", "shop"); strings.Contains(r.out, "ingress") {
			t.Errorf("list shows a foreign Gateway:\n%s", r.out)
		}
	})

	t.Run("RBAC denied", func(t *testing.T) {
		create(&rbacv1.Role{
			ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "gateway-viewer"},
			Rules: []rbacv1.PolicyRule{{
				APIGroups: []string{"gateway.networking.k8s.io"}, Resources: []string{"gateways"}, Verbs: []string{"get", "list"},
			}},
		})
		create(&rbacv1.RoleBinding{
			ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "viewer"},
			RoleRef:    rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "Role", Name: "gateway-viewer"},
			Subjects:   []rbacv1.Subject{{APIGroup: "rbac.authorization.k8s.io", Kind: "User", Name: "viewer"}},
		})
		p := &plugin{t: t, kubeconfig: userKubeconfig(t, k, "viewer")}
		p.fails("create or patch gateways in namespace shop: permission denied", "apply", "-n", "shop", "--name", "mine")
		p.fails("list gateways in namespace cart: permission denied", "list", "-n", "cart")
		r := p.ok("list", "-n", "shop")
		contains(t, "list as viewer", r.out, "waypoint")
		p.fails("delete gateways in namespace shop: permission denied", "delete", "-n", "shop", "reviews-waypoint")
		if _, err := gateway("shop", "reviews-waypoint"); err != nil {
			t.Errorf("a denied delete deleted: %v", err)
		}
	})

	t.Run("wait gives up at its timeout with the last progress", func(t *testing.T) {
		p := &plugin{t: t, kubeconfig: p.kubeconfig}
		namespace("slow", map[string]string{"amesh.dev/dataplane-mode": "ambient"})
		r := p.fails("waypoint slow/waypoint not programmed within 2s", "apply", "-n", "slow", "--wait", "--timeout", "2s")
		contains(t, "progress", r.out, "waiting for waypoint slow/waypoint: waiting for the waypoint Deployment: 0 of 1 replicas available; "+
			"its pods cannot start before the ConfigMap amesh-root-cert exists in the namespace")
	})

	t.Run("delete", func(t *testing.T) {
		p := &plugin{t: t, kubeconfig: p.kubeconfig}
		r := p.ok("delete", "-n", "shop", "reviews-waypoint")
		contains(t, "delete", r.out, "waypoint shop/reviews-waypoint deleted")
		if _, err := gateway("shop", "reviews-waypoint"); !apierrors.IsNotFound(err) {
			t.Errorf("still there: %v", err)
		}
		r = p.ok("delete", "-n", "shop")
		contains(t, "delete of the default waypoint", r.out, "waypoint shop/waypoint deleted")
		contains(t, "dangling bindings", r.errOut,
			"Warning: namespace shop is still bound to the deleted waypoint waypoint: its traffic is refused until the waypoint is back; "+
				"to send it directly instead: kubectl label namespace shop amesh.dev/use-waypoint-",
			"Warning: service shop/ratings is still bound to the deleted waypoint waypoint: its traffic is refused until the waypoint is back; "+
				"to send it directly instead: kubectl label service -n shop ratings amesh.dev/use-waypoint-")
		p.fails("waypoint shop/nope not found", "delete", "-n", "shop", "nope")
		p.fails("name waypoints or pass --all, not both", "delete", "-n", "shop", "--all", "x")

		p.ok("apply", "-n", "cart", "--name", "second")
		r = p.ok("delete", "-n", "cart", "--all")
		contains(t, "delete --all", r.out, "waypoint cart/second deleted", "waypoint cart/waypoint deleted")
		if r := p.ok("list", "-n", "cart"); !strings.Contains(r.errOut, "No waypoints found") {
			t.Errorf("after delete --all: %s", r)
		}
	})
}
