// Command ztunnel is amesh's per-node L4 proxy: it serves every enrolled
// pod of its node with mTLS (HBONE), SPIFFE identity, L4 authorization and
// TCP telemetry.
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

	"github.com/amesh-dev/amesh/ztunnel/internal/app"
	"github.com/amesh-dev/amesh/ztunnel/internal/config"
)

func main() {
	cfg := config.Default()
	fs := flag.NewFlagSet("ztunnel", flag.ExitOnError)
	cfg.RegisterFlags(fs)
	_ = fs.Parse(os.Args[1:])
	if err := cfg.Validate(); err != nil {
		fmt.Fprintln(os.Stderr, "ztunnel: invalid configuration:", err)
		os.Exit(2)
	}
	level, _ := zapcore.ParseLevel(cfg.LogLevel)
	zcfg := zap.NewProductionConfig()
	zcfg.Level = zap.NewAtomicLevelAt(level)
	zcfg.Sampling = nil
	log, err := zcfg.Build()
	if err != nil {
		fmt.Fprintln(os.Stderr, "ztunnel: logger:", err)
		os.Exit(1)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	err = app.Run(ctx, cfg, log)
	_ = log.Sync()
	if err != nil {
		log.Error("ztunnel failed", zap.Error(err))
		os.Exit(1)
	}
}
