package casecret

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"math/big"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/amesh-dev/amesh/api/ca"
	"github.com/amesh-dev/amesh/api/identity"
)

// operatorCA builds an offline root and an intermediate it signs, as an
// operator would provide them.
func operatorCA(t *testing.T) (root, inter *x509.Certificate, interKeyPEM []byte) {
	t.Helper()
	mk := func(tmpl, parent *x509.Certificate, pub any, signer any) *x509.Certificate {
		der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, signer)
		if err != nil {
			t.Fatal(err)
		}
		c, err := x509.ParseCertificate(der)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	rootKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	interKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	now := time.Now()
	rootTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "offline root"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	root = mk(rootTmpl, rootTmpl, rootKey.Public(), rootKey)
	inter = mk(&x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "mesh intermediate"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(12 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}, root, interKey.Public(), rootKey)
	der, err := x509.MarshalPKCS8PrivateKey(interKey)
	if err != nil {
		t.Fatal(err)
	}
	return root, inter, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
}

// TestLoadOperatorIntermediate: tls.crt holds only the intermediate and
// ca.crt the root; workload certificates chain to the root through it.
func TestLoadOperatorIntermediate(t *testing.T) {
	root, inter, keyPEM := operatorCA(t)
	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	s := &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Namespace: "amesh-system", Name: "amesh-ca"},
		Data: map[string][]byte{
			KeyCert: ca.EncodeCertsPEM([]*x509.Certificate{inter}),
			KeyKey:  keyPEM,
			KeyRoot: ca.EncodeCertsPEM([]*x509.Certificate{root}),
		},
	}
	a, err := Load(s, Options{TrustDomain: td})
	if err != nil {
		t.Fatal(err)
	}
	if roots := a.Roots(); len(roots) != 1 || !roots[0].Equal(root) {
		t.Fatalf("published roots %v, want the operator's root", roots)
	}
	id := spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/web")
	key, _ := identity.NewKey()
	csr, err := identity.NewCSR(key, id)
	if err != nil {
		t.Fatal(err)
	}
	chain, err := a.Sign(csr, id, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	pool, inters := x509.NewCertPool(), x509.NewCertPool()
	pool.AddCert(root)
	for _, c := range chain[1:] {
		inters.AddCert(c)
	}
	if _, err := chain[0].Verify(x509.VerifyOptions{Roots: pool, Intermediates: inters, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		t.Fatalf("leaf does not chain to the operator's root: %v", err)
	}
}

func TestLoadInvalid(t *testing.T) {
	_, inter, keyPEM := operatorCA(t)
	other, _, otherKey := operatorCA(t)
	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	for _, tc := range []struct {
		name string
		data map[string][]byte
	}{
		{"empty", nil},
		{"no key", map[string][]byte{KeyCert: ca.EncodeCertsPEM([]*x509.Certificate{inter})}},
		{"garbage key", map[string][]byte{KeyCert: ca.EncodeCertsPEM([]*x509.Certificate{inter}), KeyKey: []byte("x")}},
		{"key of another CA", map[string][]byte{KeyCert: ca.EncodeCertsPEM([]*x509.Certificate{inter}), KeyKey: otherKey}},
		{"root that did not sign it", map[string][]byte{
			KeyCert: ca.EncodeCertsPEM([]*x509.Certificate{inter}), KeyKey: keyPEM,
			KeyRoot: ca.EncodeCertsPEM([]*x509.Certificate{other}),
		}},
		{"garbage root", map[string][]byte{KeyCert: ca.EncodeCertsPEM([]*x509.Certificate{inter}), KeyKey: keyPEM, KeyRoot: []byte("x")}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Load(&corev1.Secret{Data: tc.data}, Options{TrustDomain: td})
			if !errors.Is(err, ErrInvalidSecret) {
				t.Fatalf("got %v, want ErrInvalidSecret", err)
			}
		})
	}
}

// TestLoadRotation: the Secret at each step of a root rotation — old CA
// with both roots, new CA with both roots (in either order), new CA alone
// — signs with the CA of tls.crt and publishes every root of ca.crt, the
// signing chain's own root first.
func TestLoadRotation(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	oldRoot, oldInter, oldKey := operatorCA(t)
	newRoot, newInter, newKey := operatorCA(t)
	bundle := func(cs ...*x509.Certificate) []byte { return ca.EncodeCertsPEM(cs) }
	for _, tc := range []struct {
		name      string
		cert, key []byte
		roots     []byte
		signer    *x509.Certificate
		want      []*x509.Certificate
	}{
		{"1: old CA, both roots", bundle(oldInter), oldKey, bundle(oldRoot, newRoot), oldInter, []*x509.Certificate{oldRoot, newRoot}},
		{"1: old CA, both roots, new first", bundle(oldInter), oldKey, bundle(newRoot, oldRoot), oldInter, []*x509.Certificate{oldRoot, newRoot}},
		{"2: new CA, both roots", bundle(newInter), newKey, bundle(oldRoot, newRoot), newInter, []*x509.Certificate{newRoot, oldRoot}},
		{"2: new CA with its chain, both roots", bundle(newInter, newRoot), newKey, bundle(oldRoot, newRoot), newInter, []*x509.Certificate{newRoot, oldRoot}},
		{"3: new CA, new root", bundle(newInter), newKey, bundle(newRoot), newInter, []*x509.Certificate{newRoot}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a, err := Load(&corev1.Secret{Data: map[string][]byte{KeyCert: tc.cert, KeyKey: tc.key, KeyRoot: tc.roots}}, Options{TrustDomain: td})
			if err != nil {
				t.Fatal(err)
			}
			if !a.Certificate().Equal(tc.signer) {
				t.Fatalf("signs with %s", a.Certificate().Subject)
			}
			got := a.Roots()
			if len(got) != len(tc.want) {
				t.Fatalf("%d roots published, want %d", len(got), len(tc.want))
			}
			for i := range got {
				if !got[i].Equal(tc.want[i]) {
					t.Fatalf("root %d is not the expected one", i)
				}
			}
			// What the controller stores back reads the same.
			again, err := Load(&corev1.Secret{Data: map[string][]byte{KeyCert: a.CertPEM(), KeyKey: tc.key, KeyRoot: a.RootsPEM()}}, Options{TrustDomain: td})
			if err != nil || string(again.RootsPEM()) != string(a.RootsPEM()) || string(again.CertPEM()) != string(a.CertPEM()) {
				t.Fatalf("round trip: %v", err)
			}
		})
	}
}

// FuzzLoad: whatever an operator puts in the Secret, Load returns an
// authority that can sign — a CA certificate matching its key, publishing
// at least the root its chain ends at — or ErrInvalidSecret; never a panic.
func FuzzLoad(f *testing.F) {
	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	// Seeds from files (valid 2026–2126): every fuzzing process must see
	// the same seed corpus, which freshly generated keys would not give.
	seed := func(name string) []byte {
		b, err := os.ReadFile(filepath.Join("testdata", "seed", name))
		if err != nil {
			f.Fatal(err)
		}
		return b
	}
	root, rootKey, inter, interKey, other := seed("root.pem"), seed("root-key.pem"), seed("intermediate.pem"), seed("intermediate-key.pem"), seed("other-root.pem")
	cat := func(bs ...[]byte) []byte { return bytes.Join(bs, nil) }
	f.Add(inter, interKey, root)
	f.Add(inter, interKey, cat(other, root))
	f.Add(cat(inter, root), interKey, []byte(nil))
	f.Add(root, rootKey, root)
	f.Add(root, rootKey, cat(root, other))
	f.Add(inter, interKey, other)
	f.Add([]byte("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"), interKey, root)
	f.Fuzz(func(t *testing.T, cert, key, roots []byte) {
		s := &corev1.Secret{Data: map[string][]byte{KeyCert: cert, KeyKey: key}}
		if roots != nil {
			s.Data[KeyRoot] = roots
		}
		a, err := Load(s, Options{TrustDomain: td})
		if err != nil {
			if !errors.Is(err, ErrInvalidSecret) {
				t.Fatalf("error %v is not ErrInvalidSecret", err)
			}
			return
		}
		if c := a.Certificate(); !c.IsCA || len(a.Roots()) == 0 {
			t.Fatalf("loaded a non-CA or no roots")
		}
		id := spiffeid.RequireFromString("spiffe://cluster.local/ns/a/sa/b")
		k, _ := identity.NewKey()
		csr, err := identity.NewCSR(k, id)
		if err != nil {
			t.Fatal(err)
		}
		chain, err := a.Sign(csr, id, time.Minute)
		if err != nil {
			return // e.g. a CA whose key type cannot sign what x509 wants; not a parse failure
		}
		pool, inters := x509.NewCertPool(), x509.NewCertPool()
		for _, r := range a.Roots() {
			pool.AddCert(r)
		}
		for _, c := range chain[1:] {
			inters.AddCert(c)
		}
		if _, err := chain[0].Verify(x509.VerifyOptions{Roots: pool, Intermediates: inters, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
			t.Fatalf("a certificate it signed does not verify against the roots it publishes: %v", err)
		}
	})
}
