// Package agent is the amesh node agent (amesh-cni-agent): it installs
// the amesh-cni plugin, answers it over agentapi, watches this node's pods
// and the namespaces, enrols pods (capture rules in their netns, hand-off
// to ztunnel over ZDS, redirection annotation) and unenrols them, and
// serves health and metrics.
package agent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.uber.org/zap"
	"golang.org/x/sync/errgroup"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/amesh-dev/amesh/cni-plugin/internal/agentapi"
	"github.com/amesh-dev/amesh/cni-plugin/internal/install"
	"github.com/amesh-dev/amesh/cni-plugin/internal/zdsserver"
)

// Agent is a configured node agent.
type Agent struct {
	cfg Config
	log *zap.Logger
}

// New allocates an Agent; cfg must be valid.
func New(cfg Config, log *zap.Logger) *Agent { return &Agent{cfg: cfg, log: log} }

func (a *Agent) restConfig() (*rest.Config, error) {
	if a.cfg.RestConfig != nil {
		return a.cfg.RestConfig, nil
	}
	if a.cfg.Kubeconfig != "" {
		return clientcmd.BuildConfigFromFlags("", a.cfg.Kubeconfig)
	}
	return rest.InClusterConfig()
}

// listenUnix listens on a unix stream socket, replacing a stale one.
func listenUnix(path string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, err
	}
	if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
		c.Close()
		return nil, fmt.Errorf("%s: another agent is listening", path)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, err
	}
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, err
	}
	return ln, nil
}

// Run runs the agent until ctx is done and returns after every part has
// stopped.
func (a *Agent) Run(ctx context.Context) error {
	cfg, log := a.cfg, a.log
	rc, err := a.restConfig()
	if err != nil {
		return fmt.Errorf("agent: kubernetes config: %w", err)
	}
	client, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return fmt.Errorf("agent: kubernetes client: %w", err)
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))

	node := NewNode(log.Named("node"), nil, cfg.NodeName, cfg.ProcRoot, cfg.HostNetns, cfg.LeaveTimeout)
	watch := NewWatcher(log.Named("watch"), client, node, cfg.NodeName, cfg.ExcludeNamespaces, cfg.Resync)
	zsrv := zdsserver.New(zdsserver.Config{Socket: cfg.ZDSSocket, AckTimeout: cfg.AckTimeout,
		Snapshot: node.Snapshot, SnapshotResult: node.SnapshotResult, Ready: watch.Initialized(),
		Logger: log.Named("zds"), Registerer: reg})
	node.SetZDS(zsrv)
	node.SetNotify(func(info PodInfo, acked bool) {
		if acked {
			watch.Enqueue(info.Namespace, info.Name) // annotate enabled
		} else {
			watch.Retry(info.Namespace, info.Name)
		}
	})
	handler := &cniHandler{log: log.Named("cni"), node: node, watch: watch, exclude: cfg.ExcludeNamespaces}
	enrolled := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "amesh_cni_enrolled_pods", Help: "Pods of this node whose traffic is redirected to ztunnel.",
	}, func() float64 { return float64(len(node.Enrolled())) })
	leaving := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "amesh_cni_leaving_pods",
		Help: "Pods that left the mesh whose connections through ztunnel are still draining (their capture rules stay until they end).",
	}, func() float64 { return float64(node.Leaving()) })
	unacked := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "amesh_cni_unacknowledged_pods",
		Help: "Enrolled pods whose rules are in place but that no ztunnel has acknowledged (none connected, or it refused them; retried with backoff).",
	}, func() float64 { return float64(node.Unacknowledged()) })
	reg.MustRegister(enrolled, leaving, unacked)

	// Bootstrap order: the plugin's socket listens (a plugin call waits
	// in its backlog until the server below takes it) and the state file
	// is written before the plugin is chained in, so that no pod is ever
	// refused for want of an agent that is in fact starting.
	ln, err := listenUnix(cfg.AgentSocket)
	if err != nil {
		return fmt.Errorf("agent: plugin socket: %w", err)
	}
	if err := writeState(cfg); err != nil {
		ln.Close()
		return err
	}
	var installed atomic.Bool
	if !cfg.InstallCNI {
		installed.Store(true)
	}
	mon := &http.Server{Addr: cfg.MonitorAddr, ReadHeaderTimeout: 5 * time.Second, Handler: monitor(reg, func() error {
		if err := handler.Ready(); err != nil {
			return err
		}
		if !installed.Load() {
			return errors.New("CNI plugin not installed yet")
		}
		return nil
	})}
	monLn, err := net.Listen("tcp", cfg.MonitorAddr)
	if err != nil {
		ln.Close()
		return fmt.Errorf("agent: monitor: %w", err)
	}

	var self *selfWatch
	if cfg.InstallCNI && cfg.DaemonSetName != "" {
		self = newSelfWatch(log.Named("self"), client, cfg.DaemonSetNamespace, cfg.DaemonSetName, cfg.Resync)
	} else if cfg.InstallCNI {
		log.Info("no -daemonset-name: the plugin stays chained when the agent stops (amesh-cni-agent -uninstall removes it)")
	}
	var uninstall atomic.Bool

	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return zsrv.Run(gctx) })
	g.Go(func() error { return watch.Run(gctx) })
	g.Go(func() error {
		defer os.Remove(cfg.AgentSocket)
		return agentapi.Serve(gctx, ln, handler, 10*time.Second)
	})
	var in *install.Installer
	if cfg.InstallCNI {
		in = install.New(install.Config{
			ConfDir: cfg.CNIConfDir, BinDir: cfg.CNIBinDir, PluginBinary: cfg.PluginBinary, StateFile: cfg.StateFile,
			Entry:  install.Entry{AgentSocket: cfg.AgentSocket, StateFile: cfg.StateFile, ExcludeNamespaces: cfg.ExcludeNamespaces},
			Logger: log.Named("install"),
		})
		g.Go(func() error { return in.Run(gctx, func() { installed.Store(true) }) })
	}
	if self != nil {
		g.Go(func() error { return self.Run(gctx) })
		g.Go(func() error {
			<-gctx.Done()
			if ctx.Err() == nil {
				return nil // stopping on an error, not a signal: keep everything
			}
			// Decided while the rest shuts down (the pod's grace period is
			// short); acted upon once the installer has stopped.
			dctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
			defer cancel()
			yes, reason := self.decide(dctx, client)
			uninstall.Store(yes)
			if yes {
				log.Info("the agent is being uninstalled: unchaining the plugin", zap.String("reason", reason))
			} else {
				log.Info("the plugin stays chained for the next agent", zap.String("reason", reason))
			}
			return nil
		})
	}
	g.Go(func() error {
		errc := make(chan error, 1)
		go func() { errc <- mon.Serve(monLn) }()
		select {
		case err := <-errc:
			return err
		case <-gctx.Done():
		}
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		err := mon.Shutdown(sctx)
		<-errc
		return err
	})
	log.Info("node agent started", zap.String("node", cfg.NodeName), zap.String("monitor", monLn.Addr().String()))
	err = g.Wait()
	node.Close()
	if uninstall.Load() {
		if uerr := in.Uninstall(); uerr != nil {
			err = errors.Join(err, fmt.Errorf("agent: uninstall: %w", uerr))
		} else {
			log.Info("amesh-cni removed from the CNI configuration, with its binary and state file")
		}
	}
	if ctx.Err() != nil && (err == nil || errors.Is(err, context.Canceled) || errors.Is(err, http.ErrServerClosed)) {
		return nil
	}
	return err
}

// writeState writes the plugin's fallback for when this agent cannot be
// reached: the namespaces it never enrols (their pods may start without
// it; every other pod is refused until it is back).
func writeState(cfg Config) error {
	excluded := slices.Clone(cfg.ExcludeNamespaces)
	if excluded == nil {
		excluded = []string{}
	}
	slices.Sort(excluded)
	if err := agentapi.WriteState(cfg.StateFile, &agentapi.State{ExcludedNamespaces: excluded, Updated: time.Now().UTC()}); err != nil {
		return fmt.Errorf("agent: state file: %w", err)
	}
	return nil
}

func monitor(reg *prometheus.Registry, ready func() error) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		if err := ready(); err != nil {
			http.Error(w, err.Error(), http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	return mux
}
