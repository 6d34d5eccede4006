package identity

import (
	"crypto/x509"
	"fmt"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Bundle is a hot-reloadable set of trust roots, one set per trust domain.
// Every handshake reads the current roots, so Set takes effect for the next
// connection without a restart. It implements go-spiffe's x509bundle.Source and
// is safe for concurrent use.
type Bundle struct {
	set *x509bundle.Set
}

// NewBundle returns an empty bundle: nothing verifies against it until Set.
func NewBundle() *Bundle {
	return &Bundle{set: x509bundle.NewSet()}
}

// Set replaces the roots of trust domain td. An empty roots removes td.
func (b *Bundle) Set(td spiffeid.TrustDomain, roots []*x509.Certificate) {
	if len(roots) == 0 {
		b.set.Remove(td)
		return
	}
	b.set.Add(x509bundle.FromX509Authorities(td, roots))
}

// SetPEM replaces the roots of td with the PEM certificates in pemRoots. On
// error the previous roots stay in force.
func (b *Bundle) SetPEM(td spiffeid.TrustDomain, pemRoots []byte) error {
	nb, err := x509bundle.Parse(td, pemRoots)
	if err != nil {
		return fmt.Errorf("trust bundle for %s: %w", td, err)
	}
	if nb.Empty() {
		return fmt.Errorf("trust bundle for %s: no certificates", td)
	}
	b.set.Add(nb)
	return nil
}

// Roots returns the current roots of td (nil if none).
func (b *Bundle) Roots(td spiffeid.TrustDomain) []*x509.Certificate {
	xb, ok := b.set.Get(td)
	if !ok {
		return nil
	}
	return xb.X509Authorities()
}

// GetX509BundleForTrustDomain implements x509bundle.Source.
func (b *Bundle) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	return b.set.GetX509BundleForTrustDomain(td)
}
