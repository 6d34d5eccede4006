// Package ratelimit is the waypoint's local (per replica) token-bucket rate
// limiter: a bucket of max_tokens starts full and gains tokens_per_fill every
// fill_interval, never above max_tokens. A request takes one token or is
// refused (429).
package ratelimit

import (
	"errors"
	"sync"
	"time"

	discoveryv1 "github.com/amesh-dev/amesh/api/discovery/v1"
)

// Bucket is a token bucket. Safe for concurrent use.
type Bucket struct {
	max, perFill int64
	interval     time.Duration
	now          func() time.Time

	mu     sync.Mutex
	tokens int64
	last   time.Time // time of the last whole fill
}

// New returns a bucket for cfg, or an error when cfg cannot be enforced. now
// may be nil (time.Now).
func New(cfg *discoveryv1.LocalRateLimit, now func() time.Time) (*Bucket, error) {
	if cfg.GetMaxTokens() == 0 {
		return nil, errors.New("local rate limit: max_tokens must be positive")
	}
	interval := cfg.GetFillInterval().AsDuration()
	if interval <= 0 {
		return nil, errors.New("local rate limit: fill_interval must be positive")
	}
	per := int64(cfg.GetTokensPerFill())
	if per == 0 {
		per = 1
	}
	if now == nil {
		now = time.Now
	}
	return &Bucket{max: int64(cfg.GetMaxTokens()), perFill: per, interval: interval, now: now,
		tokens: int64(cfg.GetMaxTokens()), last: now()}, nil
}

// Allow takes one token if there is one.
func (b *Bucket) Allow() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	now := b.now()
	if fills := int64(now.Sub(b.last) / b.interval); fills > 0 {
		b.tokens = min(b.max, b.tokens+fills*b.perFill)
		b.last = b.last.Add(time.Duration(fills) * b.interval)
	}
	if b.tokens == 0 {
		return false
	}
	b.tokens--
	return true
}

// RetryAfter is the time until the next fill, for a Retry-After hint.
func (b *Bucket) RetryAfter() time.Duration {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.interval - b.now().Sub(b.last)%b.interval
}
