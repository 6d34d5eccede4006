package cluster

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"

	"go.uber.org/zap"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/amesh-dev/amesh/e2e/internal/addon"
	"github.com/amesh-dev/amesh/e2e/internal/cgroup"
	"github.com/amesh-dev/amesh/e2e/internal/hostnet"
	"github.com/amesh-dev/amesh/e2e/internal/netns"
	"github.com/amesh-dev/amesh/e2e/internal/sandbox"
)

// CoreDNSImage is the image reference of the cluster DNS pods.
const CoreDNSImage = "registry.k8s.io/coredns/coredns:v1.15.0"

// Info describes a running cluster.
type Info struct {
	Name       string    `json:"name"`
	Kubeconfig string    `json:"kubeconfig"`
	APIServer  string    `json:"apiServer"`
	Version    string    `json:"version"`
	Nodes      []string  `json:"nodes"`
	StartedAt  time.Time `json:"startedAt"`
	// NodesReady is the time from start to every node Ready.
	NodesReady time.Duration `json:"nodesReady"`
	// Ready is the time from start to the cluster DNS serving.
	Ready time.Duration `json:"ready"`
}

// Cluster runs one local cluster.
type Cluster struct {
	cfg      Config
	log      *zap.Logger
	out      io.Writer
	start    time.Time
	cgroup   string
	procs    []*proc
	spawner  *sandbox.Spawner
	nodes    []*proc
	progress sync.Mutex
}

// ErrRunning means a cluster of that name is already running.
var ErrRunning = errors.New("cluster is already running")

// New validates cfg (after applying defaults) and returns a cluster that
// reports progress lines to out.
func New(cfg Config, log *zap.Logger, out io.Writer) (*Cluster, error) {
	cfg.Default()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if out == nil {
		out = io.Discard
	}
	return &Cluster{cfg: cfg, log: log, out: out}, nil
}

// Config returns the effective configuration.
func (c *Cluster) Config() Config { return c.cfg }

func (c *Cluster) step(format string, args ...any) {
	c.progress.Lock()
	defer c.progress.Unlock()
	fmt.Fprintf(c.out, "[%5.1fs] %s\n", time.Since(c.start).Seconds(), fmt.Sprintf(format, args...))
}

func (c *Cluster) plan() hostnet.Plan {
	p := hostnet.Plan{
		Bridge:      c.cfg.bridge(),
		HostAddr:    netipPrefix(c.cfg.hostIP(), c.cfg.NodeCIDR.Bits()),
		ServiceCIDR: c.cfg.ServiceCIDR,
		NetnsDir:    netns.DefaultDir,
	}
	for i := 1; i <= c.cfg.Nodes; i++ {
		p.Nodes = append(p.Nodes, hostnet.Node{Netns: c.cfg.NodeNetns(i), HostVeth: c.cfg.nodeVeth(i), IP: c.cfg.NodeIP(i), PodCIDR: c.cfg.NodePodCIDR(i)})
	}
	return p
}

// Run starts the cluster, calls ready once every node is Ready and the
// cluster DNS serves, and keeps the cluster running (restarting crashed
// processes) until ctx ends. Before returning it removes everything it
// created, also when the start failed.
func (c *Cluster) Run(ctx context.Context, ready func(Info)) (err error) {
	c.start = time.Now()
	if os.Geteuid() != 0 {
		return errors.New("the local cluster needs root (network namespaces, mounts, cgroups)")
	}
	mnt, err := cgroup.Mount()
	if err != nil {
		return err
	}
	c.cgroup = filepath.Join(mnt, c.cfg.prefix())
	if pid, ok := runningOwner(c.cfg.StateDir); ok && pid != os.Getpid() {
		return fmt.Errorf("%w: %s (pid %d); stop it first", ErrRunning, c.cfg.Name, pid)
	}
	if err := sweep(c.cfg, c.cgroup); err != nil {
		return fmt.Errorf("remove leftovers of an earlier %s cluster: %w", c.cfg.Name, err)
	}
	if err := hostnet.CheckFree(c.cfg.bridge(), c.cfg.NodeCIDR, c.cfg.PodCIDR); err != nil {
		return err
	}
	c.spawner = sandbox.NewSpawner()
	defer c.spawner.Close()
	defer func() {
		c.step("stopping")
		if terr := c.teardown(); terr != nil {
			err = errors.Join(err, terr)
		}
	}()

	if err := os.MkdirAll(filepath.Join(c.cfg.StateDir, "logs"), 0o755); err != nil {
		return fmt.Errorf("create state dir: %w", err)
	}
	if err := writeOwner(c.cfg.StateDir); err != nil {
		return err
	}
	raw, _ := json.MarshalIndent(c.cfg, "", "  ")
	if err := os.WriteFile(filepath.Join(c.cfg.StateDir, "config.json"), raw, 0o644); err != nil {
		return fmt.Errorf("write config: %w", err)
	}
	c.step("generating certificates and kubeconfigs in %s", c.cfg.StateDir)
	if err := c.cfg.writePKI(); err != nil {
		return err
	}
	c.step("creating bridge %s (%s) and %d node network namespaces", c.cfg.bridge(), c.cfg.NodeCIDR, c.cfg.Nodes)
	if err := hostnet.Setup(c.plan()); err != nil {
		return err
	}
	if err := cgroup.Create(c.cgroup); err != nil {
		return err
	}

	ports, err := freePorts(4)
	if err != nil {
		return err
	}
	etcdPort, peerPort, kcmPort, schedPort := ports[0], ports[1], ports[2], ports[3]
	etcd := c.addProc("etcd", c.command(filepath.Join(c.cfg.KubeBinDir, "etcd"), c.etcdArgs(etcdPort, peerPort)...))
	c.step("starting etcd")
	if err := waitFor(ctx, "etcd", 200*time.Millisecond, []*proc{etcd}, c.etcdHealthy(etcdPort)); err != nil {
		return err
	}
	apiserver := c.addProc("kube-apiserver", c.command(filepath.Join(c.cfg.KubeBinDir, "kube-apiserver"), c.apiserverArgs(etcdPort)...))
	c.step("starting kube-apiserver on %s", c.cfg.apiServerURL())
	rc, err := clientcmd.BuildConfigFromFlags("", c.cfg.Kubeconfig())
	if err != nil {
		return fmt.Errorf("admin kubeconfig: %w", err)
	}
	client, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return err
	}
	if err := waitFor(ctx, "kube-apiserver", 250*time.Millisecond, []*proc{etcd, apiserver}, func(ctx context.Context) error {
		body, err := client.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx)
		if err != nil {
			return fmt.Errorf("%w: %s", err, body)
		}
		return nil
	}); err != nil {
		return err
	}
	ver, err := client.Discovery().ServerVersion()
	if err != nil {
		return fmt.Errorf("server version: %w", err)
	}
	// The controller manager exits if it starts before the apiserver has
	// bootstrapped RBAC: start it (and the scheduler) once /readyz passes.
	c.step("kube-apiserver %s ready; starting kube-controller-manager and kube-scheduler", ver.GitVersion)
	c.addProc("kube-controller-manager", c.command(filepath.Join(c.cfg.KubeBinDir, "kube-controller-manager"), c.controllerManagerArgs(kcmPort)...))
	c.addProc("kube-scheduler", c.command(filepath.Join(c.cfg.KubeBinDir, "kube-scheduler"), c.schedulerArgs(schedPort)...))

	if err := c.applyDNS(ctx, rc); err != nil {
		return err
	}
	c.step("starting %d nodes (amesh-node agent + kube-proxy in %s mode each)", c.cfg.Nodes, c.cfg.ProxyMode)
	for i := 1; i <= c.cfg.Nodes; i++ {
		if err := c.writeNodeFiles(i, ver.GitVersion); err != nil {
			return err
		}
		// A node's agent, daemons and pods share the node's cgroup: when
		// the agent dies, the node's processes die with it.
		c.nodes = append(c.nodes, c.addProcIn(filepath.Join(c.cgroup, "nodes", c.cfg.NodeName(i)), c.cfg.NodeName(i), c.nodeStart(i)))
	}
	if err := waitFor(ctx, "nodes Ready", 250*time.Millisecond, c.nodes, func(ctx context.Context) error {
		return nodesReady(ctx, client, c.cfg.Nodes)
	}); err != nil {
		return err
	}
	info := Info{Name: c.cfg.Name, Kubeconfig: c.cfg.Kubeconfig(), APIServer: c.cfg.apiServerURL(), Version: ver.GitVersion, StartedAt: c.start, NodesReady: time.Since(c.start)}
	for i := 1; i <= c.cfg.Nodes; i++ {
		info.Nodes = append(info.Nodes, c.cfg.NodeName(i))
	}
	c.step("all %d nodes Ready after %.1fs", c.cfg.Nodes, info.NodesReady.Seconds())
	if err := waitFor(ctx, "cluster DNS", 250*time.Millisecond, c.nodes, func(ctx context.Context) error {
		return deploymentAvailable(ctx, client, metav1.NamespaceSystem, "coredns")
	}); err != nil {
		return err
	}
	info.Ready = time.Since(c.start)
	c.step("cluster DNS (CoreDNS) serving at %s; cluster ready after %.1fs", c.cfg.DNSIP(), info.Ready.Seconds())
	raw, _ = json.MarshalIndent(info, "", "  ")
	if err := os.WriteFile(filepath.Join(c.cfg.StateDir, "cluster.json"), raw, 0o644); err != nil {
		return fmt.Errorf("write cluster info: %w", err)
	}
	if ready != nil {
		ready(info)
	}
	<-ctx.Done()
	return nil
}

func (c *Cluster) addProc(name string, start func(logf, cg *os.File) (*exec.Cmd, error)) *proc {
	return c.addProcIn(filepath.Join(c.cgroup, "control", name), name, start)
}

// addProcIn supervises a process in cgroup cg.
func (c *Cluster) addProcIn(cg, name string, start func(logf, cg *os.File) (*exec.Cmd, error)) *proc {
	p := newProc(name, filepath.Join(c.cfg.StateDir, "logs", name+".log"), cg, start)
	c.procs = append(c.procs, p)
	go p.supervise(c.log)
	return p
}

// teardown stops the nodes (so that they stop their pods and run CNI DEL),
// then the control plane, and removes every host object and the state.
func (c *Cluster) teardown() error {
	var wg sync.WaitGroup
	for _, n := range c.nodes {
		wg.Go(func() { n.stop(30 * time.Second) })
	}
	wg.Wait()
	for i := len(c.procs) - 1; i >= 0; i-- {
		c.procs[i].stop(15 * time.Second)
	}
	return sweep(c.cfg, c.cgroup)
}

// sweep removes everything a cluster named cfg.Name may have left on the
// host. It is idempotent.
func sweep(cfg Config, cg string) error {
	var errs []error
	if cg != "" {
		if err := cgroup.Remove(cg, 15*time.Second); err != nil {
			errs = append(errs, err)
		}
	}
	if err := hostnet.Sweep(netns.DefaultDir, cfg.prefix()); err != nil {
		errs = append(errs, err)
	}
	if err := os.RemoveAll(cfg.StateDir); err != nil {
		errs = append(errs, fmt.Errorf("remove state dir: %w", err))
	}
	return errors.Join(errs...)
}

func (c *Cluster) etcdHealthy(port int) func(context.Context) error {
	dir := c.cfg.pkiDir()
	return func(ctx context.Context) error {
		cert, err := tls.LoadX509KeyPair(filepath.Join(dir, "etcd-healthcheck-client.crt"), filepath.Join(dir, "etcd-healthcheck-client.key"))
		if err != nil {
			return err
		}
		caPEM, err := os.ReadFile(filepath.Join(dir, "etcd-ca.crt"))
		if err != nil {
			return err
		}
		pool := x509.NewCertPool()
		pool.AppendCertsFromPEM(caPEM)
		tr := &http.Transport{TLSClientConfig: &tls.Config{Certificates: []tls.Certificate{cert}, RootCAs: pool}}
		defer tr.CloseIdleConnections()
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "https://127.0.0.1:"+strconv.Itoa(port)+"/health", nil)
		resp, err := (&http.Client{Transport: tr}).Do(req)
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		var h struct {
			Health string `json:"health"`
		}
		if err := json.NewDecoder(resp.Body).Decode(&h); err != nil {
			return err
		}
		if h.Health != "true" {
			return fmt.Errorf("etcd health %q", h.Health)
		}
		return nil
	}
}

func nodesReady(ctx context.Context, client kubernetes.Interface, want int) error {
	nodes, err := client.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
	if err != nil {
		return err
	}
	ready := 0
	for _, n := range nodes.Items {
		for _, c := range n.Status.Conditions {
			if c.Type == corev1.NodeReady && c.Status == corev1.ConditionTrue {
				ready++
			}
		}
	}
	if ready < want {
		return fmt.Errorf("%d of %d nodes Ready", ready, want)
	}
	return nil
}

func deploymentAvailable(ctx context.Context, client kubernetes.Interface, ns, name string) error {
	d, err := client.AppsV1().Deployments(ns).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return err
	}
	want := int32(1)
	if d.Spec.Replicas != nil {
		want = *d.Spec.Replicas
	}
	if d.Status.ObservedGeneration < d.Generation || d.Status.AvailableReplicas < want || d.Status.UpdatedReplicas < want {
		return fmt.Errorf("deployment %s/%s: %d/%d available", ns, name, d.Status.AvailableReplicas, want)
	}
	for _, cond := range d.Status.Conditions {
		if cond.Type == appsv1.DeploymentAvailable && cond.Status != corev1.ConditionTrue {
			return fmt.Errorf("deployment %s/%s not available: %s", ns, name, cond.Message)
		}
	}
	return nil
}

func (c *Cluster) applyDNS(ctx context.Context, rc *rest.Config) error {
	m, err := addon.DNSManifest(addon.DNS{Domain: c.cfg.ClusterDomain, DNSIP: c.cfg.DNSIP().String(), Image: CoreDNSImage, Replicas: c.cfg.DNSReplicas})
	if err != nil {
		return err
	}
	// The apiserver creates its bootstrap RBAC and the kube-system
	// namespace shortly after it is ready; retry until they exist.
	return waitFor(ctx, "the DNS add-on to apply", 250*time.Millisecond, nil, func(ctx context.Context) error {
		return addon.Apply(ctx, rc, m)
	})
}

// freePorts returns n distinct free TCP ports on 127.0.0.1.
func freePorts(n int) ([]int, error) {
	var out []int
	var lns []net.Listener
	defer func() {
		for _, l := range lns {
			l.Close()
		}
	}()
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("find a free port: %w", err)
		}
		lns = append(lns, l)
		out = append(out, l.Addr().(*net.TCPAddr).Port)
	}
	return out, nil
}

// ---- ownership: which process runs a cluster ----

type owner struct {
	PID   int    `json:"pid"`
	Start string `json:"start"` // /proc/<pid>/stat start time, against PID reuse
}

func procStart(pid int) string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return ""
	}
	// Field 22 (starttime) follows the parenthesised command name.
	s := string(b)
	for i := len(s) - 1; i >= 0; i-- {
		if s[i] == ')' {
			fields := splitFields(s[i+1:])
			if len(fields) > 19 {
				return fields[19]
			}
			break
		}
	}
	return ""
}

func splitFields(s string) []string {
	var out []string
	cur := ""
	for _, r := range s {
		if r == ' ' || r == '\n' {
			if cur != "" {
				out = append(out, cur)
				cur = ""
			}
			continue
		}
		cur += string(r)
	}
	if cur != "" {
		out = append(out, cur)
	}
	return out
}

func writeOwner(stateDir string) error {
	o := owner{PID: os.Getpid(), Start: procStart(os.Getpid())}
	raw, _ := json.Marshal(o)
	if err := os.WriteFile(filepath.Join(stateDir, "owner.json"), raw, 0o644); err != nil {
		return fmt.Errorf("write owner: %w", err)
	}
	return nil
}

// runningOwner returns the PID of the live process that runs the cluster
// whose state is in stateDir.
func runningOwner(stateDir string) (int, bool) {
	raw, err := os.ReadFile(filepath.Join(stateDir, "owner.json"))
	if err != nil {
		return 0, false
	}
	var o owner
	if json.Unmarshal(raw, &o) != nil || o.PID <= 0 {
		return 0, false
	}
	if err := syscall.Kill(o.PID, 0); err != nil {
		return 0, false
	}
	if o.Start != "" && procStart(o.PID) != o.Start {
		return 0, false
	}
	return o.PID, true
}
