package node

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"go.uber.org/zap"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/amesh-dev/amesh/e2e/internal/cgroup"
	"github.com/amesh-dev/amesh/e2e/internal/image"
	"github.com/amesh-dev/amesh/e2e/internal/probe"
	"github.com/amesh-dev/amesh/e2e/internal/sandbox"
)

// ctr is the runtime state of one container of a pod.
type ctr struct {
	spec    *corev1.Container
	init    bool
	sidecar bool

	gen         int // incremented at every start
	cmd         *exec.Cmd
	id          string
	running     bool
	stopping    bool
	killed      bool
	killAt      time.Time
	startedAt   time.Time
	term        *corev1.ContainerStateTerminated // last exit
	restarts    int32
	everStarted bool
	nextStart   time.Time
	backoff     time.Duration
	// startBackoff spaces retries of a container that could not start.
	startBackoff time.Duration
	ready        bool
	started      bool
	probeCancel  context.CancelFunc
	startErr     string
	waitReason   string

	// stdin feeds the container's standard input (spec.stdin); nil when
	// the container has none or it was closed (stdinOnce).
	stdin       *os.File
	cgroup      string
	logPath     string
	prevLogPath string
	termLogPath string
	env         []string
	uid, gid    uint32
	dir         string
}

// execInfo is what running a command in a container needs.
type execInfo struct {
	pid      int
	env      []string
	uid, gid uint32
	cgroup   string
	running  bool
}

func (w *worker) execInfoLocked(c *ctr) execInfo {
	i := execInfo{env: c.env, uid: c.uid, gid: c.gid, cgroup: c.cgroup, running: c.running}
	if c.cmd != nil && c.cmd.Process != nil {
		i.pid = c.cmd.Process.Pid
	}
	return i
}

func jsonMarshal(v any) ([]byte, error) { return json.Marshal(v) }

func newID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

func (a *Agent) podLogDir(ns, name string, uid types.UID) string {
	return filepath.Join(a.cfg.LogDir, ns+"_"+name+"_"+string(uid))
}

// command computes argv per Kubernetes' rules on image entrypoint/cmd.
func command(c *corev1.Container, img image.Entry, env []string) ([]string, error) {
	lookup := func(k string) (string, bool) {
		for i := len(env) - 1; i >= 0; i-- {
			if v, ok := strings.CutPrefix(env[i], k+"="); ok {
				return v, true
			}
		}
		return "", false
	}
	var argv []string
	switch {
	case len(c.Command) > 0:
		argv = append(argv, c.Command...)
		argv = append(argv, c.Args...)
	case len(c.Args) > 0:
		argv = append(append(argv, img.Entrypoint...), c.Args...)
	default:
		argv = append(append(argv, img.Entrypoint...), img.Cmd...)
	}
	if len(argv) == 0 {
		return nil, errors.New("no command specified and the image has no entrypoint")
	}
	for i := range argv {
		argv[i] = expand(argv[i], lookup)
	}
	return argv, nil
}

// startContainer builds the container's sandbox and starts it. Called with
// the worker's mu held.
func (w *worker) startContainer(ctx context.Context, c *ctr) error {
	a := w.a
	pod := w.pod
	img, err := a.images.Resolve(c.spec.Image)
	if err != nil {
		c.waitReason = "ErrImagePull"
		return err
	}
	for in, host := range img.Files {
		if _, err := os.Stat(host); err != nil {
			c.waitReason = "ErrImagePull"
			return fmt.Errorf("image %s: file %s for %s is missing (build it first): %w", c.spec.Image, host, in, err)
		}
	}
	// Downward API fields about the pod's addresses come from the sandbox:
	// the API object may not carry them yet.
	envPod := pod.DeepCopy()
	envPod.Status.HostIP = a.cfg.NodeIP.String()
	envPod.Status.HostIPs = []corev1.HostIP{{IP: envPod.Status.HostIP}}
	envPod.Status.PodIPs = nil
	for _, ip := range w.sb.ips {
		envPod.Status.PodIPs = append(envPod.Status.PodIPs, corev1.PodIP{IP: ip.String()})
	}
	envPod.Status.PodIP = envPod.Status.PodIPs[0].IP
	env, err := a.containerEnv(ctx, envPod, c.spec, img.Env)
	if err != nil {
		c.waitReason = "CreateContainerConfigError"
		return err
	}
	argv, err := command(c.spec, img, env)
	if err != nil {
		c.waitReason = "CreateContainerConfigError"
		return err
	}
	spec := &sandbox.Spec{
		Hostname:     podHostname(pod, a.cfg.NodeName),
		Args:         argv,
		Env:          env,
		Dir:          c.spec.WorkingDir,
		ReadOnlyRoot: false,
	}
	if !pod.Spec.HostNetwork {
		spec.Netns = w.sb.path
	}
	psc := pod.Spec.SecurityContext
	sc := c.spec.SecurityContext
	privileged := sc != nil && sc.Privileged != nil && *sc.Privileged
	spec.Privileged = privileged
	if sc != nil && sc.ReadOnlyRootFilesystem != nil {
		spec.ReadOnlyRoot = *sc.ReadOnlyRootFilesystem
	}
	if !privileged {
		var add, drop []string
		if sc != nil && sc.Capabilities != nil {
			for _, x := range sc.Capabilities.Add {
				add = append(add, string(x))
			}
			for _, x := range sc.Capabilities.Drop {
				drop = append(drop, string(x))
			}
		}
		caps, err := sandbox.CapSet(add, drop)
		if err != nil {
			c.waitReason = "CreateContainerConfigError"
			return err
		}
		spec.Caps = caps
		if spec.Caps == nil {
			spec.Caps = nil // "ALL"
		}
		if sc != nil && sc.AllowPrivilegeEscalation != nil && !*sc.AllowPrivilegeEscalation {
			spec.NoNewPrivs = true
		}
	}
	uid, gid := uint32(0), uint32(0)
	if psc != nil && psc.RunAsUser != nil {
		uid = uint32(*psc.RunAsUser)
	}
	if psc != nil && psc.RunAsGroup != nil {
		gid = uint32(*psc.RunAsGroup)
	}
	if sc != nil && sc.RunAsUser != nil {
		uid = uint32(*sc.RunAsUser)
	}
	if sc != nil && sc.RunAsGroup != nil {
		gid = uint32(*sc.RunAsGroup)
	}
	if sc != nil && sc.RunAsNonRoot != nil && *sc.RunAsNonRoot && uid == 0 {
		c.waitReason = "CreateContainerConfigError"
		return errors.New("container has runAsNonRoot and would run as root")
	}
	if uid != 0 || gid != 0 {
		spec.UID, spec.GID = &uid, &gid
	}
	if psc != nil {
		for _, g := range psc.SupplementalGroups {
			spec.Groups = append(spec.Groups, uint32(g))
		}
		if psc.FSGroup != nil {
			spec.Groups = append(spec.Groups, uint32(*psc.FSGroup))
		}
		if !pod.Spec.HostNetwork {
			spec.Sysctls = map[string]string{}
			for _, s := range psc.Sysctls {
				spec.Sysctls[s.Name] = s.Value
			}
		}
	}

	ctrDir := filepath.Join(a.cfg.StateDir, "pods", string(w.uid), "containers", c.spec.Name)
	scratch := filepath.Join(ctrDir, "rootfs")
	if err := os.MkdirAll(scratch, 0o755); err != nil {
		return err
	}
	spec.Scratch = scratch
	// The container gets its own /run and /tmp; the node agent's private
	// state is hidden.
	spec.Mounts = append(spec.Mounts,
		sandbox.Mount{Type: "tmpfs", Target: "/run", Data: "mode=755"},
		sandbox.Mount{Type: "tmpfs", Target: "/tmp", Data: "mode=1777"},
	)
	for _, m := range a.cfg.Masks {
		spec.Mounts = append(spec.Mounts, sandbox.Mount{Type: "tmpfs", Target: m, Data: "mode=755,size=4k", ReadOnly: true})
	}
	ins := make([]string, 0, len(img.Files))
	for in := range img.Files {
		ins = append(ins, in)
	}
	slices.Sort(ins)
	for _, in := range ins {
		spec.Mounts = append(spec.Mounts, sandbox.Mount{Type: "bind", Source: img.Files[in], Target: in, ReadOnly: true})
	}
	for _, vm := range c.spec.VolumeMounts {
		mv, ok := w.vols[vm.Name]
		if !ok {
			c.waitReason = "CreateContainerConfigError"
			return fmt.Errorf("volume mount %q: no such volume", vm.Name)
		}
		src := mv.Path
		sub := vm.SubPath
		if vm.SubPathExpr != "" {
			sub = expand(vm.SubPathExpr, func(k string) (string, bool) {
				for _, e := range env {
					if v, ok := strings.CutPrefix(e, k+"="); ok {
						return v, true
					}
				}
				return "", false
			})
		}
		if sub != "" {
			if filepath.IsAbs(sub) || slices.Contains(strings.Split(sub, "/"), "..") {
				c.waitReason = "CreateContainerConfigError"
				return fmt.Errorf("volume mount %q: invalid subPath %q", vm.Name, sub)
			}
			src = filepath.Join(src, sub)
			if _, err := os.Stat(src); errors.Is(err, os.ErrNotExist) {
				if err := os.MkdirAll(src, 0o755); err != nil {
					return fmt.Errorf("create subPath %s: %w", sub, err)
				}
			}
		}
		prop := sandbox.PropagationPrivate
		if vm.MountPropagation != nil {
			switch *vm.MountPropagation {
			case corev1.MountPropagationHostToContainer:
				prop = sandbox.PropagationSlave
			case corev1.MountPropagationBidirectional:
				prop = sandbox.PropagationShared
			}
		}
		spec.Mounts = append(spec.Mounts, sandbox.Mount{
			Type: "bind", Source: src, Target: vm.MountPath,
			ReadOnly: vm.ReadOnly || mv.ReadOnly, Propagation: prop,
		})
	}
	// Termination message file (not under a privileged container's /dev,
	// which is the host's).
	termLog := filepath.Join(ctrDir, "termination-log")
	tmp := c.spec.TerminationMessagePath
	if tmp == "" {
		tmp = corev1.TerminationMessagePathDefault
	}
	c.termLogPath = ""
	if !(privileged && strings.HasPrefix(tmp, "/dev/")) {
		if err := os.WriteFile(termLog, nil, 0o666); err != nil {
			return err
		}
		c.termLogPath = termLog
		spec.Mounts = append(spec.Mounts, sandbox.Mount{Type: "bind", Source: termLog, Target: tmp})
	}
	ips := w.sb.ips
	spec.Files = []sandbox.File{
		{Path: "/etc/hosts", Content: a.hostsFile(pod, ips, a.hostHosts)},
		{Path: "/etc/resolv.conf", Content: a.resolvConf(pod, a.hostResolv)},
		{Path: "/etc/hostname", Content: []byte(spec.Hostname + "\n")},
	}

	logDir := filepath.Join(a.podLogDir(w.namespace, w.name, w.uid), c.spec.Name)
	if err := os.MkdirAll(logDir, 0o755); err != nil {
		return err
	}
	logPath := filepath.Join(logDir, strconv.Itoa(int(c.restarts))+".log")
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("open container log: %w", err)
	}
	defer logf.Close()
	cg := filepath.Join(a.cfg.CgroupDir, "pods", string(w.uid), c.spec.Name)
	_ = cgroup.Remove(cg, 5*time.Second)
	if err := cgroup.Create(cg); err != nil {
		return err
	}
	cgf, err := cgroup.Open(cg)
	if err != nil {
		return err
	}
	defer cgf.Close()

	var stdinR, stdinW *os.File
	if c.spec.Stdin {
		if stdinR, stdinW, err = os.Pipe(); err != nil {
			return fmt.Errorf("stdin pipe: %w", err)
		}
	}
	opts := sandbox.Options{
		Helper: a.cfg.Helper, Stdout: logf, Stderr: logf, Cgroup: cgf, NewIPC: true, Pdeathsig: syscall.SIGKILL, Spawner: a.spawner,
	}
	if stdinR != nil {
		opts.Stdin = stdinR
	}
	cmd, err := sandbox.Start(spec, opts)
	if stdinR != nil {
		stdinR.Close()
	}
	if err != nil {
		if stdinW != nil {
			stdinW.Close()
		}
		c.waitReason = "RunContainerError"
		if errors.Is(err, sandbox.ErrInit) {
			c.waitReason = "CreateContainerError"
		}
		return err
	}
	c.gen++
	c.cmd = cmd
	c.stdin = stdinW
	c.id = "amesh://" + newID()
	c.running, c.stopping, c.killed = true, false, false
	c.startedAt = time.Now()
	c.ready = c.spec.ReadinessProbe == nil
	c.started = c.spec.StartupProbe == nil
	if c.logPath != logPath {
		if c.prevLogPath != "" {
			_ = os.Remove(c.prevLogPath)
		}
		c.prevLogPath = c.logPath
	}
	c.logPath = logPath
	c.cgroup = cg
	c.env = env
	c.uid, c.gid = uid, gid
	c.dir = c.spec.WorkingDir
	w.log.Info("container started", zap.String("container", c.spec.Name), zap.Int("pid", cmd.Process.Pid), zap.Strings("argv", argv))

	gen := c.gen
	name := c.spec.Name
	w.bg.Go(func() {
		_ = cmd.Wait()
		st := exitStatus{at: time.Now()}
		if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); ok {
			if ws.Signaled() {
				st.signal = ws.Signal()
			} else {
				st.code = int32(ws.ExitStatus())
			}
		}
		w.send(event{kind: evExited, ctr: name, gen: gen, exit: st})
	})
	if c.spec.ReadinessProbe != nil || c.spec.LivenessProbe != nil || c.spec.StartupProbe != nil {
		pctx, cancel := context.WithCancel(w.ctx)
		c.probeCancel = cancel
		target := probe.Target{PodIP: w.podIP(), Container: c.spec, Exec: w.probeExec(c)}
		if pod.Spec.HostNetwork {
			target.PodIP = a.cfg.NodeIP.String()
		}
		spec := c.spec
		w.bg.Go(func() { w.probeLoop(pctx, name, gen, spec, target) })
	}
	if c.spec.Lifecycle != nil && c.spec.Lifecycle.PostStart != nil {
		info := w.execInfoLocked(c)
		podIP := w.podIP()
		hook := c.spec.Lifecycle.PostStart
		cspec := c.spec
		w.bg.Go(func() {
			hctx, cancel := context.WithTimeout(w.ctx, 30*time.Second)
			defer cancel()
			if err := a.runHook(hctx, hook, info, podIP, cspec); err != nil {
				w.log.Warn("postStart hook failed; killing container", zap.String("container", name), zap.Error(err))
				w.send(event{kind: evUnhealthy, ctr: name, gen: gen, msg: "postStart hook: " + err.Error()})
			}
		})
	}
	return nil
}

// terminationMessage reads the container's termination message, or falls
// back to its log tail when asked to.
func terminationMessage(c *ctr) string {
	if c.termLogPath != "" {
		if b, err := os.ReadFile(c.termLogPath); err == nil && len(b) > 0 {
			if len(b) > 4096 {
				b = b[:4096]
			}
			return string(b)
		}
	}
	if c.spec.TerminationMessagePolicy == corev1.TerminationMessageFallbackToLogsOnError && c.logPath != "" {
		b, err := os.ReadFile(c.logPath)
		if err != nil {
			return ""
		}
		lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
		if len(lines) > 80 {
			lines = lines[len(lines)-80:]
		}
		s := strings.Join(lines, "\n")
		if len(s) > 2048 {
			s = s[len(s)-2048:]
		}
		return s
	}
	return ""
}
