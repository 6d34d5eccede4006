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
	"encoding/asn1"
	"encoding/pem"
	"errors"
	"math/big"
	"net"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

var (
	td    = spiffeid.RequireTrustDomainFromString("cluster.local")
	idA   = spiffeid.RequireFromString("spiffe://cluster.local/ns/a/sa/alice")
	idB   = spiffeid.RequireFromString("spiffe://cluster.local/ns/b/sa/bob")
	other = spiffeid.RequireFromString("spiffe://other.domain/ns/a/sa/alice")
)

func newKey(t testing.TB) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// csrPEM builds a CSR; tmpl may set any SANs or extensions.
func csrPEM(t testing.TB, key crypto.Signer, tmpl *x509.CertificateRequest) []byte {
	t.Helper()
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})
}

func uriCSR(t testing.TB, key crypto.Signer, ids ...spiffeid.ID) []byte {
	t.Helper()
	tmpl := &x509.CertificateRequest{}
	for _, id := range ids {
		tmpl.URIs = append(tmpl.URIs, id.URL())
	}
	return csrPEM(t, key, tmpl)
}

func newRoot(t testing.TB, opts ...Option) *Authority {
	t.Helper()
	a, err := NewRoot(td, 365*24*time.Hour, opts...)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// verifySVID checks chain against roots the way a mesh peer does (go-spiffe
// X509-SVID verification) and returns the identity.
func verifySVID(t *testing.T, chain, roots []*x509.Certificate) spiffeid.ID {
	t.Helper()
	id, _, err := x509svid.Verify(chain, x509bundle.FromX509Authorities(td, roots))
	if err != nil {
		t.Fatalf("x509svid.Verify: %v", err)
	}
	return id
}

func TestNewRoot(t *testing.T) {
	a := newRoot(t)
	c := a.Certificate()
	if !c.IsCA || c.KeyUsage&x509.KeyUsageCertSign == 0 {
		t.Errorf("root is not a signing CA: IsCA=%v usage=%v", c.IsCA, c.KeyUsage)
	}
	if err := c.CheckSignatureFrom(c); err != nil {
		t.Errorf("root is not self-signed: %v", err)
	}
	k, ok := c.PublicKey.(*ecdsa.PublicKey)
	if !ok || k.Curve != elliptic.P256() {
		t.Errorf("root key = %T, want ECDSA P-256", c.PublicKey)
	}
	if len(c.URIs) != 1 || c.URIs[0].String() != "spiffe://cluster.local" {
		t.Errorf("root URIs = %v", c.URIs)
	}
	if d := time.Until(c.NotAfter); d < 364*24*time.Hour || d > 366*24*time.Hour {
		t.Errorf("root lifetime ends in %v", d)
	}
	if _, err := NewRoot(spiffeid.TrustDomain{}, time.Hour); !errors.Is(err, ErrInvalidIdentity) {
		t.Errorf("NewRoot(empty trust domain) = %v", err)
	}
	if _, err := NewRoot(td, 0); err == nil {
		t.Error("NewRoot(ttl 0) succeeded")
	}
}

func TestSign(t *testing.T) {
	a := newRoot(t)
	key := newKey(t)
	otherKey := newKey(t)
	good := uriCSR(t, key, idA)

	rsaSmall, err := rsa.GenerateKey(rand.Reader, 1024)
	if err != nil {
		t.Fatal(err)
	}
	p224, err := ecdsa.GenerateKey(elliptic.P224(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	_, edKey, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}

	// A SAN extension holding the URI plus an otherName, which the x509
	// package does not surface.
	uriGN, _ := asn1.Marshal(asn1.RawValue{Class: asn1.ClassContextSpecific, Tag: 6, Bytes: []byte(idA.String())})
	otherGN, _ := asn1.Marshal(asn1.RawValue{Class: asn1.ClassContextSpecific, Tag: 0, IsCompound: true, Bytes: mustASN1(t, asn1.ObjectIdentifier{1, 3, 6, 1, 4, 1, 311, 20, 2, 3})})
	sanWithOther, _ := asn1.Marshal(asn1.RawValue{Class: asn1.ClassUniversal, Tag: asn1.TagSequence, IsCompound: true, Bytes: append(uriGN, otherGN...)})
	otherNameCSR := csrPEM(t, key, &x509.CertificateRequest{ExtraExtensions: []pkix.Extension{{Id: oidSAN, Value: sanWithOther}}})

	tampered := func() []byte {
		block, _ := pem.Decode(good)
		der := append([]byte(nil), block.Bytes...)
		der[len(der)-5] ^= 0xff // inside the signature
		return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})
	}()

	tests := []struct {
		name string
		csr  []byte
		id   spiffeid.ID
		want error // nil: success
	}{
		{"good", good, idA, nil},
		{"good ed25519", uriCSR(t, edKey, idA), idA, nil},
		{"extra DNS SAN", csrPEM(t, key, &x509.CertificateRequest{URIs: []*url.URL{idA.URL()}, DNSNames: []string{"evil.example"}}), idA, ErrInvalidCSR},
		{"extra IP SAN", csrPEM(t, key, &x509.CertificateRequest{URIs: []*url.URL{idA.URL()}, IPAddresses: []net.IP{net.IPv4(10, 0, 0, 1)}}), idA, ErrInvalidCSR},
		{"extra email SAN", csrPEM(t, key, &x509.CertificateRequest{URIs: []*url.URL{idA.URL()}, EmailAddresses: []string{"a@b.c"}}), idA, ErrInvalidCSR},
		{"second URI", uriCSR(t, key, idA, idB), idA, ErrInvalidCSR},
		{"otherName SAN", otherNameCSR, idA, ErrInvalidCSR},
		{"no SAN", csrPEM(t, key, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "x"}}), idA, ErrInvalidCSR},
		{"CSR for another identity", uriCSR(t, key, idB), idA, ErrInvalidCSR},
		{"URI differing in case", csrPEM(t, key, &x509.CertificateRequest{URIs: []*url.URL{{Scheme: "spiffe", Host: "cluster.local", Path: "/ns/a/sa/Alice"}}}), idA, ErrInvalidCSR},
		{"identity of another trust domain", uriCSR(t, key, other), other, ErrInvalidIdentity},
		{"trust domain ID", uriCSR(t, key, td.ID()), td.ID(), ErrInvalidIdentity},
		{"zero identity", good, spiffeid.ID{}, ErrInvalidIdentity},
		{"malformed PEM", []byte("-----BEGIN CERTIFICATE REQUEST-----\nnot base64!\n-----END CERTIFICATE REQUEST-----\n"), idA, ErrInvalidCSR},
		{"not PEM", []byte("hello"), idA, ErrInvalidCSR},
		{"empty", nil, idA, ErrInvalidCSR},
		{"wrong PEM type", pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: []byte{1, 2, 3}}), idA, ErrInvalidCSR},
		{"trailing data", append(append([]byte(nil), good...), []byte("junk")...), idA, ErrInvalidCSR},
		{"two CSRs", append(append([]byte(nil), good...), uriCSR(t, otherKey, idA)...), idA, ErrInvalidCSR},
		{"garbage DER", pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: []byte{0x30, 0x03, 1, 2, 3}}), idA, ErrInvalidCSR},
		{"bad signature", tampered, idA, ErrInvalidCSR},
		{"RSA 1024", uriCSR(t, rsaSmall, idA), idA, ErrInvalidCSR},
		{"ECDSA P-224", uriCSR(t, p224, idA), idA, ErrInvalidCSR},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			chain, err := a.Sign(tc.csr, tc.id, time.Hour)
			if tc.want != nil {
				if !errors.Is(err, tc.want) {
					t.Fatalf("Sign = %v, want %v", err, tc.want)
				}
				if chain != nil {
					t.Errorf("Sign returned a chain with an error")
				}
				return
			}
			if err != nil {
				t.Fatalf("Sign: %v", err)
			}
			if len(chain) != 1 {
				t.Fatalf("chain of %d certificates, want the leaf only", len(chain))
			}
			leaf := chain[0]
			if got := verifySVID(t, chain, a.Roots()); got != tc.id {
				t.Errorf("verified identity %s, want %s", got, tc.id)
			}
			if len(leaf.URIs) != 1 || len(leaf.DNSNames)+len(leaf.IPAddresses)+len(leaf.EmailAddresses) != 0 {
				t.Errorf("leaf SANs: URIs %v DNS %v IP %v email %v", leaf.URIs, leaf.DNSNames, leaf.IPAddresses, leaf.EmailAddresses)
			}
			if leaf.IsCA {
				t.Error("leaf is a CA")
			}
			eku := map[x509.ExtKeyUsage]bool{}
			for _, u := range leaf.ExtKeyUsage {
				eku[u] = true
			}
			if !eku[x509.ExtKeyUsageClientAuth] || !eku[x509.ExtKeyUsageServerAuth] || len(eku) != 2 {
				t.Errorf("leaf EKUs = %v, want client and server auth", leaf.ExtKeyUsage)
			}
			// Both TLS roles verify with the standard library too.
			pool := x509.NewCertPool()
			pool.AddCert(a.Certificate())
			for _, u := range []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth} {
				if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool, KeyUsages: []x509.ExtKeyUsage{u}}); err != nil {
					t.Errorf("Verify for %v: %v", u, err)
				}
			}
		})
	}
}

func mustASN1(t *testing.T, v any) []byte {
	t.Helper()
	b, err := asn1.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestSignLifetime(t *testing.T) {
	key := newKey(t)
	csr := uriCSR(t, key, idA)
	now := time.Now()
	clock := func() time.Time { return now }

	a := newRoot(t, WithClock(clock))
	shortCA, err := NewRoot(td, 30*time.Minute, WithClock(clock))
	if err != nil {
		t.Fatal(err)
	}
	capped := newRoot(t, WithClock(clock), WithMaxTTL(2*time.Hour))

	tests := []struct {
		name      string
		a         *Authority
		ttl       time.Duration
		wantAfter time.Time
	}{
		{"default", a, 0, now.Add(DefaultTTL)},
		{"requested shorter", a, time.Hour, now.Add(time.Hour)},
		{"requested longer is capped", a, 48 * time.Hour, now.Add(DefaultMaxTTL)},
		{"custom cap", capped, 0, now.Add(2 * time.Hour)},
		{"never beyond the CA", shortCA, time.Hour, shortCA.Certificate().NotAfter},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			chain, err := tc.a.Sign(csr, idA, tc.ttl)
			if err != nil {
				t.Fatal(err)
			}
			leaf := chain[0]
			if !leaf.NotAfter.Equal(tc.wantAfter.Truncate(time.Second)) {
				t.Errorf("NotAfter = %v, want %v", leaf.NotAfter, tc.wantAfter)
			}
			if tc.ttl > 0 && leaf.NotAfter.After(now.Add(tc.ttl)) {
				t.Errorf("NotAfter %v exceeds the requested lifetime", leaf.NotAfter)
			}
			if leaf.NotBefore.After(now) || now.Sub(leaf.NotBefore) > 2*clockSkew {
				t.Errorf("NotBefore = %v (now %v)", leaf.NotBefore, now)
			}
		})
	}
	if _, err := a.Sign(csr, idA, -time.Second); err == nil {
		t.Error("Sign with a negative lifetime succeeded")
	}
	later := now.Add(31 * time.Minute)
	expired, err := LoadAuthority(td, shortCA.CertPEM(), mustKeyPEM(t, shortCA), WithClock(func() time.Time { return later }))
	if !errors.Is(err, ErrInvalidAuthority) {
		t.Errorf("LoadAuthority of an expired CA = %v, %v", expired, err)
	}
}

func mustKeyPEM(t *testing.T, a *Authority) []byte {
	t.Helper()
	b, err := a.KeyPEM()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// newIntermediate makes a CA certificate for td signed by parent.
func newIntermediate(t *testing.T, parent *Authority, key crypto.Signer, isCA bool) []byte {
	t.Helper()
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(42),
		Subject:               pkix.Name{CommonName: "amesh intermediate"},
		NotBefore:             time.Now().Add(-time.Minute),
		NotAfter:              time.Now().Add(48 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  isCA,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent.cert, key.Public(), parent.key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}

func TestLoadAuthority(t *testing.T) {
	root := newRoot(t)
	rootKeyPEM := mustKeyPEM(t, root)
	ecKey := root.key.(*ecdsa.PrivateKey)
	sec1, err := x509.MarshalECPrivateKey(ecKey)
	if err != nil {
		t.Fatal(err)
	}
	sec1PEM := pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: sec1})
	otherKeyPEM := mustKeyPEM(t, newRoot(t))
	otherTD, err := NewRoot(spiffeid.RequireTrustDomainFromString("other.domain"), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	interKey := newKey(t)
	interKeyDER, _ := x509.MarshalPKCS8PrivateKey(interKey)
	interKeyPEM := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: interKeyDER})
	interPEM := newIntermediate(t, root, interKey, true)
	notCAPEM := newIntermediate(t, root, interKey, false)

	tests := []struct {
		name      string
		cert, key []byte
		wantErr   bool
		chainLen  int // of a signed leaf
	}{
		{"root, PKCS#8", root.CertPEM(), rootKeyPEM, false, 1},
		{"root, SEC 1", root.CertPEM(), sec1PEM, false, 1},
		{"intermediate + root", append(append([]byte(nil), interPEM...), root.CertPEM()...), interKeyPEM, false, 2},
		{"intermediate alone (trusted directly)", interPEM, interKeyPEM, false, 1},
		{"key of another CA", root.CertPEM(), otherKeyPEM, true, 0},
		{"not a CA", append(append([]byte(nil), notCAPEM...), root.CertPEM()...), interKeyPEM, true, 0},
		{"chain out of order", append(append([]byte(nil), root.CertPEM()...), interPEM...), rootKeyPEM, true, 0},
		{"other trust domain's root", otherTD.CertPEM(), mustKeyPEM(t, otherTD), true, 0},
		{"garbage certificate", []byte("nope"), rootKeyPEM, true, 0},
		{"trailing garbage after certificate", append(append([]byte(nil), root.CertPEM()...), "x"...), rootKeyPEM, true, 0},
		{"garbage key", root.CertPEM(), []byte("nope"), true, 0},
		{"no key", root.CertPEM(), nil, true, 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			a, err := LoadAuthority(td, tc.cert, tc.key)
			if tc.wantErr {
				if err == nil {
					t.Fatal("LoadAuthority succeeded")
				}
				return
			}
			if err != nil {
				t.Fatalf("LoadAuthority: %v", err)
			}
			chain, err := a.Sign(uriCSR(t, newKey(t), idB), idB, 0)
			if err != nil {
				t.Fatal(err)
			}
			if len(chain) != tc.chainLen {
				t.Errorf("chain of %d, want %d", len(chain), tc.chainLen)
			}
			if got := verifySVID(t, chain, a.Roots()); got != idB {
				t.Errorf("verified %s", got)
			}
			// What the authority writes, it reads back identically.
			kp := mustKeyPEM(t, a)
			again, err := LoadAuthority(td, a.CertPEM(), kp)
			if err != nil {
				t.Fatalf("reload: %v", err)
			}
			if !again.Certificate().Equal(a.Certificate()) || string(again.RootsPEM()) != string(a.RootsPEM()) {
				t.Error("reloaded authority differs")
			}
		})
	}
	if _, err := LoadAuthority(spiffeid.TrustDomain{}, root.CertPEM(), rootKeyPEM); err == nil {
		t.Error("LoadAuthority without trust domain succeeded")
	}
}

func TestSignServer(t *testing.T) {
	a := newRoot(t)
	key := newKey(t)
	chain, err := a.SignServer(key.Public(), []string{"amesh-controller.amesh-system.svc", "amesh-controller.amesh-system.svc.cluster.local"}, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(a.Certificate())
	for _, name := range []string{"amesh-controller.amesh-system.svc", "amesh-controller.amesh-system.svc.cluster.local"} {
		if _, err := chain[0].Verify(x509.VerifyOptions{Roots: pool, DNSName: name}); err != nil {
			t.Errorf("Verify %s: %v", name, err)
		}
	}
	if _, err := chain[0].Verify(x509.VerifyOptions{Roots: pool, DNSName: "evil.example"}); err == nil {
		t.Error("server certificate verifies for a name it does not carry")
	}
	if _, err := chain[0].Verify(x509.VerifyOptions{Roots: pool, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err == nil {
		t.Error("server certificate usable as a client certificate")
	}
	if len(chain[0].URIs) != 0 {
		t.Errorf("server certificate carries URIs %v", chain[0].URIs)
	}
	if _, err := a.SignServer(key.Public(), nil, time.Hour); err == nil {
		t.Error("SignServer without names succeeded")
	}
	small, _ := rsa.GenerateKey(rand.Reader, 1024)
	if _, err := a.SignServer(small.Public(), []string{"x"}, time.Hour); err == nil || !strings.Contains(err.Error(), "too small") {
		t.Errorf("SignServer with RSA 1024 = %v", err)
	}
}

// TestWithTrustAnchors: a rotation publishes the outgoing and the incoming
// root while signing with one of them; certificates of either verify
// against the published roots, and signing is unchanged.
func TestWithTrustAnchors(t *testing.T) {
	old, next := newRoot(t), newRoot(t)
	both, err := next.WithTrustAnchors([]*x509.Certificate{old.Certificate(), next.Certificate()})
	if err != nil {
		t.Fatal(err)
	}
	roots := both.Roots()
	if len(roots) != 2 || !roots[0].Equal(next.Certificate()) || !roots[1].Equal(old.Certificate()) {
		t.Fatalf("roots %d: want the signing root then the extra one, without duplicates", len(roots))
	}
	if len(next.Roots()) != 1 {
		t.Fatal("WithTrustAnchors changed the original authority")
	}
	if string(both.CertPEM()) != string(next.CertPEM()) {
		t.Fatal("the signing chain changed")
	}
	chainNew, err := both.Sign(uriCSR(t, newKey(t), idA), idA, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	chainOld, err := old.Sign(uriCSR(t, newKey(t), idB), idB, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if got := verifySVID(t, chainNew, roots); got != idA {
		t.Fatalf("new certificate verifies as %v", got)
	}
	if got := verifySVID(t, chainOld, roots); got != idB {
		t.Fatalf("old certificate verifies as %v", got)
	}
	if _, _, err := x509svid.Verify(chainNew, x509bundle.FromX509Authorities(td, old.Roots())); err == nil {
		t.Fatal("a certificate of the new root verifies against the old root alone")
	}

	leaf, err := both.Sign(uriCSR(t, newKey(t), idA), idA, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := next.WithTrustAnchors([]*x509.Certificate{leaf[0]}); !errors.Is(err, ErrInvalidAuthority) {
		t.Fatalf("a workload certificate as trust anchor: %v, want ErrInvalidAuthority", err)
	}
}
