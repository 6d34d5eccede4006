//go:build e2e

package suite

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/json"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
)

// jwtKey is a signing key and its key ID.
type jwtKey struct {
	k   *ecdsa.PrivateKey
	kid string
}

// newJWKS makes an ES256 key and its public JWKS (JSON).
func newJWKS(t *testing.T) (jwtKey, string) {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	kid := "e2e-" + randSuffix()
	set := jose.JSONWebKeySet{Keys: []jose.JSONWebKey{{Key: k.Public(), KeyID: kid, Algorithm: string(jose.ES256), Use: "sig"}}}
	b, err := json.Marshal(set)
	if err != nil {
		t.Fatal(err)
	}
	return jwtKey{k, kid}, string(b)
}

// signJWT signs a token for subject from issuer, valid for an hour.
func signJWT(t *testing.T, k jwtKey, issuer, subject string) string {
	t.Helper()
	opts := (&jose.SignerOptions{}).WithType("JWT").WithHeader("kid", k.kid)
	sig, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.ES256, Key: k.k}, opts)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	tok, err := jwt.Signed(sig).Claims(jwt.Claims{
		Issuer: issuer, Subject: subject, IssuedAt: jwt.NewNumericDate(now), Expiry: jwt.NewNumericDate(now.Add(time.Hour)),
	}).Serialize()
	if err != nil {
		t.Fatal(err)
	}
	return tok
}
