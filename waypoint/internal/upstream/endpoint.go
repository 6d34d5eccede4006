// Package upstream is the waypoint's view of one backend (a service port):
// its endpoints, load balancing (round robin, least request by power of two
// choices, random, consistent hash), circuit breaking, outlier detection, and
// pooled HTTP/1.1 or h2c connections to each endpoint over HBONE (or plain
// TCP for endpoints outside the mesh).
package upstream

import (
	"net/netip"
	"sync"
	"sync/atomic"
	"time"
)

// Endpoint is one address of a backend.
type Endpoint struct {
	// Addr is the workload address and target port.
	Addr netip.AddrPort
	// HBONE is set when the workload is captured by ztunnel (or speaks
	// HBONE); else the waypoint connects with plain TCP.
	HBONE bool
	// Identity is the workload's SPIFFE ID ("spiffe://..."), the SAN the
	// HBONE server must present.
	Identity string
	// Telemetry labels.
	Workload, Namespace, CanonicalName, CanonicalRevision string

	state *epState
	addr  string // Addr.String(), kept by Cluster.Update
}

// HostPort is Addr as "ip:port" (kept, not formatted per call, for
// endpoints of a Cluster).
func (e *Endpoint) HostPort() string { return e.hostPort() }

func (e *Endpoint) hostPort() string {
	if e.addr != "" {
		return e.addr
	}
	return e.Addr.String()
}

// epState is the mutable per-endpoint state, kept across endpoint updates
// for the same address.
type epState struct {
	outstanding atomic.Int64

	mu            sync.Mutex
	consec5xx     uint32
	consecGateway uint32
	ejectedUntil  time.Time
	ejections     uint32 // multiplier for the next ejection time
	lastEject     time.Time
}

// Outstanding is the number of requests in flight to e.
func (e *Endpoint) Outstanding() int64 { return e.state.outstanding.Load() }

func (s *epState) ejected(now time.Time) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return now.Before(s.ejectedUntil)
}
