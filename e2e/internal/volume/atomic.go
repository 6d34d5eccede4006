package volume

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
)

// Payload is the content of a projected-style volume: relative path → file.
type Payload map[string]FileContent

// FileContent is one file of a payload.
type FileContent struct {
	Data []byte
	Mode os.FileMode
}

const dataDirName = "..data"

// writeAtomic publishes payload in dir the way the kubelet's atomic writer
// does, so that readers never see a half-updated volume: the files live in
// a hidden timestamped directory, "..data" is a symlink to it that is
// swapped with rename(2), and each top-level name is a symlink through
// "..data". It reports whether anything changed.
func writeAtomic(dir string, payload Payload, gid int) (bool, error) {
	for p := range payload {
		if err := validPath(p); err != nil {
			return false, err
		}
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return false, fmt.Errorf("create volume dir: %w", err)
	}
	if same(dir, payload) {
		return false, nil
	}
	var rnd [6]byte
	if _, err := rand.Read(rnd[:]); err != nil {
		return false, fmt.Errorf("volume dir name: %w", err)
	}
	tsName := "..v_" + hex.EncodeToString(rnd[:])
	ts := filepath.Join(dir, tsName)
	if err := os.Mkdir(ts, 0o755); err != nil {
		return false, fmt.Errorf("create volume data dir: %w", err)
	}
	for p, f := range payload {
		full := filepath.Join(ts, p)
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			return false, fmt.Errorf("create %s: %w", filepath.Dir(p), err)
		}
		mode := f.Mode
		if mode == 0 {
			mode = 0o644
		}
		if err := os.WriteFile(full, f.Data, mode); err != nil {
			return false, fmt.Errorf("write %s: %w", p, err)
		}
		if err := os.Chmod(full, mode); err != nil {
			return false, fmt.Errorf("chmod %s: %w", p, err)
		}
		if gid >= 0 {
			if err := os.Lchown(full, -1, gid); err != nil {
				return false, fmt.Errorf("chown %s: %w", p, err)
			}
		}
	}
	old, _ := os.Readlink(filepath.Join(dir, dataDirName))
	tmpLink := filepath.Join(dir, "..data_tmp")
	_ = os.Remove(tmpLink)
	if err := os.Symlink(tsName, tmpLink); err != nil {
		return false, fmt.Errorf("link new volume data: %w", err)
	}
	if err := os.Rename(tmpLink, filepath.Join(dir, dataDirName)); err != nil {
		return false, fmt.Errorf("publish volume data: %w", err)
	}
	// Top-level user-visible names point through ..data.
	want := map[string]bool{}
	for p := range payload {
		top, _, _ := strings.Cut(p, "/")
		want[top] = true
	}
	for top := range want {
		link := filepath.Join(dir, top)
		target := filepath.Join(dataDirName, top)
		if cur, err := os.Readlink(link); err == nil && cur == target {
			continue
		}
		_ = os.RemoveAll(link)
		if err := os.Symlink(target, link); err != nil {
			return false, fmt.Errorf("link %s: %w", top, err)
		}
	}
	ents, err := os.ReadDir(dir)
	if err != nil {
		return false, fmt.Errorf("list volume dir: %w", err)
	}
	for _, e := range ents {
		n := e.Name()
		switch {
		case n == dataDirName || n == tsName:
		case strings.HasPrefix(n, ".."):
			if n == old || strings.HasPrefix(n, "..v_") {
				_ = os.RemoveAll(filepath.Join(dir, n))
			}
		case !want[n]:
			_ = os.RemoveAll(filepath.Join(dir, n))
		}
	}
	return true, nil
}

// same reports whether dir already publishes exactly payload.
func same(dir string, payload Payload) bool {
	data := filepath.Join(dir, dataDirName)
	if _, err := os.Stat(data); err != nil {
		return false
	}
	n := 0
	err := filepath.WalkDir(data+"/", func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			return nil
		}
		rel, _ := filepath.Rel(data, p)
		f, ok := payload[rel]
		if !ok {
			return errors.New("extra file")
		}
		st, err := d.Info()
		if err != nil {
			return err
		}
		mode := f.Mode
		if mode == 0 {
			mode = 0o644
		}
		if st.Mode().Perm() != mode.Perm() {
			return errors.New("mode changed")
		}
		b, err := os.ReadFile(p)
		if err != nil || !bytes.Equal(b, f.Data) {
			return errors.New("content changed")
		}
		n++
		return nil
	})
	return err == nil && n == len(payload)
}

func validPath(p string) error {
	if p == "" || filepath.IsAbs(p) || strings.HasPrefix(p, "..") || filepath.Clean(p) != p {
		return fmt.Errorf("invalid volume path %q", p)
	}
	for _, part := range strings.Split(p, "/") {
		if part == ".." {
			return fmt.Errorf("invalid volume path %q", p)
		}
	}
	return nil
}
