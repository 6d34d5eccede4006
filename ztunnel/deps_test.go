package ztunnel

import (
	"os"
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

// TestLinkerDropsUnusedMethods proves that the binary, built as it ships
// (-tags grpcnotrace, see the Dockerfile), links no package that looks
// methods up by name through reflection (text/template, html/template) —
// with one, the linker keeps every exported method of every linked type,
// 4 MB more binary and, since its pages are touched at start, 4 MB more
// RSS — and no go-control-plane package.
func TestLinkerDropsUnusedMethods(t *testing.T) {
	out, err := exec.Command("go", "list", "-tags", "grpcnotrace", "-deps", "./cmd/ztunnel").CombinedOutput()
	if err != nil {
		t.Fatalf("go list -deps: %v\n%s", err, out)
	}
	for _, p := range strings.Fields(string(out)) {
		if p == "text/template" || p == "html/template" || p == "golang.org/x/net/trace" {
			t.Errorf("cmd/ztunnel links %s", p)
		}
		// go-control-plane's generated packages register, at start, the
		// descriptors of everything envoy's Node reaches: 1 MB of binary
		// and 0.4 MB of heap (api/xds/xdsclient speaks the protocol
		// without them).
		if strings.HasPrefix(p, "github.com/envoyproxy/") || strings.HasPrefix(p, "github.com/cncf/") {
			t.Errorf("cmd/ztunnel links %s", p)
		}
	}
	df, err := os.ReadFile("../Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(df), "cd ztunnel && go build -tags grpcnotrace") {
		t.Error("the Dockerfile does not build ztunnel with -tags grpcnotrace")
	}
}
