package identity

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"net"
	"net/url"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

func TestNewCSR(t *testing.T) {
	key, err := NewKey()
	if err != nil {
		t.Fatal(err)
	}
	if key.Curve != elliptic.P256() {
		t.Fatalf("curve %v, want P-256", key.Curve.Params().Name)
	}
	id := spiffeid.RequireFromString("spiffe://cluster.local/ns/a/sa/b")
	csrPEM, err := NewCSR(key, id)
	if err != nil {
		t.Fatal(err)
	}
	csr, got, err := ParseCSR(csrPEM)
	if err != nil {
		t.Fatal(err)
	}
	if got != id {
		t.Fatalf("ParseCSR id = %v, want %v", got, id)
	}
	if len(csr.URIs) != 1 || len(csr.DNSNames)+len(csr.IPAddresses)+len(csr.EmailAddresses) != 0 || csr.Subject.String() != "" {
		t.Fatalf("CSR has unexpected names: %+v %v", csr.URIs, csr.Subject)
	}
	if !key.PublicKey.Equal(csr.PublicKey) {
		t.Fatal("CSR public key is not the key's")
	}
}

func TestParseCSRRejects(t *testing.T) {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	mk := func(tmpl *x509.CertificateRequest) []byte {
		der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
		if err != nil {
			t.Fatal(err)
		}
		return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})
	}
	u1, _ := url.Parse("spiffe://cluster.local/ns/a/sa/b")
	u2, _ := url.Parse("spiffe://cluster.local/ns/a/sa/c")
	uh, _ := url.Parse("https://example.com/x")
	good := mk(&x509.CertificateRequest{URIs: []*url.URL{u1}})
	tampered := append([]byte(nil), good...)
	blk, _ := pem.Decode(tampered)
	blk.Bytes[len(blk.Bytes)-3] ^= 0xff
	tampered = pem.EncodeToMemory(blk)
	for name, in := range map[string][]byte{
		"empty":       nil,
		"not pem":     []byte("hello"),
		"wrong type":  pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: []byte{1}}),
		"garbage der": pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: []byte{1, 2, 3}}),
		"no uri":      mk(&x509.CertificateRequest{}),
		"two uris":    mk(&x509.CertificateRequest{URIs: []*url.URL{u1, u2}}),
		"dns san":     mk(&x509.CertificateRequest{URIs: []*url.URL{u1}, DNSNames: []string{"a.example"}}),
		"ip san":      mk(&x509.CertificateRequest{URIs: []*url.URL{u1}, IPAddresses: []net.IP{net.IPv4(1, 2, 3, 4)}}),
		"email san":   mk(&x509.CertificateRequest{URIs: []*url.URL{u1}, EmailAddresses: []string{"a@b.c"}}),
		"not spiffe":  mk(&x509.CertificateRequest{URIs: []*url.URL{uh}}),
		"trailing":    append(append([]byte(nil), good...), []byte("junk")...),
		"bad sig":     tampered,
	} {
		if _, _, err := ParseCSR(in); !errors.Is(err, ErrInvalidCSR) {
			t.Errorf("%s: ParseCSR error = %v, want ErrInvalidCSR", name, err)
		}
	}
}
