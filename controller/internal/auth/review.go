// Package auth identifies data-plane callers by their projected
// service-account tokens (TokenReview against the kube-apiserver, cached)
// and decides what they may obtain: workload certificates (DESIGN.md §4: a
// ztunnel only for pods on its own node, a waypoint only its own identity)
// and discovery subscriptions (ztunnel: the mesh; a waypoint: the mesh plus
// the configuration of the services it serves).
package auth

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"golang.org/x/sync/singleflight"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	authnv1 "k8s.io/api/authentication/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	authnclient "k8s.io/client-go/kubernetes/typed/authentication/v1"
)

// Caller is an authenticated service account and, for tokens bound to a
// pod, that pod.
type Caller struct {
	Namespace      string
	ServiceAccount string
	// PodName and PodUID of the pod the token is bound to ("" if none).
	PodName string
	PodUID  string
	// NodeName of that pod, when the apiserver reports it.
	NodeName string
}

// String names the caller in logs.
func (c *Caller) String() string {
	s := c.Namespace + "/" + c.ServiceAccount
	if c.PodName != "" {
		s += " (pod " + c.PodName + ")"
	}
	return s
}

// Token-review extra keys the apiserver sets for pod-bound tokens.
const (
	extraPodName  = "authentication.kubernetes.io/pod-name"
	extraPodUID   = "authentication.kubernetes.io/pod-uid"
	extraNodeName = "authentication.kubernetes.io/node-name"
)

// ReviewerOptions configures a Reviewer.
type ReviewerOptions struct {
	// Audience every token must be issued for; default "amesh".
	Audience string
	// TTL of a successful review in the cache (never beyond the token's own
	// expiry); default 1 minute.
	TTL time.Duration
	// NegativeTTL of a refused token in the cache; default 5 seconds.
	NegativeTTL time.Duration
	// MaxEntries bounds the cache; default 10,000.
	MaxEntries int
	// Now replaces time.Now (tests).
	Now func() time.Time
}

// Reviewer authenticates bearer tokens with the TokenReview API and caches
// the answers by the token's hash. Concurrent reviews of one token share
// one API call. Safe for concurrent use.
type Reviewer struct {
	api  authnclient.TokenReviewInterface
	opts ReviewerOptions
	sf   singleflight.Group

	mu    sync.Mutex
	cache map[[32]byte]reviewEntry
	// Stats since start, for metrics.
	hits, misses uint64
}

type reviewEntry struct {
	caller  *Caller
	err     error
	expires time.Time
}

// NewReviewer returns a Reviewer on the TokenReview API.
func NewReviewer(api authnclient.TokenReviewInterface, opts ReviewerOptions) *Reviewer {
	if opts.Audience == "" {
		opts.Audience = "amesh"
	}
	if opts.TTL <= 0 {
		opts.TTL = time.Minute
	}
	if opts.NegativeTTL <= 0 {
		opts.NegativeTTL = 5 * time.Second
	}
	if opts.MaxEntries <= 0 {
		opts.MaxEntries = 10000
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	return &Reviewer{api: api, opts: opts, cache: map[[32]byte]reviewEntry{}}
}

// Stats returns the cache hits and misses so far.
func (r *Reviewer) Stats() (hits, misses uint64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.hits, r.misses
}

// Review authenticates token. Errors are gRPC status errors:
// Unauthenticated for a token the apiserver does not accept (or accepts for
// another audience, or for a user that is not a service account),
// Unavailable when the apiserver cannot be asked.
func (r *Reviewer) Review(ctx context.Context, token string) (*Caller, error) {
	key := sha256.Sum256([]byte(token))
	now := r.opts.Now()
	r.mu.Lock()
	if e, ok := r.cache[key]; ok && now.Before(e.expires) {
		r.hits++
		r.mu.Unlock()
		return e.caller, e.err
	}
	r.misses++
	r.mu.Unlock()

	v, err, _ := r.sf.Do(string(key[:]), func() (any, error) {
		// Shared by every concurrent caller with this token: not bound to
		// the first caller's cancellation.
		ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		defer cancel()
		c, err := r.review(ctx, token)
		if status.Code(err) == codes.Unavailable {
			return nil, err // not the token's fault: do not cache
		}
		ttl := r.opts.TTL
		if err != nil {
			ttl = r.opts.NegativeTTL
		} else if exp, ok := tokenExpiry(token); ok {
			ttl = min(ttl, exp.Sub(r.opts.Now()))
		}
		if ttl > 0 {
			r.store(key, reviewEntry{caller: c, err: err, expires: r.opts.Now().Add(ttl)})
		}
		return c, err
	})
	if err != nil {
		return nil, err
	}
	return v.(*Caller), nil
}

func (r *Reviewer) store(key [32]byte, e reviewEntry) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.cache) >= r.opts.MaxEntries {
		now := r.opts.Now()
		for k, v := range r.cache {
			if !now.Before(v.expires) {
				delete(r.cache, k)
			}
		}
		// Still full: drop arbitrary entries down to half (they are only a
		// cache).
		for k := range r.cache {
			if len(r.cache) < r.opts.MaxEntries/2 {
				break
			}
			delete(r.cache, k)
		}
	}
	r.cache[key] = e
}

func (r *Reviewer) review(ctx context.Context, token string) (*Caller, error) {
	res, err := r.api.Create(ctx, &authnv1.TokenReview{
		Spec: authnv1.TokenReviewSpec{Token: token, Audiences: []string{r.opts.Audience}},
	}, metav1.CreateOptions{})
	if err != nil {
		return nil, status.Errorf(codes.Unavailable, "token review: %v", err)
	}
	st := res.Status
	if !st.Authenticated {
		msg := "token not accepted"
		if st.Error != "" {
			msg += ": " + st.Error
		}
		return nil, status.Error(codes.Unauthenticated, msg)
	}
	// The apiserver answers for the audiences it checked; insist ours is
	// among them (an apiserver that ignores spec.audiences must not let a
	// token for another audience through).
	if !slices.Contains(st.Audiences, r.opts.Audience) {
		return nil, status.Errorf(codes.Unauthenticated, "token is not for audience %q", r.opts.Audience)
	}
	ns, sa, ok := parseServiceAccount(st.User.Username)
	if !ok {
		return nil, status.Errorf(codes.Unauthenticated, "user %q is not a service account", st.User.Username)
	}
	c := &Caller{Namespace: ns, ServiceAccount: sa}
	first := func(k string) string {
		if v := st.User.Extra[k]; len(v) > 0 {
			return v[0]
		}
		return ""
	}
	c.PodName, c.PodUID, c.NodeName = first(extraPodName), first(extraPodUID), first(extraNodeName)
	return c, nil
}

// parseServiceAccount splits "system:serviceaccount:<ns>:<name>".
func parseServiceAccount(user string) (ns, name string, ok bool) {
	rest, ok := strings.CutPrefix(user, "system:serviceaccount:")
	if !ok {
		return "", "", false
	}
	ns, name, ok = strings.Cut(rest, ":")
	if !ok || ns == "" || name == "" || strings.Contains(name, ":") {
		return "", "", false
	}
	return ns, name, true
}

// tokenExpiry reads the "exp" claim of a JWT without verifying it: it is
// used only to shorten how long a verified answer is cached.
func tokenExpiry(token string) (time.Time, bool) {
	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		return time.Time{}, false
	}
	b, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		return time.Time{}, false
	}
	var claims struct {
		Exp *json.Number `json:"exp"`
	}
	if err := json.Unmarshal(b, &claims); err != nil || claims.Exp == nil {
		return time.Time{}, false
	}
	sec, err := claims.Exp.Int64()
	if err != nil {
		return time.Time{}, false
	}
	return time.Unix(sec, 0), true
}

// errorf returns a gRPC status error (helper for the authorizers).
func errorf(c codes.Code, format string, args ...any) error {
	return status.Error(c, fmt.Sprintf(format, args...))
}
