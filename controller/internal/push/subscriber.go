package push

import (
	pb "github.com/amesh-dev/amesh/api/discovery/v1"
	"github.com/amesh-dev/amesh/api/xds"
)

// Subscriber is what one data-plane client may see: every workload,
// service, authorization and trust bundle; a waypoint also the
// WaypointService resources of the services it serves and its own
// WaypointGateway.
type Subscriber struct {
	id string
	// scope is ScopeGateway+"<ns>/<name>" for a waypoint, "" for ztunnel.
	scope string
}

// NewSubscriber returns the view of a client named id; gateway is the
// "<namespace>/<name>" a waypoint implements, "" for a ztunnel.
func NewSubscriber(id, gateway string) *Subscriber {
	s := &Subscriber{id: id}
	if gateway != "" {
		s.scope = ScopeGateway + gateway
	}
	return s
}

// ID names the subscriber.
func (s *Subscriber) ID() string { return s.id }

// Visible implements xds.Subscriber.
func (s *Subscriber) Visible(typeURL string, r *xds.Resource) bool {
	switch typeURL {
	case pb.WaypointServiceType, pb.WaypointGatewayType:
		return s.scope != "" && r.Scope == s.scope
	}
	return true
}
