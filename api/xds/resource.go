// Package xds is amesh's delta-xDS (DeltaAggregatedResources, envoy's
// discovery protos from go-control-plane) server, run by the controller. Its
// client, run by ztunnel and the waypoints, is package xdsclient, which
// also holds the types both share (Resource, MoreToCome) and does not link
// go-control-plane.
//
// Server keeps the current resources of each type (Set replaces a type's
// whole set and diffs it by Version; Update applies upserts and removals) and
// streams them to authenticated subscribers: only what changed, and only the
// resources each Subscriber may see. It supports wildcard and explicit
// subscriptions, ACK/NACK with nonces, and initial_resource_versions, so that
// a reconnecting client receives only the differences (including removals of
// resources it still holds but the server no longer has). Each resource is
// encoded once per change and shared by every stream; with the Codec server
// option, responses are written from those encodings without being
// assembled as messages. A push larger than 1,000 resources or 1 MiB
// (ServerOptions.MaxResponseResources, MaxResponseBytes) is split into
// several responses sent in a row, each a valid delta acknowledged on its
// own; all but the last carry system_version_info MoreToCome. This bounds
// what each stream holds while gRPC sends it.
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

	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	"github.com/amesh-dev/amesh/api/xds/xdsclient"
)

// Resource is one named discovery resource (xdsclient.Resource).
type Resource = xdsclient.Resource

// ErrInvalidResource: a resource without name or body, with a body of the
// wrong type, or named twice in one call.
var ErrInvalidResource = errors.New("invalid resource")

// TypeURL returns the type URL of m's message type
// ("type.googleapis.com/<full name>").
func TypeURL(m proto.Message) string {
	return "type.googleapis.com/" + string(m.ProtoReflect().Descriptor().FullName())
}

// entry is a resource prepared for sending: encoded once, shared by every
// stream.
type entry struct {
	res *Resource
	// enc is the resource as one encoded DeltaDiscoveryResponse.resources
	// field (tag, length, envoy Resource message). Responses are written
	// from these bytes (see Codec), so that a full push to many streams
	// costs no protobuf encoding, and with Codec no copy, per stream.
	enc []byte
}

// resourcesField is DeltaDiscoveryResponse's field number of resources.
const resourcesField = 2

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
	opts := proto.MarshalOptions{Deterministic: r.Version == ""} // the hash needs stable bytes
	b, err := opts.Marshal(r.Body)
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrInvalidResource, r.Name, err)
	}
	c := *r
	if c.Version == "" {
		sum := sha256.Sum256(b)
		c.Version = hex.EncodeToString(sum[:12])
	}
	return &entry{res: &c, enc: encodeResource(typeURL, c.Name, c.Version, b)}, nil
}

// Field numbers of envoy.service.discovery.v3.Resource and google.protobuf.Any.
const (
	resourceVersionField = 1
	resourceBodyField    = 2
	resourceNameField    = 3
	anyTypeURLField      = 1
	anyValueField        = 2
)

// encodeResource encodes one DeltaDiscoveryResponse.resources entry: a
// Resource{name, version, resource: Any{typeURL, value}} as field 2. It is
// written by hand (checked against the generated code by the tests) because
// a full push encodes every resource once per change.
func encodeResource(typeURL, name, version string, value []byte) []byte {
	anyLen := protowire.SizeTag(anyTypeURLField) + protowire.SizeBytes(len(typeURL)) +
		protowire.SizeTag(anyValueField) + protowire.SizeBytes(len(value))
	resLen := protowire.SizeTag(resourceNameField) + protowire.SizeBytes(len(name)) +
		protowire.SizeTag(resourceBodyField) + protowire.SizeBytes(anyLen)
	if version != "" {
		resLen += protowire.SizeTag(resourceVersionField) + protowire.SizeBytes(len(version))
	}
	b := make([]byte, 0, protowire.SizeTag(resourcesField)+protowire.SizeBytes(resLen))
	b = protowire.AppendTag(b, resourcesField, protowire.BytesType)
	b = protowire.AppendVarint(b, uint64(resLen))
	if version != "" {
		b = protowire.AppendTag(b, resourceVersionField, protowire.BytesType)
		b = protowire.AppendString(b, version)
	}
	b = protowire.AppendTag(b, resourceBodyField, protowire.BytesType)
	b = protowire.AppendVarint(b, uint64(anyLen))
	b = protowire.AppendTag(b, anyTypeURLField, protowire.BytesType)
	b = protowire.AppendString(b, typeURL)
	b = protowire.AppendTag(b, anyValueField, protowire.BytesType)
	b = protowire.AppendBytes(b, value)
	b = protowire.AppendTag(b, resourceNameField, protowire.BytesType)
	return protowire.AppendString(b, name)
}

// same reports whether replacing a with b changes nothing a subscriber can
// observe (content or visibility).
func same(a, b *entry) bool {
	return a.res.Version == b.res.Version && a.res.Scope == b.res.Scope
}
