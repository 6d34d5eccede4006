package hbone

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/amesh-dev/amesh/api/identity"
	"github.com/amesh-dev/amesh/api/identity/identitytest"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
	"golang.org/x/net/http2"
)

// countHandler counts handler calls and echoes.
func countHandler(n *atomic.Int32) Handler {
	return func(ctx context.Context, r *Request) (func(net.Conn), error) {
		n.Add(1)
		return echo(ctx, r)
	}
}

func TestServerRefusesPlaintext(t *testing.T) {
	var calls atomic.Int32
	e := newEnv(t, countHandler(&calls))
	c, err := net.Dial("tcp", e.addr.String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	// A cleartext HTTP/2 client (h2c prior knowledge): preface + SETTINGS +
	// a CONNECT HEADERS frame.
	fr := http2.NewFramer(c, nil)
	_, _ = c.Write([]byte(http2.ClientPreface))
	_ = fr.WriteSettings()
	_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: []byte{0x82}, EndHeaders: true})
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	b, err := io.ReadAll(c)
	if isTimeout(err) {
		t.Fatal("server kept the plaintext connection open")
	}
	if len(b) > 0 && b[0] != 0x15 { // anything but a TLS alert record
		t.Fatalf("server answered plaintext with %x", b)
	}
	if calls.Load() != 0 {
		t.Fatal("handler called for a plaintext client")
	}
}

// stdClient returns a net/http HTTP/2 client (an independent HTTP/2
// implementation) that authenticates like an HBONE client.
func stdClient(e *env) *http.Client {
	tr := &http.Transport{
		TLSClientConfig: identity.ClientTLS(func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return e.cliCert, nil }, e.bundle, e.srvID),
		Protocols:       new(http.Protocols),
	}
	tr.Protocols.SetHTTP2(true)
	return &http.Client{Transport: tr, Timeout: 10 * time.Second}
}

func TestServerWithStandardClient(t *testing.T) {
	var calls atomic.Int32
	e := newEnv(t, countHandler(&calls))
	hc := stdClient(e)
	defer hc.CloseIdleConnections()
	base := "https://" + e.addr.String()

	for _, tc := range []struct {
		method, authority string
		want              int
	}{
		{http.MethodGet, "", http.StatusBadRequest},
		{http.MethodPost, "", http.StatusBadRequest},
		{http.MethodConnect, "example.com:80", http.StatusBadRequest},
		{http.MethodConnect, "10.0.0.1", http.StatusBadRequest},
		{http.MethodConnect, "10.0.0.1:0", http.StatusBadRequest},
		{http.MethodConnect, "[fe80::1%eth0]:80", http.StatusBadRequest},
		{http.MethodConnect, "10.0.0.1:80", http.StatusOK},
		{http.MethodConnect, "[fd00::1]:443", http.StatusOK},
	} {
		t.Run(tc.method+" "+tc.authority, func(t *testing.T) {
			before := calls.Load()
			pr, pw := io.Pipe()
			req, err := http.NewRequest(tc.method, base+"/", pr)
			if err != nil {
				t.Fatal(err)
			}
			if tc.authority != "" {
				req.Host = tc.authority
			}
			resp, err := hc.Do(req)
			if err != nil {
				pw.Close()
				t.Fatal(err)
			}
			defer resp.Body.Close()
			if resp.StatusCode != tc.want {
				t.Fatalf("status %d, want %d", resp.StatusCode, tc.want)
			}
			if tc.want != http.StatusOK {
				pw.Close()
				if calls.Load() != before {
					t.Fatal("handler called for a bad request")
				}
				return
			}
			// The tunnel works with a standard HTTP/2 client too.
			go func() {
				_, _ = pw.Write([]byte("interop"))
				pw.Close()
			}()
			b, err := io.ReadAll(resp.Body)
			if err != nil || string(b) != "interop" {
				t.Fatalf("echo %q, %v", b, err)
			}
		})
	}
}

func TestServerRefusesPeers(t *testing.T) {
	var calls atomic.Int32
	core, logs := observer.New(zap.DebugLevel)
	e := newEnv(t, countHandler(&calls), func(s *ServerConfig, _ *ClientConfig) { s.Logger = zap.New(core) })
	other := identitytest.Must("other.local")
	otherCert, otherID := other.MustLeaf("cli-ns", "client")
	now := time.Now()
	expired, err := e.ca.Leaf(e.cliID, now.Add(-2*time.Hour), now.Add(-time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	self, err := identitytest.SelfSigned(e.cliID, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	// The server also trusts other.local's root: the trust domain check
	// itself must refuse its clients.
	e.bundle.Set(other.TrustDomain, other.Roots())
	defer e.bundle.Set(other.TrustDomain, nil)

	for _, tc := range []struct {
		name string
		cert *tls.Certificate
		why  string // the server's reason, in its log
	}{
		{"other trust domain", otherCert, "not in trust domain cluster.local"},
		{"expired", expired, "certificate has expired"},
		{"self-signed", self, "certificate signed by unknown authority"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// A raw TLS client that presents the certificate regardless
			// (the HBONE Client would refuse to use an expired one).
			cfg := identity.ClientTLS(func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return tc.cert, nil }, e.bundle, e.srvID)
			c, err := tls.Dial("tcp", e.addr.String(), cfg)
			if err != nil {
				t.Fatal(err) // TLS 1.3: the client's handshake ends before the server's verdict
			}
			defer c.Close()
			_, _ = c.Write([]byte(http2.ClientPreface))
			_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
			_, err = io.ReadAll(c)
			if err == nil || !strings.Contains(err.Error(), "bad certificate") {
				t.Fatalf("read: %v; want the server's bad certificate alert", err)
			}
			found := false
			for deadline := time.Now().Add(2 * time.Second); !found && time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
				for _, l := range logs.TakeAll() {
					if err, ok := l.ContextMap()["error"].(string); ok && strings.Contains(err, tc.why) {
						found = true
					}
				}
			}
			if !found {
				t.Fatalf("server did not log %q", tc.why)
			}
		})
	}
	// Through the HBONE client: refused by the server, or (expired) not even
	// sent.
	for name, cert := range map[string]*tls.Certificate{"other trust domain": otherCert, "self-signed": self, "expired": expired} {
		cl := NewClient(ClientConfig{
			Certificates: func(context.Context, spiffeid.ID) (*tls.Certificate, error) { return cert, nil },
			Bundle:       e.bundle,
		})
		r := e.req("10.0.0.1:80")
		r.Source = otherID
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		s, err := cl.Dial(ctx, r)
		cancel()
		cl.Close()
		if err == nil {
			s.Close()
			t.Errorf("%s: HBONE client got a stream", name)
		} else if !strings.Contains(err.Error(), "bad certificate") && !strings.Contains(err.Error(), "expired at") {
			t.Errorf("%s: %v", name, err)
		}
	}
	if calls.Load() != 0 {
		t.Fatalf("handler called %d times for refused clients", calls.Load())
	}
}

func TestClientRefusesUnexpectedServer(t *testing.T) {
	var calls atomic.Int32
	e := newEnv(t, countHandler(&calls))
	r := e.req("10.0.0.1:80")
	r.Expected = []spiffeid.ID{spiffeid.RequireFromString("spiffe://cluster.local/ns/srv-ns/sa/someone-else")}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if s, err := e.client.Dial(ctx, r); !errors.Is(err, identity.ErrPeer) {
		if s != nil {
			s.Close()
		}
		t.Fatalf("Dial: %v; want identity.ErrPeer", err)
	}
	if calls.Load() != 0 {
		t.Fatal("handler reached through an unexpected server")
	}
	// A wrong expectation must not poison the pool for the right one.
	s := e.dial(t, "10.0.0.1:80")
	s.Close()
}

func TestDialValidation(t *testing.T) {
	e := newEnv(t, echo)
	for name, mod := range map[string]func(*DialRequest){
		"no source":   func(r *DialRequest) { r.Source = spiffeid.ID{} },
		"no expected": func(r *DialRequest) { r.Expected = nil },
		"no proxy":    func(r *DialRequest) { r.Proxy = netipZero },
		"port 0":      func(r *DialRequest) { r.Target = netipPort0 },
	} {
		r := e.req("10.0.0.1:80")
		mod(&r)
		if _, err := e.client.Dial(context.Background(), r); err == nil {
			t.Errorf("%s: Dial succeeded", name)
		}
	}
	if n := e.dials.Load(); n != 0 {
		t.Fatalf("invalid requests dialed %d times", n)
	}
}
