// Command amesh-controller is the amesh control plane: it translates
// Kubernetes state into discovery resources for ztunnel and waypoints,
// serves them over delta xDS, and is the mesh's certificate authority.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/go-logr/zapr"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/klog/v2"
	"sigs.k8s.io/controller-runtime/pkg/client/config"
	ctrllog "sigs.k8s.io/controller-runtime/pkg/log"

	"github.com/amesh-dev/amesh/controller/internal/app"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "amesh-controller:", err)
		os.Exit(1)
	}
}

func run() error {
	cfg := app.Default()
	cfg.ApplyEnv(os.Getenv)
	fs := flag.NewFlagSet("amesh-controller", flag.ContinueOnError)
	cfg.AddFlags(fs)
	level := zapcore.InfoLevel
	fs.Var(&level, "log-level", "log level: debug, info, warn, error")
	if err := fs.Parse(os.Args[1:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		return err
	}
	if err := cfg.Validate(); err != nil {
		return err
	}

	zc := zap.NewProductionConfig()
	zc.Level = zap.NewAtomicLevelAt(level)
	log, err := zc.Build()
	if err != nil {
		return fmt.Errorf("logger: %w", err)
	}
	defer func() { _ = log.Sync() }()
	// Libraries that log through logr or klog go to the same zap logger.
	ctrllog.SetLogger(zapr.NewLogger(log))
	klog.SetLogger(zapr.NewLogger(log.Named("klog")))

	restCfg, err := restConfig(cfg.Kubeconfig)
	if err != nil {
		return err
	}
	a, err := app.New(cfg, restCfg, log)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	return a.Run(ctx)
}

// restConfig loads the Kubernetes client configuration: the given
// kubeconfig, else $KUBECONFIG, in-cluster or ~/.kube/config.
func restConfig(path string) (*rest.Config, error) {
	var (
		c   *rest.Config
		err error
	)
	if path != "" {
		c, err = clientcmd.BuildConfigFromFlags("", path)
	} else {
		c, err = config.GetConfig()
	}
	if err != nil {
		return nil, fmt.Errorf("kubernetes client configuration: %w", err)
	}
	c.QPS, c.Burst = 50, 100
	c.UserAgent = "amesh-controller"
	return c, nil
}
