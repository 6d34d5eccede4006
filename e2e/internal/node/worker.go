package node

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"go.uber.org/zap"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/amesh-dev/amesh/e2e/internal/cgroup"
	"github.com/amesh-dev/amesh/e2e/internal/netns"
	"github.com/amesh-dev/amesh/e2e/internal/podnet"
	"github.com/amesh-dev/amesh/e2e/internal/volume"
)

type eventKind int

const (
	evExited    eventKind = iota // the container's process exited
	evReady                      // readiness changed (ok)
	evStarted                    // the startup probe succeeded
	evUnhealthy                  // liveness or startup probe failed: restart
)

type event struct {
	kind eventKind
	ctr  string
	gen  int
	ok   bool
	msg  string
	exit exitStatus
}

type exitStatus struct {
	code   int32
	signal syscall.Signal
	at     time.Time
}

// sandboxState is a pod's network sandbox.
type sandboxState struct {
	rec  sandboxRecord
	path string
	ips  []netip.Addr
}

// worker owns one pod: its sandbox, containers and status. Only its
// goroutine changes its state; mu guards what the kubelet API reads.
type worker struct {
	a         *Agent
	ctx       context.Context
	uid       types.UID
	namespace string
	name      string
	log       *zap.Logger

	podCh    chan *corev1.Pod
	goneCh   chan struct{}
	goneOnce sync.Once
	evCh     chan event
	done     chan struct{}
	bg       sync.WaitGroup // container waiters and probers

	pod       *corev1.Pod
	gone      bool
	sb        *sandboxState
	sbErr     string
	sbRetry   time.Time
	sbBackoff time.Duration
	vols      map[string]volume.Mounted
	volsAt    time.Time
	volErr    string
	volFail   time.Time // when volume setup started failing
	volRetry  time.Time
	volBack   time.Duration
	// wake fires the loop for retries sooner than its tick, at wakeAt.
	wake      *time.Timer
	wakeAt    time.Time
	finished  bool // terminal: containers stopped, sandbox torn down
	startTime metav1.Time
	conds     map[corev1.PodConditionType]corev1.PodCondition
	lastPush  []byte

	mu   sync.Mutex
	ctrs map[string]*ctr
}

func newWorker(a *Agent, p *corev1.Pod) *worker {
	w := &worker{
		a:         a,
		ctx:       context.Background(),
		uid:       p.UID,
		namespace: p.Namespace,
		name:      p.Name,
		log:       a.log.With(zap.String("pod", p.Namespace+"/"+p.Name)),
		podCh:     make(chan *corev1.Pod, 1),
		goneCh:    make(chan struct{}),
		evCh:      make(chan event, 64),
		done:      make(chan struct{}),
		pod:       p,
		ctrs:      map[string]*ctr{},
		conds:     map[corev1.PodConditionType]corev1.PodCondition{},
	}
	for i := range p.Spec.InitContainers {
		c := &p.Spec.InitContainers[i]
		w.ctrs[c.Name] = &ctr{spec: c, init: true, sidecar: c.RestartPolicy != nil && *c.RestartPolicy == corev1.ContainerRestartPolicyAlways}
	}
	for i := range p.Spec.Containers {
		c := &p.Spec.Containers[i]
		w.ctrs[c.Name] = &ctr{spec: c}
	}
	if p.Status.StartTime != nil {
		w.startTime = *p.Status.StartTime
	}
	return w
}

func (w *worker) update(p *corev1.Pod) {
	select {
	case <-w.podCh:
	default:
	}
	w.podCh <- p
}

func (w *worker) markGone() { w.goneOnce.Do(func() { close(w.goneCh) }) }

func (w *worker) send(ev event) {
	select {
	case w.evCh <- ev:
	case <-w.done:
	}
}

// run is the worker's loop; it returns when the pod is gone from this node
// (deleted, or the agent is stopping).
func (w *worker) run(ctx context.Context) {
	w.ctx = ctx
	defer func() {
		close(w.done)
		w.bg.Wait()
	}()
	tick := time.NewTicker(500 * time.Millisecond)
	defer tick.Stop()
	w.wake = time.NewTimer(time.Hour)
	defer w.wake.Stop()
	for {
		select {
		case p := <-w.podCh:
			w.pod = p
		case <-w.goneCh:
			w.gone = true
		case ev := <-w.evCh:
			w.handle(ev)
		case <-tick.C:
		case <-w.wake.C:
			w.wakeAt = time.Time{}
		case <-ctx.Done():
			w.shutdown()
			return
		}
		if w.sync(ctx) {
			return
		}
	}
}

// shutdown stops everything when the agent stops; the pod stays in the API.
func (w *worker) shutdown() {
	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(w.a.cfg.ShutdownGrace)+30*time.Second)
	defer cancel()
	w.stopAll(ctx, time.Duration(w.a.cfg.ShutdownGrace), false, "node agent stopping")
	w.teardown(ctx, false)
}

func (w *worker) handle(ev event) {
	w.mu.Lock()
	defer w.mu.Unlock()
	c := w.ctrs[ev.ctr]
	if c == nil || c.gen != ev.gen {
		return // an event about an earlier run of the container
	}
	switch ev.kind {
	case evExited:
		w.exited(c, ev.exit)
	case evReady:
		if c.running {
			c.ready = ev.ok
		}
	case evStarted:
		if c.running {
			c.started = true
		}
	case evUnhealthy:
		if c.running && !c.stopping {
			w.a.recorder.Eventf(w.pod, corev1.EventTypeNormal, "Killing", "Container %s failed %s, will be restarted", c.spec.Name, ev.msg)
			w.killLocked(c, w.containerGrace(c), false)
		}
	}
}

// exited records a container's exit. Called with mu held.
func (w *worker) exited(c *ctr, st exitStatus) {
	if c.probeCancel != nil {
		c.probeCancel()
		c.probeCancel = nil
	}
	_ = cgroup.Remove(c.cgroup, 10*time.Second)
	if c.stdin != nil {
		c.stdin.Close()
		c.stdin = nil
	}
	code := st.code
	if st.signal != 0 {
		code = 128 + int32(st.signal)
	}
	reason := "Completed"
	if code != 0 {
		reason = "Error"
	}
	c.running, c.ready, c.started = false, false, false
	c.term = &corev1.ContainerStateTerminated{
		ExitCode:    code,
		Signal:      int32(st.signal),
		Reason:      reason,
		Message:     terminationMessage(c),
		StartedAt:   metav1.NewTime(c.startedAt),
		FinishedAt:  metav1.NewTime(st.at),
		ContainerID: c.id,
	}
	ran := st.at.Sub(c.startedAt)
	if ran > 10*time.Minute {
		c.backoff = 0
	}
	if c.backoff == 0 {
		c.backoff = time.Duration(w.a.cfg.RestartBackoff)
	} else {
		c.backoff = min(c.backoff*2, time.Duration(w.a.cfg.MaxRestartBackoff))
	}
	w.retryAt(&c.nextStart, c.backoff)
	w.log.Info("container exited", zap.String("container", c.spec.Name), zap.Int32("exitCode", code),
		zap.String("signal", sigName(st.signal)), zap.Bool("stopping", c.stopping), zap.Bool("killed", c.killed), zap.Duration("ran", ran))
	c.stopping, c.killed = false, false
}

func sigName(s syscall.Signal) string {
	if s == 0 {
		return ""
	}
	return s.String()
}

// restartPolicy returns the effective restart policy of c.
func (w *worker) restartPolicy(c *ctr) corev1.RestartPolicy {
	if c.sidecar {
		return corev1.RestartPolicyAlways
	}
	if c.init {
		if w.pod.Spec.RestartPolicy == corev1.RestartPolicyNever {
			return corev1.RestartPolicyNever
		}
		return corev1.RestartPolicyOnFailure
	}
	if w.pod.Spec.RestartPolicy == "" {
		return corev1.RestartPolicyAlways
	}
	return w.pod.Spec.RestartPolicy
}

// willRestart reports whether an exited container is to be started again.
func (w *worker) willRestart(c *ctr) bool {
	if c.term == nil {
		return true
	}
	switch w.restartPolicy(c) {
	case corev1.RestartPolicyAlways:
		return true
	case corev1.RestartPolicyOnFailure:
		return c.term.ExitCode != 0
	}
	return false
}

func (w *worker) deleting() bool { return w.gone || w.pod.DeletionTimestamp != nil }

func (w *worker) deletionGrace() time.Duration {
	if w.gone {
		return 0
	}
	if g := w.pod.DeletionGracePeriodSeconds; g != nil {
		return time.Duration(*g) * time.Second
	}
	if g := w.pod.Spec.TerminationGracePeriodSeconds; g != nil {
		return time.Duration(*g) * time.Second
	}
	return 30 * time.Second
}

func (w *worker) containerGrace(*ctr) time.Duration {
	if g := w.pod.Spec.TerminationGracePeriodSeconds; g != nil {
		return time.Duration(*g) * time.Second
	}
	return 30 * time.Second
}

// sync moves the pod towards its desired state; it returns true when the
// worker is done.
func (w *worker) sync(ctx context.Context) bool {
	if ctx.Err() != nil {
		return false // run's loop handles shutdown
	}
	if w.deleting() {
		w.stopAll(ctx, w.deletionGrace(), true, "pod deleted")
		w.teardown(ctx, true)
		if !w.gone {
			w.pushStatus(ctx)
			uid := w.uid
			err := w.a.client.CoreV1().Pods(w.namespace).Delete(ctx, w.name, metav1.DeleteOptions{
				GracePeriodSeconds: new(int64),
				Preconditions:      &metav1.Preconditions{UID: &uid},
			})
			if err != nil && !apierrors.IsNotFound(err) && !apierrors.IsConflict(err) {
				w.log.Warn("final pod delete", zap.Error(err))
			}
		}
		w.log.Info("pod removed from node")
		return true
	}
	w.killExpired()
	if w.finished {
		w.pushStatus(ctx)
		return false
	}
	if w.startTime.IsZero() {
		w.startTime = metav1.Now()
	}
	if w.terminal() {
		w.stopAll(ctx, w.containerGrace(nil), true, "pod finished")
		w.teardown(ctx, false)
		w.finished = true
		w.pushStatus(ctx)
		return false
	}
	if w.vols == nil && time.Now().Before(w.volRetry) {
		w.pushStatus(ctx)
		return false
	}
	if w.vols == nil || time.Since(w.volsAt) > 30*time.Second {
		vols, err := w.a.vols.Setup(ctx, w.pod)
		now := time.Now()
		w.volsAt = now
		if err != nil {
			if w.volFail.IsZero() {
				w.volFail = now
			}
			// The Node authorizer learns that a pod is bound to this node
			// a moment after the agent does, so the first attempts may be
			// forbidden: retry quickly, and report only what persists.
			if now.Sub(w.volFail) > 2*time.Second && w.volErr != err.Error() {
				w.a.recorder.Eventf(w.pod, corev1.EventTypeWarning, "FailedMount", "%v", err)
				w.log.Warn("volumes", zap.Error(err))
				w.volErr = err.Error()
			}
			if w.vols == nil {
				w.volBack = min(max(2*w.volBack, 100*time.Millisecond), 5*time.Second)
				w.retryAt(&w.volRetry, w.volBack)
				w.pushStatus(ctx)
				return false
			}
		} else {
			w.vols, w.volErr, w.volFail, w.volBack = vols, "", time.Time{}, 0
		}
	}
	if w.sb == nil {
		if time.Now().Before(w.sbRetry) {
			w.pushStatus(ctx)
			return false
		}
		if err := w.createSandbox(ctx); err != nil {
			w.sbBackoff = min(max(2*w.sbBackoff, time.Second), 30*time.Second)
			w.sbRetry = time.Now().Add(w.sbBackoff)
			if w.sbErr != err.Error() {
				w.a.recorder.Eventf(w.pod, corev1.EventTypeWarning, "FailedCreatePodSandBox", "Failed to create pod sandbox: %v", err)
			}
			w.sbErr = err.Error()
			w.log.Warn("create sandbox", zap.Error(err))
			w.pushStatus(ctx)
			return false
		}
		w.sbErr = ""
	}
	w.runContainers(ctx)
	w.pushStatus(ctx)
	return false
}

// retryAt sets *at to now+d and makes sure the loop runs then.
func (w *worker) retryAt(at *time.Time, d time.Duration) {
	*at = time.Now().Add(d)
	if w.wake == nil || (!w.wakeAt.IsZero() && !at.Before(w.wakeAt)) {
		return
	}
	w.wakeAt = *at
	w.wake.Reset(d)
}

// runContainers starts init containers in order, then the app containers,
// and restarts exited ones per policy.
func (w *worker) runContainers(ctx context.Context) {
	w.mu.Lock()
	defer w.mu.Unlock()
	now := time.Now()
	for i := range w.pod.Spec.InitContainers {
		c := w.ctrs[w.pod.Spec.InitContainers[i].Name]
		switch {
		case c.running && c.sidecar:
			if !c.started {
				return
			}
			continue
		case c.running:
			return
		case c.term != nil && c.term.ExitCode == 0 && !c.sidecar:
			continue
		case c.term != nil && !w.willRestart(c):
			return // failed for good: the pod is Failed
		case c.stopping:
			return
		}
		if (c.term != nil || c.startErr != "") && now.Before(c.nextStart) {
			return
		}
		w.start(ctx, c)
		if !c.running || !c.sidecar {
			return
		}
	}
	for i := range w.pod.Spec.Containers {
		c := w.ctrs[w.pod.Spec.Containers[i].Name]
		if c.running || c.stopping || !w.willRestart(c) {
			continue
		}
		if c.term != nil && now.Before(c.nextStart) {
			continue
		}
		if c.startErr != "" && now.Before(c.nextStart) {
			continue
		}
		w.start(ctx, c)
	}
}

// start starts c and records failures as a waiting state. Called with mu.
func (w *worker) start(ctx context.Context, c *ctr) {
	if c.everStarted {
		c.restarts++
	}
	err := w.startContainer(ctx, c)
	if err != nil {
		if c.everStarted {
			c.restarts--
		}
		if c.startErr != err.Error() {
			w.a.recorder.Eventf(w.pod, corev1.EventTypeWarning, "Failed", "Error: %v", err)
			w.log.Warn("start container", zap.String("container", c.spec.Name), zap.Error(err))
		}
		c.startErr = err.Error()
		// Start failures (a missing image, a configMap the Node authorizer
		// does not let this node read yet) are retried sooner than crashes.
		c.startBackoff = min(max(2*c.startBackoff, 250*time.Millisecond), time.Duration(w.a.cfg.RestartBackoff))
		w.retryAt(&c.nextStart, c.startBackoff)
		return
	}
	c.startErr, c.waitReason, c.startBackoff = "", "", 0
	c.everStarted = true
	w.a.recorder.Eventf(w.pod, corev1.EventTypeNormal, "Started", "Started container %s", c.spec.Name)
}

// terminal reports whether the pod has finished (restartPolicy Never or
// OnFailure and every app container done, or an init container failed).
func (w *worker) terminal() bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.pod.Spec.RestartPolicy == corev1.RestartPolicyAlways || w.pod.Spec.RestartPolicy == "" {
		return false
	}
	for i := range w.pod.Spec.InitContainers {
		c := w.ctrs[w.pod.Spec.InitContainers[i].Name]
		if !c.sidecar && c.term != nil && !c.running && !w.willRestart(c) && c.term.ExitCode != 0 {
			return true
		}
	}
	for i := range w.pod.Spec.Containers {
		c := w.ctrs[w.pod.Spec.Containers[i].Name]
		if c.running || c.term == nil || w.willRestart(c) {
			return false
		}
	}
	return true
}

// killLocked starts a graceful stop of c: preStop hook, SIGTERM, and SIGKILL
// after grace. Called with mu held.
func (w *worker) killLocked(c *ctr, grace time.Duration, preStop bool) {
	if !c.running {
		return
	}
	deadline := time.Now().Add(grace)
	if c.stopping {
		if deadline.Before(c.killAt) {
			c.killAt = deadline
		}
		return
	}
	c.stopping, c.killAt = true, deadline
	proc := c.cmd.Process
	hook := c.spec.Lifecycle
	if preStop && hook != nil && hook.PreStop != nil && grace > 0 {
		info := w.execInfoLocked(c)
		podIP := w.podIP()
		w.bg.Go(func() {
			hctx, cancel := context.WithDeadline(context.Background(), deadline)
			defer cancel()
			if err := w.a.runHook(hctx, hook.PreStop, info, podIP, c.spec); err != nil {
				w.log.Info("preStop hook failed", zap.String("container", c.spec.Name), zap.Error(err))
			}
			_ = proc.Signal(syscall.SIGTERM)
		})
		return
	}
	if grace <= 0 {
		c.killed = true
		_ = cgroup.Kill(c.cgroup, 0)
		return
	}
	_ = proc.Signal(syscall.SIGTERM)
}

// killExpired SIGKILLs containers whose grace period has passed.
func (w *worker) killExpired() {
	w.mu.Lock()
	defer w.mu.Unlock()
	now := time.Now()
	for _, c := range w.ctrs {
		if c.running && c.stopping && !c.killed && now.After(c.killAt) {
			c.killed = true
			w.log.Info("grace period over; killing", zap.String("container", c.spec.Name))
			_ = cgroup.Kill(c.cgroup, 0)
		}
	}
}

func (w *worker) anyRunning() bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, c := range w.ctrs {
		if c.running {
			return true
		}
	}
	return false
}

// stopAll stops every container within grace and waits for them to exit.
func (w *worker) stopAll(ctx context.Context, grace time.Duration, preStop bool, why string) {
	w.mu.Lock()
	for _, c := range w.ctrs {
		if c.running {
			w.a.recorder.Eventf(w.pod, corev1.EventTypeNormal, "Killing", "Stopping container %s (%s)", c.spec.Name, why)
			w.killLocked(c, grace, preStop)
		}
	}
	w.mu.Unlock()
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for w.anyRunning() {
		select {
		case ev := <-w.evCh:
			w.handle(ev)
		case p := <-w.podCh:
			w.pod = p
			if w.deleting() {
				w.mu.Lock()
				for _, c := range w.ctrs {
					w.killLocked(c, w.deletionGrace(), false)
				}
				w.mu.Unlock()
			}
		case <-w.goneCh:
			w.gone = true
			w.mu.Lock()
			for _, c := range w.ctrs {
				w.killLocked(c, 0, false)
			}
			w.mu.Unlock()
		case <-ctx.Done():
			w.mu.Lock()
			for _, c := range w.ctrs {
				w.killLocked(c, 0, false)
			}
			w.mu.Unlock()
		case <-tick.C:
		}
		w.killExpired()
	}
}

// createSandbox creates the pod's network namespace and runs CNI ADD.
func (w *worker) createSandbox(ctx context.Context) error {
	rec := sandboxRecord{ID: string(w.uid), Namespace: w.namespace, Name: w.name, UID: string(w.uid)}
	if w.pod.Spec.HostNetwork {
		if err := w.writeRecord(rec); err != nil {
			return err
		}
		w.sb = &sandboxState{rec: rec, ips: []netip.Addr{w.a.cfg.NodeIP}}
		return nil
	}
	rec.Netns = w.a.cfg.NetnsPrefix + string(w.uid)
	if netns.Exists(w.a.cfg.NetnsDir, rec.Netns) {
		// A previous attempt failed half way: start clean.
		_ = w.a.teardownNetwork(ctx, rec)
	}
	path, err := netns.Create(w.a.cfg.NetnsDir, rec.Netns)
	if err != nil {
		return err
	}
	if err := w.writeRecord(rec); err != nil {
		_ = netns.Delete(w.a.cfg.NetnsDir, rec.Netns)
		return err
	}
	actx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	ips, err := w.a.net.Add(actx, podnet.Pod{Namespace: w.namespace, Name: w.name, UID: string(w.uid), ID: rec.ID, Netns: path, PortMappings: hostPorts(w.pod)})
	if err != nil {
		if derr := w.a.teardownNetwork(ctx, rec); derr != nil {
			w.log.Warn("clean up failed sandbox", zap.Error(derr))
		}
		return err
	}
	w.sb = &sandboxState{rec: rec, path: path, ips: ips}
	w.log.Info("sandbox ready", zap.String("netns", rec.Netns), zap.Stringers("ips", ips))
	return nil
}

// hostPorts lists the pod's hostPort mappings.
func hostPorts(pod *corev1.Pod) []podnet.PortMapping {
	var out []podnet.PortMapping
	for _, c := range append(append([]corev1.Container{}, pod.Spec.InitContainers...), pod.Spec.Containers...) {
		for _, p := range c.Ports {
			if p.HostPort == 0 {
				continue
			}
			proto := strings.ToLower(string(p.Protocol))
			if proto == "" {
				proto = "tcp"
			}
			out = append(out, podnet.PortMapping{HostPort: int(p.HostPort), ContainerPort: int(p.ContainerPort), Protocol: proto, HostIP: p.HostIP})
		}
	}
	return out
}

func (w *worker) writeRecord(r sandboxRecord) error {
	p := w.a.recordPath(w.uid)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		return err
	}
	raw, err := jsonMarshal(r)
	if err != nil {
		return err
	}
	return os.WriteFile(p, raw, 0o644)
}

// teardown removes the sandbox, the pod's cgroups and volumes; with
// removeLogs, also its logs (the pod is being deleted).
func (w *worker) teardown(ctx context.Context, removeLogs bool) {
	_ = cgroup.Remove(filepath.Join(w.a.cfg.CgroupDir, "pods", string(w.uid)), 10*time.Second)
	if w.sb != nil && w.sb.rec.Netns != "" {
		var err error
		for attempt := range 3 {
			if err = w.a.teardownNetwork(ctx, w.sb.rec); err == nil {
				break
			}
			time.Sleep(time.Duration(attempt+1) * 500 * time.Millisecond)
		}
		if err != nil {
			w.log.Warn("tear down pod network", zap.Error(err))
		} else {
			w.log.Info("sandbox removed", zap.String("netns", w.sb.rec.Netns))
		}
	}
	w.sb = nil
	if err := w.a.vols.Cleanup(w.uid); err != nil {
		w.log.Warn("clean up volumes", zap.Error(err))
	}
	w.vols = nil
	if removeLogs {
		_ = os.RemoveAll(w.a.podLogDir(w.namespace, w.name, w.uid))
	}
}

func (w *worker) podIP() string {
	if w.sb == nil || len(w.sb.ips) == 0 {
		return ""
	}
	return w.sb.ips[0].String()
}

func (w *worker) String() string { return fmt.Sprintf("%s/%s", w.namespace, w.name) }
