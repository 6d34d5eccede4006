// Command amesh-cluster starts and stops the local cluster (see package
// e2e/cluster): `up` starts it in the background and returns once it is
// ready, printing progress and the KUBECONFIG; `down` removes everything it
// created; `status` reports on it; `run` runs it in the foreground.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/amesh-dev/amesh/e2e/cluster"
)

const usage = `usage: amesh-cluster <up|down|status|run> [flags]

  up      start the cluster in the background; print progress, the time to
          Ready nodes and the KUBECONFIG (does nothing if it already runs)
  down    stop the cluster and remove everything it created (idempotent)
  status  report whether the cluster runs
  run     run the cluster in the foreground until interrupted
`

func main() {
	if len(os.Args) < 2 {
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
	verb := os.Args[1]
	fs := flag.NewFlagSet("amesh-cluster "+verb, flag.ExitOnError)
	cfg := bindFlags(fs)
	_ = fs.Parse(os.Args[2:])
	cfg.Default()
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	var err error
	switch verb {
	case "up":
		err = up(ctx, cfg)
	case "down":
		err = down(ctx, cfg)
	case "status":
		err = status(cfg)
	case "run":
		err = run(ctx, cfg)
	default:
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "amesh-cluster:", err)
		os.Exit(1)
	}
}

type prefixFlag struct{ p *netip.Prefix }

func (f prefixFlag) String() string {
	if f.p == nil || !f.p.IsValid() {
		return ""
	}
	return f.p.String()
}

func (f prefixFlag) Set(s string) error {
	p, err := netip.ParsePrefix(s)
	if err != nil {
		return err
	}
	*f.p = p
	return nil
}

func bindFlags(fs *flag.FlagSet) *cluster.Config {
	c := &cluster.Config{}
	self, _ := os.Executable()
	selfDir := filepath.Dir(self)
	fs.StringVar(&c.Name, "name", "amesh", "cluster name (1-8 of [a-z0-9]); host objects are named am-<name>…")
	fs.StringVar(&c.StateDir, "state-dir", "", "state directory (default /var/lib/amesh-cluster/<name>)")
	fs.IntVar(&c.Nodes, "nodes", 2, "number of nodes")
	fs.Var(prefixFlag{&c.NodeCIDR}, "node-cidr", "bridge network of the nodes (default 172.30.0.0/24)")
	fs.Var(prefixFlag{&c.PodCIDR}, "pod-cidr", "pod network, one /24 per node (default 10.244.0.0/16)")
	fs.Var(prefixFlag{&c.ServiceCIDR}, "service-cidr", "ClusterIP range (default 10.96.0.0/16)")
	fs.StringVar(&c.ProxyMode, "proxy-mode", "iptables", "kube-proxy mode: iptables or nftables")
	fs.IntVar(&c.APIServerPort, "apiserver-port", 6443, "kube-apiserver port (on the bridge address)")
	fs.StringVar(&c.KubeBinDir, "kube-bin-dir", os.Getenv("KUBEBUILDER_ASSETS"), "directory with kube-apiserver, kube-controller-manager, kube-scheduler, kube-proxy and etcd")
	fs.StringVar(&c.CoreDNS, "coredns", filepath.Join(selfDir, "coredns"), "CoreDNS binary")
	fs.StringVar(&c.NodeBinary, "node-binary", filepath.Join(selfDir, "amesh-node"), "amesh-node binary")
	fs.StringVar(&c.BinDir, "bin-dir", selfDir, "directory of the binaries the image table maps images to")
	fs.StringVar(&c.ImagesFile, "images", "", "extra image table (YAML) consulted before the built-in one")
	fs.DurationVar(&c.ReadyTimeout, "timeout", 5*time.Minute, "how long up waits for the cluster to be ready")
	fs.DurationVar(&c.RestartBackoff, "restart-backoff", 10*time.Second, "first crash-loop back-off of containers")
	fs.IntVar(&c.DNSReplicas, "dns-replicas", 2, "CoreDNS replicas")
	return c
}

func logPath(cfg *cluster.Config) string { return cfg.StateDir + ".log" }

func run(ctx context.Context, cfg *cluster.Config) error {
	zc := zap.NewProductionConfig()
	zc.EncoderConfig.TimeKey = "ts"
	zc.EncoderConfig.EncodeTime = zapcore.ISO8601TimeEncoder
	zc.OutputPaths = []string{"stderr"}
	log, err := zc.Build()
	if err != nil {
		return err
	}
	defer func() { _ = log.Sync() }()
	c, err := cluster.New(*cfg, log, os.Stdout)
	if err != nil {
		return err
	}
	return c.Run(ctx, func(info cluster.Info) {
		printReady(os.Stdout, info)
	})
}

func printReady(w io.Writer, info cluster.Info) {
	fmt.Fprintf(w, "\ncluster %q is ready (Kubernetes %s, nodes %s)\n", info.Name, info.Version, strings.Join(info.Nodes, ", "))
	fmt.Fprintf(w, "  time to Ready nodes: %.1fs, to cluster DNS: %.1fs\n", info.NodesReady.Seconds(), info.Ready.Seconds())
	fmt.Fprintf(w, "  export KUBECONFIG=%s\n", info.Kubeconfig)
}

// up starts `run` detached and follows its output until the cluster is
// ready, the process fails, or the timeout passes.
func up(ctx context.Context, cfg *cluster.Config) error {
	if err := cfg.Validate(); err != nil {
		return err
	}
	st, err := cluster.Status(*cfg)
	if err != nil {
		return err
	}
	if st.Running && st.Info != nil {
		fmt.Printf("cluster %q is already running (pid %d)\n", cfg.Name, st.PID)
		printReady(os.Stdout, *st.Info)
		return nil
	}
	if st.Running {
		return fmt.Errorf("cluster %q is starting (pid %d); wait, or run down first", cfg.Name, st.PID)
	}
	// Whatever an earlier crashed run left behind goes first.
	if err := cluster.Down(ctx, *cfg); err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(cfg.StateDir), 0o755); err != nil {
		return err
	}
	lp := logPath(cfg)
	logf, err := os.OpenFile(lp, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	args := append([]string{"run"}, os.Args[2:]...)
	cmd := exec.Command(self, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return fmt.Errorf("start cluster process: %w", err)
	}
	logf.Close()
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	fmt.Printf("starting cluster %q (pid %d, log %s)\n", cfg.Name, cmd.Process.Pid, lp)

	in, err := os.Open(lp)
	if err != nil {
		return err
	}
	defer in.Close()
	deadline := time.After(cfg.ReadyTimeout)
	buf := make([]byte, 64<<10)
	for {
		for {
			n, _ := in.Read(buf)
			if n == 0 {
				break
			}
			printProgress(buf[:n])
		}
		if st, _ := cluster.Status(*cfg); st.Running && st.Info != nil {
			printReady(os.Stdout, *st.Info)
			return nil
		}
		select {
		case err := <-exited:
			for n, _ := in.Read(buf); n > 0; n, _ = in.Read(buf) {
				printProgress(buf[:n])
			}
			return fmt.Errorf("cluster process exited before the cluster was ready (%v); see %s", err, lp)
		case <-deadline:
			_ = cmd.Process.Signal(syscall.SIGTERM)
			return fmt.Errorf("cluster not ready after %s; stopping it (see %s)", cfg.ReadyTimeout, lp)
		case <-ctx.Done():
			_ = cmd.Process.Signal(syscall.SIGTERM)
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// printProgress shows the run's progress lines, not its structured logs.
func printProgress(b []byte) {
	for _, l := range strings.SplitAfter(string(b), "\n") {
		if strings.HasPrefix(l, "[") {
			fmt.Print(l)
		}
	}
}

func down(ctx context.Context, cfg *cluster.Config) error {
	start := time.Now()
	if err := cluster.Down(ctx, *cfg); err != nil {
		return err
	}
	if err := os.Remove(logPath(cfg)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	fmt.Printf("cluster %q removed (%.1fs)\n", cfg.Name, time.Since(start).Seconds())
	return nil
}

func status(cfg *cluster.Config) error {
	st, err := cluster.Status(*cfg)
	if err != nil {
		return err
	}
	switch {
	case st.Running && st.Info != nil:
		fmt.Printf("cluster %q: running (pid %d)\n", cfg.Name, st.PID)
		printReady(os.Stdout, *st.Info)
	case st.Running:
		fmt.Printf("cluster %q: starting (pid %d)\n", cfg.Name, st.PID)
	default:
		fmt.Printf("cluster %q: not running\n", cfg.Name)
	}
	return nil
}
