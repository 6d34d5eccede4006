package image

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestMatch(t *testing.T) {
	tests := []struct {
		pattern, name string
		want          bool
	}{
		{"*/ztunnel:*", "ghcr.io/amesh-dev/ztunnel:dev", true},
		{"*/ztunnel:*", "amesh/ztunnel:latest", true},
		{"*/ztunnel:*", "ztunnel:latest", false},
		{"*/ztunnel:*", "amesh/ztunnel-debug:latest", false},
		{"busybox:*", "busybox:1.36", true},
		{"busybox:*", "library/busybox:1.36", false},
		{"exact:1", "exact:1", true},
		{"exact:1", "exact:2", false},
		{"a*b*c", "abc", true},
		{"a*b*c", "axxbyyc", true},
		{"a*b*c", "axxbyy", false},
		{"*", "anything/at:all", true},
	}
	for _, tt := range tests {
		if got := Match(tt.pattern, tt.name); got != tt.want {
			t.Errorf("Match(%q, %q) = %t, want %t", tt.pattern, tt.name, got, tt.want)
		}
	}
}

func TestNormalize(t *testing.T) {
	tests := map[string]string{
		"busybox":                         "busybox:latest",
		"busybox:1.36":                    "busybox:1.36",
		"localhost:5000/app":              "localhost:5000/app:latest",
		"localhost:5000/app:v1":           "localhost:5000/app:v1",
		"ghcr.io/a/b@sha256:abcd":         "ghcr.io/a/b:latest",
		"ghcr.io/a/b:v2@sha256:abcd":      "ghcr.io/a/b:v2",
		"registry.k8s.io/coredns/coredns": "registry.k8s.io/coredns/coredns:latest",
	}
	for in, want := range tests {
		if got := Normalize(in); got != want {
			t.Errorf("Normalize(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestDefaultTable(t *testing.T) {
	tab := Default("/repo/bin", "/cache/coredns")
	if err := tab.Validate(); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		ref, entry, file string
	}{
		{"ghcr.io/amesh-dev/ztunnel:v0.1.0", "/usr/local/bin/ztunnel", "/repo/bin/ztunnel"},
		{"amesh/amesh-cni-agent:dev", "/usr/local/bin/amesh-cni-agent", "/repo/bin/amesh-cni-agent"},
		{"registry.k8s.io/coredns/coredns:v1.15.0", "/coredns", "/cache/coredns"},
		{"amesh/echoserver", "/usr/local/bin/echoserver", "/repo/bin/echoserver"},
	}
	for _, tt := range tests {
		e, err := tab.Resolve(tt.ref)
		if err != nil {
			t.Errorf("Resolve(%q): %v", tt.ref, err)
			continue
		}
		if len(e.Entrypoint) != 1 || e.Entrypoint[0] != tt.entry || e.Files[tt.entry] != tt.file {
			t.Errorf("Resolve(%q) = %+v, want entrypoint %s from %s", tt.ref, e, tt.entry, tt.file)
		}
	}
	if e, err := tab.Resolve("amesh/amesh-cni-agent:dev"); err != nil || e.Files["/usr/local/bin/amesh-cni"] != "/repo/bin/amesh-cni" {
		t.Errorf("the CNI agent image does not carry the plugin binary: %+v %v", e, err)
	}
	if _, err := tab.Resolve("nginx:1.27"); !errors.Is(err, ErrNotFound) {
		t.Errorf("Resolve(nginx) error = %v, want ErrNotFound", err)
	}
}

func TestLoad(t *testing.T) {
	dir := t.TempDir()
	write := func(body string) string {
		p := filepath.Join(dir, "t.yaml")
		if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	tab, err := Load(write("images:\n- image: \"*/sample-*:*\"\n  entrypoint: [/app]\n  files: {/app: /bin/true}\n"))
	if err != nil {
		t.Fatal(err)
	}
	if e, err := tab.Resolve("amesh/sample-reviews:v2"); err != nil || e.Entrypoint[0] != "/app" {
		t.Errorf("Resolve = %+v, %v", e, err)
	}
	for name, body := range map[string]string{
		"unknown field":     "images:\n- image: x\n  entrypiont: [/a]\n",
		"relative file":     "images:\n- image: x\n  files: {app: /bin/true}\n",
		"no pattern":        "images:\n- entrypoint: [/a]\n",
		"not a table":       "- 1\n- 2\n",
		"pattern sans tag":  "images:\n- image: busybox\n",
		"relative host dir": "images:\n- image: x\n  files: {/app: bin/true}\n",
	} {
		if _, err := Load(write(body)); err == nil {
			t.Errorf("%s: Load accepted %q", name, body)
		}
	}
}

func FuzzMatch(f *testing.F) {
	f.Add("*/ztunnel:*", "ghcr.io/amesh-dev/ztunnel:dev")
	f.Add("a*b*c", "axxbyyc")
	f.Add("**", "")
	f.Fuzz(func(t *testing.T, pattern, name string) {
		got := Match(pattern, name)
		if !strings.Contains(pattern, "*") && got != (pattern == name) {
			t.Fatalf("Match(%q, %q) = %t without wildcards", pattern, name, got)
		}
		if pattern == "*" && !got {
			t.Fatalf("* did not match %q", name)
		}
		if got && !strings.HasPrefix(name, strings.Split(pattern, "*")[0]) {
			t.Fatalf("Match(%q, %q) ignored the literal prefix", pattern, name)
		}
		_ = Normalize(name)
	})
}

func FuzzParse(f *testing.F) {
	f.Add([]byte("images:\n- image: \"*/x:*\"\n  entrypoint: [/x]\n  files: {/x: /bin/true}\n"))
	f.Add([]byte(`{"images":[{"image":"a:1","cmd":["sh"]}]}`))
	f.Add([]byte("images: [{image: '', files: {a: b}}]"))
	f.Fuzz(func(t *testing.T, raw []byte) {
		tab, err := Parse(raw)
		if err != nil {
			return
		}
		if err := tab.Validate(); err != nil {
			t.Fatalf("Parse accepted an invalid table: %v", err)
		}
		for _, e := range tab.Entries {
			got, err := tab.Resolve(e.Pattern)
			if err != nil && !strings.Contains(e.Pattern, "*") {
				t.Fatalf("entry %q does not resolve its own name: %v", e.Pattern, err)
			}
			_ = got
		}
	})
}
