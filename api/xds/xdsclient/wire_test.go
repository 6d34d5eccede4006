package xdsclient

import (
	"bytes"
	"os/exec"
	"reflect"
	"strings"
	"testing"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	rpcstatus "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/structpb"
)

// TestRequestWire checks that every request the client sends decodes, with
// go-control-plane's generated code, to the DeltaDiscoveryRequest it stands
// for.
func TestRequestWire(t *testing.T) {
	md, err := structpb.NewStruct(map[string]any{"kind": "ztunnel", "node": "node-1", "pod": "ztunnel-x"})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		req  request
		want *discoveryv3.DeltaDiscoveryRequest
	}{
		{"first subscription", request{node: &Node{ID: "ztunnel-x", Metadata: md}, typeURL: "t/a"},
			&discoveryv3.DeltaDiscoveryRequest{Node: &corev3.Node{Id: "ztunnel-x", Metadata: md}, TypeUrl: "t/a"}},
		{"node without metadata", request{node: &Node{ID: "n"}, typeURL: "t/a"},
			&discoveryv3.DeltaDiscoveryRequest{Node: &corev3.Node{Id: "n"}, TypeUrl: "t/a"}},
		{"empty node", request{node: &Node{}, typeURL: "t/a"},
			&discoveryv3.DeltaDiscoveryRequest{Node: &corev3.Node{}, TypeUrl: "t/a"}},
		{"resumed subscription", request{typeURL: "t/b", initial: map[string]string{"w1": "v1", "w2": "", "": "v3", "ünï": "çødé"}},
			&discoveryv3.DeltaDiscoveryRequest{TypeUrl: "t/b", InitialResourceVersions: map[string]string{"w1": "v1", "w2": "", "": "v3", "ünï": "çødé"}}},
		{"ACK", request{typeURL: "t/a", responseNonce: "n-17"},
			&discoveryv3.DeltaDiscoveryRequest{TypeUrl: "t/a", ResponseNonce: "n-17"}},
		{"NACK", request{typeURL: "t/a", responseNonce: "n-18", errCode: 3, errMessage: "w1: bad address"},
			&discoveryv3.DeltaDiscoveryRequest{TypeUrl: "t/a", ResponseNonce: "n-18", ErrorDetail: &rpcstatus.Status{Code: 3, Message: "w1: bad address"}}},
		{"NACK without message", request{typeURL: "t/a", errCode: 13},
			&discoveryv3.DeltaDiscoveryRequest{TypeUrl: "t/a", ErrorDetail: &rpcstatus.Status{Code: 13}}},
		{"NACK with a negative code", request{typeURL: "t/a", errCode: -2, errMessage: "x"},
			&discoveryv3.DeltaDiscoveryRequest{TypeUrl: "t/a", ErrorDetail: &rpcstatus.Status{Code: -2, Message: "x"}}},
		{"empty", request{}, &discoveryv3.DeltaDiscoveryRequest{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b, err := tc.req.marshal()
			if err != nil {
				t.Fatal(err)
			}
			got := &discoveryv3.DeltaDiscoveryRequest{}
			if err := proto.Unmarshal(b, got); err != nil {
				t.Fatalf("generated code cannot decode it: %v", err)
			}
			if !proto.Equal(tc.want, got) {
				t.Errorf("decoded request\n got %v\nwant %v", got, tc.want)
			}
			if u := got.ProtoReflect().GetUnknown(); len(u) > 0 {
				t.Errorf("unknown fields: %x", u)
			}
			// With the map in one entry at most, the encoding is the generated
			// code's, byte for byte.
			if len(tc.req.initial) <= 1 {
				want, err := proto.MarshalOptions{Deterministic: true}.Marshal(tc.want)
				if err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(b, want) {
					t.Errorf("encoding\n got %x\nwant %x", b, want)
				}
			}
		})
	}
}

// project is what the client keeps of a generated response.
func project(m *discoveryv3.DeltaDiscoveryResponse) *response {
	r := &response{systemVersionInfo: m.GetSystemVersionInfo(), typeURL: m.GetTypeUrl(), nonce: m.GetNonce(), removed: m.GetRemovedResources()}
	for _, x := range m.GetResources() {
		w := wireResource{name: x.GetName(), version: x.GetVersion(), hasBody: x.GetResource() != nil}
		w.bodyType, w.body = x.GetResource().GetTypeUrl(), x.GetResource().GetValue()
		r.resources = append(r.resources, w)
	}
	return r
}

// sameResponse compares responses, empty and nil slices alike.
func sameResponse(a, b *response) bool {
	norm := func(r *response) response {
		c := *r
		if len(c.removed) == 0 {
			c.removed = nil
		}
		if len(c.resources) == 0 {
			c.resources = nil
		}
		c.resources = append([]wireResource(nil), c.resources...)
		for i := range c.resources {
			if len(c.resources[i].body) == 0 {
				c.resources[i].body = nil
			}
		}
		return c
	}
	return reflect.DeepEqual(norm(a), norm(b))
}

func responseSeeds(t testing.TB) []*discoveryv3.DeltaDiscoveryResponse {
	body, err := anypb.New(structpb.NewStringValue("body"))
	if err != nil {
		t.Fatal(err)
	}
	return []*discoveryv3.DeltaDiscoveryResponse{
		{},
		{TypeUrl: "t/a", Nonce: "1"},
		{SystemVersionInfo: MoreToCome, TypeUrl: "t/a", Nonce: "2", RemovedResources: []string{"gone", "", "also gone"},
			Resources: []*discoveryv3.Resource{
				{Name: "w1", Version: "v1", Resource: body},
				{Name: "w2", Resource: &anypb.Any{TypeUrl: "t/a"}},
				{Name: "w3", Version: "v3"},
				{Name: "", Version: "v4", Resource: &anypb.Any{Value: []byte{1, 2, 3}}},
			}},
		{ // every field the client skips
			TypeUrl: "t/b", Nonce: "3",
			ControlPlane:         &corev3.ControlPlane{Identifier: "amesh-controller"},
			RemovedResourceNames: []*discoveryv3.ResourceName{{Name: "r"}},
			ResourceErrors:       []*discoveryv3.ResourceError{{ResourceName: &discoveryv3.ResourceName{Name: "e"}, ErrorDetail: &rpcstatus.Status{Code: 5}}},
			Resources: []*discoveryv3.Resource{{
				Name: "w1", Version: "v1", Resource: body, Aliases: []string{"a"}, Ttl: durationpb.New(5e9),
				ResourceName: &discoveryv3.ResourceName{Name: "w1"}, CacheControl: &discoveryv3.Resource_CacheControl{DoNotCache: true},
				Metadata: &corev3.Metadata{FilterMetadata: map[string]*structpb.Struct{"f": {}}},
			}},
		},
	}
}

// TestResponseWire decodes responses encoded by go-control-plane's generated
// code, with every field, through the client's gRPC codec.
func TestResponseWire(t *testing.T) {
	for i, m := range responseSeeds(t) {
		b, err := proto.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		// Split across buffers, as gRPC may hand it over.
		data := mem.BufferSlice{mem.SliceBuffer(b[:len(b)/2]), mem.SliceBuffer(b[len(b)/2:])}
		got := new(response)
		if err := (codec{}).Unmarshal(data, got); err != nil {
			t.Fatalf("response %d: %v", i, err)
		}
		if want := project(m); !sameResponse(got, want) {
			t.Errorf("response %d:\n got %+v\nwant %+v", i, got, want)
		}
	}
	// What the generated code refuses in the fields the client reads.
	for _, b := range [][]byte{
		{0x22, 0x01, 0xff},                   // type_url not UTF-8
		{0x12, 0x03, 0x1a, 0x01, 0xff},       // a resource's name not UTF-8
		{0x12, 0x04, 0x12, 0x02, 0x0a, 0x80}, // truncated Any
		{0x22, 0x05, 'a'},                    // truncated field
		{0x00},                               // field number 0
	} {
		if err := proto.Unmarshal(b, &discoveryv3.DeltaDiscoveryResponse{}); err == nil {
			t.Fatalf("%x: the generated code accepts it", b)
		}
		if err := new(response).unmarshal(b); err == nil {
			t.Errorf("%x: accepted", b)
		}
	}
}

// FuzzResponseWire: whatever go-control-plane's generated code decodes,
// the client decodes to the same content.
func FuzzResponseWire(f *testing.F) {
	for _, m := range responseSeeds(f) {
		b, err := proto.Marshal(m)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		m := &discoveryv3.DeltaDiscoveryResponse{}
		if proto.Unmarshal(b, m) != nil {
			_ = new(response).unmarshal(b) // must not panic
			return
		}
		got := new(response)
		if err := got.unmarshal(b); err != nil {
			t.Fatalf("%x: the generated code decodes it, the client does not: %v", b, err)
		}
		if want := project(m); !sameResponse(got, want) {
			t.Fatalf("%x:\n got %+v\nwant %+v", b, got, want)
		}
	})
}

// TestNoGoControlPlane proves the package links none of go-control-plane
// (nor the protos it depends on): the point of its hand-written wire code.
func TestNoGoControlPlane(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", ".").CombinedOutput()
	if err != nil {
		t.Fatalf("go list -deps: %v\n%s", err, out)
	}
	for _, p := range strings.Fields(string(out)) {
		if strings.HasPrefix(p, "github.com/envoyproxy/") || strings.HasPrefix(p, "github.com/cncf/") {
			t.Errorf("xdsclient links %s", p)
		}
	}
}
