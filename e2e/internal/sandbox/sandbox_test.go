package sandbox

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestMain(m *testing.M) {
	if len(os.Args) > 1 && os.Args[1] == InitArg {
		if err := Init(); err != nil {
			os.Exit(127)
		}
	}
	os.Exit(m.Run())
}

func needRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: mount namespaces, overlay and pivot_root")
	}
}

func TestStartRunsWorkloadInIsolatedRoot(t *testing.T) {
	needRoot(t)
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	scratch := t.TempDir()
	vol := t.TempDir()
	if err := os.WriteFile(filepath.Join(vol, "key"), []byte("value-from-volume"), 0o644); err != nil {
		t.Fatal(err)
	}
	var out, errb bytes.Buffer
	uid := uint32(1234)
	s := &Spec{
		Scratch:  scratch,
		Hostname: "sandboxed",
		Mounts: []Mount{
			{Type: "tmpfs", Target: "/tmp"},
			{Type: "bind", Source: vol, Target: "/data/vol", ReadOnly: true},
		},
		Files: []File{{Path: "/etc/amesh-test", Content: []byte("file-in-root")}},
		Args:  []string{"sh", "-c", "cat /data/vol/key; echo; cat /etc/amesh-test; echo; hostname; id -u; touch /data/vol/x 2>/dev/null && echo writable || echo readonly; grep -c CapEff /proc/self/status; grep CapAmb /proc/self/status"},
		Env:   []string{"PATH=/usr/bin:/bin"},
		UID:   &uid,
		Caps:  []string{"NET_ADMIN"},
	}
	cmd, err := Start(s, Options{Helper: self, Stdout: &out, Stderr: &errb})
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("workload: %v (stderr %q)", err, errb.String())
	}
	got := strings.Fields(out.String())
	want := []string{"value-from-volume", "file-in-root", "sandboxed", "1234", "readonly", "1", "CapAmb:", "0000000000001000"}
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("workload output = %q, want %q", got, want)
	}
	if _, err := os.Stat("/etc/amesh-test"); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("file written in the sandbox leaked to the host: %v", err)
	}
	if _, err := os.Stat(filepath.Join(vol, "x")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("read-only volume was written")
	}
}

func TestStartReportsInitFailure(t *testing.T) {
	needRoot(t)
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	s := &Spec{Scratch: t.TempDir(), Args: []string{"no-such-binary-anywhere"}}
	_, err = Start(s, Options{Helper: self})
	if !errors.Is(err, ErrInit) || !strings.Contains(err.Error(), "not found") {
		t.Fatalf("Start error = %v, want ErrInit about the missing executable", err)
	}
}
