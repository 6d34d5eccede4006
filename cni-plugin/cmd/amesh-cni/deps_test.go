package main

import (
	"os/exec"
	"strings"
	"testing"
)

func deps(t *testing.T, pkg string) []string {
	t.Helper()
	out, err := exec.Command("go", "list", "-deps", pkg).CombinedOutput()
	if err != nil {
		t.Fatalf("go list -deps %s: %v\n%s", pkg, err, out)
	}
	return strings.Fields(string(out))
}

func kube(pkgs []string) []string {
	var k []string
	for _, p := range pkgs {
		if strings.HasPrefix(p, "k8s.io/") || strings.HasPrefix(p, "sigs.k8s.io/") {
			k = append(k, p)
		}
	}
	return k
}

// TestNoKubernetesDeps proves that the amesh-cni binary links no
// Kubernetes package (DESIGN.md §1): it runs on every pod start and must
// stay small and client-free.
func TestNoKubernetesDeps(t *testing.T) {
	if k := kube(deps(t, ".")); len(k) > 0 {
		t.Errorf("amesh-cni links Kubernetes packages: %v", k)
	}
	// The check can fail: the agent does link client-go.
	if k := kube(deps(t, "../amesh-cni-agent")); len(k) == 0 {
		t.Error("the dependency check found no Kubernetes package in amesh-cni-agent either; is it broken?")
	}
}
