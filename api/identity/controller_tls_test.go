package identity_test

import (
	"crypto/tls"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/amesh-dev/amesh/api/ca"
	"github.com/amesh-dev/amesh/api/identity"
)

// TestControllerTLS: the controller's serving certificate is verified
// against the roots the bundle holds at each handshake — so a client
// follows a root rotation published through discovery — and for the
// expected name only.
func TestControllerTLS(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	const name = "amesh-controller.amesh-system.svc"
	serving := func(a *ca.Authority, dns string) *tls.Config {
		key, err := identity.NewKey()
		if err != nil {
			t.Fatal(err)
		}
		chain, err := a.SignServer(key.Public(), []string{dns}, time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		c := &tls.Certificate{PrivateKey: key, Leaf: chain[0]}
		for _, x := range chain {
			c.Certificate = append(c.Certificate, x.Raw)
		}
		return &tls.Config{MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{*c}}
	}
	oldCA, err := ca.NewRoot(td, 24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	newCA, err := ca.NewRoot(td, 24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	b := identity.NewBundle()
	b.Set(td, oldCA.Roots())
	file := filepath.Join(t.TempDir(), "root-cert.pem")
	client := identity.ControllerTLS(name, identity.ControllerRoots(b, td, file))
	dial := func(server *tls.Config) error {
		t.Helper()
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		done := make(chan struct{})
		go func() {
			defer close(done)
			c, err := ln.Accept()
			if err != nil {
				return
			}
			defer c.Close()
			_ = c.SetDeadline(time.Now().Add(10 * time.Second))
			_ = tls.Server(c, server).Handshake()
		}()
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer func() { c.Close(); <-done }()
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		return tls.Client(c, client).Handshake()
	}
	ok := func(what string, server *tls.Config) {
		t.Helper()
		if err := dial(server); err != nil {
			t.Fatalf("%s: %v", what, err)
		}
	}
	refused := func(what string, server *tls.Config, want string) {
		t.Helper()
		if err := dial(server); err == nil || !strings.Contains(err.Error(), want) {
			t.Fatalf("%s: %v, want an error containing %q", what, err, want)
		}
	}
	ok("old root", serving(oldCA, name))
	refused("new root not yet published", serving(newCA, name), "unknown authority")
	refused("another name", serving(oldCA, "evil.example"), "valid for evil.example, not "+name)

	b.Set(td, append(oldCA.Roots(), newCA.Roots()...)) // rotation, step 1
	ok("new root once published", serving(newCA, name))
	ok("old root still", serving(oldCA, name))

	b.Set(td, newCA.Roots()) // step 3
	refused("old root after it was dropped", serving(oldCA, name), "unknown authority")
	ok("new root", serving(newCA, name))

	// A component that missed the publication: its bundle holds the old
	// root only, but the root file (the ConfigMap) has the new one.
	b.Set(td, oldCA.Roots())
	refused("new root, neither in the bundle nor in the file", serving(newCA, name), "unknown authority")
	if err := os.WriteFile(file, append(oldCA.RootsPEM(), newCA.RootsPEM()...), 0o600); err != nil {
		t.Fatal(err)
	}
	ok("new root from the root file", serving(newCA, name))

	old12 := serving(newCA, name)
	old12.MinVersion, old12.MaxVersion = tls.VersionTLS12, tls.VersionTLS12
	refused("a TLS 1.2 controller", old12, "protocol version")
}
