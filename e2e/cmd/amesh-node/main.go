// Command amesh-node is the local cluster's node agent (it does the
// kubelet's job for one node; see e2e/internal/node). The cluster
// starts it inside the node's network namespace and root filesystem view.
// Invoked as "amesh-node sandbox-init" it is the helper that builds a
// container's sandbox and execs the workload.
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

	"github.com/amesh-dev/amesh/e2e/internal/node"
	"github.com/amesh-dev/amesh/e2e/internal/sandbox"
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == sandbox.InitArg {
		if err := sandbox.Init(); err != nil {
			fmt.Fprintln(os.Stderr, "sandbox:", err)
		}
		os.Exit(127)
	}
	config := flag.String("config", "/var/lib/amesh-node/config.json", "node agent configuration (JSON)")
	level := zap.LevelFlag("log-level", zapcore.InfoLevel, "log level")
	flag.Parse()
	if err := run(*config, *level); err != nil {
		fmt.Fprintln(os.Stderr, "amesh-node:", err)
		os.Exit(1)
	}
}

func run(config string, level zapcore.Level) error {
	cfg, err := node.Load(config)
	if err != nil {
		return err
	}
	zc := zap.NewProductionConfig()
	zc.Level = zap.NewAtomicLevelAt(level)
	zc.EncoderConfig.TimeKey = "ts"
	zc.EncoderConfig.EncodeTime = zapcore.ISO8601TimeEncoder
	log, err := zc.Build()
	if err != nil {
		return fmt.Errorf("logger: %w", err)
	}
	defer func() { _ = log.Sync() }()
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	a, err := node.New(cfg, log)
	if err != nil {
		return err
	}
	return a.Run(ctx)
}
