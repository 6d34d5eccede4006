package sample

import (
	"sync"
	"time"
)

// maxStatKeys bounds the distinct keys one instance counts; further keys
// are counted under otherKey.
const (
	maxStatKeys = 256
	otherKey    = "(other)"
)

// Stats is what an instance has received since it started (or since the
// last reset).
type Stats struct {
	ServedBy ServedBy `json:"servedBy"`
	// Total counts every request, injected failures included; requests to
	// /stats, /healthz and /readyz are not counted.
	Total int64 `json:"total"`
	// ByKey counts requests per "METHOD /path" (HTTP) or full method (gRPC).
	ByKey map[string]int64 `json:"byKey"`
	// Failed counts the injected failures.
	Failed int64     `json:"failed"`
	Since  time.Time `json:"since"`
}

// counter counts requests. Safe for concurrent use.
type counter struct {
	mu     sync.Mutex
	total  int64
	failed int64
	byKey  map[string]int64
	since  time.Time
}

func newCounter() *counter {
	return &counter{byKey: make(map[string]int64), since: time.Now()}
}

func (c *counter) add(key string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.total++
	if _, ok := c.byKey[key]; !ok && len(c.byKey) >= maxStatKeys {
		key = otherKey
	}
	c.byKey[key]++
}

func (c *counter) addFailed() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.failed++
}

// snapshot returns the counts, and zeroes them when reset is set.
func (c *counter) snapshot(by ServedBy, reset bool) Stats {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := Stats{ServedBy: by, Total: c.total, Failed: c.failed, Since: c.since, ByKey: make(map[string]int64, len(c.byKey))}
	for k, v := range c.byKey {
		s.ByKey[k] = v
	}
	if reset {
		c.total, c.failed = 0, 0
		clear(c.byKey)
		c.since = time.Now()
	}
	return s
}
