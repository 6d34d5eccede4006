package ca

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net"
	"net/url"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"

	"github.com/amesh-dev/amesh/api/bearer"
	cav1 "github.com/amesh-dev/amesh/api/ca/v1"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

const serverName = "amesh-controller.amesh-system.svc"

// tokenAuthorizer is what the controller's node check looks like from here:
// a token names a caller, and each caller may obtain some identities.
type tokenAuthorizer map[string][]spiffeid.ID

func (a tokenAuthorizer) Authorize(ctx context.Context, id spiffeid.ID) error {
	tok, err := bearer.FromIncoming(ctx)
	if err != nil {
		return err
	}
	if tok == "explode" {
		return errors.New("token review backend failed")
	}
	allowed, ok := a[tok]
	if !ok {
		return status.Error(codes.Unauthenticated, "unknown token")
	}
	for _, x := range allowed {
		if x == id {
			return nil
		}
	}
	return status.Errorf(codes.PermissionDenied, "caller may not obtain %s", id)
}

type refusals struct {
	mu    sync.Mutex
	codes map[codes.Code]int
}

func (r *refusals) hook(_ context.Context, _ string, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.codes[status.Code(err)]++
}

func (r *refusals) get() map[codes.Code]int {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := map[codes.Code]int{}
	for k, v := range r.codes {
		out[k] = v
	}
	return out
}

// serveTLS runs svc behind real TLS on loopback, with a serving certificate
// from a, and returns a client connection that verifies it.
func serveTLS(t *testing.T, a *Authority, register func(*grpc.Server)) *grpc.ClientConn {
	t.Helper()
	key := newKey(t)
	chain, err := a.SignServer(key.Public(), []string{serverName}, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	cert := tls.Certificate{PrivateKey: key, Leaf: chain[0]}
	for _, c := range chain {
		cert.Certificate = append(cert.Certificate, c.Raw)
	}
	g := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{
		Certificates: []tls.Certificate{cert},
		MinVersion:   tls.VersionTLS13,
	})))
	register(g)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { defer close(done); _ = g.Serve(ln) }()
	t.Cleanup(func() { g.Stop(); <-done })

	pool := x509.NewCertPool()
	for _, r := range a.Roots() {
		pool.AddCert(r)
	}
	conn, err := grpc.NewClient(ln.Addr().String(), grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{
		RootCAs:    pool,
		ServerName: serverName,
		MinVersion: tls.VersionTLS13,
	})))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return conn
}

func staticToken(tok string) bearer.Source {
	return func(context.Context) (string, error) { return tok, nil }
}

func TestServerOverTLS(t *testing.T) {
	a := newRoot(t)
	authz := tokenAuthorizer{
		"ztunnel-node-1": {idA},
		"waypoint-b":     {idB},
	}
	ref := &refusals{codes: map[codes.Code]int{}}
	issued := 0
	var issuedMu sync.Mutex
	srv := NewServer(a, authz, ServerOptions{
		OnRefusal: ref.hook,
		OnIssued:  func(context.Context, spiffeid.ID) { issuedMu.Lock(); issued++; issuedMu.Unlock() },
	})
	conn := serveTLS(t, a, srv.Register)
	raw := cav1.NewCertificateServiceClient(conn)
	key := newKey(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()

	t.Run("good CSR through the client", func(t *testing.T) {
		c := NewClient(conn, staticToken("ztunnel-node-1"))
		r, err := c.Create(ctx, idA, uriCSR(t, key, idA), time.Hour)
		if err != nil {
			t.Fatalf("Create: %v", err)
		}
		if got := verifySVID(t, r.Chain, r.Roots); got != idA {
			t.Errorf("identity %s", got)
		}
		if len(r.Roots) != 1 || !r.Roots[0].Equal(a.Certificate()) {
			t.Errorf("roots = %v", r.Roots)
		}
		if life := time.Until(r.Chain[0].NotAfter); life > time.Hour || life < 58*time.Minute {
			t.Errorf("leaf lives %v, asked for 1h", life)
		}
		chain, err := c.Issue(ctx, idA, uriCSR(t, key, idA), 0)
		if err != nil || len(chain) != 1 {
			t.Fatalf("Issue = %v, %v", chain, err)
		}
	})

	extra := csrPEM(t, key, &x509.CertificateRequest{URIs: []*url.URL{idA.URL()}, DNSNames: []string{"x.example"}})
	tests := []struct {
		name     string
		token    string // "" sends none
		identity string
		csr      []byte
		ttl      int64
		want     codes.Code
	}{
		{"CSR with extra SANs", "ztunnel-node-1", idA.String(), extra, 0, codes.InvalidArgument},
		{"CSR for another identity", "ztunnel-node-1", idA.String(), uriCSR(t, key, idB), 0, codes.InvalidArgument},
		{"malformed PEM", "ztunnel-node-1", idA.String(), []byte("-----BEGIN CERTIFICATE REQUEST-----\n!!\n-----END CERTIFICATE REQUEST-----\n"), 0, codes.InvalidArgument},
		{"identity not a SPIFFE ID", "ztunnel-node-1", "https://cluster.local/ns/a/sa/alice", uriCSR(t, key, idA), 0, codes.InvalidArgument},
		{"identity of another trust domain", "ztunnel-node-1", other.String(), uriCSR(t, key, other), 0, codes.InvalidArgument},
		{"negative validity", "ztunnel-node-1", idA.String(), uriCSR(t, key, idA), -5, codes.InvalidArgument},
		{"wrong identity for the caller", "ztunnel-node-1", idB.String(), uriCSR(t, key, idB), 0, codes.PermissionDenied},
		{"no token", "", idA.String(), uriCSR(t, key, idA), 0, codes.Unauthenticated},
		{"unknown token", "forged", idA.String(), uriCSR(t, key, idA), 0, codes.Unauthenticated},
		{"authorizer failure fails closed", "explode", idA.String(), uriCSR(t, key, idA), 0, codes.PermissionDenied},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			rctx := ctx
			if tc.token != "" {
				rctx = bearer.AppendOutgoing(ctx, tc.token)
			}
			resp, err := raw.CreateCertificate(rctx, &cav1.CreateCertificateRequest{CsrPem: string(tc.csr), Identity: tc.identity, ValiditySeconds: tc.ttl})
			if status.Code(err) != tc.want {
				t.Fatalf("CreateCertificate = %v, %v; want code %v", resp, err, tc.want)
			}
		})
	}
	// An unauthenticated caller learns nothing about its CSR: authorization
	// is decided before the CSR is looked at.
	_, err := raw.CreateCertificate(ctx, &cav1.CreateCertificateRequest{CsrPem: "garbage", Identity: idA.String()})
	if status.Code(err) != codes.Unauthenticated {
		t.Errorf("garbage CSR without token = %v, want Unauthenticated", err)
	}

	got := ref.get()
	want := map[codes.Code]int{codes.InvalidArgument: 6, codes.PermissionDenied: 2, codes.Unauthenticated: 3}
	for c, n := range want {
		if got[c] != n {
			t.Errorf("refusals[%v] = %d, want %d (all: %v)", c, got[c], n, got)
		}
	}
	if len(got) != len(want) {
		t.Errorf("refusal codes %v, want %v", got, want)
	}
	issuedMu.Lock()
	if issued != 2 {
		t.Errorf("issued %d, want 2", issued)
	}
	issuedMu.Unlock()

	t.Run("client refuses to send a bad CSR", func(t *testing.T) {
		c := NewClient(conn, staticToken("ztunnel-node-1"))
		if _, err := c.Issue(ctx, idA, []byte("junk"), 0); !errors.Is(err, ErrInvalidCSR) {
			t.Errorf("Issue(junk) = %v", err)
		}
	})
	t.Run("client surfaces the status", func(t *testing.T) {
		c := NewClient(conn, staticToken("waypoint-b"))
		_, err := c.Issue(ctx, idA, uriCSR(t, key, idA), 0)
		if status.Code(err) != codes.PermissionDenied {
			t.Errorf("Issue = %v, want PermissionDenied", err)
		}
	})
	t.Run("nil authorizer refuses everything", func(t *testing.T) {
		conn := serveTLS(t, a, NewServer(a, nil, ServerOptions{}).Register)
		_, err := NewClient(conn, staticToken("ztunnel-node-1")).Issue(ctx, idA, uriCSR(t, key, idA), 0)
		if status.Code(err) != codes.PermissionDenied {
			t.Errorf("Issue = %v, want PermissionDenied", err)
		}
	})
}

// lyingCA answers with a fixed response, whatever the request.
type lyingCA struct {
	cav1.UnimplementedCertificateServiceServer
	resp *cav1.CreateCertificateResponse
}

func (l *lyingCA) CreateCertificate(context.Context, *cav1.CreateCertificateRequest) (*cav1.CreateCertificateResponse, error) {
	return l.resp, nil
}

func TestClientRejectsBadResponses(t *testing.T) {
	a := newRoot(t)
	key := newKey(t)
	chainPEM := func(csr []byte, id spiffeid.ID) []string {
		chain, err := a.Sign(csr, id, time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		return []string{string(EncodeCertsPEM(chain))}
	}
	tests := []struct {
		name string
		resp *cav1.CreateCertificateResponse
	}{
		{"other identity", &cav1.CreateCertificateResponse{CertChainPem: chainPEM(uriCSR(t, key, idB), idB)}},
		{"other key", &cav1.CreateCertificateResponse{CertChainPem: chainPEM(uriCSR(t, newKey(t), idA), idA)}},
		{"garbage chain", &cav1.CreateCertificateResponse{CertChainPem: []string{"not a certificate"}}},
		{"garbage roots", &cav1.CreateCertificateResponse{CertChainPem: chainPEM(uriCSR(t, key, idA), idA), RootsPem: []string{"x"}}},
		{"empty", &cav1.CreateCertificateResponse{}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			conn := serveTLS(t, a, func(g *grpc.Server) { cav1.RegisterCertificateServiceServer(g, &lyingCA{resp: tc.resp}) })
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			_, err := NewClient(conn, nil).Issue(ctx, idA, uriCSR(t, key, idA), 0)
			if !errors.Is(err, ErrBadResponse) {
				t.Errorf("Issue = %v, want ErrBadResponse", err)
			}
		})
	}
}
