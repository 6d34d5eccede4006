package xds

import (
	"strings"
	"testing"

	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	discoveryv1 "github.com/amesh-dev/amesh/api/discovery/v1"
)

// TestResponseEncoding checks the hand-written resource encoding and the
// unknown-field assembly against the generated code: what a client decodes
// is exactly the response the generated types would have sent.
func TestResponseEncoding(t *testing.T) {
	long := strings.Repeat("x", 300) // multi-byte length varints
	bodies := []*discoveryv1.Workload{
		{},
		{Name: "a"},
		{Name: long, Namespace: long, Services: map[string]*discoveryv1.PortList{"s": {Ports: []*discoveryv1.Port{{ServicePort: 80}}}}},
	}
	var entries []*entry
	want := &discoveryv3.DeltaDiscoveryResponse{TypeUrl: discoveryv1.WorkloadType, Nonce: "n1", RemovedResources: []string{"gone"}}
	for i, body := range bodies {
		name := []string{"w0", "w1", long}[i]
		version := []string{"", "v1", long}[i]
		e, err := prepare(discoveryv1.WorkloadType, &Resource{Name: name, Version: version, Body: body})
		if err != nil {
			t.Fatal(err)
		}
		entries = append(entries, e)
		value, err := proto.MarshalOptions{Deterministic: true}.Marshal(body)
		if err != nil {
			t.Fatal(err)
		}
		want.Resources = append(want.Resources, &discoveryv3.Resource{
			Name: name, Version: e.res.Version,
			Resource: &anypb.Any{TypeUrl: discoveryv1.WorkloadType, Value: value},
		})
	}
	b, err := proto.Marshal(newResponse(discoveryv1.WorkloadType, "n1", entries, []string{"gone"}))
	if err != nil {
		t.Fatal(err)
	}
	got := &discoveryv3.DeltaDiscoveryResponse{}
	if err := proto.Unmarshal(b, got); err != nil {
		t.Fatal(err)
	}
	if len(got.ProtoReflect().GetUnknown()) != 0 {
		t.Errorf("decoded response has unknown fields")
	}
	if !proto.Equal(got, want) {
		t.Errorf("decoded\n%v\nwant\n%v", got, want)
	}
	for i, r := range got.GetResources() {
		body, err := r.GetResource().UnmarshalNew()
		if err != nil || !proto.Equal(body, bodies[i]) {
			t.Errorf("resource %d body = %v, %v", i, body, err)
		}
	}
}
