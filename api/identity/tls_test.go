package identity_test

import (
	"crypto/tls"
	"errors"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/amesh-dev/amesh/api/identity"
	"github.com/amesh-dev/amesh/api/identity/identitytest"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

type result struct {
	err  error
	peer spiffeid.ID
}

// handshake runs a real TLS handshake over loopback TCP and returns what each
// side saw.
func handshake(t *testing.T, server, client *tls.Config) (srv, cli result) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	done := make(chan result, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			done <- result{err: err}
			return
		}
		defer c.Close()
		tc := tls.Server(c, server)
		_ = tc.SetDeadline(time.Now().Add(10 * time.Second))
		if err := tc.Handshake(); err != nil {
			done <- result{err: err}
			return
		}
		id, err := identity.PeerID(tc.ConnectionState())
		// Read until the client closes so its handshake sees our alerts.
		_, _ = tc.Read(make([]byte, 1))
		done <- result{peer: id, err: err}
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	tc := tls.Client(c, client)
	_ = tc.SetDeadline(time.Now().Add(10 * time.Second))
	if err := tc.Handshake(); err != nil {
		cli.err = err
	} else {
		cli.peer, cli.err = identity.PeerID(tc.ConnectionState())
		// TLS 1.3 client certificates are checked after the client's
		// handshake returns: a read surfaces the server's alert.
		_ = tc.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
		if _, err := tc.Read(make([]byte, 1)); err != nil && !errors.Is(err, errTimeout) && !isTimeout(err) {
			cli.err = err
		}
	}
	tc.Close()
	return <-done, cli
}

var errTimeout = errors.New("timeout")

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

func TestTLS(t *testing.T) {
	ca := identitytest.Must("cluster.local")
	other := identitytest.Must("other.local")
	srvCert, srvID := ca.MustLeaf("server-ns", "server")
	cliCert, cliID := ca.MustLeaf("client-ns", "client")
	otherCert, _ := other.MustLeaf("client-ns", "client")
	now := time.Now()
	expired, err := ca.Leaf(cliID, now.Add(-2*time.Hour), now.Add(-time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	notYet, err := ca.Leaf(cliID, now.Add(time.Hour), now.Add(2*time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	self, err := identitytest.SelfSigned(cliID, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	bundle := ca.Bundle()
	federated := ca.Bundle()
	federated.Set(other.TrustDomain, other.Roots())

	fixed := func(c *tls.Certificate) func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
		return func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return c, nil }
	}
	serverCfg := func(b *identity.Bundle) *tls.Config {
		return identity.ServerTLS(func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return srvCert, nil }, b, ca.TrustDomain)
	}
	tls12 := identity.ClientTLS(fixed(cliCert), bundle, srvID)
	tls12.MinVersion, tls12.MaxVersion = tls.VersionTLS12, tls.VersionTLS12
	http1 := identity.ClientTLS(fixed(cliCert), bundle, srvID)
	http1.NextProtos = []string{"http/1.1"}
	http1.VerifyConnection = nil // only the server's check applies
	noALPN := identity.ClientTLS(fixed(cliCert), bundle, srvID)
	noALPN.NextProtos = nil
	noALPN.VerifyConnection = nil
	wrongID := spiffeid.RequireFromString("spiffe://cluster.local/ns/server-ns/sa/someone-else")

	for _, tc := range []struct {
		name     string
		server   *tls.Config
		client   *tls.Config
		wantFail string // substring of the first error, "" = success
	}{
		{"ok", serverCfg(bundle), identity.ClientTLS(fixed(cliCert), bundle, srvID), ""},
		{"ok one of several expected", serverCfg(bundle), identity.ClientTLS(fixed(cliCert), bundle, wrongID, srvID), ""},
		{"client refuses unexpected server", serverCfg(bundle), identity.ClientTLS(fixed(cliCert), bundle, wrongID), "server is spiffe://cluster.local/ns/server-ns/sa/server"},
		{"client refuses with no expected IDs", serverCfg(bundle), identity.ClientTLS(fixed(cliCert), bundle), "want one of []"},
		{"client refuses server outside its bundle", serverCfg(bundle), identity.ClientTLS(fixed(cliCert), other.Bundle(), srvID), "could not get X509 bundle"},
		{"server refuses other trust domain (not in bundle)", serverCfg(bundle), identity.ClientTLS(fixed(otherCert), bundle, srvID), "could not get X509 bundle"},
		{"server refuses other trust domain (federated)", serverCfg(federated), identity.ClientTLS(fixed(otherCert), bundle, srvID), "not in trust domain cluster.local"},
		{"server refuses expired client", serverCfg(bundle), identity.ClientTLS(fixed(expired), bundle, srvID), "expired"},
		{"server refuses not yet valid client", serverCfg(bundle), identity.ClientTLS(fixed(notYet), bundle, srvID), "not yet valid"},
		{"server refuses self-signed client", serverCfg(bundle), identity.ClientTLS(fixed(self), bundle, srvID), "unknown authority"},
		{"server refuses client without certificate", serverCfg(bundle), identity.ClientTLS(fixed(&tls.Certificate{}), bundle, srvID), "client didn't provide a certificate"},
		{"server refuses TLS 1.2", serverCfg(bundle), tls12, "protocol version"},
		{"server refuses http/1.1 ALPN", serverCfg(bundle), http1, "client did not negotiate ALPN"},
		{"server refuses missing ALPN", serverCfg(bundle), noALPN, "client did not negotiate ALPN"},
		{"server with empty bundle refuses", serverCfg(identity.NewBundle()), identity.ClientTLS(fixed(cliCert), bundle, srvID), "could not get X509 bundle"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv, cli := handshake(t, tc.server, tc.client)
			if tc.wantFail == "" {
				if srv.err != nil || cli.err != nil {
					t.Fatalf("server err %v, client err %v", srv.err, cli.err)
				}
				if srv.peer != cliID || cli.peer != srvID {
					t.Fatalf("server saw %v (want %v), client saw %v (want %v)", srv.peer, cliID, cli.peer, srvID)
				}
				return
			}
			if srv.err == nil && cli.err == nil {
				t.Fatalf("handshake succeeded; want failure %q", tc.wantFail)
			}
			msg := ""
			for _, e := range []error{srv.err, cli.err} {
				if e != nil {
					msg += e.Error() + " | "
				}
			}
			if !strings.Contains(msg, tc.wantFail) {
				t.Fatalf("errors %q do not mention %q", msg, tc.wantFail)
			}
		})
	}
}

func TestBundleHotReload(t *testing.T) {
	ca := identitytest.Must("cluster.local")
	rotated := identitytest.Must("cluster.local") // same trust domain, new root
	srvCert, srvID := ca.MustLeaf("s", "server")
	cliCert, _ := ca.MustLeaf("c", "client")
	b := identity.NewBundle()
	server := identity.ServerTLS(func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return srvCert, nil }, b, ca.TrustDomain)
	client := identity.ClientTLS(func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return cliCert, nil }, ca.Bundle(), srvID)

	if srv, _ := handshake(t, server, client); srv.err == nil {
		t.Fatal("empty bundle accepted the client")
	}
	b.Set(ca.TrustDomain, ca.Roots())
	if srv, cli := handshake(t, server, client); srv.err != nil || cli.err != nil {
		t.Fatalf("after Set: server %v client %v", srv.err, cli.err)
	}
	b.Set(ca.TrustDomain, rotated.Roots())
	if srv, _ := handshake(t, server, client); srv.err == nil {
		t.Fatal("old root still trusted after rotation")
	}
	b.Set(ca.TrustDomain, append(rotated.Roots(), ca.Roots()...))
	if srv, cli := handshake(t, server, client); srv.err != nil || cli.err != nil {
		t.Fatalf("with both roots: server %v client %v", srv.err, cli.err)
	}
	if err := b.SetPEM(ca.TrustDomain, []byte("not pem")); err == nil {
		t.Fatal("SetPEM accepted garbage")
	}
	if got := len(b.Roots(ca.TrustDomain)); got != 2 {
		t.Fatalf("failed SetPEM changed the roots: %d roots", got)
	}
	b.Set(ca.TrustDomain, nil)
	if srv, _ := handshake(t, server, client); srv.err == nil {
		t.Fatal("removed trust domain still trusted")
	}
}
