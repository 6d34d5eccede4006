// Package kubetest runs a real kube-apiserver and etcd (envtest) for
// integration tests, with the amesh and Gateway API CRDs of this
// repository, and makes sure the servers stop: at the end of the test, when
// the test binary is interrupted, and shortly before `go test -timeout`
// would kill it (envtest starts them in their own process group, so a
// killed test would otherwise leak them).
package kubetest

import (
	"errors"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
)

// Options select what the environment installs.
type Options struct {
	// NoCRDs starts a bare apiserver (for "CRDs missing" tests).
	NoCRDs bool
	// GarbageCollector also runs kube-controller-manager's garbage
	// collector (and only it), so that owner references take effect.
	GarbageCollector bool
	// AdmissionPlugins are enabled besides the apiserver's defaults (for
	// example OwnerReferencesPermissionEnforcement, as OpenShift runs).
	AdmissionPlugins []string
	// ServiceClusterIPRange replaces envtest's /24 of Service cluster IPs
	// (254 Services at most), for tests that need more Services.
	ServiceClusterIPRange string
}

// Env is a running apiserver.
type Env struct {
	// Config reaches the apiserver as an administrator.
	Config *rest.Config
	// Environment is envtest's handle (AddUser for restricted users).
	Environment *envtest.Environment
}

// Start starts the apiserver and etcd and stops them when t ends. It skips
// t when the pinned binaries are not available (make kube-bins builds
// them; make unit points KUBEBUILDER_ASSETS at them).
func Start(t testing.TB, opts Options) *Env {
	t.Helper()
	assets, err := Assets()
	if err != nil {
		t.Skipf("needs the pinned kube-apiserver and etcd (make kube-bins): %v", err)
	}
	te := &envtest.Environment{BinaryAssetsDirectory: assets, ErrorIfCRDPathMissing: true}
	if len(opts.AdmissionPlugins) > 0 {
		te.ControlPlane.GetAPIServer().Configure().Append("enable-admission-plugins", strings.Join(opts.AdmissionPlugins, ","))
	}
	if opts.ServiceClusterIPRange != "" {
		te.ControlPlane.GetAPIServer().Configure().Set("service-cluster-ip-range", opts.ServiceClusterIPRange)
	}
	if !opts.NoCRDs {
		dirs, err := CRDDirs()
		if err != nil {
			t.Fatal(err)
		}
		te.CRDDirectoryPaths = dirs
	}
	// The guard is in place before anything starts: a signal or the
	// deadline during the start still kills what was started.
	var (
		once   sync.Once
		stopMu sync.Mutex
		stopGC = func() error { return nil }
	)
	stop := func() error {
		var err error
		once.Do(func() {
			stopMu.Lock()
			defer stopMu.Unlock()
			err = errors.Join(stopGC(), te.Stop())
		})
		return err
	}
	guard(t, assets, stop)
	cfg, err := te.Start()
	if err != nil {
		t.Fatalf("start kube-apiserver and etcd: %v", err)
	}
	if opts.GarbageCollector {
		stopMu.Lock()
		stopGC, err = startGC(t, te, assets)
		stopMu.Unlock()
		if err != nil {
			t.Fatalf("start the garbage collector: %v", err)
		}
	}
	return &Env{Config: cfg, Environment: te}
}

// startGC runs kube-controller-manager with only the garbage collector,
// as an administrator, serving nothing. It dies with the test process.
func startGC(t testing.TB, te *envtest.Environment, assets string) (func() error, error) {
	user, err := te.AddUser(envtest.User{Name: "kube-controller-manager", Groups: []string{"system:masters"}}, nil)
	if err != nil {
		return nil, err
	}
	kc, err := user.KubeConfig()
	if err != nil {
		return nil, err
	}
	dir := t.TempDir()
	path := filepath.Join(dir, "kubeconfig")
	if err := os.WriteFile(path, kc, 0o600); err != nil {
		return nil, err
	}
	logPath := filepath.Join(dir, "kube-controller-manager.log")
	logf, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	t.Cleanup(func() {
		if !t.Failed() {
			return
		}
		if b, err := os.ReadFile(logPath); err == nil {
			lines := strings.Split(strings.TrimSpace(string(b)), "\n")
			t.Logf("kube-controller-manager (last lines):\n%s", strings.Join(lines[max(0, len(lines)-30):], "\n"))
		}
	})
	cmd := exec.Command(filepath.Join(assets, "kube-controller-manager"),
		"--kubeconfig="+path,
		"--controllers=garbagecollector",
		"--leader-elect=false",
		"--secure-port=0",
	)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		_ = logf.Close()
		return nil, err
	}
	exited := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		_ = logf.Close()
		close(exited)
	}()
	var once sync.Once
	return func() error {
		once.Do(func() {
			_ = cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-exited:
			case <-time.After(10 * time.Second):
				_ = cmd.Process.Kill()
				<-exited
			}
		})
		return nil
	}, nil
}

// guard stops the servers when t ends; on SIGINT/SIGTERM (then re-raises
// the signal) and a little before t's deadline it kills them first, as
// there is no time for a graceful stop.
func guard(t testing.TB, assets string, stop func() error) {
	done := make(chan struct{})
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	var deadline <-chan time.Time
	if d, ok := t.(interface{ Deadline() (time.Time, bool) }); ok {
		if dl, ok := d.Deadline(); ok {
			left := time.Until(dl)
			timer := time.NewTimer(left - min(15*time.Second, left/3))
			t.Cleanup(func() { timer.Stop() })
			deadline = timer.C
		}
	}
	var wg sync.WaitGroup
	wg.Go(func() {
		select {
		case <-done:
		case s := <-sigs:
			killChildren(assets)
			_ = stop()
			signal.Stop(sigs)
			if p, err := os.FindProcess(os.Getpid()); err == nil {
				_ = p.Signal(s)
			}
		case <-deadline:
			// The test binary is about to be killed for its timeout.
			killChildren(assets)
			_ = stop()
		}
	})
	t.Cleanup(func() {
		close(done)
		wg.Wait()
		signal.Stop(sigs)
		if err := stop(); err != nil {
			t.Errorf("stop kube-apiserver and etcd: %v", err)
		}
	})
}

// killChildren sends SIGKILL to this process's children whose executable
// is in dir (the apiserver, etcd, kube-controller-manager).
func killChildren(dir string) {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return
	}
	if real, err := filepath.EvalSymlinks(dir); err == nil {
		dir = real
	}
	self := os.Getpid()
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		stat, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		// pid (comm) state ppid …; comm may contain spaces.
		i := strings.LastIndexByte(string(stat), ')')
		if i < 0 {
			continue
		}
		fields := strings.Fields(string(stat[i+1:]))
		if len(fields) < 2 {
			continue
		}
		if ppid, err := strconv.Atoi(fields[1]); err != nil || ppid != self {
			continue
		}
		exe, err := os.Readlink(filepath.Join("/proc", e.Name(), "exe"))
		if err != nil || filepath.Dir(exe) != filepath.Clean(dir) {
			continue
		}
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
}

// Assets is the directory holding kube-apiserver and etcd:
// $KUBEBUILDER_ASSETS, else what `make print-kube-bin` prints when the
// binaries are there (never building them).
func Assets() (string, error) {
	if d := os.Getenv("KUBEBUILDER_ASSETS"); d != "" {
		return d, nil
	}
	root, err := RepoRoot()
	if err != nil {
		return "", err
	}
	out, err := exec.Command("make", "-s", "-C", root, "print-kube-bin").Output()
	if err != nil {
		return "", errors.New("KUBEBUILDER_ASSETS is unset and make print-kube-bin failed")
	}
	dir := strings.TrimSpace(string(out))
	for _, b := range []string{"kube-apiserver", "etcd"} {
		if _, err := os.Stat(filepath.Join(dir, b)); err != nil {
			return "", errors.New("KUBEBUILDER_ASSETS is unset and " + dir + " has no " + b)
		}
	}
	return dir, nil
}

// RepoRoot is the repository's top directory.
func RepoRoot() (string, error) {
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		return "", errors.New("kubetest: cannot locate the source tree")
	}
	// controller/internal/kubetest/kubetest.go
	root := filepath.Join(filepath.Dir(file), "..", "..", "..")
	if _, err := os.Stat(filepath.Join(root, "manifests")); err != nil {
		return "", errors.New("kubetest: no manifests directory at " + root)
	}
	return filepath.Clean(root), nil
}

// CRDDirs are the amesh CRDs and the pinned Gateway API CRDs (experimental
// channel, a superset of standard) as the manifests install them.
func CRDDirs() ([]string, error) {
	root, err := RepoRoot()
	if err != nil {
		return nil, err
	}
	return []string{
		filepath.Join(root, "manifests", "base", "crds"),
		filepath.Join(root, "manifests", "gateway-api", "experimental"),
	}, nil
}
