package volume

import (
	"os"
	"path/filepath"
	"testing"

	corev1 "k8s.io/api/core/v1"
)

func read(t *testing.T, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestWriteAtomic(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "vol")
	changed, err := writeAtomic(dir, Payload{"a": {Data: []byte("1")}, "sub/b": {Data: []byte("2"), Mode: 0o600}}, -1)
	if err != nil || !changed {
		t.Fatalf("first write: changed %t, %v", changed, err)
	}
	if read(t, filepath.Join(dir, "a")) != "1" || read(t, filepath.Join(dir, "sub/b")) != "2" {
		t.Fatal("payload not readable through the volume")
	}
	if st, err := os.Stat(filepath.Join(dir, "sub/b")); err != nil || st.Mode().Perm() != 0o600 {
		t.Errorf("sub/b mode = %v (%v), want 0600", st.Mode().Perm(), err)
	}
	if target, err := os.Readlink(filepath.Join(dir, "a")); err != nil || target != "..data/a" {
		t.Errorf("a links to %q (%v), want ..data/a", target, err)
	}
	first, _ := os.Readlink(filepath.Join(dir, "..data"))

	changed, err = writeAtomic(dir, Payload{"a": {Data: []byte("1")}, "sub/b": {Data: []byte("2"), Mode: 0o600}}, -1)
	if err != nil || changed {
		t.Fatalf("unchanged payload rewrote the volume: changed %t, %v", changed, err)
	}

	changed, err = writeAtomic(dir, Payload{"a": {Data: []byte("new")}, "c": {Data: []byte("3")}}, -1)
	if err != nil || !changed {
		t.Fatalf("update: changed %t, %v", changed, err)
	}
	if read(t, filepath.Join(dir, "a")) != "new" || read(t, filepath.Join(dir, "c")) != "3" {
		t.Error("update not visible")
	}
	if _, err := os.Lstat(filepath.Join(dir, "sub")); !os.IsNotExist(err) {
		t.Errorf("removed key still visible: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, first)); !os.IsNotExist(err) {
		t.Errorf("old data dir %s not removed: %v", first, err)
	}
}

func TestWriteAtomicRejectsEscapes(t *testing.T) {
	for _, p := range []string{"../x", "/abs", "a/../../x", "", "a//b", "..data"} {
		if _, err := writeAtomic(t.TempDir(), Payload{p: {Data: []byte("x")}}, -1); err == nil {
			t.Errorf("path %q accepted", p)
		}
	}
}

func TestHostPathTypes(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "f")
	if err := os.WriteFile(file, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	typ := func(t corev1.HostPathType) *corev1.HostPathType { return &t }
	tests := []struct {
		name    string
		src     corev1.HostPathVolumeSource
		wantErr bool
	}{
		{"unset, missing", corev1.HostPathVolumeSource{Path: filepath.Join(dir, "nope")}, false},
		{"DirectoryOrCreate creates", corev1.HostPathVolumeSource{Path: filepath.Join(dir, "new/deep"), Type: typ(corev1.HostPathDirectoryOrCreate)}, false},
		{"DirectoryOrCreate on a file", corev1.HostPathVolumeSource{Path: file, Type: typ(corev1.HostPathDirectoryOrCreate)}, true},
		{"FileOrCreate creates", corev1.HostPathVolumeSource{Path: filepath.Join(dir, "x/newfile"), Type: typ(corev1.HostPathFileOrCreate)}, false},
		{"Directory missing", corev1.HostPathVolumeSource{Path: filepath.Join(dir, "missing"), Type: typ(corev1.HostPathDirectory)}, true},
		{"File exists", corev1.HostPathVolumeSource{Path: file, Type: typ(corev1.HostPathFile)}, false},
		{"Socket is a file", corev1.HostPathVolumeSource{Path: file, Type: typ(corev1.HostPathSocket)}, true},
		{"relative", corev1.HostPathVolumeSource{Path: "rel"}, true},
	}
	for _, tt := range tests {
		if _, err := hostPath(&tt.src); (err != nil) != tt.wantErr {
			t.Errorf("%s: error %v, want error %t", tt.name, err, tt.wantErr)
		}
	}
	if st, err := os.Stat(filepath.Join(dir, "new/deep")); err != nil || !st.IsDir() {
		t.Errorf("DirectoryOrCreate did not create the directory: %v", err)
	}
}
