// Command waypoint is amesh's L7 proxy: it terminates HBONE for the services
// bound to its Gateway and applies routes, resilience, L7 policy and HTTP
// telemetry.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/amesh-dev/amesh/waypoint/internal/app"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

func main() {
	cfg := app.DefaultConfig()
	fs := flag.NewFlagSet("waypoint", flag.ExitOnError)
	cfg.RegisterFlags(fs)
	_ = fs.Parse(os.Args[1:])
	if err := cfg.Validate(); err != nil {
		fmt.Fprintf(os.Stderr, "waypoint: invalid configuration:\n%v\n", err)
		os.Exit(2)
	}
	lvl, _ := zapcore.ParseLevel(cfg.LogLevel)
	zc := zap.NewProductionConfig()
	zc.Level = zap.NewAtomicLevelAt(lvl)
	log, err := zc.Build()
	if err != nil {
		fmt.Fprintf(os.Stderr, "waypoint: logger: %v\n", err)
		os.Exit(1)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if err := app.Run(ctx, cfg, log); err != nil {
		log.Error("waypoint failed", zap.Error(err))
		_ = log.Sync()
		os.Exit(1)
	}
	_ = log.Sync()
}
