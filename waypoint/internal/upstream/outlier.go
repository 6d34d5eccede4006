package upstream

import (
	"context"
	"errors"
	"time"
)

// DefaultMaxEjectionTime caps an outlier ejection (base_ejection_time ×
// the endpoint's ejection count) when the policy sets no
// max_ejection_time, unless base_ejection_time alone is longer: it is
// Envoy's default.
const DefaultMaxEjectionTime = 300 * time.Second

// Report records the outcome of one attempt to ep for outlier detection:
// status is the response code, or 0 with err set when no response came.
// Consecutive 5xx responses (connect failures and resets count) and
// consecutive gateway errors (502, 503, 504, connect failures) eject the
// endpoint for base_ejection_time × its ejection count (at most
// max_ejection_time, default DefaultMaxEjectionTime, or base_ejection_time
// if longer), as long as no more
// than max_ejection_percent of the endpoints are ejected (one endpoint may
// always be ejected). The ejection count decays by one per interval spent
// without an ejection. A cancelled attempt (context.Canceled: the caller
// gave up, typically because its own client went away) is not reported.
func (c *Cluster) Report(ep *Endpoint, status int, err error) {
	s := c.cur.Load()
	od := s.od
	if od == nil || (od.GetConsecutive_5Xx() == 0 && od.GetConsecutiveGatewayErrors() == 0) {
		return
	}
	if errors.Is(err, context.Canceled) {
		return
	}
	gateway := err != nil || status == 502 || status == 503 || status == 504
	fiveXX := err != nil || status >= 500
	var ce *ConnectError
	if errors.As(err, &ce) && errors.Is(err, ErrOverflow) {
		return // local overflow says nothing about the endpoint
	}
	st := ep.state
	st.mu.Lock()
	if !fiveXX {
		st.consec5xx, st.consecGateway = 0, 0
		st.mu.Unlock()
		return
	}
	st.consec5xx++
	if gateway {
		st.consecGateway++
	} else {
		st.consecGateway = 0
	}
	trip := (od.GetConsecutive_5Xx() > 0 && st.consec5xx >= od.GetConsecutive_5Xx()) ||
		(od.GetConsecutiveGatewayErrors() > 0 && st.consecGateway >= od.GetConsecutiveGatewayErrors())
	st.mu.Unlock()
	if trip {
		c.eject(s, ep)
	}
}

func (c *Cluster) eject(s *snapshot, ep *Endpoint) {
	now := c.now()
	ejected := 0
	for _, e := range s.all {
		if e != ep && e.state.ejected(now) {
			ejected++
		}
	}
	maxPct := s.od.GetMaxEjectionPercent()
	if maxPct == 0 {
		maxPct = 10
	}
	if ejected > 0 && (ejected+1)*100 > int(maxPct)*len(s.all) {
		return
	}
	base := s.od.GetBaseEjectionTime().AsDuration()
	if base <= 0 {
		base = 30 * time.Second
	}
	interval := s.od.GetInterval().AsDuration()
	if interval <= 0 {
		interval = 10 * time.Second
	}
	st := ep.state
	st.mu.Lock()
	defer st.mu.Unlock()
	if now.Before(st.ejectedUntil) {
		return
	}
	if st.ejections > 0 && !st.lastEject.IsZero() {
		quiet := now.Sub(st.ejectedUntil)
		decay := uint32(quiet / interval)
		st.ejections -= min(decay, st.ejections)
	}
	// The multiplier stops growing once it reaches the cap (so that it
	// decays from there, as Envoy's does).
	limit := s.od.GetMaxEjectionTime().AsDuration()
	if limit <= 0 {
		limit = DefaultMaxEjectionTime
	}
	limit = max(limit, base)
	if time.Duration(st.ejections)*base < limit {
		st.ejections++
	}
	st.ejectedUntil = now.Add(min(base*time.Duration(st.ejections), limit))
	st.lastEject = now
	for until := st.ejectedUntil.UnixNano(); ; {
		cur := c.ejectedUntil.Load()
		if cur >= until || c.ejectedUntil.CompareAndSwap(cur, until) {
			break
		}
	}
	st.consec5xx, st.consecGateway = 0, 0
	c.ejectionsTotal.Add(1)
}

// Ejections counts outlier ejections.
func (c *Cluster) Ejections() int64 { return c.ejectionsTotal.Load() }

// Ejected reports whether ep is currently ejected.
func (c *Cluster) Ejected(ep *Endpoint) bool { return ep.state.ejected(c.now()) }
