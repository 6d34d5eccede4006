// Command kubectl-waypoint is the `kubectl waypoint` plugin: it creates,
// lists, inspects and deletes amesh waypoints. Install it on PATH (or with
// krew) and run `kubectl waypoint --help`.
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"

	"github.com/amesh-dev/amesh/controller/internal/waypointctl"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := waypointctl.Main(ctx, os.Args[1:])
	stop()
	os.Exit(code)
}
