package identity

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"slices"

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
// certificate must be valid for serverName and chain to a root that b holds
// for td at the time of the handshake. Unlike a fixed RootCAs pool read at
// start, this follows the roots discovery publishes, so that a client
// keeps reaching the controller across a root rotation (the controller
// switches its serving certificate to the new root only after publishing
// it); a root that discovery stops publishing stops being trusted.
func ControllerTLS(serverName string, b *Bundle, td spiffeid.TrustDomain) *tls.Config {
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
			roots := x509.NewCertPool()
			for _, r := range b.Roots(td) {
				roots.AddCert(r)
			}
			inter := x509.NewCertPool()
			for _, c := range cs.PeerCertificates[1:] {
				inter.AddCert(c)
			}
			_, err := cs.PeerCertificates[0].Verify(x509.VerifyOptions{
				DNSName: serverName, Roots: roots, Intermediates: inter,
				KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
			})
			if err != nil {
				return fmt.Errorf("controller %s: server certificate: %w", serverName, err)
			}
			return nil
		},
	}
}
