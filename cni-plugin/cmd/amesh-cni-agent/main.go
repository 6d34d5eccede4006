// Command amesh-cni-agent is the amesh node agent (DaemonSet, privileged,
// host network): it installs the amesh-cni plugin and redirects enrolled
// pods' traffic into ztunnel. With -uninstall it removes the plugin from
// the node and exits; with -daemonset-name it does so by itself when it
// stops because its DaemonSet is being deleted.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/amesh-dev/amesh/cni-plugin/internal/agent"
	"github.com/amesh-dev/amesh/cni-plugin/internal/install"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "amesh-cni-agent:", err)
		os.Exit(1)
	}
}

func run() error {
	cfg := agent.DefaultConfig()
	cfg.NodeName = os.Getenv("NODE_NAME")
	cfg.DaemonSetNamespace = os.Getenv("POD_NAMESPACE")
	fs := flag.NewFlagSet("amesh-cni-agent", flag.ContinueOnError)
	cfg.RegisterFlags(fs)
	uninstall := fs.Bool("uninstall", false, "remove the plugin from the CNI configuration and bin dir, then exit")
	if err := fs.Parse(os.Args[1:]); err != nil {
		return err
	}
	level, err := zapcore.ParseLevel(cfg.LogLevel)
	if err != nil {
		return err
	}
	zc := zap.NewProductionConfig()
	zc.Level = zap.NewAtomicLevelAt(level)
	log, err := zc.Build()
	if err != nil {
		return err
	}
	defer func() { _ = log.Sync() }()
	if *uninstall {
		return install.New(install.Config{ConfDir: cfg.CNIConfDir, BinDir: cfg.CNIBinDir, StateFile: cfg.StateFile, Logger: log}).Uninstall()
	}
	if err := cfg.Validate(); err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	return agent.New(cfg, log).Run(ctx)
}
