package install

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"
	"go.uber.org/zap/zaptest"

	amesh "github.com/amesh-dev/amesh/cni-plugin/internal/plugin"
)

var update = flag.Bool("update", false, "rewrite the golden files")

func testEntry() Entry {
	return Entry{AgentSocket: "/var/run/amesh/cni.sock", StateFile: "/var/run/amesh/cni-state.json",
		ExcludeNamespaces: []string{"amesh-system", "kube-system"}}
}

func readDir(t *testing.T, dir string) map[string]string {
	t.Helper()
	out := map[string]string{}
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		out[e.Name()] = string(b)
	}
	return out
}

func writeDir(t *testing.T, dir string, files map[string]string) {
	t.Helper()
	if err := os.RemoveAll(dir); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for n, c := range files {
		if err := os.WriteFile(filepath.Join(dir, n), []byte(c), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

func compareDir(t *testing.T, golden string, got map[string]string) {
	t.Helper()
	if *update {
		writeDir(t, golden, got)
		return
	}
	want := readDir(t, golden)
	for n, w := range want {
		if g, ok := got[n]; !ok {
			t.Errorf("%s: missing %s", golden, n)
		} else if g != w {
			t.Errorf("%s/%s differs:\n--- got\n%s\n--- want\n%s", golden, n, g, w)
		}
	}
	for n := range got {
		if _, ok := want[n]; !ok {
			t.Errorf("%s: unexpected file %s", golden, n)
		}
	}
}

// TestGolden: testdata/<case>/in is a CNI conf dir; out is the dir after
// install, uninstalled after uninstall.
func TestGolden(t *testing.T) {
	cases, err := os.ReadDir("testdata")
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range cases {
		t.Run(c.Name(), func(t *testing.T) {
			base := filepath.Join("testdata", c.Name())
			conf := t.TempDir()
			writeDir(t, conf, readDir(t, filepath.Join(base, "in")))
			bin := t.TempDir()
			plugin := filepath.Join(t.TempDir(), "amesh-cni")
			if err := os.WriteFile(plugin, []byte("#!/bin/sh\n"), 0o755); err != nil {
				t.Fatal(err)
			}
			state := filepath.Join(t.TempDir(), "cni-state.json")
			if err := os.WriteFile(state, []byte(`{"excludedNamespaces":[]}`), 0o644); err != nil {
				t.Fatal(err)
			}
			in := New(Config{ConfDir: conf, BinDir: bin, PluginBinary: plugin, StateFile: state, Entry: testEntry(), Logger: zaptest.NewLogger(t)})

			changed, err := in.Ensure()
			if err != nil || !changed {
				t.Fatalf("Ensure = %v, %v; want changed", changed, err)
			}
			compareDir(t, filepath.Join(base, "out"), readDir(t, conf))
			// The runtime hands the list's cniVersion to every plugin of
			// the chain: amesh-cni must speak it.
			primary, err := Primary(conf)
			if err != nil {
				t.Fatal(err)
			}
			list, err := libcni.ConfListFromFile(primary)
			if err != nil {
				t.Fatalf("installed conflist: %v", err)
			}
			if !slices.Contains(amesh.SupportedVersions(), list.CNIVersion) {
				t.Errorf("installed conflist has cniVersion %q; amesh-cni speaks %v", list.CNIVersion, amesh.SupportedVersions())
			}
			if fi, err := os.Stat(filepath.Join(bin, PluginType)); err != nil || fi.Mode().Perm() != 0o755 {
				t.Fatalf("plugin binary: %v %v", fi, err)
			}
			// Idempotent: nothing to do the second time.
			if changed, err := in.Ensure(); err != nil || changed {
				t.Fatalf("second Ensure = %v, %v; want unchanged", changed, err)
			}

			if err := in.Uninstall(); err != nil {
				t.Fatal(err)
			}
			compareDir(t, filepath.Join(base, "uninstalled"), readDir(t, conf))
			if _, err := os.Stat(filepath.Join(bin, PluginType)); !errors.Is(err, os.ErrNotExist) {
				t.Fatalf("binary left after uninstall: %v", err)
			}
			if _, err := os.Stat(state); !errors.Is(err, os.ErrNotExist) {
				t.Fatalf("state file left after uninstall: %v", err)
			}
			if err := in.Uninstall(); err != nil {
				t.Fatalf("second Uninstall: %v", err)
			}
		})
	}
}

func TestNoPrimary(t *testing.T) {
	in := New(Config{ConfDir: t.TempDir(), Entry: testEntry()})
	if _, err := in.Ensure(); !errors.Is(err, ErrNoPrimary) {
		t.Fatalf("Ensure on empty dir = %v, want ErrNoPrimary", err)
	}
}

func TestChainRejectsMalformed(t *testing.T) {
	for _, in := range []string{``, `[]`, `null`, `{"plugins": 3}`, `{"plugins": [1]}`, `{"name": "x"}`, `{"type": 5}`} {
		if _, err := Chain([]byte(in), testEntry()); err == nil {
			t.Errorf("Chain(%q) accepted", in)
		}
	}
}

// TestRechain: when the primary CNI rewrites its file, the running
// installer chains itself again.
func TestRechain(t *testing.T) {
	conf := t.TempDir()
	orig, err := os.ReadFile("testdata/bridge-conflist/in/10-bridge.conflist")
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(conf, "10-bridge.conflist")
	if err := os.WriteFile(path, orig, 0o644); err != nil {
		t.Fatal(err)
	}
	in := New(Config{ConfDir: conf, Entry: testEntry(), Poll: time.Hour, Logger: zaptest.NewLogger(t)})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	ready := make(chan struct{})
	go func() { done <- in.Run(ctx, func() { close(ready) }) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	}()
	<-ready
	chained := func() bool {
		b, err := os.ReadFile(path)
		if err != nil {
			return false
		}
		var l struct{ Plugins []map[string]any }
		if json.Unmarshal(b, &l) != nil || len(l.Plugins) == 0 {
			return false
		}
		return l.Plugins[len(l.Plugins)-1]["type"] == PluginType
	}
	if !chained() {
		t.Fatal("not chained after ready")
	}
	for i := 0; i < 3; i++ {
		// The primary CNI rewrites its file (rename over, like most do).
		tmp := filepath.Join(conf, "tmp-primary")
		if err := os.WriteFile(tmp, orig, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, path); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(5 * time.Second)
		for !chained() {
			if time.Now().After(deadline) {
				t.Fatalf("round %d: not re-chained", i)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	// A conf dir that is emptied and refilled later is handled too.
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond)
	if err := os.WriteFile(path, orig, 0o644); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for !chained() {
		if time.Now().After(deadline) {
			t.Fatal("not chained after the file came back")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func FuzzChain(f *testing.F) {
	for _, p := range []string{
		"testdata/bridge-conflist/in/10-bridge.conflist", "testdata/single-conf/in/10-flannel.conf",
		"testdata/stale-entry/in/05-cilium.conflist", "testdata/extra-keys/in/10-kindnet.conflist",
	} {
		if b, err := os.ReadFile(p); err == nil {
			f.Add(b)
		}
	}
	f.Add([]byte(`{"plugins":[{"type":"amesh-cni"}]}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		out, err := Chain(data, testEntry())
		if err != nil {
			return
		}
		// Chaining is idempotent and unchaining removes exactly our entry.
		again, err := Chain(out, testEntry())
		if err != nil || !bytes.Equal(out, again) {
			t.Fatalf("Chain not idempotent: %v\n%s\n%s", err, out, again)
		}
		un, err := Unchain(out)
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(string(un), `"type": "amesh-cni"`) {
			t.Fatalf("Unchain left amesh-cni:\n%s", un)
		}
	})
}
