// Command amesh-demo is `make demo` (see package e2e/internal/demo): on a
// running cluster (the local one by default: its KUBECONFIG is found by
// cluster name) it installs amesh, deploys and enrols the sample, creates
// a waypoint, applies the canary and header routes, drives traffic and
// prints identities, splits and metrics.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/amesh-dev/amesh/e2e/cluster"
	"github.com/amesh-dev/amesh/e2e/internal/demo"
	"github.com/amesh-dev/amesh/e2e/internal/mesh"
	"github.com/amesh-dev/amesh/e2e/manifest"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "amesh-demo:", err)
		os.Exit(1)
	}
}

func run() error {
	var cfg demo.Config
	var env, clusterName string
	self, _ := os.Executable()
	fs := flag.NewFlagSet("amesh-demo", flag.ContinueOnError)
	fs.StringVar(&cfg.Kubeconfig, "kubeconfig", "", "kubeconfig of the cluster (default: the local cluster named by -cluster)")
	fs.StringVar(&clusterName, "cluster", "amesh", "local cluster whose KUBECONFIG to use when -kubeconfig is not given")
	fs.StringVar(&cfg.Root, "root", "", "repository root (default: found from the working directory)")
	fs.StringVar(&env, "env", "local", "manifests overlay: local or kind")
	fs.StringVar(&cfg.KubectlWaypoint, "kubectl-waypoint", filepath.Join(filepath.Dir(self), "kubectl-waypoint"), "the kubectl-waypoint plugin")
	fs.IntVar(&cfg.Requests, "requests", 400, "requests per traffic step")
	fs.DurationVar(&cfg.Timeout, "timeout", 3*time.Minute, "bound of each wait")
	if err := fs.Parse(os.Args[1:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		return err
	}
	e, err := mesh.ParseEnv(env)
	if err != nil {
		return err
	}
	cfg.Env = e
	if cfg.Root == "" {
		if cfg.Root, err = manifest.FindRoot("."); err != nil {
			return err
		}
	}
	if cfg.Kubeconfig == "" {
		cc := cluster.Config{Name: clusterName}
		cc.Default()
		st, err := cluster.Status(cc)
		if err != nil {
			return err
		}
		if !st.Running || st.Info == nil {
			return fmt.Errorf("local cluster %q is not running: start it with `make cluster-up CLUSTER_NAME=%s`", clusterName, clusterName)
		}
		cfg.Kubeconfig = st.Info.Kubeconfig
	}
	cfg.Default()
	if err := cfg.Validate(); err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	return demo.New(cfg, os.Stdout).Run(ctx)
}
