// Package authn validates request JWTs for RequestAuthentication resources:
// issuers, audiences, signatures against inline or fetched (and cached) JWKS.
// A request without a token passes unauthenticated; a request with a token
// that does not validate is refused (401 with a WWW-Authenticate challenge).
package authn

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"sort"
	"strings"
	"sync"
	"time"

	discoveryv1 "github.com/amesh-dev/amesh/api/discovery/v1"
	jose "github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"google.golang.org/protobuf/proto"
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
//
// Configure tells it which URIs the RequestAuthentications reference: keys
// of URIs no longer referenced are dropped, and a URI that is new, or whose
// rules changed, is fetched again — by Run in the background, so that
// requests after a RequestAuthentication change neither wait for the fetch
// nor see keys older than the change (they keep the previous keys until the
// new ones arrive; without Run, the next request fetches).
type KeyCache struct {
	client *http.Client
	ttl    time.Duration
	now    func() time.Time

	mu      sync.Mutex
	entries map[string]*keyEntry
	prints  map[string]string   // URI → fingerprint of the rules naming it
	pending map[string]struct{} // URIs for Run to fetch
	wake    chan struct{}
}

type keyEntry struct {
	ready   chan struct{} // closed when the fetch in flight finishes
	set     *jose.JSONWebKeySet
	err     error
	fetched time.Time
}

// NewKeyCache returns a cache using opts.Client, CacheTTL and Now.
func NewKeyCache(opts Options) *KeyCache {
	c := &KeyCache{client: opts.Client, ttl: opts.CacheTTL, now: opts.Now, entries: map[string]*keyEntry{},
		prints: map[string]string{}, pending: map[string]struct{}{}, wake: make(chan struct{}, 1)}
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
	// The fetch is shared, so it must not die with one caller's request.
	return c.get(ctx, context.WithoutCancel(ctx), uri, refresh)
}

// get is Get with the context the fetch runs under.
func (c *KeyCache) get(ctx, fetchCtx context.Context, uri string, refresh bool) (*jose.JSONWebKeySet, error) {
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

	set, err := c.fetch(fetchCtx, uri)
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
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
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

// Configure declares the JWKS URIs that the configuration references, each
// with a fingerprint of the JWT rules that name it (see Fingerprints). Keys
// of URIs not in refs are dropped; a URI that is new or whose fingerprint
// changed is marked stale (the next Get fetches it, keeping the previous
// keys if that fails) and queued for Run to fetch at once.
func (c *KeyCache) Configure(refs map[string]string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for uri := range c.entries {
		if _, ok := refs[uri]; !ok {
			delete(c.entries, uri)
		}
	}
	for uri := range c.prints {
		if _, ok := refs[uri]; !ok {
			delete(c.prints, uri)
			delete(c.pending, uri)
		}
	}
	changed := false
	for uri, fp := range refs {
		if old, ok := c.prints[uri]; ok && old == fp {
			continue
		}
		c.prints[uri] = fp
		if e := c.entries[uri]; e != nil {
			select {
			case <-e.ready:
				e.fetched = time.Time{} // stale: refetch, last good keys kept on failure
			default: // a fetch is in flight: its keys are as current as the change
			}
		}
		c.pending[uri] = struct{}{}
		changed = true
	}
	if changed {
		select {
		case c.wake <- struct{}{}:
		default:
		}
	}
}

// Run fetches the key sets that Configure queued, until ctx ends; a fetch
// in flight is abandoned then.
func (c *KeyCache) Run(ctx context.Context) error {
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-c.wake:
		}
		c.mu.Lock()
		uris := make([]string, 0, len(c.pending))
		for uri := range c.pending {
			uris = append(uris, uri)
		}
		clear(c.pending)
		c.mu.Unlock()
		for _, uri := range uris {
			if ctx.Err() != nil {
				return nil
			}
			// Errors reach the requests that need the keys.
			_, _ = c.get(ctx, ctx, uri, false)
		}
	}
}

// Fingerprints returns, for each jwks_uri that ras reference (rules with
// inline keys need no fetch), a fingerprint of the rules that name it, for
// Configure: it changes when any of them changes.
func Fingerprints(ras []*discoveryv1.RequestAuthentication) map[string]string {
	rules := map[string][]string{}
	for _, ra := range ras {
		for _, jr := range ra.GetJwtRules() {
			if jr.GetJwks() != "" || jr.GetJwksUri() == "" {
				continue
			}
			b, err := proto.MarshalOptions{Deterministic: true}.Marshal(jr)
			if err != nil {
				b = []byte(jr.String())
			}
			rules[jr.GetJwksUri()] = append(rules[jr.GetJwksUri()], string(b))
		}
	}
	out := make(map[string]string, len(rules))
	for uri, rs := range rules {
		sort.Strings(rs)
		h := sha256.New()
		for _, r := range rs {
			h.Write(binary.AppendUvarint(nil, uint64(len(r))))
			h.Write([]byte(r))
		}
		out[uri] = hex.EncodeToString(h.Sum(nil))
	}
	return out
}

// PayloadJSON decodes a base64url JWT payload (as written to
// output_payload_to_header), for tests and debugging.
func PayloadJSON(seg string) ([]byte, error) {
	return base64.RawURLEncoding.DecodeString(seg)
}
