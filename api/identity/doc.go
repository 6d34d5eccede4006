// Package identity provides amesh's workload identities and the mTLS plumbing
// built on them: SPIFFE IDs of the form spiffe://<td>/ns/<ns>/sa/<sa>
// (go-spiffe spiffeid), ECDSA P-256 keys and CSRs whose only SAN is the SPIFFE
// URI, a certificate Store that fetches one certificate per identity from an
// Issuer and rotates it at half-life, a hot-reloadable trust Bundle, and the
// TLS 1.3 configurations used by HBONE clients and servers, which verify peers
// by their SPIFFE URI SAN with go-spiffe's x509svid verification.
//
// Deviations from the API sketch: ClientTLS takes a certificate getter (like
// tls.Config.GetClientCertificate) rather than a fixed certificate; the Store
// adds GetCertificate/GetClientCertificate adapters for tls.Config; Release
// forgets an identity (the caller tracks its own users).
package identity
