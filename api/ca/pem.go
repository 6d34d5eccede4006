package ca

import (
	"bytes"
	"crypto"
	"crypto/x509"
	"encoding/asn1"
	"encoding/pem"
	"errors"
	"fmt"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// oidSAN is id-ce-subjectAltName (RFC 5280 §4.2.1.6).
var oidSAN = asn1.ObjectIdentifier{2, 5, 29, 17}

// ParseCSR decodes exactly one PEM "CERTIFICATE REQUEST" block (nothing but
// whitespace around it), parses it and verifies its signature and key type.
func ParseCSR(csrPEM []byte) (*x509.CertificateRequest, error) {
	block, rest := pem.Decode(csrPEM)
	if block == nil {
		return nil, fmt.Errorf("%w: no PEM block", ErrInvalidCSR)
	}
	if block.Type != "CERTIFICATE REQUEST" && block.Type != "NEW CERTIFICATE REQUEST" {
		return nil, fmt.Errorf("%w: PEM block of type %q", ErrInvalidCSR, block.Type)
	}
	if len(bytes.TrimSpace(rest)) != 0 {
		return nil, fmt.Errorf("%w: data after the PEM block", ErrInvalidCSR)
	}
	csr, err := x509.ParseCertificateRequest(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrInvalidCSR, err)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, fmt.Errorf("%w: signature: %v", ErrInvalidCSR, err)
	}
	if err := checkKey(csr.PublicKey); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrInvalidCSR, err)
	}
	return csr, nil
}

// checkOnlyURISAN requires the CSR's subject alternative names to be exactly
// one URI equal to id. It reads the raw extension too, because the x509
// package silently drops name types it does not model (otherName,
// directoryName, registeredID…).
func checkOnlyURISAN(csr *x509.CertificateRequest, id spiffeid.ID) error {
	if n := len(csr.DNSNames) + len(csr.IPAddresses) + len(csr.EmailAddresses); n > 0 {
		return fmt.Errorf("%w: DNS, IP or email SANs %v %v %v; only the SPIFFE URI is allowed",
			ErrInvalidCSR, csr.DNSNames, csr.IPAddresses, csr.EmailAddresses)
	}
	if len(csr.URIs) != 1 {
		return fmt.Errorf("%w: %d URI SANs; exactly one (%s) is required", ErrInvalidCSR, len(csr.URIs), id)
	}
	if got := csr.URIs[0].String(); got != id.String() {
		return fmt.Errorf("%w: URI SAN %q is not the requested identity %q", ErrInvalidCSR, got, id)
	}
	sans := 0
	for _, ext := range csr.Extensions {
		if !ext.Id.Equal(oidSAN) {
			continue
		}
		sans++
		var seq asn1.RawValue
		rest, err := asn1.Unmarshal(ext.Value, &seq)
		if err != nil || len(rest) != 0 || !seq.IsCompound || seq.Tag != asn1.TagSequence {
			return fmt.Errorf("%w: malformed subjectAltName", ErrInvalidCSR)
		}
		names := 0
		for b := seq.Bytes; len(b) > 0; names++ {
			var gn asn1.RawValue
			b, err = asn1.Unmarshal(b, &gn)
			if err != nil {
				return fmt.Errorf("%w: malformed subjectAltName entry", ErrInvalidCSR)
			}
			if gn.Class != asn1.ClassContextSpecific || gn.Tag != 6 { // uniformResourceIdentifier
				return fmt.Errorf("%w: subjectAltName of type [%d]; only the SPIFFE URI is allowed", ErrInvalidCSR, gn.Tag)
			}
		}
		if names != 1 {
			return fmt.Errorf("%w: %d names in subjectAltName", ErrInvalidCSR, names)
		}
	}
	if sans != 1 {
		return fmt.Errorf("%w: %d subjectAltName extensions", ErrInvalidCSR, sans)
	}
	return nil
}

// ParseCertsPEM decodes one or more PEM "CERTIFICATE" blocks; anything else
// in the input is an error.
func ParseCertsPEM(b []byte) ([]*x509.Certificate, error) {
	var out []*x509.Certificate
	for {
		block, rest := pem.Decode(b)
		if block == nil {
			if len(bytes.TrimSpace(b)) != 0 {
				return nil, errors.New("certificate PEM: data that is not a PEM block")
			}
			break
		}
		if block.Type != "CERTIFICATE" {
			return nil, fmt.Errorf("certificate PEM: block of type %q", block.Type)
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("certificate PEM: %w", err)
		}
		out = append(out, c)
		b = rest
	}
	if len(out) == 0 {
		return nil, errors.New("certificate PEM: no certificate")
	}
	return out, nil
}

// parseKeyPEM decodes one PEM private key (PKCS#8, SEC 1 or PKCS#1).
func parseKeyPEM(b []byte) (crypto.Signer, error) {
	block, rest := pem.Decode(b)
	if block == nil {
		return nil, errors.New("key PEM: no PEM block")
	}
	if len(bytes.TrimSpace(rest)) != 0 {
		return nil, errors.New("key PEM: data after the key")
	}
	var key any
	var err error
	switch block.Type {
	case "PRIVATE KEY":
		key, err = x509.ParsePKCS8PrivateKey(block.Bytes)
	case "EC PRIVATE KEY":
		key, err = x509.ParseECPrivateKey(block.Bytes)
	case "RSA PRIVATE KEY":
		key, err = x509.ParsePKCS1PrivateKey(block.Bytes)
	default:
		return nil, fmt.Errorf("key PEM: block of type %q", block.Type)
	}
	if err != nil {
		return nil, fmt.Errorf("key PEM: %w", err)
	}
	s, ok := key.(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("key PEM: %T cannot sign", key)
	}
	if err := checkKey(s.Public()); err != nil {
		return nil, fmt.Errorf("key PEM: %w", err)
	}
	return s, nil
}

// EncodeCertsPEM encodes certificates as concatenated PEM blocks.
func EncodeCertsPEM(certs []*x509.Certificate) []byte {
	var buf bytes.Buffer
	for _, c := range certs {
		_ = pem.Encode(&buf, &pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
	}
	return buf.Bytes()
}
