// Package authn validates request JWTs for RequestAuthentication resources:
// issuers, audiences, signatures against inline or fetched (and cached) JWKS.
// A request without a token passes unauthenticated; a request with a token
// that does not validate is refused (401 with a WWW-Authenticate challenge).
package authn

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"time"

	discoveryv1 "github.com/amesh-dev/amesh/api/discovery/v1"
	jose "github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
)

// Errors a Result can carry; all mean 401.
var (
	ErrMalformed      = errors.New("malformed JWT")
	ErrUnknownIssuer  = errors.New("JWT issuer is not configured")
	ErrSignature      = errors.New("JWT signature verification failed")
	ErrExpired        = errors.New("JWT is expired")
	ErrNotYetValid    = errors.New("JWT is not yet valid")
	ErrAudience       = errors.New("JWT audience is not allowed")
	ErrKeysNotFetched = errors.New("JWKS could not be fetched")
)

// Algorithms accepted for signatures (no "none", no HMAC: keys are public).
var algorithms = []jose.SignatureAlgorithm{
	jose.RS256, jose.RS384, jose.RS512, jose.PS256, jose.PS384, jose.PS512,
	jose.ES256, jose.ES384, jose.ES512, jose.EdDSA,
}

// Identity is what a valid token establishes.
type Identity struct {
	// Principal is "<iss>/<sub>".
	Principal string
	Issuer    string
	Subject   string
	Audiences []string
	Claims    map[string]any
}

// Options configure an Authenticator.
type Options struct {
	// Client fetches jwks_uri; default: an http.Client with a 10s timeout.
	Client *http.Client
	// CacheTTL of fetched key sets; default 20 minutes.
	CacheTTL time.Duration
	// Now is the clock; default time.Now.
	Now func() time.Time
	// Leeway for exp/nbf/iat; default 60s (as Istio and Envoy).
	Leeway time.Duration
}

// Authenticator validates tokens for a set of RequestAuthentication
// resources. Safe for concurrent use; JWKS caches are shared.
type Authenticator struct {
	rules []*rule
	keys  *KeyCache
	now   func() time.Time
	lw    time.Duration
}

type rule struct {
	*discoveryv1.JWTRule
	inline *jose.JSONWebKeySet
	err    error // inline JWKS could not be parsed: tokens of this issuer fail
}

// New prepares an authenticator; keys may be shared across authenticators.
func New(ras []*discoveryv1.RequestAuthentication, keys *KeyCache, opts Options) *Authenticator {
	a := &Authenticator{keys: keys, now: opts.Now, lw: opts.Leeway}
	if a.now == nil {
		a.now = time.Now
	}
	if a.lw == 0 {
		a.lw = time.Minute
	}
	for _, ra := range ras {
		for _, jr := range ra.GetJwtRules() {
			r := &rule{JWTRule: jr}
			if jr.GetJwks() != "" {
				var set jose.JSONWebKeySet
				if err := json.Unmarshal([]byte(jr.GetJwks()), &set); err != nil {
					r.err = fmt.Errorf("%w: inline JWKS of %s: %v", ErrKeysNotFetched, jr.GetIssuer(), err)
				}
				r.inline = &set
			} else if jr.GetJwksUri() == "" {
				r.err = fmt.Errorf("%w: issuer %s has neither jwks nor jwks_uri", ErrKeysNotFetched, jr.GetIssuer())
			}
			a.rules = append(a.rules, r)
		}
	}
	return a
}

// Enabled reports whether any JWT rule is configured.
func (a *Authenticator) Enabled() bool { return len(a.rules) > 0 }

// location is where a token was found.
type location struct {
	header, prefix, param string
}

// extract finds the first token in r at any configured location.
func (a *Authenticator) extract(r *http.Request) (string, location, bool) {
	try := func(loc location) (string, bool) {
		if loc.param != "" {
			v := r.URL.Query().Get(loc.param)
			return v, v != ""
		}
		v := r.Header.Get(loc.header)
		if v == "" {
			return "", false
		}
		if loc.prefix != "" {
			if len(v) < len(loc.prefix) || !strings.EqualFold(v[:len(loc.prefix)], loc.prefix) {
				return "", false
			}
			v = v[len(loc.prefix):]
		}
		v = strings.TrimSpace(v)
		return v, v != ""
	}
	for _, rl := range a.rules {
		for _, loc := range locations(rl.JWTRule) {
			if tok, ok := try(loc); ok {
				return tok, loc, true
			}
		}
	}
	return "", location{}, false
}

func locations(jr *discoveryv1.JWTRule) []location {
	var out []location
	for _, h := range jr.GetFromHeaders() {
		out = append(out, location{header: h.GetName(), prefix: h.GetPrefix()})
	}
	for _, p := range jr.GetFromParams() {
		out = append(out, location{param: p})
	}
	if len(out) == 0 {
		out = append(out, location{header: "Authorization", prefix: "Bearer "})
	}
	return out
}

// Authenticate validates the token of r, if any. It returns (nil, nil) for a
// request without a token. On success it applies the rule's header
// handling (removing the token unless forward_original_token, writing the
// payload to output_payload_to_header).
func (a *Authenticator) Authenticate(ctx context.Context, r *http.Request) (*Identity, error) {
	if len(a.rules) == 0 {
		return nil, nil
	}
	tok, loc, ok := a.extract(r)
	if !ok {
		return nil, nil
	}
	parsed, err := jwt.ParseSigned(tok, algorithms)
	if err != nil || len(parsed.Headers) == 0 {
		return nil, fmt.Errorf("%w: %v", ErrMalformed, err)
	}
	var unverified jwt.Claims
	if err := parsed.UnsafeClaimsWithoutVerification(&unverified); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrMalformed, err)
	}
	var rl *rule
	for _, cand := range a.rules {
		if cand.GetIssuer() == unverified.Issuer {
			rl = cand
			break
		}
	}
	if rl == nil {
		return nil, fmt.Errorf("%w: %q", ErrUnknownIssuer, unverified.Issuer)
	}
	if rl.err != nil {
		return nil, rl.err
	}
	set := rl.inline
	if set == nil {
		if set, err = a.keys.Get(ctx, rl.GetJwksUri(), false); err != nil {
			return nil, err
		}
	}
	kid := parsed.Headers[0].KeyID
	var claims jwt.Claims
	var all map[string]any
	verified := tryKeys(parsed, set, kid, &claims, &all)
	if !verified && rl.inline == nil && kid != "" && len(set.Key(kid)) == 0 {
		// Unknown key id: the issuer may have rotated; refresh once.
		if set, err = a.keys.Get(ctx, rl.GetJwksUri(), true); err != nil {
			return nil, err
		}
		verified = tryKeys(parsed, set, kid, &claims, &all)
	}
	if !verified {
		return nil, ErrSignature
	}
	exp := jwt.Expected{Issuer: rl.GetIssuer(), AnyAudience: rl.GetAudiences(), Time: a.now()}
	if err := claims.ValidateWithLeeway(exp, a.lw); err != nil {
		switch {
		case errors.Is(err, jwt.ErrExpired):
			return nil, ErrExpired
		case errors.Is(err, jwt.ErrNotValidYet), errors.Is(err, jwt.ErrIssuedInTheFuture):
			return nil, ErrNotYetValid
		case errors.Is(err, jwt.ErrInvalidAudience):
			return nil, ErrAudience
		}
		return nil, fmt.Errorf("%w: %v", ErrMalformed, err)
	}
	id := &Identity{Issuer: claims.Issuer, Subject: claims.Subject, Principal: claims.Issuer + "/" + claims.Subject,
		Audiences: claims.Audience, Claims: all}
	if !rl.GetForwardOriginalToken() {
		if loc.param == "" {
			r.Header.Del(loc.header)
		}
	}
	if h := rl.GetOutputPayloadToHeader(); h != "" {
		if parts := strings.Split(tok, "."); len(parts) == 3 {
			r.Header.Set(h, parts[1])
		}
	}
	return id, nil
}

func tryKeys(t *jwt.JSONWebToken, set *jose.JSONWebKeySet, kid string, claims *jwt.Claims, all *map[string]any) bool {
	keys := set.Keys
	if kid != "" {
		keys = set.Key(kid)
	}
	for _, k := range keys {
		if k.Use == "enc" {
			continue
		}
		if err := t.Claims(k.Public().Key, claims, all); err == nil {
			return true
		}
	}
	return false
}

// Challenge returns the WWW-Authenticate value for a refused request
// (RFC 6750 §3).
func Challenge(r *http.Request, err error) string {
	desc := strings.ReplaceAll(err.Error(), `"`, `'`)
	return fmt.Sprintf(`Bearer realm="http://%s%s", error="invalid_token", error_description="%s"`, r.Host, r.URL.Path, desc)
}

// KeyCache fetches and caches JWKS documents by URI. Safe for concurrent
// use; a fetch is shared by concurrent callers.
type KeyCache struct {
	client *http.Client
	ttl    time.Duration
	now    func() time.Time

	mu      sync.Mutex
	entries map[string]*keyEntry
}

type keyEntry struct {
	ready   chan struct{} // closed when the fetch in flight finishes
	set     *jose.JSONWebKeySet
	err     error
	fetched time.Time
}

// NewKeyCache returns a cache using opts.Client, CacheTTL and Now.
func NewKeyCache(opts Options) *KeyCache {
	c := &KeyCache{client: opts.Client, ttl: opts.CacheTTL, now: opts.Now, entries: map[string]*keyEntry{}}
	if c.client == nil {
		c.client = &http.Client{Timeout: 10 * time.Second}
	}
	if c.ttl == 0 {
		c.ttl = 20 * time.Minute
	}
	if c.now == nil {
		c.now = time.Now
	}
	return c
}

// minRefresh bounds forced refreshes (unknown kid) per URI.
const minRefresh = 30 * time.Second

// Get returns the key set at uri, fetching it when absent, stale, or when
// refresh is set and the cached copy is older than minRefresh. A failed
// fetch is retried on the next call after minRefresh, and a stale good copy
// is served meanwhile.
func (c *KeyCache) Get(ctx context.Context, uri string, refresh bool) (*jose.JSONWebKeySet, error) {
	c.mu.Lock()
	e := c.entries[uri]
	now := c.now()
	if e != nil {
		select {
		case <-e.ready:
			age := now.Sub(e.fetched)
			fresh := e.err == nil && age < c.ttl && !(refresh && age >= minRefresh)
			if fresh || (e.err != nil && age < minRefresh) {
				c.mu.Unlock()
				if e.err != nil {
					return nil, e.err
				}
				return e.set, nil
			}
		default:
			c.mu.Unlock()
			return wait(ctx, e)
		}
	}
	prev := e
	e = &keyEntry{ready: make(chan struct{})}
	c.entries[uri] = e
	c.mu.Unlock()

	set, err := c.fetch(ctx, uri)
	c.mu.Lock()
	e.fetched = c.now()
	if err != nil && prev != nil && prev.set != nil {
		e.set = prev.set // keep serving the last good keys
	} else {
		e.set, e.err = set, err
	}
	close(e.ready)
	c.mu.Unlock()
	return wait(ctx, e)
}

func wait(ctx context.Context, e *keyEntry) (*jose.JSONWebKeySet, error) {
	select {
	case <-e.ready:
	case <-ctx.Done():
		return nil, fmt.Errorf("%w: %w", ErrKeysNotFetched, ctx.Err())
	}
	if e.err != nil {
		return nil, e.err
	}
	return e.set, nil
}

func (c *KeyCache) fetch(ctx context.Context, uri string) (*jose.JSONWebKeySet, error) {
	// The fetch is shared, so it must not die with one caller's request.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, uri, nil)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrKeysNotFetched, err)
	}
	resp, err := c.client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrKeysNotFetched, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("%w: %s answered %s", ErrKeysNotFetched, uri, resp.Status)
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrKeysNotFetched, err)
	}
	var set jose.JSONWebKeySet
	if err := json.Unmarshal(body, &set); err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrKeysNotFetched, uri, err)
	}
	return &set, nil
}

// PayloadJSON decodes a base64url JWT payload (as written to
// output_payload_to_header), for tests and debugging.
func PayloadJSON(seg string) ([]byte, error) {
	return base64.RawURLEncoding.DecodeString(seg)
}
