package ca

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"

	"github.com/amesh-dev/amesh/api/bearer"
	cav1 "github.com/amesh-dev/amesh/api/ca/v1"
)

// ErrBadResponse: the CA answered with a chain that does not match the
// request (wrong identity or key, expired, unparsable).
var ErrBadResponse = errors.New("unusable certificate from the CA")

// Client obtains certificates from the controller's CertificateService. It
// has the shape of identity.Issuer.
type Client struct {
	svc   cav1.CertificateServiceClient
	token bearer.Source
	now   func() time.Time
}

// NewClient returns a client on conn (which should use TLS that verifies the
// controller). token, if not nil, supplies the bearer token sent with every
// request.
func NewClient(conn grpc.ClientConnInterface, token bearer.Source) *Client {
	return &Client{svc: cav1.NewCertificateServiceClient(conn), token: token, now: time.Now}
}

// Result is a signed chain and the trust domain's roots.
type Result struct {
	Chain []*x509.Certificate // leaf first
	Roots []*x509.Certificate
}

// Issue requests a certificate for id from the CSR csrPEM and returns the
// chain, leaf first. ttl 0 asks for the CA's default.
func (c *Client) Issue(ctx context.Context, id spiffeid.ID, csrPEM []byte, ttl time.Duration) ([]*x509.Certificate, error) {
	r, err := c.Create(ctx, id, csrPEM, ttl)
	if err != nil {
		return nil, err
	}
	return r.Chain, nil
}

// Create is Issue that also returns the roots. The response is checked: the
// leaf must carry exactly id as its URI SAN, hold the CSR's public key and be
// currently valid.
func (c *Client) Create(ctx context.Context, id spiffeid.ID, csrPEM []byte, ttl time.Duration) (*Result, error) {
	csr, err := ParseCSR(csrPEM)
	if err != nil {
		return nil, fmt.Errorf("ca: create %s: %w", id, err)
	}
	if c.token != nil {
		tok, err := c.token(ctx)
		if err != nil {
			return nil, fmt.Errorf("ca: create %s: bearer token: %w", id, err)
		}
		ctx = bearer.AppendOutgoing(ctx, tok)
	}
	resp, err := c.svc.CreateCertificate(ctx, &cav1.CreateCertificateRequest{
		CsrPem:          string(csrPEM),
		ValiditySeconds: int64(ttl / time.Second),
		Identity:        id.String(),
	})
	if err != nil {
		return nil, fmt.Errorf("ca: create %s: %w", id, err)
	}
	chain, err := ParseCertsPEM([]byte(strings.Join(resp.GetCertChainPem(), "\n")))
	if err != nil {
		return nil, fmt.Errorf("ca: create %s: %w: chain: %v", id, ErrBadResponse, err)
	}
	var roots []*x509.Certificate
	if len(resp.GetRootsPem()) > 0 {
		if roots, err = ParseCertsPEM([]byte(strings.Join(resp.GetRootsPem(), "\n"))); err != nil {
			return nil, fmt.Errorf("ca: create %s: %w: roots: %v", id, ErrBadResponse, err)
		}
	}
	leaf := chain[0]
	if len(leaf.URIs) != 1 || leaf.URIs[0].String() != id.String() {
		return nil, fmt.Errorf("ca: create %s: %w: leaf names %v", id, ErrBadResponse, leaf.URIs)
	}
	if !publicKeysEqual(leaf.PublicKey, csr.PublicKey) {
		return nil, fmt.Errorf("ca: create %s: %w: leaf key differs from the CSR's", id, ErrBadResponse)
	}
	if now := c.now(); now.After(leaf.NotAfter) {
		return nil, fmt.Errorf("ca: create %s: %w: leaf expired at %v", id, ErrBadResponse, leaf.NotAfter)
	}
	return &Result{Chain: chain, Roots: roots}, nil
}
