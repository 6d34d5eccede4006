package xds

import (
	"fmt"
	"strings"
	"testing"

	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/grpc/encoding"
	protoenc "google.golang.org/grpc/encoding/proto"
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
	// Through the standard codec (the response assembles itself) and
	// through Codec (header and shared encodings written as they are).
	viaProto, err := proto.Marshal(newResponse(discoveryv1.WorkloadType, "n1", entries, []string{"gone"}))
	if err != nil {
		t.Fatal(err)
	}
	c := codec{base: encoding.GetCodecV2(protoenc.Name)}
	bufs, err := c.Marshal(newResponse(discoveryv1.WorkloadType, "n1", entries, []string{"gone"}))
	if err != nil {
		t.Fatal(err)
	}
	viaCodec := bufs.Materialize()
	for name, b := range map[string][]byte{"proto": viaProto, "codec": viaCodec} {
		t.Run(name, func(t *testing.T) { checkResponse(t, b, want, bodies) })
	}
	// Other messages go through the standard codec.
	req := &discoveryv3.DeltaDiscoveryRequest{TypeUrl: "x", ResponseNonce: "n"}
	rb, err := c.Marshal(req)
	if err != nil {
		t.Fatal(err)
	}
	back := &discoveryv3.DeltaDiscoveryRequest{}
	if err := c.Unmarshal(rb, back); err != nil || !proto.Equal(back, req) {
		t.Errorf("request through the codec: %v, %v", back, err)
	}
}

func checkResponse(t *testing.T, b []byte, want *discoveryv3.DeltaDiscoveryResponse, bodies []*discoveryv1.Workload) {
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

// TestSplit: pushes are cut within the bounds, in order, never empty
// except a push with nothing in it (one empty response).
func TestSplit(t *testing.T) {
	ent := func(n, size int) []*entry {
		out := make([]*entry, n)
		for i := range out {
			out[i] = &entry{res: &Resource{Name: fmt.Sprint(i)}, enc: make([]byte, size)}
		}
		return out
	}
	rm := func(n int) []string {
		out := make([]string, n)
		for i := range out {
			out[i] = fmt.Sprint("r", i)
		}
		return out
	}
	for _, tc := range []struct {
		name       string
		maxN, maxB int
		upserts    []*entry
		removes    []string
		want       [][2]int // upserts, removes per chunk
	}{
		{"empty", 10, 100, nil, nil, [][2]int{{0, 0}}},
		{"exact multiple", 10, -1, ent(20, 1), nil, [][2]int{{10, 0}, {10, 0}}},
		{"removes fill the last", 10, -1, ent(15, 1), rm(12), [][2]int{{10, 0}, {5, 5}, {0, 7}}},
		{"only removes", 10, -1, nil, rm(25), [][2]int{{0, 10}, {0, 10}, {0, 5}}},
		{"bytes", -1, 100, ent(10, 30), nil, [][2]int{{3, 0}, {3, 0}, {3, 0}, {1, 0}}},
		{"oversized alone", -1, 100, append(append(ent(1, 10), ent(1, 500)...), ent(1, 10)...), nil, [][2]int{{1, 0}, {1, 0}, {1, 0}}},
		{"no limit", -1, -1, ent(5000, 100), rm(5000), [][2]int{{5000, 5000}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := &Server{opts: ServerOptions{MaxResponseResources: tc.maxN, MaxResponseBytes: tc.maxB}}
			chunks := s.split(tc.upserts, tc.removes)
			var got [][2]int
			var ups []*entry
			var rms []string
			for _, c := range chunks {
				got = append(got, [2]int{len(c.upserts), len(c.removes)})
				ups, rms = append(ups, c.upserts...), append(rms, c.removes...)
			}
			if fmt.Sprint(got) != fmt.Sprint(tc.want) {
				t.Errorf("chunks %v, want %v", got, tc.want)
			}
			if len(ups) != len(tc.upserts) || len(rms) != len(tc.removes) {
				t.Fatalf("lost resources: %d/%d upserts, %d/%d removes", len(ups), len(tc.upserts), len(rms), len(tc.removes))
			}
			for i := range ups {
				if ups[i] != tc.upserts[i] {
					t.Fatalf("upsert %d out of order", i)
				}
			}
		})
	}
}
