package cluster

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.uber.org/zap"
	appsv1 "k8s.io/api/apps/v1"
	authnv1 "k8s.io/api/authentication/v1"
	autoscalingv1 "k8s.io/api/autoscaling/v1"
	coordv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/tools/remotecommand"

	"github.com/amesh-dev/amesh/e2e/internal/cgroup"
	"github.com/amesh-dev/amesh/e2e/internal/hostnet"
	"github.com/amesh-dev/amesh/e2e/internal/netns"
)

// The local cluster's end-to-end test: one 2-node cluster shared by ordered
// subtests, then torn down and checked for leftovers.
func TestLocalCluster(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: network namespaces, mounts and cgroups")
	}
	kubeBin, coreDNS := os.Getenv("KUBEBUILDER_ASSETS"), os.Getenv("AMESH_COREDNS")
	if kubeBin == "" || coreDNS == "" {
		t.Skip("needs the pinned Kubernetes binaries and CoreDNS: run `make kube-bins coredns` and set KUBEBUILDER_ASSETS and AMESH_COREDNS (`make unit` does)")
	}
	sweepStaleTestClusters(t)
	bin := buildBinaries(t)
	cfg := testConfig(t, kubeBin, coreDNS, bin)
	t.Logf("cluster %s: nodes %s, pods %s", cfg.Name, cfg.NodeCIDR, cfg.PodCIDR)

	c, err := New(cfg, zap.NewNop(), testWriter{t})
	if err != nil {
		t.Fatal(err)
	}
	cfg = c.Config()
	ctx, cancel := context.WithCancel(context.Background())
	readyc, errc := make(chan Info, 1), make(chan error, 1)
	go func() { errc <- c.Run(ctx, func(i Info) { readyc <- i }) }()
	stopped := false
	t.Cleanup(func() {
		if !stopped {
			cancel()
			<-errc
		}
	})
	var info Info
	select {
	case info = <-readyc:
	case err := <-errc:
		stopped = true
		t.Fatalf("cluster did not start: %v", err)
	case <-time.After(4 * time.Minute):
		t.Fatal("cluster not ready after 4 minutes")
	}
	t.Logf("time to Ready nodes %.1fs, to cluster DNS %.1fs", info.NodesReady.Seconds(), info.Ready.Seconds())

	rc, err := clientcmd.BuildConfigFromFlags("", info.Kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	client := kubernetes.NewForConfigOrDie(rc)
	e := &env{t: t, cfg: cfg, rc: rc, client: client, ns: "e2e"}
	if _, err := client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: e.ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}

	t.Run("NodesRegistered", e.nodesRegistered)
	t.Run("EchoDeploymentOnBothNodes", e.echoOnBothNodes)
	t.Run("ClusterIPAndDNSFromOtherNode", e.clusterIPAndDNS)
	t.Run("HostNetworkHostPathDaemonSet", e.hostNetworkDaemonSet)
	t.Run("ProjectedTokenAuthenticates", e.projectedToken)
	t.Run("ScaleDownTerminatesGracefully", e.scaleDown)
	t.Run("ProbesRestartsAndTermination", e.probesAndRestarts)
	t.Run("AttachWithStdin", e.attach)
	t.Run("NodeAgentCrashRecovers", e.agentCrash)
	t.Run("TeardownLeavesNothing", func(t *testing.T) {
		mnt, err := cgroup.Mount()
		if err != nil {
			t.Fatal(err)
		}
		root := filepath.Join(mnt, cfg.prefix())
		pids, err := cgroup.Procs(root)
		if err != nil || len(pids) < 4 {
			t.Fatalf("cluster processes before teardown: %v (%v)", pids, err)
		}
		starts := map[int]string{}
		for _, p := range pids {
			starts[p] = procStart(p)
		}
		start := time.Now()
		cancel()
		err = <-errc
		stopped = true
		if err != nil {
			t.Errorf("Run returned %v", err)
		}
		t.Logf("teardown took %.1fs", time.Since(start).Seconds())
		if links, err := hostnet.Links(cfg.prefix()); err != nil || len(links) > 0 {
			t.Errorf("links left: %v (%v)", links, err)
		}
		if nss, err := netns.List(netns.DefaultDir, cfg.prefix()+"-"); err != nil || len(nss) > 0 {
			t.Errorf("network namespaces left: %v (%v)", nss, err)
		}
		out, _ := exec.Command("ip", "netns", "list").Output()
		if strings.Contains(string(out), cfg.prefix()) {
			t.Errorf("ip netns still lists the cluster's namespaces:\n%s", out)
		}
		if _, err := os.Stat(root); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("cgroup %s left (%v)", root, err)
		}
		for p, s := range starts {
			if s != "" && procStart(p) == s {
				cmd, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", p))
				t.Errorf("process %d survived teardown: %q", p, bytes.ReplaceAll(cmd, []byte{0}, []byte{' '}))
			}
		}
		if _, err := os.Stat(cfg.StateDir); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("state dir %s left (%v)", cfg.StateDir, err)
		}
		routes, _ := exec.Command("ip", "route").Output()
		if strings.Contains(string(routes), cfg.prefix()) || strings.Contains(string(routes), cfg.PodCIDR.Addr().String()[:5]) {
			t.Errorf("host routes left:\n%s", routes)
		}
	})
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

var testNameRE = regexp.MustCompile(`^t[a-z0-9]{5}$`)

// sweepStaleTestClusters removes test clusters whose test process died
// (killed by a timeout, say) and left them behind.
func sweepStaleTestClusters(t *testing.T) {
	names, err := List(DefaultStateRoot)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range names {
		if !testNameRE.MatchString(n) {
			continue
		}
		cfg := Config{Name: n}
		cfg.Default()
		if _, running := runningOwner(cfg.StateDir); running {
			continue
		}
		t.Logf("removing stale test cluster %s", n)
		if err := Down(context.Background(), cfg); err != nil {
			t.Errorf("remove stale cluster %s: %v", n, err)
		}
	}
}

func buildBinaries(t *testing.T) string {
	dir := t.TempDir()
	start := time.Now()
	cmd := exec.Command("go", "build", "-o", dir+"/", "./cmd/amesh-node", "./cmd/echoserver")
	cmd.Dir = ".."
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build binaries: %v\n%s", err, out)
	}
	t.Logf("built amesh-node and echoserver in %.1fs", time.Since(start).Seconds())
	return dir
}

// testConfig picks a random name and address ranges that no host route
// uses, so that the test never collides with another cluster.
func testConfig(t *testing.T, kubeBin, coreDNS, bin string) Config {
	const alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
	for range 50 {
		name := []byte("t")
		for range 5 {
			name = append(name, alphabet[rand.IntN(len(alphabet))])
		}
		k := 20 + rand.IntN(200)
		if k == 96 || k == 244 {
			continue
		}
		cfg := Config{
			Name:           string(name),
			NodeCIDR:       netip.MustParsePrefix(fmt.Sprintf("172.31.%d.0/24", k)),
			PodCIDR:        netip.MustParsePrefix(fmt.Sprintf("10.%d.0.0/16", k)),
			KubeBinDir:     kubeBin,
			CoreDNS:        coreDNS,
			NodeBinary:     filepath.Join(bin, "amesh-node"),
			BinDir:         bin,
			RestartBackoff: time.Second,
			DNSReplicas:    1,
		}
		cfg.Default()
		if _, err := os.Stat(cfg.StateDir); err == nil {
			continue
		}
		if hostnet.CheckFree(cfg.bridge(), cfg.NodeCIDR, cfg.PodCIDR) == nil {
			return cfg
		}
	}
	t.Fatal("no free address ranges for a test cluster")
	return Config{}
}

type env struct {
	t      *testing.T
	cfg    Config
	rc     *rest.Config
	client kubernetes.Interface
	ns     string
}

func ctxT(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// eventually polls f until it returns nil or the timeout passes.
func eventually(t *testing.T, timeout time.Duration, what string, f func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var err error
	for {
		if err = f(); err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not after %s: %v", what, timeout, err)
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// exec runs a command in a pod through the apiserver and the node agent's
// kubelet API (as kubectl exec does) and returns its stdout.
func (e *env) exec(t *testing.T, pod string, cmd ...string) (string, error) {
	req := e.client.CoreV1().RESTClient().Post().Resource("pods").Namespace(e.ns).Name(pod).SubResource("exec").
		VersionedParams(&corev1.PodExecOptions{Command: cmd, Stdout: true, Stderr: true}, scheme.ParameterCodec)
	ex, err := remotecommand.NewWebSocketExecutor(e.rc, "GET", req.URL().String())
	if err != nil {
		return "", err
	}
	var out, errb bytes.Buffer
	err = ex.StreamWithContext(ctxT(t, 30*time.Second), remotecommand.StreamOptions{Stdout: &out, Stderr: &errb})
	if err != nil {
		return out.String(), fmt.Errorf("exec %v in %s: %w (stderr %q)", cmd, pod, err, errb.String())
	}
	return out.String(), nil
}

func (e *env) nodesRegistered(t *testing.T) {
	ctx := ctxT(t, time.Minute)
	nodes, err := e.client.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(nodes.Items) != e.cfg.Nodes {
		t.Fatalf("%d nodes, want %d", len(nodes.Items), e.cfg.Nodes)
	}
	for i := 1; i <= e.cfg.Nodes; i++ {
		n, err := e.client.CoreV1().Nodes().Get(ctx, e.cfg.NodeName(i), metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if n.Spec.PodCIDR != e.cfg.NodePodCIDR(i).String() {
			t.Errorf("%s podCIDR %q, want %s", n.Name, n.Spec.PodCIDR, e.cfg.NodePodCIDR(i))
		}
		var ip string
		for _, a := range n.Status.Addresses {
			if a.Type == corev1.NodeInternalIP {
				ip = a.Address
			}
		}
		if ip != e.cfg.NodeIP(i).String() {
			t.Errorf("%s InternalIP %q, want %s", n.Name, ip, e.cfg.NodeIP(i))
		}
		if len(n.Spec.Taints) > 0 {
			t.Errorf("%s still tainted: %v", n.Name, n.Spec.Taints)
		}
		var lease *coordv1.Lease
		eventually(t, 30*time.Second, "node lease", func() error {
			lease, err = e.client.CoordinationV1().Leases(corev1.NamespaceNodeLease).Get(ctx, n.Name, metav1.GetOptions{})
			return err
		})
		first := lease.Spec.RenewTime.Time
		eventually(t, 30*time.Second, "lease renewal", func() error {
			l, err := e.client.CoordinationV1().Leases(corev1.NamespaceNodeLease).Get(ctx, n.Name, metav1.GetOptions{})
			if err != nil {
				return err
			}
			if !l.Spec.RenewTime.After(first) {
				return fmt.Errorf("lease of %s not renewed since %s", n.Name, first)
			}
			return nil
		})
	}
}

func (e *env) echoOnBothNodes(t *testing.T) {
	ctx := ctxT(t, 2*time.Minute)
	replicas := int32(e.cfg.Nodes)
	grace := int64(10)
	labels := map[string]string{"app": "echo"}
	dep := &appsv1.Deployment{
		ObjectMeta: metav1.ObjectMeta{Name: "echo", Namespace: e.ns},
		Spec: appsv1.DeploymentSpec{
			Replicas: &replicas,
			Selector: &metav1.LabelSelector{MatchLabels: labels},
			Template: corev1.PodTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{Labels: labels},
				Spec: corev1.PodSpec{
					TerminationGracePeriodSeconds: &grace,
					TopologySpreadConstraints: []corev1.TopologySpreadConstraint{{
						MaxSkew: 1, TopologyKey: corev1.LabelHostname, WhenUnsatisfiable: corev1.DoNotSchedule,
						LabelSelector: &metav1.LabelSelector{MatchLabels: labels},
					}},
					Containers: []corev1.Container{{
						Name:  "echo",
						Image: "amesh/echoserver:e2e",
						Args:  []string{"--listen=:8080", "--drain=1s"},
						Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 8080, HostPort: 18080}},
						Env: []corev1.EnvVar{
							{Name: "POD_NAME", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.name"}}},
							{Name: "POD_NAMESPACE", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.namespace"}}},
							{Name: "POD_IP", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "status.podIP"}}},
							{Name: "NODE_NAME", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "spec.nodeName"}}},
						},
						ReadinessProbe: &corev1.Probe{ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/readyz", Port: intstr.FromString("http")}}, PeriodSeconds: 1},
						LivenessProbe:  &corev1.Probe{ProbeHandler: corev1.ProbeHandler{TCPSocket: &corev1.TCPSocketAction{Port: intstr.FromInt32(8080)}}, PeriodSeconds: 2},
					}},
				},
			},
		},
	}
	if _, err := e.client.AppsV1().Deployments(e.ns).Create(ctx, dep, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "echo", Namespace: e.ns},
		Spec:       corev1.ServiceSpec{Selector: labels, Ports: []corev1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromString("http")}}},
	}
	if _, err := e.client.CoreV1().Services(e.ns).Create(ctx, svc, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, 90*time.Second, "echo deployment available", func() error {
		return deploymentAvailable(ctx, e.client, e.ns, "echo")
	})
	pods := e.echoPods(t)
	nodes := map[string]bool{}
	for _, p := range pods {
		nodes[p.Spec.NodeName] = true
		ready := false
		for _, c := range p.Status.Conditions {
			if c.Type == corev1.PodReady && c.Status == corev1.ConditionTrue {
				ready = true
			}
		}
		if !ready || p.Status.Phase != corev1.PodRunning {
			t.Errorf("pod %s: phase %s, ready %t", p.Name, p.Status.Phase, ready)
		}
		i := e.nodeIndex(p.Spec.NodeName)
		ip, err := netip.ParseAddr(p.Status.PodIP)
		if err != nil || !e.cfg.NodePodCIDR(i).Contains(ip) {
			t.Errorf("pod %s on %s has IP %q outside the node's pod CIDR %s", p.Name, p.Spec.NodeName, p.Status.PodIP, e.cfg.NodePodCIDR(i))
		}
		if p.Status.HostIP != e.cfg.NodeIP(i).String() {
			t.Errorf("pod %s hostIP %q, want %s", p.Name, p.Status.HostIP, e.cfg.NodeIP(i))
		}
	}
	if len(nodes) != e.cfg.Nodes {
		t.Fatalf("echo pods run on %v, want all %d nodes", nodes, e.cfg.Nodes)
	}
}

func (e *env) nodeIndex(name string) int {
	for i := 1; i <= e.cfg.Nodes; i++ {
		if e.cfg.NodeName(i) == name {
			return i
		}
	}
	e.t.Fatalf("unknown node %q", name)
	return 0
}

func (e *env) echoPods(t *testing.T) []corev1.Pod {
	pods, err := e.client.CoreV1().Pods(e.ns).List(ctxT(t, 10*time.Second), metav1.ListOptions{LabelSelector: "app=echo"})
	if err != nil {
		t.Fatal(err)
	}
	var out []corev1.Pod
	for _, p := range pods.Items {
		if p.DeletionTimestamp == nil {
			out = append(out, p)
		}
	}
	return out
}

// runPod creates a long-running pod from the node's tools ("debian" maps to
// the node's root filesystem) and waits until it runs.
func (e *env) runPod(t *testing.T, pod *corev1.Pod) *corev1.Pod {
	ctx := ctxT(t, 90*time.Second)
	pod.Namespace = e.ns
	if _, err := e.client.CoreV1().Pods(e.ns).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	var got *corev1.Pod
	eventually(t, 60*time.Second, "pod "+pod.Name+" running", func() error {
		var err error
		got, err = e.client.CoreV1().Pods(e.ns).Get(ctx, pod.Name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		for _, c := range got.Status.Conditions {
			if c.Type == corev1.PodReady && c.Status == corev1.ConditionTrue {
				return nil
			}
		}
		return fmt.Errorf("phase %s, containers %+v", got.Status.Phase, got.Status.ContainerStatuses)
	})
	return got
}

type echoReply struct {
	Pod  string `json:"pod"`
	Node string `json:"node"`
}

func (e *env) clusterIPAndDNS(t *testing.T) {
	pods := e.echoPods(t)
	if len(pods) < 2 {
		t.Fatalf("need echo pods on both nodes, have %d", len(pods))
	}
	clientNode := e.cfg.NodeName(1)
	client := e.runPod(t, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "client"},
		Spec: corev1.PodSpec{
			NodeName:   clientNode,
			Containers: []corev1.Container{{Name: "client", Image: "debian:12", Command: []string{"sleep", "infinity"}}},
		},
	})
	var remote string
	for _, p := range pods {
		if p.Spec.NodeName != clientNode {
			remote = p.Name
		}
	}
	svc, err := e.client.CoreV1().Services(e.ns).Get(ctxT(t, 10*time.Second), "echo", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, target := range []string{svc.Spec.ClusterIP, "echo." + e.ns + ".svc." + e.cfg.ClusterDomain, "echo"} {
		seen := map[string]bool{}
		eventually(t, 30*time.Second, "reach the echo pod on the other node via "+target, func() error {
			out, err := e.exec(t, client.Name, "curl", "-sS", "-m", "3", "http://"+target+"/")
			if err != nil {
				return err
			}
			var r echoReply
			if err := json.Unmarshal([]byte(out), &r); err != nil {
				return fmt.Errorf("reply %q: %w", out, err)
			}
			seen[r.Pod] = true
			if !seen[remote] {
				return fmt.Errorf("only reached %v so far", seen)
			}
			return nil
		})
	}
	// hostPort (the portmap plugin in the chain) on the other node.
	var remoteNodeIP string
	for _, p := range pods {
		if p.Name == remote {
			remoteNodeIP = p.Status.HostIP
		}
	}
	out, err := e.exec(t, client.Name, "curl", "-sS", "-m", "3", "http://"+remoteNodeIP+":18080/")
	if err != nil {
		t.Fatal(err)
	}
	var r echoReply
	if err := json.Unmarshal([]byte(out), &r); err != nil || r.Pod != remote {
		t.Errorf("hostPort %s:18080 answered %q (%v), want pod %s", remoteNodeIP, out, err, remote)
	}
	// The DNS name resolves to the ClusterIP from the pod.
	out, err = e.exec(t, client.Name, "getent", "hosts", "echo."+e.ns+".svc."+e.cfg.ClusterDomain)
	if err != nil {
		t.Fatal(err)
	}
	if f := strings.Fields(out); len(f) == 0 || f[0] != svc.Spec.ClusterIP {
		t.Errorf("echo resolves to %q, want %s", out, svc.Spec.ClusterIP)
	}
}

func (e *env) hostNetworkDaemonSet(t *testing.T) {
	ctx := ctxT(t, 2*time.Minute)
	hostDir := "/var/lib/amesh-e2e-" + e.cfg.Name
	dirType := corev1.HostPathDirectoryOrCreate
	labels := map[string]string{"app": "hostnet"}
	ds := &appsv1.DaemonSet{
		ObjectMeta: metav1.ObjectMeta{Name: "hostnet", Namespace: e.ns},
		Spec: appsv1.DaemonSetSpec{
			Selector: &metav1.LabelSelector{MatchLabels: labels},
			Template: corev1.PodTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{Labels: labels},
				Spec: corev1.PodSpec{
					HostNetwork: true,
					Containers: []corev1.Container{{
						Name:         "writer",
						Image:        "debian:12",
						Command:      []string{"sh", "-c", "echo $NODE_NAME > /data/node; hostname > /data/hostname; exec sleep infinity"},
						Env:          []corev1.EnvVar{{Name: "NODE_NAME", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "spec.nodeName"}}}},
						VolumeMounts: []corev1.VolumeMount{{Name: "data", MountPath: "/data"}},
					}},
					Volumes: []corev1.Volume{{Name: "data", VolumeSource: corev1.VolumeSource{HostPath: &corev1.HostPathVolumeSource{Path: hostDir, Type: &dirType}}}},
				},
			},
		},
	}
	if _, err := e.client.AppsV1().DaemonSets(e.ns).Create(ctx, ds, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, 90*time.Second, "daemonset ready on every node", func() error {
		d, err := e.client.AppsV1().DaemonSets(e.ns).Get(ctx, "hostnet", metav1.GetOptions{})
		if err != nil {
			return err
		}
		if d.Status.NumberReady != int32(e.cfg.Nodes) || d.Status.DesiredNumberScheduled != int32(e.cfg.Nodes) {
			return fmt.Errorf("%d/%d ready", d.Status.NumberReady, d.Status.DesiredNumberScheduled)
		}
		return nil
	})
	pods, err := e.client.CoreV1().Pods(e.ns).List(ctx, metav1.ListOptions{LabelSelector: "app=hostnet"})
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range pods.Items {
		i := e.nodeIndex(p.Spec.NodeName)
		if p.Status.PodIP != e.cfg.NodeIP(i).String() {
			t.Errorf("host-network pod %s has IP %q, want its node's %s", p.Name, p.Status.PodIP, e.cfg.NodeIP(i))
		}
	}
	for i := 1; i <= e.cfg.Nodes; i++ {
		// hostPath lands in the node's own root filesystem layer.
		dir := filepath.Join(e.cfg.NodeRootUpper(i), hostDir)
		for file, want := range map[string]string{"node": e.cfg.NodeName(i), "hostname": e.cfg.NodeName(i)} {
			eventually(t, 30*time.Second, "hostPath file "+file+" on node "+e.cfg.NodeName(i), func() error {
				b, err := os.ReadFile(filepath.Join(dir, file))
				if err != nil {
					return err
				}
				if got := strings.TrimSpace(string(b)); got != want {
					return fmt.Errorf("%s = %q, want %q", file, got, want)
				}
				return nil
			})
		}
	}
	if _, err := os.Stat(hostDir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("hostPath %s leaked onto the real host (%v)", hostDir, err)
	}
}

func (e *env) projectedToken(t *testing.T) {
	ctx := ctxT(t, 2*time.Minute)
	aud := "amesh-e2e-" + e.cfg.Name
	exp := int64(600)
	pod := e.runPod(t, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "tokenpod"},
		Spec: corev1.PodSpec{
			NodeName: e.cfg.NodeName(e.cfg.Nodes),
			Containers: []corev1.Container{{
				Name: "main", Image: "debian:12", Command: []string{"sleep", "infinity"},
				VolumeMounts: []corev1.VolumeMount{{Name: "tok", MountPath: "/var/run/secrets/amesh", ReadOnly: true}},
			}},
			Volumes: []corev1.Volume{{Name: "tok", VolumeSource: corev1.VolumeSource{Projected: &corev1.ProjectedVolumeSource{
				Sources: []corev1.VolumeProjection{{ServiceAccountToken: &corev1.ServiceAccountTokenProjection{Audience: aud, ExpirationSeconds: &exp, Path: "token"}}},
			}}}},
		},
	})
	token, err := e.exec(t, pod.Name, "cat", "/var/run/secrets/amesh/token")
	if err != nil {
		t.Fatal(err)
	}
	review := func(auds []string) *authnv1.TokenReview {
		r, err := e.client.AuthenticationV1().TokenReviews().Create(ctx, &authnv1.TokenReview{Spec: authnv1.TokenReviewSpec{Token: token, Audiences: auds}}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		return r
	}
	r := review([]string{aud})
	if !r.Status.Authenticated {
		t.Fatalf("token with audience %s not authenticated: %s", aud, r.Status.Error)
	}
	if want := "system:serviceaccount:" + e.ns + ":default"; r.Status.User.Username != want {
		t.Errorf("token user %q, want %q", r.Status.User.Username, want)
	}
	if got := r.Status.User.Extra["authentication.kubernetes.io/pod-name"]; len(got) != 1 || got[0] != pod.Name {
		t.Errorf("token bound to pod %v, want %s", got, pod.Name)
	}
	if r := review(nil); r.Status.Authenticated {
		t.Errorf("token for audience %s was accepted by the apiserver's own audience", aud)
	}
	// The pod's default service-account token authenticates to the
	// apiserver through the kubernetes Service and the cluster CA.
	const sa = "/var/run/secrets/kubernetes.io/serviceaccount"
	call := `curl -sS -o /dev/null -w '%{http_code}' --cacert ` + sa + `/ca.crt -H "Authorization: Bearer $(cat ` + sa + `/token)$SUFFIX" https://kubernetes.default.svc/api`
	for suffix, want := range map[string]string{"": "200", "x": "401"} {
		out, err := e.exec(t, pod.Name, "sh", "-c", "SUFFIX="+suffix+"; "+call)
		if err != nil {
			t.Fatal(err)
		}
		if out != want {
			t.Errorf("in-pod API call with token suffix %q: HTTP %s, want %s", suffix, out, want)
		}
	}
	ns, err := e.exec(t, pod.Name, "cat", sa+"/namespace")
	if err != nil || ns != e.ns {
		t.Errorf("downward API namespace file = %q (%v), want %q", ns, err, e.ns)
	}
}

func (e *env) scaleDown(t *testing.T) {
	ctx := ctxT(t, 2*time.Minute)
	before := e.echoPods(t)
	if len(before) < 2 {
		t.Fatalf("need 2 echo pods, have %d", len(before))
	}
	type podNet struct {
		pod, node, netnsFile, ipFile string
	}
	nets := map[string]podNet{}
	for _, p := range before {
		i := e.nodeIndex(p.Spec.NodeName)
		pn := podNet{
			pod: p.Name, node: p.Spec.NodeName,
			netnsFile: filepath.Join(e.cfg.NodeDir(i), "run", "netns", "cni-"+string(p.UID)),
			ipFile:    filepath.Join(e.cfg.NodeRootUpper(i), "var/lib/cni/networks/amesh-cluster", p.Status.PodIP),
		}
		for _, f := range []string{pn.netnsFile, pn.ipFile} {
			if _, err := os.Stat(f); err != nil {
				t.Fatalf("pod %s: %v", p.Name, err)
			}
		}
		nets[p.Name] = pn
	}
	scale := &autoscalingv1.Scale{ObjectMeta: metav1.ObjectMeta{Name: "echo", Namespace: e.ns}, Spec: autoscalingv1.ScaleSpec{Replicas: 1}}
	if _, err := e.client.AppsV1().Deployments(e.ns).UpdateScale(ctx, "echo", scale, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	var removed podNet
	eventually(t, 60*time.Second, "one echo pod removed from the API", func() error {
		pods, err := e.client.CoreV1().Pods(e.ns).List(ctx, metav1.ListOptions{LabelSelector: "app=echo"})
		if err != nil {
			return err
		}
		if len(pods.Items) != 1 {
			return fmt.Errorf("%d echo pods", len(pods.Items))
		}
		for name, pn := range nets {
			if name != pods.Items[0].Name {
				removed = pn
			}
		}
		return nil
	})
	if _, err := os.Stat(removed.netnsFile); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("netns of removed pod %s still pinned (%v)", removed.pod, err)
	}
	if _, err := os.Stat(removed.ipFile); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("IP of removed pod %s still allocated: CNI DEL did not run (%v)", removed.pod, err)
	}
	// The node agent's log tells how the container ended.
	ev := findLog(t, filepath.Join(e.cfg.StateDir, "logs", removed.node+".log"), e.ns+"/"+removed.pod, "container exited")
	if ev == nil {
		t.Fatalf("no exit record for %s", removed.pod)
	}
	if ev["exitCode"] != float64(0) || ev["stopping"] != true || ev["killed"] != false {
		t.Errorf("container of %s did not stop gracefully: %v", removed.pod, ev)
	}
	if ev := findLog(t, filepath.Join(e.cfg.StateDir, "logs", removed.node+".log"), e.ns+"/"+removed.pod, "sandbox removed"); ev == nil {
		t.Errorf("no sandbox removal record for %s", removed.pod)
	}
}

// findLog returns the last record of the node agent's log about pod with
// message msg.
func findLog(t *testing.T, path, pod, msg string) map[string]any {
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	var last map[string]any
	for sc.Scan() {
		var m map[string]any
		if json.Unmarshal(sc.Bytes(), &m) != nil {
			continue
		}
		if m["pod"] == pod && m["msg"] == msg {
			last = m
		}
	}
	return last
}

func (e *env) probesAndRestarts(t *testing.T) {
	ctx := ctxT(t, 2*time.Minute)
	never := corev1.RestartPolicyNever
	// A liveness exec probe that starts failing after a few seconds makes
	// the node agent restart the container; an init container must finish
	// first and leaves a file in a shared emptyDir.
	e.runPod(t, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "flaky"},
		Spec: corev1.PodSpec{
			InitContainers: []corev1.Container{{
				Name: "init", Image: "debian:12", Command: []string{"sh", "-c", "echo from-init > /work/init"},
				VolumeMounts: []corev1.VolumeMount{{Name: "work", MountPath: "/work"}},
			}},
			Containers: []corev1.Container{{
				Name: "main", Image: "debian:12",
				Command:        []string{"sh", "-c", "test -f /work/init || exit 7; touch /tmp/healthy; sleep 4; rm /tmp/healthy; exec sleep infinity"},
				VolumeMounts:   []corev1.VolumeMount{{Name: "work", MountPath: "/work"}},
				ReadinessProbe: &corev1.Probe{ProbeHandler: corev1.ProbeHandler{Exec: &corev1.ExecAction{Command: []string{"cat", "/work/init"}}}, PeriodSeconds: 1},
				LivenessProbe: &corev1.Probe{ProbeHandler: corev1.ProbeHandler{Exec: &corev1.ExecAction{Command: []string{"test", "-f", "/tmp/healthy"}}},
					InitialDelaySeconds: 1, PeriodSeconds: 1, FailureThreshold: 2},
			}},
			Volumes: []corev1.Volume{{Name: "work", VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}}},
		},
	})
	eventually(t, 60*time.Second, "liveness restart", func() error {
		p, err := e.client.CoreV1().Pods(e.ns).Get(ctx, "flaky", metav1.GetOptions{})
		if err != nil {
			return err
		}
		if len(p.Status.InitContainerStatuses) != 1 || p.Status.InitContainerStatuses[0].State.Terminated == nil ||
			p.Status.InitContainerStatuses[0].State.Terminated.Reason != "Completed" {
			return fmt.Errorf("init container status %+v", p.Status.InitContainerStatuses)
		}
		cs := p.Status.ContainerStatuses[0]
		if cs.RestartCount < 1 || cs.LastTerminationState.Terminated == nil {
			return fmt.Errorf("restarts %d, last state %+v", cs.RestartCount, cs.LastTerminationState)
		}
		if code := cs.LastTerminationState.Terminated.ExitCode; code != 137 && code != 143 {
			return fmt.Errorf("killed container exited %d, want a SIGTERM/SIGKILL status", code)
		}
		return nil
	})
	// The previous run's log is served as --previous.
	if _, err := e.client.CoreV1().Pods(e.ns).GetLogs("flaky", &corev1.PodLogOptions{Container: "main", Previous: true}).DoRaw(ctx); err != nil {
		t.Errorf("previous logs: %v", err)
	}

	// A pod that fails for good: phase Failed, exit code and termination
	// message from its termination log.
	if _, err := e.client.CoreV1().Pods(e.ns).Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "fails", Namespace: e.ns},
		Spec: corev1.PodSpec{
			RestartPolicy: never,
			Containers: []corev1.Container{{Name: "main", Image: "debian:12",
				Command: []string{"sh", "-c", "echo line-on-stdout; echo bad-input > /dev/termination-log; exit 3"}}},
		},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, 60*time.Second, "failed pod", func() error {
		p, err := e.client.CoreV1().Pods(e.ns).Get(ctx, "fails", metav1.GetOptions{})
		if err != nil {
			return err
		}
		if p.Status.Phase != corev1.PodFailed {
			return fmt.Errorf("phase %s", p.Status.Phase)
		}
		term := p.Status.ContainerStatuses[0].State.Terminated
		if term == nil || term.ExitCode != 3 || strings.TrimSpace(term.Message) != "bad-input" || term.Reason != "Error" {
			return fmt.Errorf("terminated state %+v", term)
		}
		return nil
	})
	logs, err := e.client.CoreV1().Pods(e.ns).GetLogs("fails", &corev1.PodLogOptions{}).DoRaw(ctx)
	if err != nil || strings.TrimSpace(string(logs)) != "line-on-stdout" {
		t.Errorf("logs of the failed pod = %q, %v", logs, err)
	}
	// A missing image is reported, not run.
	if _, err := e.client.CoreV1().Pods(e.ns).Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "noimage", Namespace: e.ns},
		Spec:       corev1.PodSpec{Containers: []corev1.Container{{Name: "main", Image: "example.com/not-in-the-table:1"}}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, 30*time.Second, "image error reported", func() error {
		p, err := e.client.CoreV1().Pods(e.ns).Get(ctx, "noimage", metav1.GetOptions{})
		if err != nil {
			return err
		}
		if len(p.Status.ContainerStatuses) == 0 || p.Status.ContainerStatuses[0].State.Waiting == nil ||
			p.Status.ContainerStatuses[0].State.Waiting.Reason != "ErrImagePull" {
			return fmt.Errorf("status %+v", p.Status.ContainerStatuses)
		}
		return nil
	})
}

// agentCrash kills a node agent: its pods die with it, the cluster restarts
// the agent, and the node's pods come back.
func (e *env) agentCrash(t *testing.T) {
	ctx := ctxT(t, 2*time.Minute)
	node := e.cfg.NodeName(e.cfg.Nodes)
	mnt, err := cgroup.Mount()
	if err != nil {
		t.Fatal(err)
	}
	pids, err := cgroup.Procs(filepath.Join(mnt, e.cfg.prefix(), "nodes", node))
	if err != nil {
		t.Fatal(err)
	}
	agent := 0
	for _, p := range pids {
		cmd, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", p))
		if strings.Contains(string(cmd), "--config="+nodeStateDir+"/config.json") {
			agent = p
		}
	}
	if agent == 0 {
		t.Fatalf("no agent process among %v", pids)
	}
	before, err := e.client.CoreV1().Pods(e.ns).Get(ctx, "tokenpod", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := syscall.Kill(agent, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	eventually(t, 90*time.Second, "pod back after the agent restart", func() error {
		p, err := e.client.CoreV1().Pods(e.ns).Get(ctx, "tokenpod", metav1.GetOptions{})
		if err != nil {
			return err
		}
		cs := p.Status.ContainerStatuses
		if len(cs) == 0 || cs[0].ContainerID == before.Status.ContainerStatuses[0].ContainerID || !cs[0].Ready {
			return fmt.Errorf("container %+v", cs)
		}
		return nil
	})
	n, err := e.client.CoreV1().Nodes().Get(ctx, node, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range n.Status.Conditions {
		if c.Type == corev1.NodeReady && c.Status != corev1.ConditionTrue {
			t.Errorf("node %s not Ready after the agent restart: %s", node, c.Message)
		}
	}
	// The old pod network namespaces were cleaned up: one veth per pod
	// sandbox on the node (running pods, and pending ones such as the pod
	// whose image is missing).
	eventually(t, 30*time.Second, "one veth per pod sandbox", func() error {
		out, err := exec.Command("ip", "netns", "exec", e.cfg.NodeNetns(e.cfg.Nodes), "ip", "-o", "link", "show", "type", "veth").Output()
		if err != nil {
			return err
		}
		got := 0
		for _, l := range strings.Split(string(out), "\n") {
			if f := strings.Fields(l); len(f) > 1 && strings.HasPrefix(f[1], "veth") {
				got++
			}
		}
		pods, err := e.client.CoreV1().Pods("").List(ctx, metav1.ListOptions{FieldSelector: "spec.nodeName=" + node})
		if err != nil {
			return err
		}
		want := 0
		for _, p := range pods.Items {
			if !p.Spec.HostNetwork && (p.Status.Phase == corev1.PodRunning || p.Status.Phase == corev1.PodPending) {
				want++
			}
		}
		if got != want {
			return fmt.Errorf("node %s has %d pod veths, want %d:\n%s", node, got, want, out)
		}
		return nil
	})
}

// attach feeds a container's stdin and reads its output through the
// apiserver (kubectl attach / kubectl run -i).
func (e *env) attach(t *testing.T) {
	ctx := ctxT(t, time.Minute)
	if _, err := e.client.CoreV1().Pods(e.ns).Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "reader", Namespace: e.ns},
		Spec: corev1.PodSpec{
			RestartPolicy: corev1.RestartPolicyNever,
			Containers: []corev1.Container{{Name: "main", Image: "debian:12", Stdin: true, StdinOnce: true,
				Command: []string{"sh", "-c", "read line; echo got $line; cat; echo eof"}}},
		},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, 30*time.Second, "reader running", func() error {
		p, err := e.client.CoreV1().Pods(e.ns).Get(ctx, "reader", metav1.GetOptions{})
		if err != nil {
			return err
		}
		if p.Status.Phase != corev1.PodRunning {
			return fmt.Errorf("phase %s", p.Status.Phase)
		}
		return nil
	})
	req := e.client.CoreV1().RESTClient().Post().Resource("pods").Namespace(e.ns).Name("reader").SubResource("attach").
		VersionedParams(&corev1.PodAttachOptions{Container: "main", Stdin: true, Stdout: true, Stderr: true}, scheme.ParameterCodec)
	ex, err := remotecommand.NewWebSocketExecutor(e.rc, "GET", req.URL().String())
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	if err := ex.StreamWithContext(ctx, remotecommand.StreamOptions{Stdin: strings.NewReader("hello\nmore\n"), Stdout: &out}); err != nil {
		t.Fatalf("attach: %v (output %q)", err, out.String())
	}
	if got, want := out.String(), "got hello\nmore\neof\n"; got != want {
		t.Errorf("attach output %q, want %q (stdin closed after the session: stdinOnce)", got, want)
	}
	eventually(t, 30*time.Second, "reader succeeded", func() error {
		p, err := e.client.CoreV1().Pods(e.ns).Get(ctx, "reader", metav1.GetOptions{})
		if err != nil {
			return err
		}
		if p.Status.Phase != corev1.PodSucceeded {
			return fmt.Errorf("phase %s", p.Status.Phase)
		}
		return nil
	})
}
