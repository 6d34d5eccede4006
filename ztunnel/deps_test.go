package ztunnel

import (
	"os/exec"
	"strings"
	"testing"
)

// TestNoKubernetesDeps proves that no package of this module links a
// Kubernetes package: the data plane must stay free of them (DESIGN.md §1).
func TestNoKubernetesDeps(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", "-test", "./...").CombinedOutput()
	if err != nil {
		t.Fatalf("go list -deps: %v\n%s", err, out)
	}
	for _, p := range strings.Fields(string(out)) {
		if strings.HasPrefix(p, "k8s.io/") || strings.HasPrefix(p, "sigs.k8s.io/") {
			t.Errorf("ztunnel links Kubernetes package %s", p)
		}
	}
}
