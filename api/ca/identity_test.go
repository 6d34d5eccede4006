package ca

import (
	"context"
	"crypto"
	"crypto/x509"
	"testing"
	"time"

	"github.com/amesh-dev/amesh/api/identity"
)

var _ identity.Issuer = (*Client)(nil)

// TestIdentityStoreThroughCA is the data plane's real path: identity's key,
// CSR and certificate store, issuing through this package's client over
// gRPC + TLS to this package's server.
func TestIdentityStoreThroughCA(t *testing.T) {
	a := newRoot(t)
	srv := NewServer(a, tokenAuthorizer{"ztunnel-node-1": {idA}}, ServerOptions{})
	conn := serveTLS(t, a, srv.Register)
	store := identity.NewStore(NewClient(conn, staticToken("ztunnel-node-1")), identity.StoreOptions{TTL: time.Hour})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- store.Run(ctx) }()
	defer func() { cancel(); <-done }()

	cctx, ccancel := context.WithTimeout(ctx, 20*time.Second)
	defer ccancel()
	cert, err := store.Certificate(cctx, idA)
	if err != nil {
		t.Fatalf("Certificate: %v", err)
	}
	var chain []*x509.Certificate
	for _, der := range cert.Certificate {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			t.Fatal(err)
		}
		chain = append(chain, c)
	}
	if got := verifySVID(t, chain, a.Roots()); got != idA {
		t.Errorf("store holds a certificate for %s", got)
	}
	key, ok := cert.PrivateKey.(crypto.Signer)
	if !ok {
		t.Fatalf("private key %T", cert.PrivateKey)
	}
	if err := identity.CheckChain(chain, idA, key); err != nil {
		t.Errorf("identity.CheckChain: %v", err)
	}

	// An identity the caller may not have is refused, and the store says so.
	bctx, bcancel := context.WithTimeout(ctx, 2*time.Second)
	defer bcancel()
	if _, err := store.Certificate(bctx, idB); err == nil {
		t.Error("the store obtained a certificate the CA should refuse")
	}
}
