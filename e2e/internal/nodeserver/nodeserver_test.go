package nodeserver

import (
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"go.uber.org/zap"
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

func TestAuthorize(t *testing.T) {
	s := New(Config{}, nil, zap.NewNop())
	h := s.authorize(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { w.WriteHeader(http.StatusTeapot) }))
	tests := []struct {
		name string
		tls  *tls.ConnectionState
		want int
	}{
		{"no TLS", nil, http.StatusUnauthorized},
		{"no certificate", &tls.ConnectionState{}, http.StatusUnauthorized},
		{"apiserver", state("kube-apiserver-kubelet-client"), http.StatusTeapot},
		{"cluster admin", state("kubernetes-admin", "system:masters"), http.StatusTeapot},
		{"another node", state("system:node:n2", "system:nodes"), http.StatusForbidden},
		{"kube-proxy", state("system:kube-proxy"), http.StatusForbidden},
	}
	for _, tt := range tests {
		r := httptest.NewRequest(http.MethodGet, "/containerLogs/ns/p/c", nil)
		r.TLS = tt.tls
		w := httptest.NewRecorder()
		h.ServeHTTP(w, r)
		if w.Code != tt.want {
			t.Errorf("%s: HTTP %d, want %d", tt.name, w.Code, tt.want)
		}
	}
}

func state(cn string, orgs ...string) *tls.ConnectionState {
	return &tls.ConnectionState{PeerCertificates: []*x509.Certificate{{Subject: pkix.Name{CommonName: cn, Organization: orgs}}}}
}
