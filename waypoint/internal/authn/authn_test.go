package authn

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	discoveryv1 "github.com/amesh-dev/amesh/api/discovery/v1"
	jose "github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
)

type signer struct {
	key *ecdsa.PrivateKey
	kid string
}

func newSigner(t *testing.T, kid string) *signer {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return &signer{key: k, kid: kid}
}

func (s *signer) jwks(t *testing.T) string {
	b, err := json.Marshal(jose.JSONWebKeySet{Keys: []jose.JSONWebKey{{Key: &s.key.PublicKey, KeyID: s.kid, Algorithm: "ES256", Use: "sig"}}})
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func (s *signer) token(t *testing.T, c jwt.Claims, extra map[string]any) string {
	sig, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.ES256, Key: s.key},
		(&jose.SignerOptions{}).WithType("JWT").WithHeader("kid", s.kid))
	if err != nil {
		t.Fatal(err)
	}
	tok, err := jwt.Signed(sig).Claims(c).Claims(extra).Serialize()
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

const issuer = "https://issuer.example"

func TestAuthenticate(t *testing.T) {
	s := newSigner(t, "k1")
	other := newSigner(t, "k1") // same kid, different key
	now := time.Unix(1_800_000_000, 0)
	ra := []*discoveryv1.RequestAuthentication{{Name: "jwt", Namespace: "default", JwtRules: []*discoveryv1.JWTRule{{
		Issuer: issuer, Audiences: []string{"reviews"}, Jwks: s.jwks(t), OutputPayloadToHeader: "x-jwt-payload",
	}}}}
	a := New(ra, NewKeyCache(Options{}), Options{Now: func() time.Time { return now }})
	good := jwt.Claims{Issuer: issuer, Subject: "alice", Audience: jwt.Audience{"reviews"},
		Expiry: jwt.NewNumericDate(now.Add(time.Hour)), IssuedAt: jwt.NewNumericDate(now)}
	mod := func(f func(*jwt.Claims)) jwt.Claims { c := good; f(&c); return c }
	tests := []struct {
		name string
		auth string
		want error
	}{
		{"valid", "Bearer " + s.token(t, good, map[string]any{"groups": []string{"admin"}}), nil},
		{"expired", "Bearer " + s.token(t, mod(func(c *jwt.Claims) { c.Expiry = jwt.NewNumericDate(now.Add(-2 * time.Minute)) }), nil), ErrExpired},
		{"not yet valid", "Bearer " + s.token(t, mod(func(c *jwt.Claims) { c.NotBefore = jwt.NewNumericDate(now.Add(time.Hour)) }), nil), ErrNotYetValid},
		{"wrong issuer", "Bearer " + s.token(t, mod(func(c *jwt.Claims) { c.Issuer = "https://evil.example" }), nil), ErrUnknownIssuer},
		{"wrong audience", "Bearer " + s.token(t, mod(func(c *jwt.Claims) { c.Audience = jwt.Audience{"ratings"} }), nil), ErrAudience},
		{"wrong key", "Bearer " + other.token(t, good, nil), ErrSignature},
		{"garbage", "Bearer not.a.jwt", ErrMalformed},
		{"no token", "", nil},
		{"other scheme is no token", "Basic dXNlcjpwYXNz", nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := httptest.NewRequest("GET", "http://reviews/x", nil)
			if tt.auth != "" {
				r.Header.Set("Authorization", tt.auth)
			}
			id, err := a.Authenticate(context.Background(), r)
			if !errors.Is(err, tt.want) {
				t.Fatalf("err = %v, want %v", err, tt.want)
			}
			if tt.want != nil {
				if id != nil {
					t.Fatal("identity with error")
				}
				if c := Challenge(r, err); !strings.HasPrefix(c, `Bearer realm="http://reviews/x", error="invalid_token"`) {
					t.Fatalf("challenge %q", c)
				}
				return
			}
			if tt.name == "valid" {
				if id == nil || id.Principal != issuer+"/alice" || id.Audiences[0] != "reviews" {
					t.Fatalf("identity %+v", id)
				}
				if g, _ := id.Claims["groups"].([]any); len(g) != 1 || g[0] != "admin" {
					t.Fatalf("claims %v", id.Claims)
				}
				if r.Header.Get("Authorization") != "" {
					t.Error("token forwarded without forward_original_token")
				}
				p, err := PayloadJSON(r.Header.Get("x-jwt-payload"))
				if err != nil || !strings.Contains(string(p), `"sub":"alice"`) {
					t.Errorf("payload header %q %v", p, err)
				}
			} else if id != nil {
				t.Fatalf("identity without token: %+v", id)
			}
		})
	}
}

func TestFetchedJWKSCachedAndRotated(t *testing.T) {
	s1, s2 := newSigner(t, "k1"), newSigner(t, "k2")
	var fetches atomic.Int32
	var current atomic.Value
	current.Store(s1.jwks(t))
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fetches.Add(1)
		_, _ = w.Write([]byte(current.Load().(string)))
	}))
	defer srv.Close()
	clock := time.Unix(1_800_000_000, 0)
	now := func() time.Time { return clock }
	keys := NewKeyCache(Options{Now: now, CacheTTL: time.Hour})
	a := New([]*discoveryv1.RequestAuthentication{{JwtRules: []*discoveryv1.JWTRule{{Issuer: issuer, JwksUri: srv.URL,
		FromHeaders: []*discoveryv1.JWTHeader{{Name: "x-token"}}, ForwardOriginalToken: true}}}}, keys, Options{Now: now})
	claims := jwt.Claims{Issuer: issuer, Subject: "bob", Expiry: jwt.NewNumericDate(clock.Add(time.Hour))}
	call := func(tok string) error {
		r := httptest.NewRequest("GET", "http://svc/", nil)
		r.Header.Set("x-token", tok)
		_, err := a.Authenticate(context.Background(), r)
		if err == nil && r.Header.Get("x-token") == "" {
			t.Fatal("forward_original_token removed the token")
		}
		return err
	}
	for range 5 {
		if err := call(s1.token(t, claims, nil)); err != nil {
			t.Fatal(err)
		}
	}
	if fetches.Load() != 1 {
		t.Fatalf("fetched %d times, want 1 (cached)", fetches.Load())
	}
	// Rotation: a new kid forces one refresh once minRefresh has passed.
	current.Store(s2.jwks(t))
	clock = clock.Add(minRefresh)
	if err := call(s2.token(t, claims, nil)); err != nil {
		t.Fatalf("rotated key: %v", err)
	}
	if fetches.Load() != 2 {
		t.Fatalf("fetched %d times, want 2", fetches.Load())
	}
	// The JWKS endpoint failing: tokens fail closed when no keys were ever fetched.
	bad := New([]*discoveryv1.RequestAuthentication{{JwtRules: []*discoveryv1.JWTRule{{Issuer: issuer, JwksUri: "http://127.0.0.1:1/jwks"}}}},
		NewKeyCache(Options{}), Options{Now: now})
	r := httptest.NewRequest("GET", "http://svc/", nil)
	r.Header.Set("Authorization", "Bearer "+s1.token(t, claims, nil))
	if _, err := bad.Authenticate(context.Background(), r); !errors.Is(err, ErrKeysNotFetched) {
		t.Fatalf("unreachable JWKS: %v", err)
	}
}

// FuzzAuthenticate: arbitrary Authorization headers never panic and never
// authenticate (no key can sign them).
func FuzzAuthenticate(f *testing.F) {
	f.Add("Bearer eyJhbGciOiJub25lIn0.eyJpc3MiOiJodHRwczovL2lzc3Vlci5leGFtcGxlIn0.")
	f.Add("Bearer a.b.c")
	f.Add("bearer ....")
	s, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		f.Fatal(err)
	}
	set, _ := json.Marshal(jose.JSONWebKeySet{Keys: []jose.JSONWebKey{{Key: &s.PublicKey, KeyID: "k", Algorithm: "ES256"}}})
	a := New([]*discoveryv1.RequestAuthentication{{JwtRules: []*discoveryv1.JWTRule{{Issuer: issuer, Jwks: string(set)}}}},
		NewKeyCache(Options{}), Options{})
	f.Fuzz(func(t *testing.T, h string) {
		r := httptest.NewRequest("GET", "http://svc/", nil)
		r.Header["Authorization"] = []string{h}
		if id, err := a.Authenticate(context.Background(), r); id != nil || (err == nil && strings.HasPrefix(strings.ToLower(h), "bearer ") && strings.TrimSpace(h[7:]) != "") {
			t.Fatalf("header %q: identity %v err %v", h, id, err)
		}
	})
}

// jwksServer serves key sets by path over TLS and counts fetches per path.
type jwksServer struct {
	srv     *httptest.Server
	mu      sync.Mutex
	sets    map[string]string
	fetches map[string]int
}

func newJWKSServer(t *testing.T) *jwksServer {
	j := &jwksServer{sets: map[string]string{}, fetches: map[string]int{}}
	j.srv = httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		j.mu.Lock()
		defer j.mu.Unlock()
		j.fetches[r.URL.Path]++
		set, ok := j.sets[r.URL.Path]
		if !ok {
			http.NotFound(w, r)
			return
		}
		_, _ = w.Write([]byte(set))
	}))
	t.Cleanup(j.srv.Close)
	return j
}

func (j *jwksServer) serve(path, set string) {
	j.mu.Lock()
	defer j.mu.Unlock()
	j.sets[path] = set
}

func (j *jwksServer) count(path string) int {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.fetches[path]
}

// waitCount waits until path was fetched n times.
func (j *jwksServer) waitCount(t *testing.T, path string, n int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for j.count(path) < n {
		if time.Now().After(deadline) {
			t.Fatalf("%s fetched %d times, want %d", path, j.count(path), n)
		}
		time.Sleep(5 * time.Millisecond)
	}
	time.Sleep(20 * time.Millisecond)
	if got := j.count(path); got != n {
		t.Fatalf("%s fetched %d times, want exactly %d", path, got, n)
	}
}

// TestJWKSHotReload: a RequestAuthentication change reaches the fetched
// keys without waiting for the cache TTL — new URIs are fetched before any
// request needs them, a changed rule refetches its URI, unchanged rules
// fetch nothing, and keys of URIs no longer referenced are dropped.
func TestJWKSHotReload(t *testing.T) {
	j := newJWKSServer(t)
	s1, s2 := newSigner(t, "k1"), newSigner(t, "k1") // same kid: only a reload finds s2
	j.serve("/a", s1.jwks(t))
	j.serve("/b", s2.jwks(t))
	keys := NewKeyCache(Options{Client: j.srv.Client(), CacheTTL: time.Hour})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- keys.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	})
	ra := func(uri string, aud ...string) []*discoveryv1.RequestAuthentication {
		return []*discoveryv1.RequestAuthentication{{Namespace: "default", Name: "jwt", JwtRules: []*discoveryv1.JWTRule{{
			Issuer: issuer, JwksUri: j.srv.URL + uri, Audiences: aud}}}}
	}
	claims := jwt.Claims{Issuer: issuer, Subject: "carol", Audience: jwt.Audience{"x"}, Expiry: jwt.NewNumericDate(time.Now().Add(time.Hour))}
	check := func(ras []*discoveryv1.RequestAuthentication, s *signer, want error) {
		t.Helper()
		r := httptest.NewRequest("GET", "http://svc/", nil)
		r.Header.Set("Authorization", "Bearer "+s.token(t, claims, nil))
		if _, err := New(ras, keys, Options{}).Authenticate(context.Background(), r); !errors.Is(err, want) {
			t.Fatalf("authenticate: %v, want %v", err, want)
		}
	}

	v1 := ra("/a", "x")
	keys.Configure(Fingerprints(v1))
	j.waitCount(t, "/a", 1) // fetched before any request
	check(v1, s1, nil)
	check(v1, s2, ErrSignature)
	keys.Configure(Fingerprints(v1)) // unchanged: nothing fetched
	j.waitCount(t, "/a", 1)

	// The issuer's keys change and the operator updates the
	// RequestAuthentication: the same URI is fetched again at once.
	j.serve("/a", s2.jwks(t))
	v2 := ra("/a", "x", "y")
	keys.Configure(Fingerprints(v2))
	j.waitCount(t, "/a", 2)
	check(v2, s2, nil)
	check(v2, s1, ErrSignature)

	// A new URI: fetched ahead, and /a's keys are dropped.
	v3 := ra("/b", "x")
	keys.Configure(Fingerprints(v3))
	j.waitCount(t, "/b", 1)
	check(v3, s2, nil)
	keys.mu.Lock()
	_, kept := keys.entries[j.srv.URL+"/a"]
	keys.mu.Unlock()
	if kept {
		t.Fatal("keys of an unreferenced URI kept")
	}
	j.waitCount(t, "/a", 2)
}

// TestJWKSReloadWithoutRun: without the background fetcher, a changed rule
// makes the next request refetch.
func TestJWKSReloadWithoutRun(t *testing.T) {
	j := newJWKSServer(t)
	s1, s2 := newSigner(t, "k1"), newSigner(t, "k1")
	j.serve("/a", s1.jwks(t))
	keys := NewKeyCache(Options{Client: j.srv.Client(), CacheTTL: time.Hour})
	uri := j.srv.URL + "/a"
	ras := []*discoveryv1.RequestAuthentication{{JwtRules: []*discoveryv1.JWTRule{{Issuer: issuer, JwksUri: uri}}}}
	keys.Configure(Fingerprints(ras))
	if _, err := keys.Get(context.Background(), uri, false); err != nil {
		t.Fatal(err)
	}
	j.serve("/a", s2.jwks(t))
	ras[0].JwtRules[0].FromHeaders = []*discoveryv1.JWTHeader{{Name: "x-token"}}
	keys.Configure(Fingerprints(ras))
	set, err := keys.Get(context.Background(), uri, false)
	if err != nil || j.count("/a") != 2 {
		t.Fatalf("%v, %d fetches", err, j.count("/a"))
	}
	if len(set.Keys) != 1 || !set.Keys[0].Key.(*ecdsa.PublicKey).Equal(&s2.key.PublicKey) {
		t.Fatal("stale keys after the rule changed")
	}
	// The endpoint failing on the next change keeps the last good keys.
	j.mu.Lock()
	delete(j.sets, "/a") // 404 from now on
	j.mu.Unlock()
	ras[0].JwtRules[0].Audiences = []string{"z"}
	keys.Configure(Fingerprints(ras))
	if set, err := keys.Get(context.Background(), uri, false); err != nil || !set.Keys[0].Key.(*ecdsa.PublicKey).Equal(&s2.key.PublicKey) || j.count("/a") != 3 {
		t.Fatalf("failed refetch lost the keys: %v (%d fetches)", err, j.count("/a"))
	}
}
