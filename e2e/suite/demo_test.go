//go:build e2e

package suite

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/amesh-dev/amesh/e2e/internal/demo"
	"github.com/amesh-dev/amesh/e2e/manifest"
)

// TestDemo runs the README's first command (make demo) against the
// suite's cluster: install, bookinfo, enrolment, a waypoint through the
// kubectl-waypoint plugin, the 90/10 canary and the header route. The
// demo checks its own steps (every request OK, the split within 3σ, all
// of jason's requests on v2, waypoint metrics present) and fails when any
// of them did not work. It works in the sample's own namespace, which
// no other test uses, and removes it afterwards.
func TestDemo(t *testing.T) {
	plugin := filepath.Join(t.TempDir(), "kubectl-waypoint")
	build := exec.CommandContext(ctxFor(t, 3*time.Minute), "go", "build", "-o", plugin, "./cmd/kubectl-waypoint")
	build.Dir = filepath.Join(shared.root, "controller")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build kubectl-waypoint: %v\n%s", err, out)
	}
	cfg := demo.Config{
		Kubeconfig:      os.Getenv("KUBECONFIG"),
		Root:            shared.root,
		Env:             shared.env,
		KubectlWaypoint: plugin,
	}
	cfg.Default()
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		if t.Failed() {
			dumpNamespace(ctx, t, manifest.SampleNamespace)
		}
		if err := shared.c.DeleteNamespace(ctx, manifest.SampleNamespace, 2*time.Minute); err != nil {
			t.Logf("cleanup: %v", err)
		}
	})
	err := demo.New(cfg, &out).Run(ctxFor(t, 10*time.Minute))
	t.Logf("demo output:\n%s", out.String())
	if err != nil {
		t.Fatalf("make demo's steps: %v", err)
	}
}
