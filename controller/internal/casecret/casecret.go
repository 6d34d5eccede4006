// Package casecret keeps the mesh certificate authority in a Kubernetes
// Secret (amesh-system/amesh-ca by default): it loads the Secret an
// operator provided, or generates a root and stores it when the Secret is
// absent.
//
// The Secret holds "tls.crt" (the signing certificate, optionally followed
// by its chain), "tls.key" (its private key) and optionally "ca.crt" (the
// trust anchor, when tls.crt does not end with it) — the layout of a
// kubernetes.io/tls Secret as cert-manager writes it for a CA.
//
// "ca.crt" may hold several roots: all of them are published to the mesh
// as trust anchors, which is how an operator rotates the root without
// refusing anybody's traffic (docs/DESIGN.md, "Rotating the root"):
// publish old and new roots while still signing with the old CA, then sign
// with the new one, then drop the old root once the certificates it signed
// have expired.
package casecret

import (
	"bytes"
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/amesh-dev/amesh/api/ca"
)

// Secret keys.
const (
	KeyCert = corev1.TLSCertKey       // "tls.crt"
	KeyKey  = corev1.TLSPrivateKeyKey // "tls.key"
	KeyRoot = "ca.crt"
)

// ErrInvalidSecret: the Secret exists but does not hold a usable CA.
var ErrInvalidSecret = errors.New("invalid CA secret")

// Options say where the Secret lives and how to generate a root.
type Options struct {
	Namespace string
	Name      string
	// TrustDomain of the mesh.
	TrustDomain spiffeid.TrustDomain
	// RootTTL is the lifetime of a generated root; default 10 years.
	RootTTL time.Duration
	// CA options (maximum workload certificate TTL, clock).
	CAOptions []ca.Option
}

// Ensure returns the authority stored in the Secret, creating the Secret
// with a new root if it does not exist. It is safe to call from several
// replicas at once: only one Create wins and the others load its root.
// created reports whether this call generated the root.
func Ensure(ctx context.Context, c client.Client, o Options) (a *ca.Authority, created bool, err error) {
	key := types.NamespacedName{Namespace: o.Namespace, Name: o.Name}
	var s corev1.Secret
	err = c.Get(ctx, key, &s)
	if err == nil {
		a, err := Load(&s, o)
		return a, false, err
	}
	if !apierrors.IsNotFound(err) {
		return nil, false, fmt.Errorf("casecret: get %s: %w", key, err)
	}
	ttl := o.RootTTL
	if ttl <= 0 {
		ttl = 10 * 365 * 24 * time.Hour
	}
	a, err = ca.NewRoot(o.TrustDomain, ttl, o.CAOptions...)
	if err != nil {
		return nil, false, fmt.Errorf("casecret: %w", err)
	}
	keyPEM, err := a.KeyPEM()
	if err != nil {
		return nil, false, fmt.Errorf("casecret: %w", err)
	}
	s = corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{
			Namespace: o.Namespace,
			Name:      o.Name,
			Labels:    map[string]string{"app.kubernetes.io/managed-by": "amesh-controller"},
		},
		Type: corev1.SecretTypeTLS,
		Data: map[string][]byte{KeyCert: a.CertPEM(), KeyKey: keyPEM, KeyRoot: a.RootsPEM()},
	}
	switch err := c.Create(ctx, &s); {
	case err == nil:
		return a, true, nil
	case apierrors.IsAlreadyExists(err):
		// Another replica won the race: use its root.
		if err := c.Get(ctx, key, &s); err != nil {
			return nil, false, fmt.Errorf("casecret: get %s: %w", key, err)
		}
		a, err := Load(&s, o)
		return a, false, err
	default:
		return nil, false, fmt.Errorf("casecret: create %s: %w", key, err)
	}
}

// Load parses the authority in s.
func Load(s *corev1.Secret, o Options) (*ca.Authority, error) {
	cert, key := s.Data[KeyCert], s.Data[KeyKey]
	if len(cert) == 0 || len(key) == 0 {
		return nil, fmt.Errorf("casecret: %s/%s: %w: %s and %s are required", s.Namespace, s.Name, ErrInvalidSecret, KeyCert, KeyKey)
	}
	chain := cert
	var roots []*x509.Certificate
	if root := s.Data[KeyRoot]; len(root) > 0 {
		certs, err := ca.ParseCertsPEM(cert)
		if err != nil {
			return nil, fmt.Errorf("casecret: %s/%s: %w: %s: %v", s.Namespace, s.Name, ErrInvalidSecret, KeyCert, err)
		}
		roots, err = ca.ParseCertsPEM(root)
		if err != nil {
			return nil, fmt.Errorf("casecret: %s/%s: %w: %s: %v", s.Namespace, s.Name, ErrInvalidSecret, KeyRoot, err)
		}
		// The chain ends at the root of ca.crt that signed its last
		// certificate, unless it ends at a root already.
		last := certs[len(certs)-1]
		if !slices.ContainsFunc(roots, last.Equal) {
			i := slices.IndexFunc(roots, func(r *x509.Certificate) bool { return last.CheckSignatureFrom(r) == nil })
			if i < 0 {
				return nil, fmt.Errorf("casecret: %s/%s: %w: no root in %s signed the last certificate of %s (%s)",
					s.Namespace, s.Name, ErrInvalidSecret, KeyRoot, KeyCert, last.Subject)
			}
			chain = append(append(bytes.Clone(cert), '\n'), ca.EncodeCertsPEM(roots[i:i+1])...)
		}
	}
	a, err := ca.LoadAuthority(o.TrustDomain, chain, key, o.CAOptions...)
	if err != nil {
		return nil, fmt.Errorf("casecret: %s/%s: %w: %w", s.Namespace, s.Name, ErrInvalidSecret, err)
	}
	if a, err = a.WithTrustAnchors(roots); err != nil {
		return nil, fmt.Errorf("casecret: %s/%s: %w: %s: %w", s.Namespace, s.Name, ErrInvalidSecret, KeyRoot, err)
	}
	return a, nil
}
