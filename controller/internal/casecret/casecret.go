// Package casecret keeps the mesh certificate authority in a Kubernetes
// Secret (amesh-system/amesh-ca by default): it loads the Secret an
// operator provided, or generates a root and stores it when the Secret is
// absent.
//
// The Secret holds "tls.crt" (the signing certificate, optionally followed
// by its chain), "tls.key" (its private key) and optionally "ca.crt" (the
// trust anchor, when tls.crt does not end with it) — the layout of a
// kubernetes.io/tls Secret as cert-manager writes it for a CA.
package casecret

import (
	"bytes"
	"context"
	"errors"
	"fmt"
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
	if root := s.Data[KeyRoot]; len(root) > 0 {
		certs, err := ca.ParseCertsPEM(cert)
		if err != nil {
			return nil, fmt.Errorf("casecret: %s/%s: %w: %s: %v", s.Namespace, s.Name, ErrInvalidSecret, KeyCert, err)
		}
		roots, err := ca.ParseCertsPEM(root)
		if err != nil {
			return nil, fmt.Errorf("casecret: %s/%s: %w: %s: %v", s.Namespace, s.Name, ErrInvalidSecret, KeyRoot, err)
		}
		if !bytes.Equal(certs[len(certs)-1].Raw, roots[0].Raw) {
			chain = append(append(bytes.Clone(cert), '\n'), root...)
		}
	}
	a, err := ca.LoadAuthority(o.TrustDomain, chain, key, o.CAOptions...)
	if err != nil {
		return nil, fmt.Errorf("casecret: %s/%s: %w: %w", s.Namespace, s.Name, ErrInvalidSecret, err)
	}
	return a, nil
}
