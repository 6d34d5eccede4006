package ratelimit

import (
	"sync"
	"sync/atomic"
	"testing"
	"time"

	discoveryv1 "github.com/amesh-dev/amesh/api/discovery/v1"
	"google.golang.org/protobuf/types/known/durationpb"
)

type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *clock) add(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

func TestBucketExact(t *testing.T) {
	c := &clock{t: time.Unix(1000, 0)}
	b, err := New(&discoveryv1.LocalRateLimit{MaxTokens: 10, TokensPerFill: 4, FillInterval: durationpb.New(time.Second)}, c.now)
	if err != nil {
		t.Fatal(err)
	}
	// Concurrent takers get exactly max_tokens.
	var ok atomic.Int64
	var wg sync.WaitGroup
	for range 50 {
		wg.Go(func() {
			if b.Allow() {
				ok.Add(1)
			}
		})
	}
	wg.Wait()
	if ok.Load() != 10 {
		t.Fatalf("allowed %d of 50, want exactly 10", ok.Load())
	}
	c.add(999 * time.Millisecond)
	if b.Allow() {
		t.Fatal("allowed before the fill interval elapsed")
	}
	c.add(time.Millisecond)
	for i := range 4 {
		if !b.Allow() {
			t.Fatalf("token %d of the fill refused", i)
		}
	}
	if b.Allow() {
		t.Fatal("more than tokens_per_fill after one fill")
	}
	c.add(time.Hour)
	n := 0
	for b.Allow() {
		n++
	}
	if n != 10 {
		t.Fatalf("after a long pause got %d tokens, want max_tokens 10", n)
	}
}

func TestNewRejectsBadConfig(t *testing.T) {
	for _, cfg := range []*discoveryv1.LocalRateLimit{
		{MaxTokens: 0, FillInterval: durationpb.New(time.Second)},
		{MaxTokens: 1},
	} {
		if _, err := New(cfg, nil); err == nil {
			t.Errorf("New(%v) accepted", cfg)
		}
	}
}
