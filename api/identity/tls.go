package identity

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"slices"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// ALPN is the only application protocol HBONE speaks.
const ALPN = "h2"

// ErrPeer reports a peer whose certificate is missing, does not verify against
// the trust bundle, or does not carry an acceptable SPIFFE ID.
var ErrPeer = errors.New("peer identity rejected")

// ServerTLS returns the TLS configuration of an HBONE server: TLS 1.3 only,
// ALPN h2, a client certificate is required, and the client chain must verify
// against b (read at each handshake) with a SPIFFE ID in trust domain td.
// Session tickets are disabled so every connection is fully verified.
func ServerTLS(cert func(*tls.ClientHelloInfo) (*tls.Certificate, error), b *Bundle, td spiffeid.TrustDomain) *tls.Config {
	return &tls.Config{
		MinVersion:             tls.VersionTLS13,
		MaxVersion:             tls.VersionTLS13,
		NextProtos:             []string{ALPN},
		GetCertificate:         cert,
		ClientAuth:             tls.RequireAnyClientCert, // verified in VerifyConnection
		SessionTicketsDisabled: true,
		VerifyConnection: func(cs tls.ConnectionState) error {
			if cs.NegotiatedProtocol != ALPN {
				return fmt.Errorf("%w: client did not negotiate ALPN %q", ErrPeer, ALPN)
			}
			id, err := verifyPeer(cs, b)
			if err != nil {
				return err
			}
			if !id.MemberOf(td) {
				return fmt.Errorf("%w: client %s is not in trust domain %s", ErrPeer, id, td)
			}
			return nil
		},
	}
}

// ClientTLS returns the TLS configuration of an HBONE client: TLS 1.3 only,
// ALPN h2, no SNI, the client certificate from cert, and the server chain must
// verify against b with a SPIFFE ID that is one of expected. With no expected
// IDs every server is refused.
func ClientTLS(cert func(*tls.CertificateRequestInfo) (*tls.Certificate, error), b *Bundle, expected ...spiffeid.ID) *tls.Config {
	expected = slices.Clone(expected)
	return &tls.Config{
		MinVersion:           tls.VersionTLS13,
		MaxVersion:           tls.VersionTLS13,
		NextProtos:           []string{ALPN},
		GetClientCertificate: cert,
		// Go verifies server names against DNS/IP SANs; SPIFFE peers are
		// verified by URI SAN in VerifyConnection instead, on every handshake.
		InsecureSkipVerify: true,
		VerifyConnection: func(cs tls.ConnectionState) error {
			if cs.NegotiatedProtocol != ALPN {
				return fmt.Errorf("%w: server did not negotiate ALPN %q", ErrPeer, ALPN)
			}
			id, err := verifyPeer(cs, b)
			if err != nil {
				return err
			}
			if !slices.Contains(expected, id) {
				return fmt.Errorf("%w: server is %s, want one of %v", ErrPeer, id, expected)
			}
			return nil
		},
	}
}

func verifyPeer(cs tls.ConnectionState, b *Bundle) (spiffeid.ID, error) {
	if len(cs.PeerCertificates) == 0 {
		return spiffeid.ID{}, fmt.Errorf("%w: no certificate", ErrPeer)
	}
	if b == nil {
		return spiffeid.ID{}, fmt.Errorf("%w: no trust bundle", ErrPeer)
	}
	id, _, err := x509svid.Verify(cs.PeerCertificates, b)
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("%w: %w", ErrPeer, err)
	}
	return id, nil
}

// PeerID returns the SPIFFE ID of the peer of a connection configured by
// ServerTLS or ClientTLS (whose handshake already verified it).
func PeerID(cs tls.ConnectionState) (spiffeid.ID, error) {
	if !cs.HandshakeComplete || len(cs.PeerCertificates) == 0 {
		return spiffeid.ID{}, fmt.Errorf("%w: no verified peer certificate", ErrPeer)
	}
	id, err := x509svid.IDFromCert(cs.PeerCertificates[0])
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("%w: %w", ErrPeer, err)
	}
	return id, nil
}

// LeafID returns the SPIFFE ID of a certificate's leaf.
func LeafID(c *tls.Certificate) (spiffeid.ID, error) {
	leaf := c.Leaf
	if leaf == nil {
		if len(c.Certificate) == 0 {
			return spiffeid.ID{}, errors.New("empty certificate")
		}
		var err error
		if leaf, err = x509.ParseCertificate(c.Certificate[0]); err != nil {
			return spiffeid.ID{}, err
		}
	}
	return x509svid.IDFromCert(leaf)
}

// ControllerTLS returns the client TLS configuration for the controller's
// discovery and certificate service (TLS 1.3): the controller's server
// certificate must be valid for serverName and chain to one of the roots
// that roots returns at the time of the handshake. Unlike a fixed RootCAs
// pool read at start, this follows a root rotation: the controller
// switches its serving certificate to a new root only after publishing it
// (see ControllerRoots).
func ControllerTLS(serverName string, roots func() []*x509.Certificate) *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		ServerName: serverName,
		// The chain is verified in VerifyConnection, against the roots
		// of the moment; Go's own verification takes a fixed pool.
		InsecureSkipVerify: true,
		VerifyConnection: func(cs tls.ConnectionState) error {
			switch {
			case serverName == "":
				// x509 would skip the name check.
				return errors.New("controller: no server name to verify")
			case len(cs.PeerCertificates) == 0:
				return fmt.Errorf("controller %s: no server certificate", serverName)
			}
			pool := x509.NewCertPool()
			for _, r := range roots() {
				pool.AddCert(r)
			}
			inter := x509.NewCertPool()
			for _, c := range cs.PeerCertificates[1:] {
				inter.AddCert(c)
			}
			_, err := cs.PeerCertificates[0].Verify(x509.VerifyOptions{
				DNSName: serverName, Roots: pool, Intermediates: inter,
				KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
			})
			if err != nil {
				return fmt.Errorf("controller %s: server certificate: %w", serverName, err)
			}
			return nil
		},
	}
}

// ControllerRoots are the roots a data-plane component trusts for the
// controller: those b holds for td (published through discovery, or the
// root file's until discovery publishes some) and those in the root file
// now (the amesh-root-cert ConfigMap as the kubelet keeps it current), so
// that a component that was away while a new root was published can
// still reconnect. Both drop a root the operator removes.
func ControllerRoots(b *Bundle, td spiffeid.TrustDomain, rootFile string) func() []*x509.Certificate {
	return func() []*x509.Certificate {
		roots := b.Roots(td)
		if pemRoots, err := os.ReadFile(rootFile); err == nil {
			if fb, err := x509bundle.Parse(td, pemRoots); err == nil {
				roots = append(roots, fb.X509Authorities()...)
			}
		}
		return roots
	}
}
