package nodeserver

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestLastLines(t *testing.T) {
	p := filepath.Join(t.TempDir(), "log")
	var b strings.Builder
	for i := range 100000 {
		b.WriteString("line ")
		b.WriteString(strings.Repeat("x", i%7))
		b.WriteString("\n")
	}
	if err := os.WriteFile(p, []byte(b.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	all := strings.Split(strings.TrimSuffix(b.String(), "\n"), "\n")
	for _, n := range []int{1, 2, 10, 5000, 99999} {
		got, err := LastLines(p, n)
		if err != nil {
			t.Fatal(err)
		}
		want := strings.Join(all[len(all)-n:], "\n")
		if got != want {
			t.Errorf("LastLines(%d): got %d lines, want %d", n, strings.Count(got, "\n")+1, n)
		}
	}
	got, err := LastLines(p, 200000)
	if err != nil || got != strings.Join(all, "\n") {
		t.Errorf("LastLines beyond the file: %d bytes, %v", len(got), err)
	}
	if err := os.WriteFile(p, []byte("no newline at end"), 0o644); err != nil {
		t.Fatal(err)
	}
	if got, _ := LastLines(p, 1); got != "no newline at end" {
		t.Errorf("unterminated last line: %q", got)
	}
}
