package identity

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"net/url"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// ErrInvalidCSR reports a certificate signing request that is not a valid
// request for exactly one SPIFFE identity.
var ErrInvalidCSR = errors.New("invalid certificate signing request")

// NewKey returns a new ECDSA P-256 private key.
func NewKey() (*ecdsa.PrivateKey, error) {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate P-256 key: %w", err)
	}
	return k, nil
}

// NewCSR returns a PEM-encoded certificate signing request signed by key whose
// only subject alternative name is the URI of id. The subject is empty, as in
// an X509-SVID.
func NewCSR(key crypto.Signer, id spiffeid.ID) ([]byte, error) {
	if id.IsZero() {
		return nil, fmt.Errorf("%w: empty SPIFFE ID", ErrInvalidCSR)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		URIs: []*url.URL{id.URL()},
	}, key)
	if err != nil {
		return nil, fmt.Errorf("create CSR for %s: %w", id, err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}), nil
}

// ParseCSR decodes a PEM-encoded CSR, checks its signature and that its only
// SAN is one SPIFFE URI, and returns the request and that ID. A CA uses it
// before deciding whether the caller may obtain the ID.
func ParseCSR(csrPEM []byte) (*x509.CertificateRequest, spiffeid.ID, error) {
	block, rest := pem.Decode(csrPEM)
	if block == nil || block.Type != "CERTIFICATE REQUEST" {
		return nil, spiffeid.ID{}, fmt.Errorf("%w: no PEM CERTIFICATE REQUEST block", ErrInvalidCSR)
	}
	if len(rest) > 0 && len(pemTrim(rest)) > 0 {
		return nil, spiffeid.ID{}, fmt.Errorf("%w: trailing data after the PEM block", ErrInvalidCSR)
	}
	csr, err := x509.ParseCertificateRequest(block.Bytes)
	if err != nil {
		return nil, spiffeid.ID{}, fmt.Errorf("%w: %w", ErrInvalidCSR, err)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, spiffeid.ID{}, fmt.Errorf("%w: signature: %w", ErrInvalidCSR, err)
	}
	if len(csr.DNSNames) > 0 || len(csr.IPAddresses) > 0 || len(csr.EmailAddresses) > 0 {
		return nil, spiffeid.ID{}, fmt.Errorf("%w: only a URI SAN is allowed", ErrInvalidCSR)
	}
	if len(csr.URIs) != 1 {
		return nil, spiffeid.ID{}, fmt.Errorf("%w: want exactly one URI SAN, got %d", ErrInvalidCSR, len(csr.URIs))
	}
	id, err := spiffeid.FromURI(csr.URIs[0])
	if err != nil {
		return nil, spiffeid.ID{}, fmt.Errorf("%w: URI SAN: %w", ErrInvalidCSR, err)
	}
	return csr, id, nil
}

func pemTrim(b []byte) []byte {
	for len(b) > 0 && (b[0] == '\n' || b[0] == '\r' || b[0] == ' ' || b[0] == '\t') {
		b = b[1:]
	}
	return b
}

// CheckChain verifies that chain (leaf first) is an X509-SVID for id whose
// leaf key is key's public key. It does not verify the chain against trust
// roots; peers do that during the handshake.
func CheckChain(chain []*x509.Certificate, id spiffeid.ID, key crypto.Signer) error {
	if len(chain) == 0 {
		return errors.New("empty certificate chain")
	}
	got, err := x509svid.IDFromCert(chain[0])
	if err != nil {
		return fmt.Errorf("leaf certificate: %w", err)
	}
	if got != id {
		return fmt.Errorf("leaf certificate is for %s, want %s", got, id)
	}
	if chain[0].IsCA {
		return errors.New("leaf certificate is a CA")
	}
	type equaler interface{ Equal(crypto.PublicKey) bool }
	if pub, ok := key.Public().(equaler); !ok || !pub.Equal(chain[0].PublicKey) {
		return errors.New("leaf certificate does not match the private key")
	}
	return nil
}
