package node

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"
	coordv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	listersv1 "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/tools/record"

	"github.com/amesh-dev/amesh/e2e/internal/cgroup"
	"github.com/amesh-dev/amesh/e2e/internal/downward"
	"github.com/amesh-dev/amesh/e2e/internal/image"
	"github.com/amesh-dev/amesh/e2e/internal/netns"
	"github.com/amesh-dev/amesh/e2e/internal/nodeserver"
	"github.com/amesh-dev/amesh/e2e/internal/podnet"
	"github.com/amesh-dev/amesh/e2e/internal/sandbox"
	"github.com/amesh-dev/amesh/e2e/internal/volume"
)

// Agent is one node's agent.
type Agent struct {
	cfg      Config
	log      *zap.Logger
	client   kubernetes.Interface
	images   image.Table
	net      *podnet.Network
	vols     *volume.Manager
	recorder record.EventRecorder
	services servicesLister

	hostResolv, hostHosts []byte

	// ctx is Run's context, for the pod workers.
	ctx context.Context
	// spawner forks containers and daemons (see sandbox.Spawner).
	spawner *sandbox.Spawner

	mu      sync.Mutex
	workers map[types.UID]*worker
	wg      sync.WaitGroup
}

type servicesLister interface{ List() []*corev1.Service }

type informerServices struct{ l listersv1.ServiceLister }

func (s informerServices) List() []*corev1.Service {
	out, _ := s.l.List(labels.Everything())
	return out
}

// New builds an agent from a validated config.
func New(cfg Config, log *zap.Logger) (*Agent, error) {
	rc, err := clientcmd.BuildConfigFromFlags("", cfg.Kubeconfig)
	if err != nil {
		return nil, fmt.Errorf("load kubeconfig: %w", err)
	}
	rc.UserAgent = "amesh-node/" + cfg.NodeName
	rc.QPS, rc.Burst = 50, 100
	client, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return nil, fmt.Errorf("kubernetes client: %w", err)
	}
	images, err := image.Load(cfg.ImagesFile)
	if err != nil {
		return nil, err
	}
	a := &Agent{
		cfg:     cfg,
		log:     log,
		client:  client,
		images:  images,
		net:     podnet.New(cfg.CNIConfDir, cfg.CNIBinDirs, cfg.CNICacheDir),
		workers: map[types.UID]*worker{},
	}
	a.vols = volume.NewManager(client, filepath.Join(cfg.StateDir, "pods"), a.allocatable())
	a.hostResolv, _ = os.ReadFile("/etc/resolv.conf")
	a.hostHosts, _ = os.ReadFile("/etc/hosts")
	return a, nil
}

func (a *Agent) allocatable() downward.Allocatable {
	return downward.Allocatable{CPU: resource.MustParse(a.cfg.CPU), Memory: resource.MustParse(a.cfg.Memory)}
}

// Run registers the node and runs its pods until ctx ends; then it stops
// every pod (without deleting them from the API) and returns.
func (a *Agent) Run(ctx context.Context) error {
	a.ctx = ctx
	a.spawner = sandbox.NewSpawner()
	defer a.spawner.Close()
	for _, s := range []struct{ path, val string }{
		{"/proc/sys/net/ipv4/ip_forward", "1"},
		{"/proc/sys/net/bridge/bridge-nf-call-iptables", "1"},
		{"/proc/sys/net/bridge/bridge-nf-call-ip6tables", "1"},
	} {
		if err := os.WriteFile(s.path, []byte(s.val), 0); err != nil {
			a.log.Warn("node sysctl", zap.String("path", s.path), zap.Error(err))
		}
	}
	for _, d := range []string{a.cfg.StateDir, a.cfg.LogDir, a.cfg.DaemonLogDir, a.cfg.CNIConfDir, a.cfg.CNICacheDir, filepath.Join(a.cfg.StateDir, "pods")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return fmt.Errorf("create %s: %w", d, err)
		}
	}
	for _, d := range a.cfg.CNIBinDirs {
		_ = os.MkdirAll(d, 0o755)
	}
	// Pods that mount the netns dir (the amesh CNI agent) must see
	// namespaces created after they start: make it a shared mount now.
	if err := netns.EnsureDir(a.cfg.NetnsDir); err != nil {
		return err
	}
	a.cleanupLeftovers(ctx)

	if err := a.register(ctx); err != nil {
		return err
	}

	bc := record.NewBroadcaster(record.WithContext(ctx))
	bc.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: a.client.CoreV1().Events("")})
	defer bc.Shutdown()
	a.recorder = bc.NewRecorder(scheme.Scheme, corev1.EventSource{Component: "kubelet", Host: a.cfg.NodeName})

	svcFactory := informers.NewSharedInformerFactory(a.client, 0)
	svcInf := svcFactory.Core().V1().Services()
	a.services = informerServices{svcInf.Lister()}
	podFactory := informers.NewSharedInformerFactoryWithOptions(a.client, 0, informers.WithTweakListOptions(func(o *metav1.ListOptions) {
		o.FieldSelector = "spec.nodeName=" + a.cfg.NodeName
	}))
	podInf := podFactory.Core().V1().Pods().Informer()
	svcFactory.Start(ctx.Done())
	svcFactory.WaitForCacheSync(ctx.Done())
	if _, err := podInf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(o any) { a.dispatch(o) },
		UpdateFunc: func(_, o any) { a.dispatch(o) },
		DeleteFunc: func(o any) {
			if t, ok := o.(cache.DeletedFinalStateUnknown); ok {
				o = t.Obj
			}
			if p, ok := o.(*corev1.Pod); ok {
				a.gone(p.UID)
			}
		},
	}); err != nil {
		return fmt.Errorf("pod event handler: %w", err)
	}
	podFactory.Start(ctx.Done())

	var bg sync.WaitGroup
	errc := make(chan error, 2)
	bg.Go(func() { a.leaseLoop(ctx) })
	bg.Go(func() { a.statusLoop(ctx) })
	for _, d := range a.cfg.Daemons {
		bg.Go(func() { a.runDaemon(ctx, d) })
	}
	srv := nodeserver.New(nodeserver.Config{
		Addr:     net.JoinHostPort(a.cfg.NodeIP.String(), strconv.Itoa(a.cfg.Port)),
		CertFile: a.cfg.ServingCrt, KeyFile: a.cfg.ServingKey, ClientCA: a.cfg.ClientCA,
	}, a, a.log.Named("api"))
	bg.Go(func() {
		if err := srv.Run(ctx); err != nil {
			errc <- err
		}
	})
	a.log.Info("node agent running", zap.String("node", a.cfg.NodeName), zap.Stringer("ip", a.cfg.NodeIP))

	var runErr error
	select {
	case <-ctx.Done():
	case runErr = <-errc:
	}
	// Stop the pods: workers see the cancelled context and kill their
	// containers within ShutdownGrace, then tear down their sandboxes.
	a.wg.Wait()
	podFactory.Shutdown()
	svcFactory.Shutdown()
	bg.Wait()
	a.log.Info("node agent stopped")
	return runErr
}

func (a *Agent) dispatch(o any) {
	p, ok := o.(*corev1.Pod)
	if !ok {
		return
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	w := a.workers[p.UID]
	if w == nil {
		if p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed {
			if p.DeletionTimestamp == nil {
				return // finished before this agent started; nothing to run
			}
		}
		w = newWorker(a, p)
		a.workers[p.UID] = w
		a.wg.Go(func() {
			w.run(a.ctx)
			a.mu.Lock()
			delete(a.workers, p.UID)
			a.mu.Unlock()
		})
	}
	w.update(p)
}

func (a *Agent) gone(uid types.UID) {
	a.mu.Lock()
	w := a.workers[uid]
	a.mu.Unlock()
	if w != nil {
		w.markGone()
	}
}

func (a *Agent) worker(uid types.UID) *worker {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.workers[uid]
}

// ---- node registration, lease and status ----

func (a *Agent) nodeObject() *corev1.Node {
	return &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{
			Name: a.cfg.NodeName,
			Labels: map[string]string{
				corev1.LabelHostname:      a.cfg.NodeName,
				corev1.LabelOSStable:      "linux",
				corev1.LabelArchStable:    runtime.GOARCH,
				"amesh.dev/local-cluster": a.cfg.ClusterName,
			},
		},
		Spec: corev1.NodeSpec{PodCIDR: a.cfg.PodCIDR.String(), PodCIDRs: []string{a.cfg.PodCIDR.String()}},
	}
}

func (a *Agent) register(ctx context.Context) error {
	backoff := 200 * time.Millisecond
	for {
		_, err := a.client.CoreV1().Nodes().Create(ctx, a.nodeObject(), metav1.CreateOptions{})
		if err == nil || apierrors.IsAlreadyExists(err) {
			break
		}
		a.log.Info("register node: retrying", zap.Error(err))
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(backoff):
		}
		backoff = min(backoff*2, 5*time.Second)
	}
	return a.updateNodeStatus(ctx)
}

func (a *Agent) nodeStatus(now metav1.Time) corev1.NodeStatus {
	res := corev1.ResourceList{
		corev1.ResourceCPU:              resource.MustParse(a.cfg.CPU),
		corev1.ResourceMemory:           resource.MustParse(a.cfg.Memory),
		corev1.ResourcePods:             *resource.NewQuantity(int64(a.cfg.Pods), resource.DecimalSI),
		corev1.ResourceEphemeralStorage: resource.MustParse("100Gi"),
	}
	ready := corev1.NodeCondition{
		Type: corev1.NodeReady, Status: corev1.ConditionTrue, Reason: "KubeletReady",
		Message: "amesh local node agent is posting ready status", LastHeartbeatTime: now, LastTransitionTime: now,
	}
	if _, err := a.net.Config(); err != nil {
		ready.Status, ready.Reason = corev1.ConditionFalse, "NetworkPluginNotReady"
		ready.Message = "container runtime network not ready: " + err.Error()
	}
	cond := func(t corev1.NodeConditionType, reason, msg string) corev1.NodeCondition {
		return corev1.NodeCondition{Type: t, Status: corev1.ConditionFalse, Reason: reason, Message: msg, LastHeartbeatTime: now, LastTransitionTime: now}
	}
	kernel := ""
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		kernel = strings.TrimSpace(string(b))
	}
	return corev1.NodeStatus{
		Capacity:    res,
		Allocatable: res,
		Phase:       corev1.NodeRunning,
		Conditions: []corev1.NodeCondition{
			cond(corev1.NodeMemoryPressure, "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
			cond(corev1.NodeDiskPressure, "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
			cond(corev1.NodePIDPressure, "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
			ready,
		},
		Addresses: []corev1.NodeAddress{
			{Type: corev1.NodeInternalIP, Address: a.cfg.NodeIP.String()},
			{Type: corev1.NodeHostName, Address: a.cfg.NodeName},
		},
		DaemonEndpoints: corev1.NodeDaemonEndpoints{KubeletEndpoint: corev1.DaemonEndpoint{Port: int32(a.cfg.Port)}},
		NodeInfo: corev1.NodeSystemInfo{
			MachineID:               a.cfg.ClusterName + "-" + a.cfg.NodeName,
			SystemUUID:              a.cfg.ClusterName + "-" + a.cfg.NodeName,
			BootID:                  a.cfg.ClusterName + "-" + a.cfg.NodeName,
			KernelVersion:           kernel,
			OSImage:                 "amesh local cluster node",
			ContainerRuntimeVersion: "amesh-local://" + a.cfg.Version,
			KubeletVersion:          a.cfg.Version,
			OperatingSystem:         "linux",
			Architecture:            runtime.GOARCH,
		},
	}
}

func (a *Agent) updateNodeStatus(ctx context.Context) error {
	now := metav1.Now()
	n, err := a.client.CoreV1().Nodes().Get(ctx, a.cfg.NodeName, metav1.GetOptions{})
	if err != nil {
		return fmt.Errorf("get node: %w", err)
	}
	st := a.nodeStatus(now)
	// Keep transition times of conditions whose status did not change.
	for i, c := range st.Conditions {
		for _, old := range n.Status.Conditions {
			if old.Type == c.Type && old.Status == c.Status && !old.LastTransitionTime.IsZero() {
				st.Conditions[i].LastTransitionTime = old.LastTransitionTime
			}
		}
	}
	st.Images = n.Status.Images
	patch, err := json.Marshal(map[string]any{"status": st})
	if err != nil {
		return err
	}
	if _, err := a.client.CoreV1().Nodes().PatchStatus(ctx, a.cfg.NodeName, patch); err != nil {
		return fmt.Errorf("update node status: %w", err)
	}
	return nil
}

func (a *Agent) statusLoop(ctx context.Context) {
	t := time.NewTicker(20 * time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if err := a.updateNodeStatus(ctx); err != nil && ctx.Err() == nil {
			a.log.Warn("node status", zap.Error(err))
		}
	}
}

func (a *Agent) leaseLoop(ctx context.Context) {
	const duration = 40
	leases := a.client.CoordinationV1().Leases(corev1.NamespaceNodeLease)
	for {
		now := metav1.NewMicroTime(time.Now())
		l, err := leases.Get(ctx, a.cfg.NodeName, metav1.GetOptions{})
		switch {
		case apierrors.IsNotFound(err):
			var owner []metav1.OwnerReference
			if n, err := a.client.CoreV1().Nodes().Get(ctx, a.cfg.NodeName, metav1.GetOptions{}); err == nil {
				owner = []metav1.OwnerReference{{APIVersion: "v1", Kind: "Node", Name: n.Name, UID: n.UID}}
			}
			id, d := a.cfg.NodeName, int32(duration)
			_, err = leases.Create(ctx, &coordv1.Lease{
				ObjectMeta: metav1.ObjectMeta{Name: a.cfg.NodeName, Namespace: corev1.NamespaceNodeLease, OwnerReferences: owner},
				Spec:       coordv1.LeaseSpec{HolderIdentity: &id, LeaseDurationSeconds: &d, RenewTime: &now},
			}, metav1.CreateOptions{})
		case err == nil:
			l.Spec.RenewTime = &now
			_, err = leases.Update(ctx, l, metav1.UpdateOptions{})
		}
		if err != nil && ctx.Err() == nil {
			a.log.Warn("renew lease", zap.Error(err))
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(10 * time.Second):
		}
	}
}

// ---- node daemons ----

func (a *Agent) runDaemon(ctx context.Context, d Daemon) {
	log := a.log.With(zap.String("daemon", d.Name))
	cg := filepath.Join(a.cfg.CgroupDir, "daemons", d.Name)
	backoff := time.Second
	for ctx.Err() == nil {
		start := time.Now()
		err := a.runDaemonOnce(ctx, d, cg)
		if ctx.Err() != nil {
			break
		}
		log.Warn("daemon exited; restarting", zap.Error(err), zap.Duration("after", backoff))
		if time.Since(start) > time.Minute {
			backoff = time.Second
		}
		select {
		case <-ctx.Done():
		case <-time.After(backoff):
		}
		backoff = min(backoff*2, 30*time.Second)
	}
	_ = cgroup.Remove(cg, 10*time.Second)
}

func (a *Agent) runDaemonOnce(ctx context.Context, d Daemon, cg string) error {
	if err := cgroup.Create(cg); err != nil {
		return err
	}
	cgf, err := cgroup.Open(cg)
	if err != nil {
		return err
	}
	defer cgf.Close()
	logf, err := os.OpenFile(filepath.Join(a.cfg.DaemonLogDir, d.Name+".log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("open daemon log: %w", err)
	}
	defer logf.Close()
	cmd := newDaemonCmd(ctx, d.Args, logf, cgf)
	if err := a.spawner.Start(cmd); err != nil {
		return fmt.Errorf("start %s: %w", d.Name, err)
	}
	a.log.Info("daemon started", zap.String("daemon", d.Name), zap.Int("pid", cmd.Process.Pid))
	return cmd.Wait()
}

// ---- leftovers of a previous run ----

// sandboxRecord is what the agent persists about a pod sandbox so that it
// can clean up after a crash.
type sandboxRecord struct {
	ID        string `json:"id"`
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
	UID       string `json:"uid"`
	Netns     string `json:"netns,omitempty"`
}

func (a *Agent) recordPath(uid types.UID) string {
	return filepath.Join(a.cfg.StateDir, "pods", string(uid), "sandbox.json")
}

func (a *Agent) cleanupLeftovers(ctx context.Context) {
	podsDir := filepath.Join(a.cfg.StateDir, "pods")
	ents, _ := os.ReadDir(podsDir)
	for _, e := range ents {
		uid := types.UID(e.Name())
		_ = cgroup.Remove(filepath.Join(a.cfg.CgroupDir, "pods", string(uid)), 10*time.Second)
		if raw, err := os.ReadFile(a.recordPath(uid)); err == nil {
			var r sandboxRecord
			if json.Unmarshal(raw, &r) == nil {
				if err := a.teardownNetwork(ctx, r); err != nil {
					a.log.Warn("clean up leftover pod network", zap.String("pod", r.Namespace+"/"+r.Name), zap.Error(err))
				}
			}
		}
		if err := a.vols.Cleanup(uid); err != nil {
			a.log.Warn("clean up leftover pod volumes", zap.Error(err))
		}
	}
	_ = cgroup.Remove(filepath.Join(a.cfg.CgroupDir, "pods"), 10*time.Second)
	left, _ := netns.List(a.cfg.NetnsDir, a.cfg.NetnsPrefix)
	for _, n := range left {
		_ = netns.Delete(a.cfg.NetnsDir, n)
	}
}

func (a *Agent) teardownNetwork(ctx context.Context, r sandboxRecord) error {
	if r.Netns == "" {
		return nil // host network
	}
	path := filepath.Join(a.cfg.NetnsDir, r.Netns)
	p := podnet.Pod{Namespace: r.Namespace, Name: r.Name, UID: r.UID, ID: r.ID}
	if netns.Exists(a.cfg.NetnsDir, r.Netns) {
		p.Netns = path
	}
	var errs []error
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := a.net.Del(ctx, p); err != nil {
		errs = append(errs, err)
	}
	if err := netns.Delete(a.cfg.NetnsDir, r.Netns); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}
