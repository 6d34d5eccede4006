package node

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"syscall"
	"time"

	"github.com/creack/pty"
	vnetns "github.com/vishvananda/netns"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/cri-streaming/pkg/streaming/remotecommand"
	utilexec "k8s.io/utils/exec"

	"github.com/amesh-dev/amesh/e2e/internal/cgroup"
	"github.com/amesh-dev/amesh/e2e/internal/nodeserver"
	"github.com/amesh-dev/amesh/e2e/internal/probe"
)

// nsenterCmd builds a command that runs argv inside a container's
// namespaces (mount, network, UTS, IPC) with its root, working directory,
// user and environment. Go cannot join a mount namespace from a
// multithreaded process, so util-linux's nsenter does it.
func nsenterCmd(ctx context.Context, info execInfo, argv []string) *exec.Cmd {
	args := []string{
		"--target", strconv.Itoa(info.pid), "--mount", "--net", "--uts", "--ipc", "--root", "--wd",
	}
	if info.uid != 0 || info.gid != 0 {
		args = append(args, "--setuid", strconv.Itoa(int(info.uid)), "--setgid", strconv.Itoa(int(info.gid)))
	}
	args = append(args, "--")
	args = append(args, argv...)
	cmd := exec.CommandContext(ctx, "nsenter", args...)
	cmd.Env = info.env
	cmd.SysProcAttr = &syscall.SysProcAttr{}
	return cmd
}

// runIn runs argv in the container, in its cgroup, and waits.
func runIn(ctx context.Context, info execInfo, argv []string, stdin io.Reader, stdout, stderr io.Writer) (int, error) {
	if !info.running || info.pid == 0 {
		return -1, errors.New("container is not running")
	}
	cmd := nsenterCmd(ctx, info, argv)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = stdin, stdout, stderr
	if f, err := cgroup.Open(info.cgroup); err == nil {
		defer f.Close()
		cmd.SysProcAttr.UseCgroupFD, cmd.SysProcAttr.CgroupFD = true, int(f.Fd())
	}
	err := cmd.Run()
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.ExitCode(), nil
	}
	if err != nil {
		return -1, err
	}
	return 0, nil
}

func (w *worker) probeExec(c *ctr) probe.Exec {
	return func(ctx context.Context, argv []string) ([]byte, int, error) {
		w.mu.Lock()
		info := w.execInfoLocked(c)
		w.mu.Unlock()
		var out bytes.Buffer
		code, err := runIn(ctx, info, argv, nil, &out, &out)
		return out.Bytes(), code, err
	}
}

// runHook runs a lifecycle handler (exec, httpGet, sleep).
func (a *Agent) runHook(ctx context.Context, h *corev1.LifecycleHandler, info execInfo, podIP string, c *corev1.Container) error {
	switch {
	case h.Exec != nil:
		var out bytes.Buffer
		code, err := runIn(ctx, info, h.Exec.Command, nil, &out, &out)
		if err != nil {
			return err
		}
		if code != 0 {
			return fmt.Errorf("exited %d: %s", code, out.String())
		}
		return nil
	case h.HTTPGet != nil:
		p := &corev1.Probe{ProbeHandler: corev1.ProbeHandler{HTTPGet: h.HTTPGet}, TimeoutSeconds: 30}
		if res, msg := probe.Run(ctx, p, probe.Target{PodIP: podIP, Container: c}); res != probe.Success {
			return errors.New(msg)
		}
		return nil
	case h.Sleep != nil:
		select {
		case <-ctx.Done():
		case <-time.After(time.Duration(h.Sleep.Seconds) * time.Second):
		}
		return nil
	}
	return errors.New("lifecycle handler has no action")
}

// probeLoop runs the startup probe, then readiness and liveness, sending
// state changes to the worker.
func (w *worker) probeLoop(ctx context.Context, name string, gen int, c *corev1.Container, t probe.Target) {
	if sp := c.StartupProbe; sp != nil {
		ok, msg := w.untilThreshold(ctx, sp, t)
		if ctx.Err() != nil {
			return
		}
		if !ok {
			w.a.recorder.Eventf(w.pod, corev1.EventTypeWarning, "Unhealthy", "Startup probe failed: %s", msg)
			w.send(event{kind: evUnhealthy, ctr: name, gen: gen, msg: "startup probe"})
			return
		}
		w.send(event{kind: evStarted, ctr: name, gen: gen})
	}
	done := make(chan struct{}, 2)
	if rp := c.ReadinessProbe; rp != nil {
		go func() {
			defer func() { done <- struct{}{} }()
			w.watch(ctx, rp, t, func(ok bool, msg string) {
				if !ok {
					w.a.recorder.Eventf(w.pod, corev1.EventTypeWarning, "Unhealthy", "Readiness probe failed: %s", msg)
				}
				w.send(event{kind: evReady, ctr: name, gen: gen, ok: ok})
			}, false)
		}()
	} else {
		done <- struct{}{}
	}
	if lp := c.LivenessProbe; lp != nil {
		go func() {
			defer func() { done <- struct{}{} }()
			w.watch(ctx, lp, t, func(ok bool, msg string) {
				if !ok {
					w.a.recorder.Eventf(w.pod, corev1.EventTypeWarning, "Unhealthy", "Liveness probe failed: %s", msg)
					w.send(event{kind: evUnhealthy, ctr: name, gen: gen, msg: "liveness probe"})
				}
			}, true)
		}()
	} else {
		done <- struct{}{}
	}
	<-done
	<-done
}

func probeTimes(p *corev1.Probe) (initial, period time.Duration, success, failure int32) {
	initial = time.Duration(p.InitialDelaySeconds) * time.Second
	period = time.Duration(p.PeriodSeconds) * time.Second
	if period <= 0 {
		period = 10 * time.Second
	}
	success, failure = p.SuccessThreshold, p.FailureThreshold
	if success <= 0 {
		success = 1
	}
	if failure <= 0 {
		failure = 3
	}
	return
}

// untilThreshold probes until success (true) or failureThreshold failures.
func (w *worker) untilThreshold(ctx context.Context, p *corev1.Probe, t probe.Target) (bool, string) {
	initial, period, _, failure := probeTimes(p)
	if !sleepCtx(ctx, initial) {
		return false, ""
	}
	var fails int32
	for {
		res, msg := probe.Run(ctx, p, t)
		if res == probe.Success {
			return true, ""
		}
		fails++
		if fails >= failure {
			return false, msg
		}
		if !sleepCtx(ctx, period) {
			return false, ""
		}
	}
}

// watch probes forever, calling report when the thresholded result
// changes; with stopOnFailure it returns after reporting a failure.
func (w *worker) watch(ctx context.Context, p *corev1.Probe, t probe.Target, report func(bool, string), stopOnFailure bool) {
	initial, period, success, failure := probeTimes(p)
	if !sleepCtx(ctx, initial) {
		return
	}
	state := !stopOnFailure // readiness starts "not ready", liveness "alive"
	reported := stopOnFailure
	var succ, fail int32
	for {
		res, msg := probe.Run(ctx, p, t)
		if ctx.Err() != nil {
			return
		}
		if res == probe.Success {
			succ, fail = succ+1, 0
			if succ >= success && (!state || !reported) {
				state, reported = true, true
				if !stopOnFailure {
					report(true, "")
				}
			}
		} else {
			fail, succ = fail+1, 0
			if fail >= failure && (state || !reported) {
				state, reported = false, true
				report(false, msg)
				if stopOnFailure {
					return
				}
			}
		}
		if !sleepCtx(ctx, period) {
			return
		}
	}
}

func sleepCtx(ctx context.Context, d time.Duration) bool {
	if d <= 0 {
		return ctx.Err() == nil
	}
	select {
	case <-ctx.Done():
		return false
	case <-time.After(d):
		return true
	}
}

// ---- kubelet API (nodeserver.Runtime) ----

func (a *Agent) findWorker(namespace, pod string) *worker {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, w := range a.workers {
		if w.namespace == namespace && w.name == pod {
			return w
		}
	}
	return nil
}

// Resolve implements nodeserver.Runtime.
func (a *Agent) Resolve(namespace, pod, container string) (string, string, error) {
	w := a.findWorker(namespace, pod)
	if w == nil {
		return "", "", fmt.Errorf("pod %s/%s on node %s: %w", namespace, pod, a.cfg.NodeName, nodeserver.ErrNotFound)
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if container == "" {
		if len(w.pod.Spec.Containers) == 0 {
			return "", "", fmt.Errorf("pod %s/%s has no containers: %w", namespace, pod, nodeserver.ErrNotFound)
		}
		container = w.pod.Spec.Containers[0].Name
	}
	if _, ok := w.ctrs[container]; !ok {
		return "", "", fmt.Errorf("container %q in pod %s/%s: %w", container, namespace, pod, nodeserver.ErrNotFound)
	}
	return string(w.uid), container, nil
}

// LogPath implements nodeserver.Runtime.
func (a *Agent) LogPath(namespace, pod, container string, previous bool) (string, error) {
	_, name, err := a.Resolve(namespace, pod, container)
	if err != nil {
		return "", err
	}
	w := a.findWorker(namespace, pod)
	w.mu.Lock()
	defer w.mu.Unlock()
	c := w.ctrs[name]
	p := c.logPath
	if previous {
		p = c.prevLogPath
	}
	if p == "" {
		return "", fmt.Errorf("no log for container %q (previous=%t): %w", name, previous, nodeserver.ErrNotFound)
	}
	return p, nil
}

// ExecInContainer implements remotecommand.Executor.
func (a *Agent) ExecInContainer(ctx context.Context, _ string, uid string, container string, argv []string, in io.Reader, out, errw io.WriteCloser, tty bool, resize <-chan remotecommand.TerminalSize, timeout time.Duration) error {
	w := a.worker(types.UID(uid))
	if w == nil {
		return fmt.Errorf("pod %s: %w", uid, nodeserver.ErrNotFound)
	}
	w.mu.Lock()
	c := w.ctrs[container]
	var info execInfo
	if c != nil {
		info = w.execInfoLocked(c)
	}
	w.mu.Unlock()
	if c == nil {
		return fmt.Errorf("container %q: %w", container, nodeserver.ErrNotFound)
	}
	if !info.running {
		return fmt.Errorf("container %q is not running", container)
	}
	if timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, timeout)
		defer cancel()
	}
	var code int
	var err error
	if tty {
		code, err = runTTY(ctx, info, argv, in, out, resize)
	} else {
		var stdout, stderr io.Writer
		if out != nil {
			stdout = out
		}
		if errw != nil {
			stderr = errw
		}
		code, err = runIn(ctx, info, argv, in, stdout, stderr)
	}
	if err != nil {
		return err
	}
	if code != 0 {
		return utilexec.CodeExitError{Err: fmt.Errorf("command terminated with exit code %d", code), Code: code}
	}
	return nil
}

func runTTY(ctx context.Context, info execInfo, argv []string, in io.Reader, out io.Writer, resize <-chan remotecommand.TerminalSize) (int, error) {
	cmd := nsenterCmd(ctx, info, argv)
	cmd.Env = append(cmd.Env, "TERM=xterm")
	ptmx, err := pty.Start(cmd)
	if err != nil {
		return -1, fmt.Errorf("start with a terminal: %w", err)
	}
	defer ptmx.Close()
	go func() {
		for sz := range resize {
			_ = pty.Setsize(ptmx, &pty.Winsize{Rows: sz.Height, Cols: sz.Width})
		}
	}()
	if in != nil {
		go func() { _, _ = io.Copy(ptmx, in) }()
	}
	if out != nil {
		go func() { _, _ = io.Copy(out, ptmx) }()
	}
	err = cmd.Wait()
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.ExitCode(), nil
	}
	return 0, err
}

// PortForward implements portforward.PortForwarder: it connects to
// localhost:port inside the pod's network namespace.
func (a *Agent) PortForward(ctx context.Context, _ string, uid string, port int32, stream io.ReadWriteCloser) error {
	defer stream.Close()
	w := a.worker(types.UID(uid))
	if w == nil {
		return fmt.Errorf("pod %s: %w", uid, nodeserver.ErrNotFound)
	}
	w.mu.Lock()
	path := ""
	if w.sb != nil {
		path = w.sb.path
	}
	hostNet := w.pod.Spec.HostNetwork
	w.mu.Unlock()
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(int(port)))
	var conn net.Conn
	var err error
	switch {
	case hostNet:
		var d net.Dialer
		conn, err = d.DialContext(ctx, "tcp", addr)
	case path == "":
		return errors.New("pod has no network namespace")
	default:
		conn, err = dialIn(ctx, path, addr)
	}
	if err != nil {
		return fmt.Errorf("port-forward to %s in pod: %w", addr, err)
	}
	defer conn.Close()
	errc := make(chan error, 2)
	go func() { _, err := io.Copy(conn, stream); errc <- err }()
	go func() { _, err := io.Copy(stream, conn); errc <- err }()
	select {
	case <-errc:
	case <-ctx.Done():
	}
	return nil
}

// dialIn connects to addr from inside the network namespace at path. The
// socket is created on a thread locked into that namespace; once connected
// it can be used from any thread.
func dialIn(ctx context.Context, path, addr string) (net.Conn, error) {
	type result struct {
		c   net.Conn
		err error
	}
	res := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		// The thread is never unlocked: the runtime discards it instead of
		// reusing a thread that might still be in the pod's namespace.
		target, err := vnetns.GetFromPath(path)
		if err != nil {
			res <- result{err: fmt.Errorf("open netns %s: %w", path, err)}
			return
		}
		defer target.Close()
		if err := vnetns.Set(target); err != nil {
			res <- result{err: fmt.Errorf("enter netns %s: %w", path, err)}
			return
		}
		var d net.Dialer
		c, err := d.DialContext(ctx, "tcp", addr)
		res <- result{c, err}
	}()
	r := <-res
	return r.c, r.err
}

// AttachContainer implements remotecommand.Attacher: it feeds in to the
// container's stdin (when it has one; closing it after the session for
// stdinOnce) and streams the container's output, from the start of its
// current log, until the container exits or the client goes away. The
// container has no terminal; tty requests get plain streams.
func (a *Agent) AttachContainer(ctx context.Context, _ string, uid string, container string, in io.Reader, out, errw io.WriteCloser, _ bool, _ <-chan remotecommand.TerminalSize) error {
	w := a.worker(types.UID(uid))
	if w == nil {
		return fmt.Errorf("pod %s: %w", uid, nodeserver.ErrNotFound)
	}
	w.mu.Lock()
	c := w.ctrs[container]
	if c == nil {
		w.mu.Unlock()
		return fmt.Errorf("container %q: %w", container, nodeserver.ErrNotFound)
	}
	gen, logPath, stdin, once := c.gen, c.logPath, c.stdin, c.spec.StdinOnce
	running := c.running
	w.mu.Unlock()
	if !running {
		return fmt.Errorf("container %q is not running", container)
	}
	if in != nil && stdin != nil {
		go func() {
			_, _ = io.Copy(stdin, in)
			if once {
				w.mu.Lock()
				if c.gen == gen && c.stdin == stdin {
					c.stdin.Close()
					c.stdin = nil
				}
				w.mu.Unlock()
			}
		}()
	}
	if out == nil {
		out = errw
	}
	if out == nil {
		<-ctx.Done()
		return nil
	}
	f, err := os.Open(logPath)
	if err != nil {
		return fmt.Errorf("open container output: %w", err)
	}
	defer f.Close()
	buf := make([]byte, 32<<10)
	for {
		for {
			n, rerr := f.Read(buf)
			if n > 0 {
				if _, err := out.Write(buf[:n]); err != nil {
					return nil
				}
			}
			if rerr != nil {
				break
			}
		}
		w.mu.Lock()
		done := c.gen != gen || !c.running
		w.mu.Unlock()
		if done {
			// Drain what the container wrote before it exited.
			_, _ = io.CopyBuffer(out, f, buf)
			return nil
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(100 * time.Millisecond):
		}
	}
}
