package upstream

import (
	"hash/fnv"
	"math/rand/v2"
	"net/http"
	"net/netip"
	"sync/atomic"

	discoveryv1 "github.com/amesh-dev/amesh/api/discovery/v1"
)

// HashInput carries what consistent hashing may key on.
type HashInput struct {
	Header   http.Header
	SourceIP netip.Addr
	// Cookie is the value of the configured hash cookie, when present.
	Cookie string
}

// balancer picks among the available endpoints (never empty).
type balancer interface {
	pick(eps []*Endpoint, in *HashInput) *Endpoint
}

func newBalancer(lb *discoveryv1.LoadBalancer) balancer {
	switch lb.GetType() {
	case discoveryv1.LoadBalancer_TYPE_LEAST_REQUEST:
		return leastRequest{}
	case discoveryv1.LoadBalancer_TYPE_RANDOM:
		return random{}
	case discoveryv1.LoadBalancer_TYPE_CONSISTENT_HASH:
		return &consistentHash{lb: lb}
	}
	return &roundRobin{}
}

type roundRobin struct{ next atomic.Uint64 }

func (r *roundRobin) pick(eps []*Endpoint, _ *HashInput) *Endpoint {
	return eps[(r.next.Add(1)-1)%uint64(len(eps))]
}

type random struct{}

func (random) pick(eps []*Endpoint, _ *HashInput) *Endpoint { return eps[rand.IntN(len(eps))] }

// leastRequest is power of two choices over outstanding requests.
type leastRequest struct{}

func (leastRequest) pick(eps []*Endpoint, _ *HashInput) *Endpoint {
	if len(eps) == 1 {
		return eps[0]
	}
	i := rand.IntN(len(eps))
	j := rand.IntN(len(eps) - 1)
	if j >= i {
		j++
	}
	a, b := eps[i], eps[j]
	if b.Outstanding() < a.Outstanding() {
		return b
	}
	return a
}

// consistentHash uses rendezvous (highest random weight) hashing: the
// endpoint with the largest hash of (key, address) wins, so adding or
// removing an endpoint moves only the keys that belonged to it. The hash is
// deterministic, so every waypoint replica maps a key to the same endpoint.
type consistentHash struct {
	lb *discoveryv1.LoadBalancer
}

// Key returns the hash key of a request, or "" when it has none.
func (c *consistentHash) key(in *HashInput) string {
	switch {
	case c.lb.GetHashHeader() != "":
		return in.Header.Get(c.lb.GetHashHeader())
	case c.lb.GetHashCookie() != nil:
		return in.Cookie
	case c.lb.GetHashSourceIp():
		return in.SourceIP.String()
	}
	return ""
}

func (c *consistentHash) pick(eps []*Endpoint, in *HashInput) *Endpoint {
	k := c.key(in)
	if k == "" {
		return eps[rand.IntN(len(eps))]
	}
	var best *Endpoint
	var bestScore uint64
	for _, e := range eps {
		h := fnv.New64a()
		_, _ = h.Write([]byte(k))
		b := e.Addr.Addr().As16()
		_, _ = h.Write(b[:])
		_, _ = h.Write([]byte{byte(e.Addr.Port() >> 8), byte(e.Addr.Port())})
		if s := mix(h.Sum64()); best == nil || s > bestScore {
			best, bestScore = e, s
		}
	}
	return best
}

// mix is the splitmix64 finaliser: it spreads FNV's weak low bits so that
// rendezvous scores are uniform.
func mix(z uint64) uint64 {
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9
	z = (z ^ (z >> 27)) * 0x94d049bb133111eb
	return z ^ (z >> 31)
}
