package cluster

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/amesh-dev/amesh/e2e/internal/cgroup"
)

// Down stops the cluster named by cfg, wherever it runs (a detached
// `amesh-cluster run`, or another process), and removes everything it
// created on the host: processes, network namespaces, links, cgroups and
// the state directory. It is idempotent and works after a crash.
func Down(ctx context.Context, cfg Config) error {
	cfg.Default()
	if !nameRE.MatchString(cfg.Name) {
		return fmt.Errorf("invalid cluster name %q", cfg.Name)
	}
	if pid, ok := runningOwner(cfg.StateDir); ok && pid != os.Getpid() {
		// Ask the owner to stop: it stops pods and nodes gracefully.
		_ = syscall.Kill(pid, syscall.SIGTERM)
		deadline := time.Now().Add(90 * time.Second)
		for time.Now().Before(deadline) {
			if _, alive := runningOwner(cfg.StateDir); !alive {
				break
			}
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(100 * time.Millisecond):
			}
		}
		if _, alive := runningOwner(cfg.StateDir); alive {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
	mnt, err := cgroup.Mount()
	cg := ""
	if err == nil {
		cg = filepath.Join(mnt, cfg.prefix())
	}
	return sweep(cfg, cg)
}

// State is what Status reports about a cluster.
type State struct {
	Name    string `json:"name"`
	Running bool   `json:"running"`
	PID     int    `json:"pid,omitempty"`
	// Info is set once the cluster was ready.
	Info *Info `json:"info,omitempty"`
}

// Status reports whether the cluster named by cfg runs, and its info.
func Status(cfg Config) (State, error) {
	cfg.Default()
	s := State{Name: cfg.Name}
	s.PID, s.Running = runningOwner(cfg.StateDir)
	raw, err := os.ReadFile(filepath.Join(cfg.StateDir, "cluster.json"))
	if errors.Is(err, os.ErrNotExist) {
		return s, nil
	}
	if err != nil {
		return s, err
	}
	var info Info
	if err := json.Unmarshal(raw, &info); err != nil {
		return s, fmt.Errorf("parse cluster info: %w", err)
	}
	s.Info = &info
	return s, nil
}

// List returns the names of the clusters that have state under root.
func List(root string) ([]string, error) {
	ents, err := os.ReadDir(root)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []string
	for _, e := range ents {
		if e.IsDir() && nameRE.MatchString(e.Name()) {
			out = append(out, e.Name())
		}
	}
	return out, nil
}
