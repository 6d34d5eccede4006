// Package identitytest is a test-only certificate authority for SPIFFE
// workload certificates: it mints a root and signs leaf certificates with
// crypto/x509, and implements identity.Issuer. It exists for tests of the
// identity and hbone packages and of their users; production code uses the
// controller's CA (api/ca).
package identitytest

import (
	"context"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"math/big"
	"net/url"
	"sync"
	"time"

	"github.com/amesh-dev/amesh/api/identity"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// CA is a root certificate authority for one trust domain. Safe for
// concurrent use.
type CA struct {
	TrustDomain spiffeid.TrustDomain
	Root        *x509.Certificate
	key         *ecdsa.PrivateKey

	mu     sync.Mutex
	issued int
	fail   error
}

// New returns a CA for trust domain td (a name such as "cluster.local") whose
// root is valid from an hour ago for ten years.
func New(td string) (*CA, error) {
	trust, err := spiffeid.TrustDomainFromString(td)
	if err != nil {
		return nil, err
	}
	key, err := identity.NewKey()
	if err != nil {
		return nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{Organization: []string{"amesh test"}, CommonName: "root " + td},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(10 * 365 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		URIs:                  []*url.URL{trust.ID().URL()},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, err
	}
	root, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return &CA{TrustDomain: trust, Root: root, key: key}, nil
}

// Must is New that panics on error, for tests.
func Must(td string) *CA {
	ca, err := New(td)
	if err != nil {
		panic(err)
	}
	return ca
}

// Roots returns the CA's root certificates.
func (ca *CA) Roots() []*x509.Certificate { return []*x509.Certificate{ca.Root} }

// Bundle returns a new trust bundle holding this CA's root.
func (ca *CA) Bundle() *identity.Bundle {
	b := identity.NewBundle()
	b.Set(ca.TrustDomain, ca.Roots())
	return b
}

// SetFailure makes Issue fail with err (nil restores success).
func (ca *CA) SetFailure(err error) {
	ca.mu.Lock()
	defer ca.mu.Unlock()
	ca.fail = err
}

// Issued returns how many certificates Issue has signed.
func (ca *CA) Issued() int {
	ca.mu.Lock()
	defer ca.mu.Unlock()
	return ca.issued
}

// Issue implements identity.Issuer: it validates the CSR (only SAN = id) and
// signs a leaf valid for ttl.
func (ca *CA) Issue(ctx context.Context, id spiffeid.ID, csrPEM []byte, ttl time.Duration) ([]*x509.Certificate, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	ca.mu.Lock()
	fail := ca.fail
	ca.mu.Unlock()
	if fail != nil {
		return nil, fail
	}
	csr, csrID, err := identity.ParseCSR(csrPEM)
	if err != nil {
		return nil, err
	}
	if csrID != id {
		return nil, fmt.Errorf("CSR is for %s, request is for %s", csrID, id)
	}
	if !id.MemberOf(ca.TrustDomain) {
		return nil, fmt.Errorf("%s is not in trust domain %s", id, ca.TrustDomain)
	}
	// X.509 validity has one-second resolution: start at the current second
	// so that the lifetime is exactly ttl and valid right away.
	notBefore := time.Now().Truncate(time.Second)
	leaf, err := ca.sign(id, csr.PublicKey, notBefore, notBefore.Add(ttl))
	if err != nil {
		return nil, err
	}
	ca.mu.Lock()
	ca.issued++
	ca.mu.Unlock()
	return []*x509.Certificate{leaf}, nil
}

func (ca *CA) sign(id spiffeid.ID, pub any, notBefore, notAfter time.Time) (*x509.Certificate, error) {
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		NotBefore:             notBefore,
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
		URIs:                  []*url.URL{id.URL()},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Root, pub, ca.key)
	if err != nil {
		return nil, err
	}
	return x509.ParseCertificate(der)
}

// Leaf returns a key and certificate for id valid from notBefore to notAfter,
// ready for a tls.Config.
func (ca *CA) Leaf(id spiffeid.ID, notBefore, notAfter time.Time) (*tls.Certificate, error) {
	key, err := identity.NewKey()
	if err != nil {
		return nil, err
	}
	leaf, err := ca.sign(id, key.Public(), notBefore, notAfter)
	if err != nil {
		return nil, err
	}
	return &tls.Certificate{Certificate: [][]byte{leaf.Raw}, PrivateKey: key, Leaf: leaf}, nil
}

// MustLeaf returns a certificate for the workload identity
// spiffe://<td>/ns/<ns>/sa/<sa>, valid for an hour; it panics on error.
func (ca *CA) MustLeaf(ns, sa string) (*tls.Certificate, spiffeid.ID) {
	id, err := identity.ID(ca.TrustDomain.Name(), ns, sa)
	if err != nil {
		panic(err)
	}
	now := time.Now()
	c, err := ca.Leaf(id, now.Add(-time.Minute), now.Add(time.Hour))
	if err != nil {
		panic(err)
	}
	return c, id
}

// SelfSigned returns a self-signed leaf certificate for id: it verifies against
// no bundle.
func SelfSigned(id spiffeid.ID, ttl time.Duration) (*tls.Certificate, error) {
	key, err := identity.NewKey()
	if err != nil {
		return nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		NotBefore:             now.Add(-time.Minute),
		NotAfter:              now.Add(ttl),
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
		URIs:                  []*url.URL{id.URL()},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, err
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return &tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}, nil
}

// ErrUnavailable is a convenient failure for SetFailure.
var ErrUnavailable = errors.New("identitytest: CA unavailable")

func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		panic(err)
	}
	return n
}
