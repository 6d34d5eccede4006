package xdsclient

import (
	"errors"
	"fmt"
	"unicode/utf8"

	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/structpb"
)

// The client speaks envoy's delta discovery protocol
// (envoy.service.discovery.v3, as go-control-plane generates it) with the
// few messages and fields it uses encoded and decoded by hand, so that the
// data plane does not link go-control-plane: the generated packages
// register, at start, the descriptors of everything
// envoy.config.core.v3.Node reaches (addresses, sockets, matchers, their
// validation code), 1 MB of binary and 0.4 MB of heap that ztunnel and
// the waypoint would keep for the lifetime of the process. The tests check
// every encoding against the generated code.

// adsMethod is the full method name of the delta ADS stream.
const adsMethod = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"

// Field numbers of the messages the client encodes and decodes.
const (
	// envoy.service.discovery.v3.DeltaDiscoveryRequest
	reqNodeField          = 1
	reqTypeURLField       = 2
	reqInitialField       = 5 // map<string, string> initial_resource_versions
	reqResponseNonceField = 6
	reqErrorDetailField   = 7
	mapKeyField           = 1
	mapValueField         = 2

	// envoy.config.core.v3.Node
	nodeIDField       = 1
	nodeMetadataField = 3

	// google.rpc.Status
	statusCodeField    = 1
	statusMessageField = 2

	// envoy.service.discovery.v3.DeltaDiscoveryResponse
	respSystemVersionField = 1
	respResourcesField     = 2
	respTypeURLField       = 4
	respNonceField         = 5
	respRemovedField       = 6

	// envoy.service.discovery.v3.Resource
	resVersionField = 1
	resBodyField    = 2
	resNameField    = 3

	// google.protobuf.Any
	anyTypeURLField = 1
	anyValueField   = 2
)

// Node identifies the client to the server: envoy.config.core.v3.Node's id
// and metadata (the fields amesh uses).
type Node struct {
	ID       string
	Metadata *structpb.Struct
}

// request is a DeltaDiscoveryRequest: a subscription (node on the first,
// type URL, initial versions) or an ACK/NACK (type URL, nonce, error).
type request struct {
	node          *Node
	typeURL       string
	initial       map[string]string
	responseNonce string
	// errCode and errMessage are error_detail (a google.rpc.Status) when
	// errMessage or errCode is set: a NACK.
	errCode    int32
	errMessage string
}

// marshal encodes r.
func (r *request) marshal() ([]byte, error) {
	var b []byte
	if r.node != nil {
		var n []byte
		n = appendString(n, nodeIDField, r.node.ID)
		if r.node.Metadata != nil {
			// Deterministic: the Struct's map in sorted order, so that
			// one node's requests encode alike.
			md, err := proto.MarshalOptions{Deterministic: true}.Marshal(r.node.Metadata)
			if err != nil {
				return nil, fmt.Errorf("node metadata: %w", err)
			}
			n = protowire.AppendTag(n, nodeMetadataField, protowire.BytesType)
			n = protowire.AppendBytes(n, md)
		}
		b = protowire.AppendTag(b, reqNodeField, protowire.BytesType)
		b = protowire.AppendBytes(b, n)
	}
	b = appendString(b, reqTypeURLField, r.typeURL)
	for k, v := range r.initial {
		var e []byte
		e = appendString(e, mapKeyField, k)
		e = appendString(e, mapValueField, v)
		b = protowire.AppendTag(b, reqInitialField, protowire.BytesType)
		b = protowire.AppendBytes(b, e)
	}
	b = appendString(b, reqResponseNonceField, r.responseNonce)
	if r.errCode != 0 || r.errMessage != "" {
		var s []byte
		if r.errCode != 0 {
			s = protowire.AppendTag(s, statusCodeField, protowire.VarintType)
			s = protowire.AppendVarint(s, uint64(int64(r.errCode))) // int32: sign-extended
		}
		s = appendString(s, statusMessageField, r.errMessage)
		b = protowire.AppendTag(b, reqErrorDetailField, protowire.BytesType)
		b = protowire.AppendBytes(b, s)
	}
	return b, nil
}

// appendString appends a proto3 string field, omitted when empty.
func appendString(b []byte, num protowire.Number, s string) []byte {
	if s == "" {
		return b
	}
	b = protowire.AppendTag(b, num, protowire.BytesType)
	return protowire.AppendString(b, s)
}

// response is the part of a DeltaDiscoveryResponse the client uses; the
// other fields are skipped.
type response struct {
	systemVersionInfo string
	typeURL           string
	nonce             string
	resources         []wireResource
	removed           []string
}

// wireResource is an envoy Resource: its name, version and body (an Any).
type wireResource struct {
	name, version string
	hasBody       bool   // the resource field is present
	bodyType      string // Any.type_url
	body          []byte // Any.value; aliases the received message
}

var errInvalidUTF8 = errors.New("string field contains invalid UTF-8")

// unmarshal decodes b into r. As the generated code does, a field that
// appears more than once takes its last value (repeated fields append,
// messages merge), a known field with another wire type is skipped as
// unknown, and a string that is not UTF-8 is an error. Byte fields alias b.
func (r *response) unmarshal(b []byte) error {
	return walk(b, func(num protowire.Number, typ protowire.Type, v []byte) error {
		if typ != protowire.BytesType {
			return nil
		}
		var err error
		switch num {
		case respSystemVersionField:
			r.systemVersionInfo, err = str(v)
		case respTypeURLField:
			r.typeURL, err = str(v)
		case respNonceField:
			r.nonce, err = str(v)
		case respRemovedField:
			var s string
			if s, err = str(v); err == nil {
				r.removed = append(r.removed, s)
			}
		case respResourcesField:
			var res wireResource
			if err = res.unmarshal(v); err == nil {
				r.resources = append(r.resources, res)
			}
		}
		return err
	})
}

func (r *wireResource) unmarshal(b []byte) error {
	return walk(b, func(num protowire.Number, typ protowire.Type, v []byte) error {
		if typ != protowire.BytesType {
			return nil
		}
		var err error
		switch num {
		case resNameField:
			r.name, err = str(v)
		case resVersionField:
			r.version, err = str(v)
		case resBodyField:
			r.hasBody = true
			err = walk(v, func(num protowire.Number, typ protowire.Type, v []byte) error {
				if typ != protowire.BytesType {
					return nil
				}
				var err error
				switch num {
				case anyTypeURLField:
					r.bodyType, err = str(v)
				case anyValueField:
					r.body = v
				}
				return err
			})
		}
		return err
	})
}

// walk calls fn with each field of the message b: its number, wire type
// and, for a length-delimited field, its contents (nil for the others).
func walk(b []byte, fn func(protowire.Number, protowire.Type, []byte) error) error {
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return protowire.ParseError(n)
		}
		b = b[n:]
		var v []byte
		if typ == protowire.BytesType {
			v, n = protowire.ConsumeBytes(b)
		} else {
			n = protowire.ConsumeFieldValue(num, typ, b)
		}
		if n < 0 {
			return protowire.ParseError(n)
		}
		b = b[n:]
		if err := fn(num, typ, v); err != nil {
			return err
		}
	}
	return nil
}

func str(b []byte) (string, error) {
	if !utf8.Valid(b) {
		return "", errInvalidUTF8
	}
	return string(b), nil
}

// codec is the gRPC codec of the ADS stream: it sends requests and
// receives responses in the wire format of envoy's generated messages.
type codec struct{}

func (codec) Marshal(v any) (mem.BufferSlice, error) {
	r, ok := v.(*request)
	if !ok {
		return nil, fmt.Errorf("xdsclient: cannot send a %T", v)
	}
	b, err := r.marshal()
	if err != nil {
		return nil, err
	}
	return mem.BufferSlice{mem.SliceBuffer(b)}, nil
}

func (codec) Unmarshal(data mem.BufferSlice, v any) error {
	r, ok := v.(*response)
	if !ok {
		return fmt.Errorf("xdsclient: cannot receive a %T", v)
	}
	// A copy of its own: the resources' bodies alias it until applied.
	return r.unmarshal(data.Materialize())
}

// Name is the content subtype's codec name: the messages are protobuf.
func (codec) Name() string { return "proto" }
