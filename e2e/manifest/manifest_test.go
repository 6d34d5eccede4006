package manifest

import (
	"bytes"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/yaml"
)

// kustomizations are every kustomization directory of the repository.
var kustomizations = []string{
	DirCRDs, DirBase, DirOverlayKind, DirOverlayLocal,
	DirSample, DirSampleRoutes, DirOverlayKind + "/bookinfo", DirOverlayLocal + "/bookinfo",
	DirGatewayAPI + "/standard", DirGatewayAPI + "/experimental", "manifests/base/crds",
}

func root(t *testing.T) string {
	t.Helper()
	r, err := FindRoot(".")
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// renders caches Render per directory: the CRDs make rendering slow.
var renders sync.Map // dir → []*unstructured.Unstructured

// render returns a deep copy of dir's objects.
func render(t *testing.T, dir string) []*unstructured.Unstructured {
	t.Helper()
	v, ok := renders.Load(dir)
	if !ok {
		objs, err := Render(filepath.Join(root(t), dir))
		if err != nil {
			t.Fatal(err)
		}
		v, _ = renders.LoadOrStore(dir, objs)
	}
	objs := v.([]*unstructured.Unstructured)
	out := make([]*unstructured.Unstructured, len(objs))
	for i, u := range objs {
		out[i] = u.DeepCopy()
	}
	return out
}

func find(t *testing.T, objs []*unstructured.Unstructured, kind, name string) *unstructured.Unstructured {
	t.Helper()
	for _, u := range objs {
		if u.GetKind() == kind && u.GetName() == name {
			return u
		}
	}
	t.Fatalf("no %s %s", kind, name)
	return nil
}

// TestRender renders every kustomization and checks the objects are
// well-formed: unique, namespaced where they must be, in amesh-system or
// bookinfo, and parseable as their Go types where the test knows them.
func TestRender(t *testing.T) {
	for _, dir := range kustomizations {
		t.Run(dir, func(t *testing.T) {
			objs := render(t, dir)
			if len(objs) == 0 {
				t.Fatal("no objects")
			}
			seen := map[string]bool{}
			for _, u := range objs {
				if seen[Key(u)] {
					t.Errorf("duplicate %s", Key(u))
				}
				seen[Key(u)] = true
				switch u.GetKind() {
				case "Deployment", "DaemonSet", "Service", "ServiceAccount", "Role", "RoleBinding", "HTTPRoute", "GRPCRoute":
					if ns := u.GetNamespace(); ns != SystemNamespace && ns != SampleNamespace {
						t.Errorf("%s: namespace %q", Key(u), ns)
					}
				}
			}
		})
	}
}

// TestKubectlKustomizeAgrees renders the overlays (which include the base
// and the CRDs) with the pinned kubectl too — what users and hack/kind.sh
// run — and checks both agree.
func TestKubectlKustomizeAgrees(t *testing.T) {
	assets := os.Getenv("KUBEBUILDER_ASSETS")
	kubectl := filepath.Join(assets, "kubectl")
	if _, err := os.Stat(kubectl); assets == "" || err != nil {
		t.Skip("needs the pinned kubectl: set KUBEBUILDER_ASSETS=$(make -s print-kube-bin) (make unit does)")
	}
	for _, dir := range []string{DirOverlayLocal, DirOverlayKind, DirOverlayLocal + "/bookinfo", DirOverlayKind + "/bookinfo", DirSampleRoutes} {
		t.Run(dir, func(t *testing.T) {
			out, err := exec.Command(kubectl, "kustomize", filepath.Join(root(t), dir)).Output()
			if err != nil {
				t.Fatalf("kubectl kustomize: %v", err)
			}
			var got []map[string]any
			dec := utilyaml.NewYAMLOrJSONDecoder(bytes.NewReader(out), 4096)
			for {
				var m map[string]any
				if err := dec.Decode(&m); err != nil {
					break
				}
				if m != nil {
					got = append(got, m)
				}
			}
			want := render(t, dir)
			if len(got) != len(want) {
				t.Fatalf("kubectl rendered %d objects, Render %d", len(got), len(want))
			}
			for i := range want {
				// Normalize both through JSON for number types.
				g := &unstructured.Unstructured{}
				b, _ := yaml.Marshal(got[i])
				j, _ := yaml.YAMLToJSON(b)
				if err := g.UnmarshalJSON(j); err != nil {
					t.Fatal(err)
				}
				if !reflect.DeepEqual(g.Object, want[i].Object) {
					t.Errorf("object %d (%s) differs between kubectl and Render", i, Key(want[i]))
				}
			}
		})
	}
}

// podSpec returns the pod template spec of a workload.
func podSpec(t *testing.T, u *unstructured.Unstructured) map[string]any {
	t.Helper()
	s, ok, err := unstructured.NestedMap(u.Object, "spec", "template", "spec")
	if err != nil || !ok {
		t.Fatalf("%s: no pod spec", Key(u))
	}
	return s
}

func container(t *testing.T, u *unstructured.Unstructured) map[string]any {
	t.Helper()
	cs, _ := podSpec(t, u)["containers"].([]any)
	if len(cs) != 1 {
		t.Fatalf("%s: %d containers, want 1", Key(u), len(cs))
	}
	return cs[0].(map[string]any)
}

func get(m map[string]any, path ...string) any {
	var v any = m
	for _, p := range path {
		mm, ok := v.(map[string]any)
		if !ok {
			return nil
		}
		v = mm[p]
	}
	return v
}

// TestBaseContracts checks the base against DESIGN.md: ports, the ZDS
// socket shared by hostPath, the projected token audience, the privileges
// of each component and the GatewayClass.
func TestBaseContracts(t *testing.T) {
	objs := render(t, DirBase)

	ctl := find(t, objs, "Deployment", "amesh-controller")
	svc := find(t, objs, "Service", "amesh-controller")
	ports := map[string]int64{}
	for _, p := range get(svc.Object, "spec", "ports").([]any) {
		pm := p.(map[string]any)
		ports[pm["name"].(string)] = pm["port"].(int64)
	}
	if !maps.Equal(ports, map[string]int64{"grpc-xds": 15012, "http-monitoring": 15014}) {
		t.Errorf("controller Service ports %v", ports)
	}
	if get(podSpec(t, ctl), "serviceAccountName") != "amesh-controller" || get(container(t, ctl), "securityContext", "readOnlyRootFilesystem") != true {
		t.Errorf("controller pod spec %v", podSpec(t, ctl))
	}

	zt := find(t, objs, "DaemonSet", "ztunnel")
	zs, zc := podSpec(t, zt), container(t, zt)
	if zs["hostNetwork"] == true || zs["hostPID"] == true || get(zc, "securityContext", "privileged") == true {
		t.Errorf("ztunnel must not be privileged nor share the host network/PID namespace: %v", zs)
	}
	if zs["automountServiceAccountToken"] != false {
		t.Error("ztunnel mounts a Kubernetes API token; it needs only its amesh token")
	}
	caps := get(zc, "securityContext", "capabilities", "add").([]any)
	if got := fmt.Sprint(caps); got != "[NET_ADMIN SYS_ADMIN NET_RAW]" {
		t.Errorf("ztunnel capabilities %s", got)
	}
	if get(zc, "readinessProbe", "httpGet", "path") != "/healthz/ready" {
		t.Errorf("ztunnel readiness %v", get(zc, "readinessProbe"))
	}
	cports := map[string]int64{}
	for _, p := range zc["ports"].([]any) {
		pm := p.(map[string]any)
		cports[pm["name"].(string)] = pm["containerPort"].(int64)
	}
	if !maps.Equal(cports, map[string]int64{"http-metrics": 15020, "http-ready": 15021}) {
		t.Errorf("ztunnel ports %v", cports)
	}
	audience := ""
	for _, v := range zs["volumes"].([]any) {
		srcs, _ := get(v.(map[string]any), "projected", "sources").([]any)
		for _, src := range srcs {
			if a, ok := get(src.(map[string]any), "serviceAccountToken", "audience").(string); ok {
				audience = a
			}
		}
		if len(audience) > 0 {
			break
		}
	}
	if audience != "amesh" {
		t.Errorf("ztunnel token audience %q, want amesh", audience)
	}

	agent := find(t, objs, "DaemonSet", "amesh-cni-agent")
	as, ac := podSpec(t, agent), container(t, agent)
	if as["hostNetwork"] != true || as["hostPID"] != true || get(ac, "securityContext", "privileged") != true {
		t.Errorf("the node agent must be privileged with host network and PID: %v", as)
	}
	// Both mount the node's /var/run/amesh at the path of the ZDS socket.
	for _, u := range []*unstructured.Unstructured{zt, agent} {
		if !hostPathMounted(podSpec(t, u), container(t, u), "/var/run/amesh", "/var/run/amesh") {
			t.Errorf("%s does not mount hostPath /var/run/amesh at /var/run/amesh", Key(u))
		}
		if !slices.Contains(stringList(container(t, u)["args"]), "-zds-socket=/var/run/amesh/zds.sock") {
			t.Errorf("%s: no -zds-socket=/var/run/amesh/zds.sock", Key(u))
		}
	}
	for _, m := range [][2]string{{"/etc/cni/net.d", "/host/etc/cni/net.d"}, {"/opt/cni/bin", "/host/opt/cni/bin"}} {
		if !hostPathMounted(as, ac, m[0], m[1]) {
			t.Errorf("agent does not mount %s at %s", m[0], m[1])
		}
	}

	// The mesh's own pods are never captured.
	for _, u := range []*unstructured.Unstructured{ctl, zt, agent} {
		if get(u.Object, "spec", "template", "metadata", "labels", "amesh.dev/dataplane-mode") != "none" {
			t.Errorf("%s pods are not labelled amesh.dev/dataplane-mode=none", Key(u))
		}
	}

	gc := find(t, objs, "GatewayClass", "amesh-waypoint")
	if get(gc.Object, "spec", "controllerName") != "amesh.dev/waypoint-controller" {
		t.Errorf("GatewayClass %v", gc.Object["spec"])
	}
	ns := find(t, objs, "Namespace", SystemNamespace)
	if ns.GetLabels()["pod-security.kubernetes.io/enforce"] != "privileged" {
		t.Errorf("namespace labels %v", ns.GetLabels())
	}
}

func stringList(v any) []string {
	l, _ := v.([]any)
	out := make([]string, len(l))
	for i, s := range l {
		out[i], _ = s.(string)
	}
	return out
}

// hostPathMounted reports whether the container mounts host dir at path.
func hostPathMounted(spec, c map[string]any, host, path string) bool {
	vol := ""
	for _, v := range spec["volumes"].([]any) {
		vm := v.(map[string]any)
		if get(vm, "hostPath", "path") == host {
			vol = vm["name"].(string)
		}
	}
	for _, m := range c["volumeMounts"].([]any) {
		mm := m.(map[string]any)
		if vol != "" && mm["name"] == vol && mm["mountPath"] == path {
			return true
		}
	}
	return false
}

// TestOverlayImages checks that each overlay uses one registry and tag for
// every amesh image, the waypoint image the controller deploys included.
func TestOverlayImages(t *testing.T) {
	for _, tt := range []struct {
		dir, tag, pull string
	}{
		{DirBase, "latest", "IfNotPresent"},
		{DirOverlayKind, "dev", "Never"},
		{DirOverlayLocal, "dev", "IfNotPresent"},
		{DirOverlayKind + "/bookinfo", "dev", "Never"},
		{DirOverlayLocal + "/bookinfo", "dev", "IfNotPresent"},
		{DirSample, "latest", "IfNotPresent"},
	} {
		t.Run(tt.dir, func(t *testing.T) {
			n := 0
			for _, u := range render(t, tt.dir) {
				if u.GetKind() != "Deployment" && u.GetKind() != "DaemonSet" {
					continue
				}
				c := container(t, u)
				refs := []string{c["image"].(string)}
				for _, e := range c["env"].([]any) {
					if em := e.(map[string]any); em["name"] == waypointImageEnv {
						refs = append(refs, em["value"].(string))
					}
				}
				for _, ref := range refs {
					n++
					reg, _, tag, err := splitImage(ref)
					if err != nil || reg != BaseRegistry || tag != tt.tag {
						t.Errorf("%s: image %s, want %s/…:%s", Key(u), ref, BaseRegistry, tt.tag)
					}
				}
				if c["imagePullPolicy"] != tt.pull {
					t.Errorf("%s: imagePullPolicy %v, want %s", Key(u), c["imagePullPolicy"], tt.pull)
				}
			}
			if n == 0 {
				t.Fatal("no images")
			}
		})
	}
}

// TestCRDs checks that the CRD kustomization carries every amesh CRD
// controller-gen wrote and the Gateway API CRDs of the controller's
// gateway-api version (experimental channel).
func TestCRDs(t *testing.T) {
	r := root(t)
	files, err := filepath.Glob(filepath.Join(r, "manifests/base/crds/*.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var want []string
	for _, f := range files {
		if filepath.Base(f) == "kustomization.yaml" {
			continue
		}
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		var crd unstructured.Unstructured
		if err := yaml.Unmarshal(b, &crd.Object); err != nil {
			t.Fatal(err)
		}
		want = append(want, crd.GetName())
	}
	if len(want) == 0 {
		t.Fatal("no amesh CRDs in manifests/base/crds")
	}
	gomod, err := os.ReadFile(filepath.Join(r, "controller/go.mod"))
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^\s*sigs\.k8s\.io/gateway-api (v\S+)`).FindSubmatch(gomod)
	if m == nil {
		t.Fatal("controller/go.mod does not require sigs.k8s.io/gateway-api")
	}
	gwVersion := string(m[1])

	got := map[string]bool{}
	gateway := 0
	for _, u := range render(t, DirCRDs) {
		if !IsCRD(u) {
			continue
		}
		got[u.GetName()] = true
		if strings.Contains(u.GetName(), "gateway.networking") {
			gateway++
			a := u.GetAnnotations()
			if a["gateway.networking.k8s.io/bundle-version"] != gwVersion || a["gateway.networking.k8s.io/channel"] != "experimental" {
				t.Errorf("%s: bundle %s channel %s, want %s experimental", u.GetName(),
					a["gateway.networking.k8s.io/bundle-version"], a["gateway.networking.k8s.io/channel"], gwVersion)
			}
		}
	}
	for _, name := range want {
		if !got[name] {
			t.Errorf("CRD %s is not in %s; run make generate", name, DirCRDs)
		}
	}
	for _, name := range []string{"gateways.gateway.networking.k8s.io", "httproutes.gateway.networking.k8s.io", "grpcroutes.gateway.networking.k8s.io", "referencegrants.gateway.networking.k8s.io"} {
		if !got[name] {
			t.Errorf("Gateway API CRD %s missing", name)
		}
	}
}

// TestChartInStep checks that the generated chart files are current and
// that the chart, rendered with its default values, is the base; and that
// values change what they should.
func TestChartInStep(t *testing.T) {
	r := root(t)
	base := render(t, DirBase)
	want, err := Chart(base)
	if err != nil {
		t.Fatal(err)
	}
	got, err := ReadChart(r)
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range slices.Sorted(maps.Keys(want)) {
		if !bytes.Equal(got[name], want[name]) {
			t.Errorf("chart file %s is stale; run make generate", name)
		}
	}
	for name := range got {
		if _, ok := want[name]; !ok {
			t.Errorf("chart file %s is not generated from the base; run make generate", name)
		}
	}

	rendered, err := RenderChart(r, nil)
	if err != nil {
		t.Fatal(err)
	}
	byKey := map[string]*unstructured.Unstructured{}
	for _, u := range rendered {
		byKey[Key(u)] = u
	}
	if len(rendered) != len(base) {
		t.Errorf("chart renders %d objects, base %d", len(rendered), len(base))
	}
	for _, u := range base {
		c, ok := byKey[Key(u)]
		if !ok {
			t.Errorf("chart lacks %s", Key(u))
			continue
		}
		if !reflect.DeepEqual(c.Object, u.Object) {
			t.Errorf("chart renders %s differently from the base", Key(u))
		}
	}

	custom, err := RenderChart(r, map[string]any{
		"image": map[string]any{"registry": "registry.example/mesh", "tag": "v9"},
		"cni":   map[string]any{"confDir": "/etc/kubernetes/cni/net.d"},
	})
	if err != nil {
		t.Fatal(err)
	}
	ctl, agent := find(t, custom, "Deployment", "amesh-controller"), find(t, custom, "DaemonSet", "amesh-cni-agent")
	if img := container(t, ctl)["image"]; img != "registry.example/mesh/amesh-controller:v9" {
		t.Errorf("controller image %v", img)
	}
	if env := fmt.Sprint(container(t, ctl)["env"]); !strings.Contains(env, "registry.example/mesh/waypoint:v9") {
		t.Errorf("waypoint image not templated: %s", env)
	}
	if !hostPathMounted(podSpec(t, agent), container(t, agent), "/etc/kubernetes/cni/net.d", "/host/etc/cni/net.d") ||
		!hostPathMounted(podSpec(t, agent), container(t, agent), "/opt/cni/bin", "/host/opt/cni/bin") {
		t.Errorf("agent CNI dirs not templated: %v", podSpec(t, agent)["volumes"])
	}
}

func TestActionize(t *testing.T) {
	tests := []struct {
		in, want string
		wantErr  bool
	}{
		{in: "image: __AMESH_REGISTRY__/x:__AMESH_TAG__", want: `image: "{{ .Values.image.registry }}/x:{{ .Values.image.tag }}"`},
		{in: "  - value: __AMESH_PULL_POLICY__", want: `  - value: "{{ .Values.image.pullPolicy }}"`},
		{in: "plain: value", want: "plain: value"},
		{in: "- __AMESH_TAG__", wantErr: true},
		{in: "x: __AMESH_UNKNOWN__", wantErr: true},
	}
	for _, tt := range tests {
		got, err := actionize([]byte(tt.in))
		if (err != nil) != tt.wantErr || (err == nil && string(got) != tt.want) {
			t.Errorf("actionize(%q) = %q, %v; want %q (error %v)", tt.in, got, err, tt.want, tt.wantErr)
		}
	}
}

func TestSplitImage(t *testing.T) {
	tests := []struct {
		ref, reg, name, tag string
		wantErr             bool
	}{
		{ref: "ghcr.io/amesh-dev/ztunnel:dev", reg: "ghcr.io/amesh-dev", name: "ztunnel", tag: "dev"},
		{ref: "localhost:5000/a/b:c", reg: "localhost:5000/a", name: "b", tag: "c"},
		{ref: "ztunnel:dev", wantErr: true},
		{ref: "ghcr.io/amesh-dev/ztunnel", wantErr: true},
		{ref: "localhost:5000/ztunnel", wantErr: true},
		{ref: "ghcr.io/a/b@sha256:00", wantErr: true},
	}
	for _, tt := range tests {
		reg, name, tag, err := splitImage(tt.ref)
		if (err != nil) != tt.wantErr || (err == nil && (reg != tt.reg || name != tt.name || tag != tt.tag)) {
			t.Errorf("splitImage(%q) = %q %q %q %v", tt.ref, reg, name, tag, err)
		}
	}
}
