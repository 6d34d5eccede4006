// Command sampleapp runs one role of the amesh sample application
// (productpage, details, reviews, ratings or client), chosen by -role or
// $ROLE. See package sample for what each role serves and the test knobs.
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

	"github.com/amesh-dev/amesh/e2e/sample"
)

func main() {
	cfg := sample.Default()
	fs := flag.NewFlagSet("sampleapp", flag.ExitOnError)
	cfg.RegisterFlags(fs)
	_ = fs.Parse(os.Args[1:]) // ExitOnError
	if err := cfg.Validate(); err != nil {
		fmt.Fprintf(os.Stderr, "sampleapp: %v\n", err)
		os.Exit(2)
	}
	level, _ := zapcore.ParseLevel(cfg.LogLevel) // checked by Validate
	zc := zap.NewProductionConfig()
	zc.Level = zap.NewAtomicLevelAt(level)
	log, err := zc.Build()
	if err != nil {
		fmt.Fprintf(os.Stderr, "sampleapp: logger: %v\n", err)
		os.Exit(1)
	}
	log = log.With(zap.String("role", string(cfg.Role)), zap.String("pod", cfg.Pod))
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	app, err := sample.New(cfg, log)
	if err == nil {
		err = app.Run(ctx)
	}
	_ = log.Sync()
	if err != nil {
		log.Error("sampleapp failed", zap.Error(err))
		os.Exit(1)
	}
}
