// Package xds is amesh's delta-xDS (DeltaAggregatedResources, envoy's
// discovery protos from go-control-plane) server and client, shared by the
// controller, ztunnel and waypoints.
//
// Server keeps the current resources of each type (Set replaces a type's
// whole set and diffs it by Version; Update applies upserts and removals) and
// streams them to authenticated subscribers: only what changed, and only the
// resources each Subscriber may see. It supports wildcard and explicit
// subscriptions, ACK/NACK with nonces, and initial_resource_versions, so that
// a reconnecting client receives only the differences (including removals of
// resources it still holds but the server no longer has).
//
// Client subscribes (wildcard) to a list of type URLs, hands every response
// to a Handler (an error NACKs it and keeps the old state), reconnects with
// jittered exponential backoff, resumes with the versions it holds, and
// keeps its state while disconnected.
//
// Deviations from the API sketch: Set and Update return an error for invalid
// input (nothing is applied then); Server.Recheck re-evaluates visibility
// after a Subscriber's view changed; the client's Handler never sees Scope
// (it is server-side only).
package xds

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"

	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
)

// Resource is one named discovery resource.
type Resource struct {
	Name string
	// Version identifies the content; the server diffs by it. Empty means
	// "derive it from the content" (a hash of the deterministic encoding).
	Version string
	// Body is the resource (a discoveryv1 message whose type matches the
	// type URL it is published under).
	Body proto.Message
	// Scope is opaque to this package and lets a Subscriber decide
	// visibility (for example "gateway/<ns>/<name>"). It is not sent.
	Scope string
}

// ErrInvalidResource: a resource without name or body, with a body of the
// wrong type, or named twice in one call.
var ErrInvalidResource = errors.New("invalid resource")

// TypeURL returns the type URL of m's message type
// ("type.googleapis.com/<full name>").
func TypeURL(m proto.Message) string {
	return "type.googleapis.com/" + string(m.ProtoReflect().Descriptor().FullName())
}

// shortType is the metric label of a type URL: its full message name.
func shortType(typeURL string) string {
	if i := strings.LastIndexByte(typeURL, '/'); i >= 0 {
		return typeURL[i+1:]
	}
	return typeURL
}

// entry is a resource prepared for sending: encoded once, shared by every
// stream.
type entry struct {
	res  *Resource
	wire *discoveryv3.Resource
}

var deterministic = proto.MarshalOptions{Deterministic: true}

// prepare validates r for typeURL, fills in its version and encodes it.
func prepare(typeURL string, r *Resource) (*entry, error) {
	if r == nil || r.Name == "" {
		return nil, fmt.Errorf("%w: empty name", ErrInvalidResource)
	}
	if r.Body == nil {
		return nil, fmt.Errorf("%w: %s: no body", ErrInvalidResource, r.Name)
	}
	if got := TypeURL(r.Body); got != typeURL {
		return nil, fmt.Errorf("%w: %s: body of type %s published as %s", ErrInvalidResource, r.Name, got, typeURL)
	}
	b, err := deterministic.Marshal(r.Body)
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrInvalidResource, r.Name, err)
	}
	c := *r
	if c.Version == "" {
		sum := sha256.Sum256(b)
		c.Version = hex.EncodeToString(sum[:12])
	}
	return &entry{
		res: &c,
		wire: &discoveryv3.Resource{
			Name:     c.Name,
			Version:  c.Version,
			Resource: &anypb.Any{TypeUrl: typeURL, Value: b},
		},
	}, nil
}

// same reports whether replacing a with b changes nothing a subscriber can
// observe (content or visibility).
func same(a, b *entry) bool {
	return a.res.Version == b.res.Version && a.res.Scope == b.res.Scope
}
