package agent

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/testutils"
	"go.uber.org/zap/zaptest"
	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/util/retry"
	"sigs.k8s.io/controller-runtime/pkg/envtest"

	"github.com/amesh-dev/amesh/api/capture"
	"github.com/amesh-dev/amesh/cni-plugin/internal/agentapi"
	"github.com/amesh-dev/amesh/cni-plugin/internal/ztunneltest"
)

const nodeName = "node-a"

// subnetBase and subnetSeq give each harness its own pod subnet.
var (
	subnetBase = rand.Uint32N(250)
	subnetSeq  atomic.Uint32
)

// Shared by the tests of this package (set up in TestMain).
var (
	restCfg    *rest.Config
	testEnv    *envtest.Environment
	pluginPath string // built amesh-cni
	skipReason string
)

func TestMain(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	switch {
	case os.Geteuid() != 0:
		skipReason = "needs root: network namespaces, bridges, nftables"
	case os.Getenv("KUBEBUILDER_ASSETS") == "":
		skipReason = "needs KUBEBUILDER_ASSETS (make -s print-kube-bin) for envtest"
	}
	if _, err := os.Stat("/usr/lib/cni/bridge"); skipReason == "" && err != nil {
		skipReason = "needs containernetworking-plugins in /usr/lib/cni (make deps)"
	}
	if skipReason != "" {
		return m.Run()
	}
	dir, err := os.MkdirTemp("", "amesh-cni-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	pluginPath = filepath.Join(dir, "amesh-cni")
	if out, err := exec.Command("go", "build", "-o", pluginPath, "../../cmd/amesh-cni").CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "building amesh-cni: %v\n%s", err, out)
		return 1
	}
	env := &envtest.Environment{}
	testEnv = env
	restCfg, err = env.Start()
	if err != nil {
		fmt.Fprintln(os.Stderr, "envtest:", err)
		return 1
	}
	defer env.Stop()
	return m.Run()
}

// harness is one node: a node netns with the real CNI chain (bridge +
// host-local, then amesh-cni installed by the agent), the agent, and
// optionally a test ztunnel.
type harness struct {
	t       testing.TB
	k8s     kubernetes.Interface
	node    ns.NetNS
	subnet  netip.Prefix
	gw      netip.Addr
	dir     string
	confDir string
	binDir  string
	cfg     Config
	cni     *libcni.CNIConfig

	stopAgent func()
}

func newHarness(t testing.TB) *harness {
	t.Helper()
	return newHarnessVersion(t, "1.0.0")
}

// newHarnessVersion is newHarness with the node's conflist written in
// the given CNI spec version (libcni passes it to every plugin).
func newHarnessVersion(t testing.TB, cniVersion string) *harness {
	t.Helper()
	if skipReason != "" {
		t.Skip(skipReason)
	}
	node, err := testutils.NewNS()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		node.Close()
		if err := testutils.UnmountNS(node); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
	if err := node.Do(func(ns.NetNS) error { return exec.Command("ip", "link", "set", "lo", "up").Run() }); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	h := &harness{t: t, node: node, dir: dir, confDir: filepath.Join(dir, "net.d"), binDir: filepath.Join(dir, "bin")}
	// A subnet of its own: the pods of every harness of this test run
	// stay in the API server, and the agent finds pods by IP.
	h.subnet = netip.MustParsePrefix(fmt.Sprintf("198.19.%d.0/24", (subnetBase+subnetSeq.Add(1))%250))
	h.gw = h.subnet.Addr().Next()
	h.k8s = kubernetes.NewForConfigOrDie(restCfg)
	for _, d := range []string{h.confDir, h.binDir} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	conflist := fmt.Sprintf(`{"cniVersion":%q,"name":"podnet","plugins":[
	  {"type":"bridge","bridge":"cni0","isGateway":true,
	   "ipam":{"type":"host-local","dataDir":%q,"ranges":[[{"subnet":%q}]],"routes":[{"dst":"0.0.0.0/0"}]}}]}`,
		cniVersion, filepath.Join(dir, "ipam"), h.subnet.String())
	if err := os.WriteFile(filepath.Join(h.confDir, "10-podnet.conflist"), []byte(conflist), 0o644); err != nil {
		t.Fatal(err)
	}
	h.cni = libcni.NewCNIConfigWithCacheDir([]string{h.binDir, "/usr/lib/cni"}, filepath.Join(dir, "cache"), nil)
	h.cfg = DefaultConfig()
	h.cfg.NodeName = nodeName
	h.cfg.RestConfig = restCfg
	h.cfg.CNIConfDir, h.cfg.CNIBinDir, h.cfg.PluginBinary = h.confDir, h.binDir, pluginPath
	h.cfg.AgentSocket = filepath.Join(dir, "cni.sock")
	h.cfg.StateFile = filepath.Join(dir, "cni-state.json")
	h.cfg.ZDSSocket = filepath.Join(dir, "zds.sock")
	h.cfg.HostNetns = node.Path()
	h.cfg.MonitorAddr = freeAddr(t)
	h.cfg.AckTimeout = 2 * time.Second
	h.cfg.Resync = 0
	return h
}

func freeAddr(t testing.TB) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// metrics returns the agent's /metrics page.
func (h *harness) metrics() string {
	h.t.Helper()
	_, body := h.get("/metrics")
	return body
}

// get fetches a monitor endpoint.
func (h *harness) get(path string) (int, string) {
	h.t.Helper()
	resp, err := http.Get("http://" + h.cfg.MonitorAddr + path)
	if err != nil {
		h.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func (h *harness) startAgent() {
	h.t.Helper()
	if err := h.cfg.Validate(); err != nil {
		h.t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- New(h.cfg, zaptest.NewLogger(h.t)).Run(ctx) }()
	stopped := false
	h.stopAgent = func() {
		if stopped {
			return
		}
		stopped = true
		cancel()
		if err := <-done; err != nil {
			h.t.Errorf("agent Run: %v", err)
		}
	}
	h.t.Cleanup(h.stopAgent)
	// Ready (/readyz) when the caches are synced and the plugin is
	// installed and chained.
	h.eventually("agent ready", func() error {
		resp, err := http.Get("http://" + h.cfg.MonitorAddr + "/readyz")
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("/readyz: %s", resp.Status)
		}
		return nil
	})
}

func (h *harness) ztunnel() *ztunneltest.Ztunnel {
	h.t.Helper()
	z, err := ztunneltest.Dial(h.cfg.ZDSSocket)
	if err != nil {
		h.t.Fatal(err)
	}
	h.t.Cleanup(z.Close)
	if err := z.Expect("snapshot_sent", 5*time.Second); err != nil {
		h.t.Fatal(err)
	}
	return z
}

func (h *harness) eventually(what string, cond func() error) {
	h.t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		err := cond()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			h.t.Fatalf("%s: %v", what, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (h *harness) namespace(prefix string, ambient bool) string {
	h.t.Helper()
	n := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{GenerateName: prefix + "-"}}
	if ambient {
		n.Labels = map[string]string{LabelDataplaneMode: ModeAmbient}
	}
	n, err := h.k8s.CoreV1().Namespaces().Create(context.Background(), n, metav1.CreateOptions{})
	if err != nil {
		h.t.Fatal(err)
	}
	return n.Name
}

func (h *harness) labelNamespace(name string, ambient bool) {
	h.t.Helper()
	val := any(nil)
	if ambient {
		val = ModeAmbient
	}
	patch, _ := json.Marshal(map[string]any{"metadata": map[string]any{"labels": map[string]any{LabelDataplaneMode: val}}})
	if _, err := h.k8s.CoreV1().Namespaces().Patch(context.Background(), name, "application/merge-patch+json", patch, metav1.PatchOptions{}); err != nil {
		h.t.Fatal(err)
	}
}

// testPod is a pod object plus its sandbox netns.
type testPod struct {
	*corev1.Pod
	netns       ns.NetNS
	containerID string
	ip          netip.Addr
	result      []byte // the chain's ADD result (JSON)
}

func (h *harness) pod(namespace, name string, podLabels map[string]string) *testPod {
	h.t.Helper()
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: namespace, Labels: podLabels},
		Spec: corev1.PodSpec{NodeName: nodeName, Containers: []corev1.Container{{
			Name: "app", Image: "app",
			Ports:          []corev1.ContainerPort{{Name: "http", ContainerPort: 8080}},
			ReadinessProbe: &corev1.Probe{ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Port: intstr.FromString("http")}}},
		}}},
	}
	p, err := h.k8s.CoreV1().Pods(namespace).Create(context.Background(), p, metav1.CreateOptions{})
	if err != nil {
		h.t.Fatal(err)
	}
	n, err := testutils.NewNS()
	if err != nil {
		h.t.Fatal(err)
	}
	h.t.Cleanup(func() {
		n.Close()
		if err := testutils.UnmountNS(n); err != nil {
			h.t.Errorf("cleanup: %v", err)
		}
	})
	return &testPod{Pod: p, netns: n, containerID: fmt.Sprintf("c%016x", rand.Uint64())}
}

func (h *harness) rt(p *testPod) *libcni.RuntimeConf {
	return &libcni.RuntimeConf{
		ContainerID: p.containerID, NetNS: p.netns.Path(), IfName: "eth0",
		Args: [][2]string{{"IgnoreUnknown", "1"}, {"K8S_POD_NAMESPACE", p.Namespace}, {"K8S_POD_NAME", p.Name},
			{"K8S_POD_UID", string(p.UID)}, {"K8S_POD_INFRA_CONTAINER_ID", p.containerID}},
	}
}

func (h *harness) list() *libcni.NetworkConfigList {
	h.t.Helper()
	l, err := libcni.ConfListFromFile(filepath.Join(h.confDir, "10-podnet.conflist"))
	if err != nil {
		h.t.Fatal(err)
	}
	return l
}

// inNode runs fn (which may exec CNI plugins) inside the node netns.
func (h *harness) inNode(fn func() error) error {
	return h.node.Do(func(ns.NetNS) error { return fn() })
}

// add runs CNI ADD of loopback then the conflist, like a runtime does.
func (h *harness) add(p *testPod) error {
	ctx := context.Background()
	lo, err := libcni.NetworkPluginConfFromBytes([]byte(`{"cniVersion":"1.0.0","name":"lo","type":"loopback"}`))
	if err != nil {
		return err
	}
	return h.inNode(func() error {
		if _, err := h.cni.AddNetwork(ctx, lo, h.rt(p)); err != nil {
			return fmt.Errorf("loopback: %w", err)
		}
		res, err := h.cni.AddNetworkList(ctx, h.list(), h.rt(p))
		if err != nil {
			return err
		}
		r, err := current.NewResultFromResult(res)
		if err != nil {
			return err
		}
		if len(r.IPs) == 0 {
			return errors.New("no IP in result")
		}
		p.ip, _ = netip.AddrFromSlice(r.IPs[0].Address.IP.To4())
		p.result, err = json.Marshal(r)
		return err
	})
}

// execPlugin runs amesh-cni alone, as the last plugin of the chain, with
// the pod's chain result as prevResult.
func (h *harness) execPlugin(cmd string, p *testPod) (string, error) {
	stdin := fmt.Sprintf(`{"cniVersion":"1.0.0","name":"podnet","type":"amesh-cni","agentSocket":%q,"stateFile":%q,"prevResult":%s}`,
		h.cfg.AgentSocket, h.cfg.StateFile, p.result)
	var out []byte
	err := h.inNode(func() error {
		c := exec.Command(filepath.Join(h.binDir, "amesh-cni"))
		c.Stdin = strings.NewReader(stdin)
		c.Env = []string{"CNI_COMMAND=" + cmd, "CNI_CONTAINERID=" + p.containerID, "CNI_NETNS=" + p.netns.Path(),
			"CNI_IFNAME=eth0", "CNI_PATH=" + h.binDir,
			"CNI_ARGS=IgnoreUnknown=1;K8S_POD_NAMESPACE=" + p.Namespace + ";K8S_POD_NAME=" + p.Name + ";K8S_POD_UID=" + string(p.UID)}
		var err error
		out, err = c.Output()
		if err != nil {
			return fmt.Errorf("%w: %s", err, out)
		}
		return nil
	})
	return string(out), err
}

func (h *harness) del(p *testPod) error {
	return h.inNode(func() error { return h.cni.DelNetworkList(context.Background(), h.list(), h.rt(p)) })
}

func (h *harness) check(p *testPod) error {
	return h.inNode(func() error { return h.cni.CheckNetworkList(context.Background(), h.list(), h.rt(p)) })
}

// runIn starts a process inside the pod's netns (its "pause container"),
// which is how the agent finds pods through /proc.
func (h *harness) runIn(p *testPod) {
	h.t.Helper()
	sleep := exec.Command("sleep", "300")
	if err := p.netns.Do(func(ns.NetNS) error { return sleep.Start() }); err != nil {
		h.t.Fatal(err)
	}
	h.t.Cleanup(func() { _ = sleep.Process.Kill(); _ = sleep.Wait() })
}

// setRunning records the pod's IP in its status, as the kubelet would.
func (h *harness) setRunning(p *testPod) {
	h.t.Helper()
	// The agent annotates the pod concurrently: retry on conflicts.
	err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		cur, err := h.k8s.CoreV1().Pods(p.Namespace).Get(context.Background(), p.Name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		cur.Status.Phase = corev1.PodRunning
		cur.Status.PodIP = p.ip.String()
		cur.Status.PodIPs = []corev1.PodIP{{IP: p.ip.String()}}
		_, err = h.k8s.CoreV1().Pods(p.Namespace).UpdateStatus(context.Background(), cur, metav1.UpdateOptions{})
		return err
	})
	if err != nil {
		h.t.Fatal(err)
	}
}

// rules returns capture.Check's verdict inside the pod for the expected
// config (probes from the node's bridge address to port 8080).
func (h *harness) rules(p *testPod) error {
	cfg := capture.Config{ProbeSources: []netip.Addr{h.gw}, ProbePorts: []uint16{8080}}
	return p.netns.Do(func(ns.NetNS) error { return capture.Check(cfg) })
}

func (h *harness) wantRules(p *testPod) {
	h.t.Helper()
	if err := h.rules(p); err != nil {
		h.t.Fatalf("pod %s: capture rules: %v", p.Name, err)
	}
}

func (h *harness) wantNoRules(p *testPod) {
	h.t.Helper()
	if err := h.rules(p); !errors.Is(err, capture.ErrNotInstalled) {
		h.t.Fatalf("pod %s: want no capture rules, Check = %v", p.Name, err)
	}
}

// dialOut connects from inside the pod to the node's bridge address and
// returns the first line of the answer.
func (h *harness) dialOut(p *testPod, port int) (string, error) {
	var line string
	err := p.netns.Do(func(ns.NetNS) error {
		c, err := net.DialTimeout("tcp", netip.AddrPortFrom(h.gw, uint16(port)).String(), 2*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(2 * time.Second))
		line, err = bufio.NewReader(c).ReadString('\n')
		return err
	})
	return strings.TrimSpace(line), err
}

func (h *harness) annotation(p *testPod) string {
	cur, err := h.k8s.CoreV1().Pods(p.Namespace).Get(context.Background(), p.Name, metav1.GetOptions{})
	if err != nil {
		return "error: " + err.Error()
	}
	v, ok := cur.Annotations[AnnotationRedirection]
	if !ok {
		return "<none>"
	}
	return v
}

func (h *harness) wantAnnotation(p *testPod, want string) {
	h.t.Helper()
	h.eventually("annotation of "+p.Name, func() error {
		if got := h.annotation(p); got != want {
			return fmt.Errorf("annotation %q, want %q", got, want)
		}
		return nil
	})
}

func cniCode(err error) int {
	var e *types.Error
	if errors.As(err, &e) {
		return int(e.Code)
	}
	return -1
}

func TestCNIChain(t *testing.T) {
	h := newHarness(t)
	h.startAgent()
	z := h.ztunnel()
	enrolledNS := h.namespace("mesh", true)
	plainNS := h.namespace("plain", false)

	a := h.pod(enrolledNS, "a", nil)
	b := h.pod(plainNS, "b", nil)
	c := h.pod(enrolledNS, "c", map[string]string{LabelDataplaneMode: ModeNone})
	d := h.pod(plainNS, "d", map[string]string{LabelDataplaneMode: ModeAmbient})
	for _, p := range []*testPod{a, b, c, d} {
		if err := h.add(p); err != nil {
			t.Fatalf("ADD %s: %v", p.Name, err)
		}
	}
	h.wantRules(a)
	h.wantNoRules(b)
	h.wantNoRules(c)
	h.wantRules(d)
	if err := z.Expect("add "+string(a.UID), 5*time.Second); err != nil {
		t.Fatal(err)
	}
	h.wantAnnotation(a, "enabled")
	h.wantAnnotation(d, "enabled")

	// Health and metrics.
	if code, body := h.get("/readyz"); code != 200 {
		t.Fatalf("/readyz = %d %s", code, body)
	}
	if code, _ := h.get("/healthz"); code != 200 {
		t.Fatalf("/healthz = %d", code)
	}
	_, metrics := h.get("/metrics")
	for _, want := range []string{"amesh_cni_zds_connected 1", "amesh_cni_enrolled_pods 2",
		`amesh_cni_zds_messages_total{result="ok",type="add"}`, "amesh_cni_zds_snapshots_total 1"} {
		if !strings.Contains(metrics, want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}

	// Traffic: a's outbound connection lands on ztunnel inside a's netns,
	// with the original destination; b's is not captured (refused: no
	// listener on the node).
	got, err := h.dialOut(a, 9999)
	if want := "ztunnel " + netip.AddrPortFrom(h.gw, 9999).String(); err != nil || got != want {
		t.Fatalf("a → node: %q, %v; want %q", got, err, want)
	}
	if got, err := h.dialOut(b, 9999); err == nil {
		t.Fatalf("b's traffic was captured: %q", got)
	}

	// ADD twice (amesh-cni again, with the chain's result as prevResult:
	// the bridge plugin itself is not idempotent), CHECK.
	if out, err := h.execPlugin("ADD", a); err != nil {
		t.Fatalf("second ADD: %v", err)
	} else if !strings.Contains(out, a.ip.String()) {
		t.Fatalf("second ADD did not return prevResult: %s", out)
	}
	h.wantRules(a)
	if err := h.check(a); err != nil {
		t.Fatalf("CHECK a: %v", err)
	}
	if err := h.check(b); err != nil {
		t.Fatalf("CHECK b: %v", err)
	}
	// CHECK notices removed rules.
	if err := a.netns.Do(func(ns.NetNS) error { return capture.Remove() }); err != nil {
		t.Fatal(err)
	}
	if err := h.check(a); err == nil {
		t.Fatal("CHECK passed without capture rules")
	}

	// DEL twice; DEL without ADD.
	for i := 0; i < 2; i++ {
		if err := h.del(a); err != nil {
			t.Fatalf("DEL %d: %v", i, err)
		}
	}
	if err := z.Expect("delete "+string(a.UID), 5*time.Second); err != nil {
		t.Fatal(err)
	}
	if z.Serving(string(a.UID)) {
		t.Fatal("ztunnel still serves a after DEL")
	}
	never := h.pod(enrolledNS, "never-added", nil)
	if err := h.del(never); err != nil {
		t.Fatalf("DEL without ADD: %v", err)
	}

	// STATUS (CNI 1.1.0) reports the agent ready.
	st, err := libcni.ConfListFromBytes([]byte(`{"cniVersion":"1.1.0","name":"s","plugins":[{"type":"amesh-cni","agentSocket":"` + h.cfg.AgentSocket + `"}]}`))
	if err != nil {
		t.Fatal(err)
	}
	if err := h.inNode(func() error { return h.cni.GetStatusNetworkList(context.Background(), st) }); err != nil {
		t.Fatalf("STATUS with agent up: %v", err)
	}

	// ztunnel gone: an enrolled pod cannot start (fail closed), a plain one can.
	z.Close()
	h.eventually("agent notices ztunnel gone", func() error {
		e := h.pod(enrolledNS, fmt.Sprintf("probe-%d", rand.IntN(1e6)), nil)
		if err := h.add(e); err == nil {
			return errors.New("enrolled ADD succeeded without ztunnel")
		} else if cniCode(err) != 100 {
			return fmt.Errorf("code %d: %v", cniCode(err), err)
		}
		return nil
	})
	f := h.pod(plainNS, "f", nil)
	if err := h.add(f); err != nil {
		t.Fatalf("plain ADD without ztunnel: %v", err)
	}

	// Agent down: every ADD fails with "try again later" — the plugin
	// cannot know whether a pod is enrolled (a pod of a plain namespace
	// may be by its own label) — except in the namespaces the agent
	// excludes from the mesh.
	h.stopAgent()
	if st, err := agentapi.ReadState(h.cfg.StateFile); err != nil || !slices.Equal(st.ExcludedNamespaces, []string{"amesh-system", "kube-system"}) {
		t.Fatalf("state file left for the plugin = %+v, %v; want the agent's excluded namespaces", st, err)
	}
	g := h.pod(enrolledNS, "g", nil)
	if err := h.add(g); cniCode(err) != int(types.ErrTryAgainLater) {
		t.Fatalf("enrolled ADD with agent down = %v (code %d), want code 11", err, cniCode(err))
	}
	h.wantNoRules(g)
	p := h.pod(plainNS, "p", nil)
	if err := h.add(p); cniCode(err) != int(types.ErrTryAgainLater) {
		t.Fatalf("plain ADD with agent down = %v (code %d), want code 11", err, cniCode(err))
	}
	if err := h.del(p); err != nil {
		t.Fatalf("DEL with agent down: %v", err)
	}
	optIn := h.pod(plainNS, "opt-in", map[string]string{LabelDataplaneMode: ModeAmbient})
	if err := h.add(optIn); cniCode(err) != int(types.ErrTryAgainLater) {
		t.Fatalf("ADD of a pod enrolled by its own label with agent down = %v (code %d), want code 11", err, cniCode(err))
	}
	sys := h.pod("kube-system", fmt.Sprintf("sys-%d", rand.IntN(1e6)), nil)
	if err := h.add(sys); err != nil {
		t.Fatalf("ADD in an excluded namespace with agent down: %v", err)
	}
	if err := h.del(sys); err != nil {
		t.Fatalf("DEL with agent down: %v", err)
	}
	if err := h.inNode(func() error { return h.cni.GetStatusNetworkList(context.Background(), st) }); cniCode(err) != int(types.ErrPluginNotAvailable) {
		t.Fatalf("STATUS with agent down = %v, want code 50", err)
	}
}

// TestCNIChain031: the node's conflist is CNI 0.3.1 (kindnet, flannel and
// Calico write that version, and libcni passes it to every plugin of the
// chain): ADD and DEL work through the whole chain, enrolled pods get
// their rules, and CHECK — not defined before 0.4.0 — is refused.
func TestCNIChain031(t *testing.T) {
	h := newHarnessVersion(t, "0.3.1")
	h.startAgent()
	z := h.ztunnel()
	if l := h.list(); l.CNIVersion != "0.3.1" || l.Plugins[len(l.Plugins)-1].Network.Type != "amesh-cni" {
		t.Fatalf("chained conflist: version %q, last plugin %q", l.CNIVersion, l.Plugins[len(l.Plugins)-1].Network.Type)
	}
	enrolledNS := h.namespace("mesh031", true)
	plainNS := h.namespace("plain031", false)
	a := h.pod(enrolledNS, "a", nil)
	b := h.pod(plainNS, "b", nil)
	for _, p := range []*testPod{a, b} {
		if err := h.add(p); err != nil {
			t.Fatalf("ADD %s through a 0.3.1 chain: %v", p.Name, err)
		}
	}
	h.wantRules(a)
	h.wantNoRules(b)
	if err := z.Expect("add "+string(a.UID), 5*time.Second); err != nil {
		t.Fatal(err)
	}
	h.wantAnnotation(a, "enabled")
	got, err := h.dialOut(a, 9999)
	if want := "ztunnel " + netip.AddrPortFrom(h.gw, 9999).String(); err != nil || got != want {
		t.Fatalf("a → node: %q, %v; want %q", got, err, want)
	}
	if err := h.check(a); err == nil {
		t.Fatal("CHECK accepted on a 0.3.1 list")
	}
	for _, p := range []*testPod{a, b} {
		if err := h.del(p); err != nil {
			t.Fatalf("DEL %s through a 0.3.1 chain: %v", p.Name, err)
		}
	}
	h.wantNoRules(a)
	if err := z.Expect("delete "+string(a.UID), 5*time.Second); err != nil {
		t.Fatal(err)
	}
}

// TestLabelAfterPodsRun: pods running before their namespace is labelled
// are enrolled when it is, and released when the label goes.
func TestLabelAfterPodsRun(t *testing.T) {
	h := newHarness(t)
	nsName := h.namespace("late", false)

	// "early" started before the agent existed (the chain had no
	// amesh-cni yet): its netns is found by IP through /proc (a process
	// lives in it).
	early := h.pod(nsName, "early", nil)
	if err := h.add(early); err != nil {
		t.Fatal(err)
	}
	h.runIn(early)
	h.setRunning(early)

	h.startAgent()
	z := h.ztunnel()
	// "later" went through the CNI ADD with the agent running.
	later := h.pod(nsName, "later", nil)
	if err := h.add(later); err != nil {
		t.Fatal(err)
	}
	h.runIn(later)
	h.setRunning(later)
	h.wantNoRules(early)
	h.wantNoRules(later)

	h.labelNamespace(nsName, true)
	for _, p := range []*testPod{early, later} {
		h.eventually("rules in "+p.Name, func() error { return h.rules(p) })
		h.wantAnnotation(p, "enabled")
		if !z.Serving(string(p.UID)) {
			t.Fatalf("ztunnel does not serve %s", p.Name)
		}
		got, err := h.dialOut(p, 7777)
		if want := "ztunnel " + netip.AddrPortFrom(h.gw, 7777).String(); err != nil || got != want {
			t.Fatalf("%s → node: %q, %v; want %q", p.Name, got, err, want)
		}
	}

	// ztunnel restarts: the new connection gets both pods in its snapshot.
	z.Close()
	z2, err := ztunneltest.Dial(h.cfg.ZDSSocket)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(z2.Close)
	seen := map[string]bool{}
	for {
		ev, err := z2.Next(5 * time.Second)
		if err != nil {
			t.Fatal(err)
		}
		if ev == "snapshot_sent" {
			break
		}
		seen[ev] = true
	}
	for _, p := range []*testPod{early, later} {
		if !seen["add "+string(p.UID)] {
			t.Fatalf("snapshot after reconnect lacks %s: %v", p.Name, seen)
		}
	}

	h.labelNamespace(nsName, false)
	for _, p := range []*testPod{early, later} {
		h.eventually("rules gone in "+p.Name, func() error {
			if err := h.rules(p); !errors.Is(err, capture.ErrNotInstalled) {
				return fmt.Errorf("Check = %v", err)
			}
			return nil
		})
		h.wantAnnotation(p, "<none>")
		h.eventually("ztunnel dropped "+p.Name, func() error {
			if z2.Serving(string(p.UID)) {
				return errors.New("still served")
			}
			return nil
		})
	}

	// The label goes while the agent is down: the restarted agent (which
	// remembers nothing) removes the rules it left behind.
	h.labelNamespace(nsName, true)
	for _, p := range []*testPod{early, later} {
		h.eventually("rules back in "+p.Name, func() error { return h.rules(p) })
		h.wantAnnotation(p, "enabled")
	}
	h.stopAgent()
	z2.Close()
	h.labelNamespace(nsName, false)
	h.wantRules(early) // nobody removed them yet
	h.startAgent()
	for _, p := range []*testPod{early, later} {
		h.eventually("stale rules removed in "+p.Name, func() error {
			if err := h.rules(p); !errors.Is(err, capture.ErrNotInstalled) {
				return fmt.Errorf("Check = %v", err)
			}
			return nil
		})
		h.wantAnnotation(p, "<none>")
	}
}

// TestRestartKeepsPods: after an agent restart, ztunnel's first snapshot
// already holds the enrolled pods (the agent reconciles before serving),
// ztunnel gets each of them once (no second add after the snapshot), and
// their annotation stays "enabled" throughout: a restart does not flap
// enrolled pods through "pending".
func TestRestartKeepsPods(t *testing.T) {
	h := newHarness(t)
	h.startAgent()
	z := h.ztunnel()
	nsName := h.namespace("restart", true)
	p := h.enrolRunning(nsName, "p")
	if !strings.Contains(h.metrics(), "amesh_cni_unacknowledged_pods 0") {
		t.Errorf("metrics: want amesh_cni_unacknowledged_pods 0")
	}

	// Every annotation value the pod has from now on.
	cur, err := h.k8s.CoreV1().Pods(nsName).Get(context.Background(), p.Name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	wctx, stopWatch := context.WithCancel(context.Background())
	defer stopWatch()
	w, err := h.k8s.CoreV1().Pods(nsName).Watch(wctx, metav1.ListOptions{
		FieldSelector: "metadata.name=" + p.Name, ResourceVersion: cur.ResourceVersion})
	if err != nil {
		t.Fatal(err)
	}
	seen := make(chan string, 100)
	go func() {
		defer close(seen)
		for ev := range w.ResultChan() {
			if o, ok := ev.Object.(*corev1.Pod); ok {
				v, has := o.Annotations[AnnotationRedirection]
				if !has {
					v = "<none>"
				}
				seen <- v
			}
		}
	}()

	// The agent restarts; ztunnel (still serving the pod) reconnects.
	h.stopAgent()
	z.Close()
	h.startAgent()
	z2, err := ztunneltest.Dial(h.cfg.ZDSSocket)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(z2.Close)
	if ev, err := z2.Next(15 * time.Second); err != nil || ev != "add "+string(p.UID) {
		t.Fatalf("first message after restart = %q, %v; want the pod's add", ev, err)
	}
	if err := z2.Expect("snapshot_sent", 5*time.Second); err != nil {
		t.Fatal(err)
	}
	if ev, err := z2.Next(2 * time.Second); err == nil {
		t.Fatalf("after the snapshot ztunnel got %q; want nothing (the snapshot's add was acknowledged)", ev)
	}
	h.wantRules(p)
	h.wantAnnotation(p, "enabled")
	if !strings.Contains(h.metrics(), "amesh_cni_unacknowledged_pods 0") {
		t.Errorf("metrics after the restart: want amesh_cni_unacknowledged_pods 0")
	}
	stopWatch()
	for v := range seen {
		if v != "enabled" {
			t.Errorf("the pod's annotation became %q during the restart; want it enabled throughout", v)
		}
	}
}

// TestSnapshotRejectionRetried: a ztunnel that refuses a pod in its
// snapshot does not serve it; the agent shows it (annotation pending,
// amesh_cni_unacknowledged_pods) and retries with backoff until ztunnel
// takes it.
func TestSnapshotRejectionRetried(t *testing.T) {
	h := newHarness(t)
	h.startAgent()
	z := h.ztunnel()
	nsName := h.namespace("reject", true)
	p := h.enrolRunning(nsName, "p")

	// ztunnel restarts and now refuses the pod (it cannot get its
	// certificate yet, say).
	z.Close()
	z2, err := ztunneltest.Dial(h.cfg.ZDSSocket, string(p.UID))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(z2.Close)
	if err := z2.Expect("add "+string(p.UID), 5*time.Second); err != nil {
		t.Fatal(err)
	}
	if err := z2.Expect("snapshot_sent", 5*time.Second); err != nil {
		t.Fatal(err)
	}
	h.wantAnnotation(p, "pending")
	h.eventually("metric of the refused pod", func() error {
		if m := h.metrics(); !strings.Contains(m, "amesh_cni_unacknowledged_pods 1") {
			return errors.New("amesh_cni_unacknowledged_pods is not 1")
		}
		return nil
	})
	// Retried: another add (refused again), then, once ztunnel takes it,
	// enabled and served.
	if err := z2.Expect("add "+string(p.UID), 5*time.Second); err != nil {
		t.Fatalf("the refused pod was not retried: %v", err)
	}
	z2.Accept(string(p.UID))
	h.eventually("ztunnel serves the pod", func() error {
		if !z2.Serving(string(p.UID)) {
			return errors.New("not served")
		}
		return nil
	})
	h.wantAnnotation(p, "enabled")
	h.wantRules(p)
	if !strings.Contains(h.metrics(), "amesh_cni_unacknowledged_pods 0") {
		t.Errorf("metrics: want amesh_cni_unacknowledged_pods 0")
	}
}

// TestSandboxRecreated: the runtime recreates a pod's sandbox (same pod,
// new netns) and the DEL of the old one never reached the agent: the new
// ADD enrols the new namespace, and ztunnel gets the new one.
func TestSandboxRecreated(t *testing.T) {
	h := newHarness(t)
	h.startAgent()
	z := h.ztunnel()
	nsName := h.namespace("recreate", true)
	first := h.pod(nsName, "p", nil)
	if err := h.add(first); err != nil {
		t.Fatal(err)
	}
	h.wantRules(first)
	if err := z.Expect("add "+string(first.UID), 5*time.Second); err != nil {
		t.Fatal(err)
	}

	second := &testPod{Pod: first.Pod, containerID: first.containerID + "b"}
	n, err := testutils.NewNS()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		n.Close()
		if err := testutils.UnmountNS(n); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
	second.netns = n
	if err := h.add(second); err != nil {
		t.Fatal(err)
	}
	h.wantRules(second)
	if err := z.Expect("add "+string(first.UID), 5*time.Second); err != nil {
		t.Fatal(err)
	}
	got, err := h.dialOut(second, 9999)
	if want := "ztunnel " + netip.AddrPortFrom(h.gw, 9999).String(); err != nil || got != want {
		t.Fatalf("new sandbox → node: %q, %v; want %q", got, err, want)
	}
}

// TestLateDelOfOldSandbox: the runtime recreated a pod's sandbox and the
// DEL of the old sandbox arrives after the new sandbox's ADD (a retried
// teardown, garbage collection of the dead sandbox). That DEL is about a
// sandbox the agent no longer holds: the new sandbox must keep its
// capture rules and ztunnel must keep serving it. Tearing them down would
// leave the running pod unprotected (its traffic in plaintext, outside
// the mesh) until the next resync.
func TestLateDelOfOldSandbox(t *testing.T) {
	h := newHarness(t)
	h.startAgent()
	z := h.ztunnel()
	nsName := h.namespace("latedel", true)
	first := h.pod(nsName, "p", nil)
	if err := h.add(first); err != nil {
		t.Fatal(err)
	}
	h.wantRules(first)
	if err := z.Expect("add "+string(first.UID), 5*time.Second); err != nil {
		t.Fatal(err)
	}
	second := &testPod{Pod: first.Pod, containerID: first.containerID + "b"}
	n, err := testutils.NewNS()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		n.Close()
		if err := testutils.UnmountNS(n); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
	second.netns = n
	if err := h.add(second); err != nil {
		t.Fatal(err)
	}
	h.wantRules(second)
	if err := z.Expect("add "+string(first.UID), 5*time.Second); err != nil {
		t.Fatal(err)
	}

	// The old sandbox's DEL, late.
	if err := h.del(first); err != nil {
		t.Fatalf("DEL of the old sandbox: %v", err)
	}
	h.wantRules(second)
	if err := z.Expect("delete "+string(first.UID), 500*time.Millisecond); err == nil {
		t.Fatal("ztunnel was told to drop the pod on the DEL of a sandbox it no longer runs in")
	}
	got, err := h.dialOut(second, 9999)
	if want := "ztunnel " + netip.AddrPortFrom(h.gw, 9999).String(); err != nil || got != want {
		t.Fatalf("new sandbox → node after the late DEL: %q, %v; want %q (captured)", got, err, want)
	}

	// The current sandbox's DEL still cleans up.
	if err := h.del(second); err != nil {
		t.Fatal(err)
	}
	h.wantNoRules(second)
	if err := z.Expect("delete "+string(first.UID), 5*time.Second); err != nil {
		t.Fatal(err)
	}
}

// TestLeaveWithLiveConnection: a pod leaves the mesh while a connection
// of it goes through ztunnel. New connections go direct at once; the
// live one keeps working (ztunnel drains it) and the pod's capture rules
// stay until it ends; at the leave timeout the rest are reset. Never does
// a captured connection lose its rules while it is open.
func TestLeaveWithLiveConnection(t *testing.T) {
	h := newHarness(t)
	h.cfg.LeaveTimeout = 2 * time.Second
	h.startAgent()
	z := h.ztunnel()
	nsName := h.namespace("leave", true)
	p := h.enrolRunning(nsName, "p")
	// The node answers on 7777 itself: a direct connection reaches it.
	var nodeLn net.Listener
	if err := h.inNode(func() (err error) {
		nodeLn, err = net.Listen("tcp", netip.AddrPortFrom(h.gw, 7777).String())
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nodeLn.Close() })
	go func() {
		for {
			c, err := nodeLn.Accept()
			if err != nil {
				return
			}
			fmt.Fprintln(c, "node")
			c.Close()
		}
	}()

	// open connects from the pod and returns the connection and its
	// first line ("ztunnel …" when captured).
	open := func() (net.Conn, *bufio.Reader) {
		t.Helper()
		var c net.Conn
		if err := p.netns.Do(func(ns.NetNS) (err error) {
			c, err = net.DialTimeout("tcp", netip.AddrPortFrom(h.gw, 7777).String(), 2*time.Second)
			return err
		}); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		r := bufio.NewReader(c)
		_ = c.SetDeadline(time.Now().Add(2 * time.Second))
		if line, err := r.ReadString('\n'); err != nil || !strings.HasPrefix(line, "ztunnel ") {
			t.Fatalf("captured connection answered %q, %v", line, err)
		}
		return c, r
	}
	echo := func(c net.Conn, r *bufio.Reader, msg string) error {
		_ = c.SetDeadline(time.Now().Add(2 * time.Second))
		if _, err := fmt.Fprintln(c, msg); err != nil {
			return err
		}
		got, err := r.ReadString('\n')
		if err != nil {
			return err
		}
		if strings.TrimSpace(got) != msg {
			return fmt.Errorf("echoed %q", got)
		}
		return nil
	}
	draining := func() error {
		if err := h.rules(p); !errors.Is(err, capture.ErrMismatch) {
			return fmt.Errorf("Check = %v, want the draining rules (a mismatch)", err)
		}
		return nil
	}
	gone := func() error {
		if err := h.rules(p); !errors.Is(err, capture.ErrNotInstalled) {
			return fmt.Errorf("Check = %v, want no rules", err)
		}
		return nil
	}

	// Leaves and ends its connection before the timeout.
	c, r := open()
	h.labelNamespace(nsName, false)
	h.wantAnnotation(p, "<none>")
	if err := z.Expect("delete "+string(p.UID), 5*time.Second); err != nil {
		t.Fatal(err)
	}
	if got, err := h.dialOut(p, 7777); err != nil || got != "node" {
		t.Fatalf("new connection after leaving: %q, %v; want the node directly", got, err)
	}
	h.eventually("draining rules", draining)
	if err := echo(c, r, "still through ztunnel"); err != nil {
		t.Fatalf("live connection after leaving: %v", err)
	}
	if err := draining(); err != nil {
		t.Fatalf("with the connection open: %v", err)
	}
	c.Close()
	h.eventually("rules removed once the connection ended", gone)

	// Back in the mesh, then out with a connection that outlives the
	// leave timeout: reset, then the rules go.
	h.labelNamespace(nsName, true)
	h.eventually("rules back", func() error { return h.rules(p) })
	h.wantAnnotation(p, "enabled")
	c, r = open()
	left := time.Now()
	h.labelNamespace(nsName, false)
	h.eventually("draining rules", draining)
	if err := echo(c, r, "still through ztunnel"); err != nil {
		t.Fatalf("live connection after leaving: %v", err)
	}
	h.eventually("rules removed at the leave timeout", gone)
	if d := time.Since(left); d < h.cfg.LeaveTimeout {
		t.Errorf("rules removed %v after leaving, before the %v timeout, with the connection open", d, h.cfg.LeaveTimeout)
	}
	_ = c.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := r.ReadString('\n'); !errors.Is(err, unix.ECONNABORTED) {
		t.Errorf("the connection after the leave timeout: %v, want ECONNABORTED (reset)", err)
	}
	if _, body := h.get("/metrics"); !strings.Contains(body, "amesh_cni_leaving_pods 0") {
		t.Errorf("metrics: want amesh_cni_leaving_pods 0")
	}
}
