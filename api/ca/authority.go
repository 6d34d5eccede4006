// Package ca is amesh's certificate authority: an Authority that issues
// SPIFFE X.509 workload certificates for one trust domain (from a root it
// generates or one the operator provides), the gRPC CertificateService
// server the controller runs on 15012 with a pluggable Authorizer, and the
// client the data plane uses to obtain certificates.
//
// Deviations from the API sketch: LoadAuthority takes the trust domain
// (an operator's certificate need not carry a SPIFFE ID); SignServer returns
// the chain, leaf first, like Sign; Authority constructors take Options
// (maximum TTL, clock).
package ca

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net/url"
	"slices"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

const (
	// DefaultTTL is the lifetime of a workload certificate when the caller
	// asks for none.
	DefaultTTL = 24 * time.Hour
	// DefaultMaxTTL caps every workload certificate.
	DefaultMaxTTL = 24 * time.Hour
	// clockSkew backdates NotBefore so that peers whose clocks run a little
	// behind accept a fresh certificate.
	clockSkew = time.Minute
)

var (
	// ErrInvalidCSR: the CSR does not parse, its signature is wrong, its
	// key is unsupported, or its SANs are not exactly the requested ID.
	ErrInvalidCSR = errors.New("invalid certificate signing request")
	// ErrInvalidIdentity: the identity is not a workload SPIFFE ID of this
	// authority's trust domain.
	ErrInvalidIdentity = errors.New("invalid identity")
	// ErrInvalidAuthority: a loaded certificate or key cannot serve as this
	// trust domain's CA.
	ErrInvalidAuthority = errors.New("invalid certificate authority")
)

// Option configures an Authority.
type Option func(*Authority)

// WithMaxTTL caps the lifetime of workload certificates (default
// DefaultMaxTTL).
func WithMaxTTL(d time.Duration) Option { return func(a *Authority) { a.maxTTL = d } }

// WithClock replaces time.Now (tests).
func WithClock(now func() time.Time) Option { return func(a *Authority) { a.now = now } }

// Authority signs certificates for one trust domain with a CA key: a root it
// generated, or an operator-provided root or intermediate. It is immutable
// and safe for concurrent use.
type Authority struct {
	td    spiffeid.TrustDomain
	cert  *x509.Certificate   // the signing certificate
	key   crypto.Signer       // its key
	chain []*x509.Certificate // intermediates above cert, excluding the trust anchor
	roots []*x509.Certificate // trust anchors published to the mesh

	maxTTL time.Duration
	now    func() time.Time
}

func newAuthority(opts []Option) *Authority {
	a := &Authority{maxTTL: DefaultMaxTTL, now: time.Now}
	for _, o := range opts {
		o(a)
	}
	return a
}

// NewRoot generates a self-signed ECDSA P-256 root for td, valid for ttl.
func NewRoot(td spiffeid.TrustDomain, ttl time.Duration, opts ...Option) (*Authority, error) {
	if td.IsZero() {
		return nil, fmt.Errorf("ca: new root: %w: empty trust domain", ErrInvalidIdentity)
	}
	if ttl <= 0 {
		return nil, fmt.Errorf("ca: new root: non-positive lifetime %v", ttl)
	}
	a := newAuthority(opts)
	a.td = td
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("ca: new root: %w", err)
	}
	serial, err := newSerial()
	if err != nil {
		return nil, fmt.Errorf("ca: new root: %w", err)
	}
	now := a.now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{Organization: []string{"amesh"}, CommonName: "amesh root CA " + td.Name()},
		NotBefore:             now.Add(-clockSkew),
		NotAfter:              now.Add(ttl),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		URIs:                  []*url.URL{td.ID().URL()},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, fmt.Errorf("ca: new root: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("ca: new root: %w", err)
	}
	a.cert, a.key, a.roots = cert, key, []*x509.Certificate{cert}
	return a, nil
}

// LoadAuthority loads a CA for td from PEM: certPEM holds the signing
// certificate first, optionally followed by the chain up to the root; keyPEM
// its private key (PKCS#8, SEC 1 or PKCS#1). The last certificate of certPEM
// is the trust anchor published to the mesh (the signing certificate itself
// when it is alone). The signing certificate must be a currently valid CA
// allowed to sign certificates, match the key, and, if it carries a SPIFFE
// ID, belong to td.
func LoadAuthority(td spiffeid.TrustDomain, certPEM, keyPEM []byte, opts ...Option) (*Authority, error) {
	if td.IsZero() {
		return nil, fmt.Errorf("ca: load: %w: empty trust domain", ErrInvalidIdentity)
	}
	a := newAuthority(opts)
	a.td = td
	certs, err := ParseCertsPEM(certPEM)
	if err != nil {
		return nil, fmt.Errorf("ca: load: %w", err)
	}
	key, err := parseKeyPEM(keyPEM)
	if err != nil {
		return nil, fmt.Errorf("ca: load: %w", err)
	}
	cert := certs[0]
	if !cert.IsCA || !cert.BasicConstraintsValid || cert.KeyUsage&x509.KeyUsageCertSign == 0 {
		return nil, fmt.Errorf("ca: load: %w: the certificate is not a CA allowed to sign certificates", ErrInvalidAuthority)
	}
	if !publicKeysEqual(cert.PublicKey, key.Public()) {
		return nil, fmt.Errorf("ca: load: %w: the key does not match the certificate", ErrInvalidAuthority)
	}
	now := a.now()
	if now.Before(cert.NotBefore) || now.After(cert.NotAfter) {
		return nil, fmt.Errorf("ca: load: %w: the certificate is valid from %v to %v", ErrInvalidAuthority, cert.NotBefore, cert.NotAfter)
	}
	for _, u := range cert.URIs {
		if u.Scheme != "spiffe" {
			continue
		}
		id, err := spiffeid.FromURI(u)
		if err != nil || id.TrustDomain() != td {
			return nil, fmt.Errorf("ca: load: %w: the certificate's SPIFFE ID %s is not of trust domain %s", ErrInvalidAuthority, u, td)
		}
	}
	// Each certificate must be signed by the next one.
	for i := 0; i+1 < len(certs); i++ {
		if err := certs[i].CheckSignatureFrom(certs[i+1]); err != nil {
			return nil, fmt.Errorf("ca: load: %w: certificate %d is not signed by certificate %d: %v", ErrInvalidAuthority, i, i+1, err)
		}
	}
	a.cert, a.key = cert, key
	a.roots = []*x509.Certificate{certs[len(certs)-1]}
	if len(certs) > 2 {
		a.chain = certs[1 : len(certs)-1]
	}
	return a, nil
}

// WithTrustAnchors returns a copy of a that also publishes extra as trust
// anchors (Roots) — the roots of a CA rotation: the outgoing one while
// certificates it issued are still in use, the incoming one before it
// signs. Each must be a CA certificate; duplicates of a root already
// published are dropped. Signing is unchanged: a's own chain and anchor.
func (a *Authority) WithTrustAnchors(extra []*x509.Certificate) (*Authority, error) {
	b := *a
	b.roots = slices.Clone(a.roots)
	for i, c := range extra {
		if !c.IsCA || !c.BasicConstraintsValid {
			return nil, fmt.Errorf("ca: trust anchor %d (%s): %w: not a CA certificate", i, c.Subject, ErrInvalidAuthority)
		}
		if !slices.ContainsFunc(b.roots, func(r *x509.Certificate) bool { return r.Equal(c) }) {
			b.roots = append(b.roots, c)
		}
	}
	return &b, nil
}

// TrustDomain is the authority's trust domain.
func (a *Authority) TrustDomain() spiffeid.TrustDomain { return a.td }

// Certificate is the signing certificate.
func (a *Authority) Certificate() *x509.Certificate { return a.cert }

// Roots are the trust anchors published to the mesh: first the one that
// verifies every certificate this authority issues, then any added by
// WithTrustAnchors.
func (a *Authority) Roots() []*x509.Certificate {
	return append([]*x509.Certificate(nil), a.roots...)
}

// RootsPEM is Roots, PEM-encoded.
func (a *Authority) RootsPEM() []byte { return EncodeCertsPEM(a.roots) }

// CertPEM is the signing certificate followed by its chain up to the trust
// anchor: what LoadAuthority reads back.
func (a *Authority) CertPEM() []byte {
	all := append([]*x509.Certificate{a.cert}, a.chain...)
	if a.roots[0] != a.cert {
		all = append(all, a.roots[0])
	}
	return EncodeCertsPEM(all)
}

// KeyPEM is the signing key as PKCS#8 PEM.
func (a *Authority) KeyPEM() ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(a.key)
	if err != nil {
		return nil, fmt.Errorf("ca: key: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

// Sign issues a workload certificate for id from a PEM PKCS#10 CSR. The CSR
// signature must verify, its key must be ECDSA P-256/P-384, Ed25519 or RSA ≥
// 2048 bits, and its only subject alternative name must be exactly id's
// URI. The leaf carries that URI SAN, client and server auth EKUs, and lives
// min(ttl or DefaultTTL, the maximum TTL, the CA's remaining life). The
// result is the chain, leaf first, without the trust anchor.
func (a *Authority) Sign(csrPEM []byte, id spiffeid.ID, ttl time.Duration) ([]*x509.Certificate, error) {
	if err := a.checkID(id); err != nil {
		return nil, fmt.Errorf("ca: sign: %w", err)
	}
	csr, err := ParseCSR(csrPEM)
	if err != nil {
		return nil, fmt.Errorf("ca: sign: %w", err)
	}
	if err := checkOnlyURISAN(csr, id); err != nil {
		return nil, fmt.Errorf("ca: sign: %w", err)
	}
	if ttl < 0 {
		return nil, fmt.Errorf("ca: sign: negative lifetime %v", ttl)
	}
	if ttl == 0 {
		ttl = DefaultTTL
	}
	ttl = min(ttl, a.maxTTL)
	tmpl := &x509.Certificate{
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
		URIs:                  []*url.URL{id.URL()},
	}
	if _, ok := csr.PublicKey.(*rsa.PublicKey); ok {
		tmpl.KeyUsage |= x509.KeyUsageKeyEncipherment
	}
	leaf, err := a.issue(tmpl, csr.PublicKey, ttl)
	if err != nil {
		return nil, fmt.Errorf("ca: sign %s: %w", id, err)
	}
	return a.withChain(leaf), nil
}

// SignServer issues a TLS server certificate for the given DNS names (the
// controller's own serving certificate). The result is the chain, leaf
// first, without the trust anchor.
func (a *Authority) SignServer(pub crypto.PublicKey, dnsNames []string, ttl time.Duration) ([]*x509.Certificate, error) {
	if len(dnsNames) == 0 {
		return nil, errors.New("ca: sign server: no DNS names")
	}
	if err := checkKey(pub); err != nil {
		return nil, fmt.Errorf("ca: sign server: %w", err)
	}
	if ttl <= 0 {
		return nil, fmt.Errorf("ca: sign server: non-positive lifetime %v", ttl)
	}
	tmpl := &x509.Certificate{
		Subject:               pkix.Name{CommonName: dnsNames[0]},
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		DNSNames:              append([]string(nil), dnsNames...),
	}
	if _, ok := pub.(*rsa.PublicKey); ok {
		tmpl.KeyUsage |= x509.KeyUsageKeyEncipherment
	}
	leaf, err := a.issue(tmpl, pub, ttl)
	if err != nil {
		return nil, fmt.Errorf("ca: sign server: %w", err)
	}
	return a.withChain(leaf), nil
}

func (a *Authority) issue(tmpl *x509.Certificate, pub crypto.PublicKey, ttl time.Duration) (*x509.Certificate, error) {
	serial, err := newSerial()
	if err != nil {
		return nil, err
	}
	now := a.now()
	if !now.Before(a.cert.NotAfter) {
		return nil, fmt.Errorf("%w: the CA certificate expired at %v", ErrInvalidAuthority, a.cert.NotAfter)
	}
	tmpl.SerialNumber = serial
	tmpl.NotBefore = now.Add(-clockSkew)
	if tmpl.NotBefore.Before(a.cert.NotBefore) {
		tmpl.NotBefore = a.cert.NotBefore
	}
	tmpl.NotAfter = now.Add(ttl)
	if tmpl.NotAfter.After(a.cert.NotAfter) {
		tmpl.NotAfter = a.cert.NotAfter
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, a.cert, pub, a.key)
	if err != nil {
		return nil, err
	}
	return x509.ParseCertificate(der)
}

func (a *Authority) withChain(leaf *x509.Certificate) []*x509.Certificate {
	out := []*x509.Certificate{leaf}
	if a.roots[0] != a.cert {
		out = append(out, a.cert)
	}
	return append(out, a.chain...)
}

// checkID accepts workload IDs (non-empty path) of the authority's trust
// domain.
func (a *Authority) checkID(id spiffeid.ID) error {
	if id.IsZero() {
		return fmt.Errorf("%w: empty", ErrInvalidIdentity)
	}
	if id.TrustDomain() != a.td {
		return fmt.Errorf("%w: %s is not of trust domain %s", ErrInvalidIdentity, id, a.td)
	}
	if id.Path() == "" {
		return fmt.Errorf("%w: %s names the trust domain, not a workload", ErrInvalidIdentity, id)
	}
	return nil
}

func newSerial() (*big.Int, error) {
	return rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
}

func publicKeysEqual(a, b crypto.PublicKey) bool {
	ak, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && ak.Equal(b)
}

// checkKey accepts ECDSA P-256 and P-384, Ed25519 and RSA of at least 2048
// bits.
func checkKey(pub crypto.PublicKey) error {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		if k.Curve != elliptic.P256() && k.Curve != elliptic.P384() {
			return fmt.Errorf("unsupported ECDSA curve %s", k.Curve.Params().Name)
		}
	case ed25519.PublicKey:
	case *rsa.PublicKey:
		if k.N.BitLen() < 2048 {
			return fmt.Errorf("RSA key of %d bits is too small", k.N.BitLen())
		}
	default:
		return fmt.Errorf("unsupported key type %T", pub)
	}
	return nil
}
