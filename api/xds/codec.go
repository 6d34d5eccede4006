package xds

import (
	"sync"

	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/encoding"
	protoenc "google.golang.org/grpc/encoding/proto"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
)

// Codec is the gRPC server option that lets the Server send its responses
// without assembling them as messages: gRPC writes each response's header
// fields and the resources' shared encodings (prepared once per change for
// every stream), copied once into pooled buffers, instead of concatenating
// them into one message that is then marshalled again for every stream.
// Every other message of the gRPC server goes through the standard
// protobuf codec. Without the option the Server still works, at the cost
// of a second copy and per-stream garbage the size of each response.
func Codec() grpc.ServerOption {
	return grpc.ForceServerCodecV2(codec{base: encoding.GetCodecV2(protoenc.Name)})
}

type codec struct{ base encoding.CodecV2 }

func (c codec) Marshal(v any) (mem.BufferSlice, error) {
	if r, ok := v.(*response); ok {
		return r.buffers()
	}
	return c.base.Marshal(v)
}

func (c codec) Unmarshal(data mem.BufferSlice, v any) error { return c.base.Unmarshal(data, v) }

func (c codec) Name() string { return c.base.Name() }

// response is a DeltaDiscoveryResponse whose resources are pre-encoded
// entries. It is a proto.Message too: for the standard codec, ProtoReflect
// assembles the resources into the message (as its unknown-field bytes,
// which on the wire are exactly the repeated resources field).
type response struct {
	msg     *discoveryv3.DeltaDiscoveryResponse // everything but resources
	upserts []*entry

	once sync.Once
}

// newResponse builds a response of typeURL carrying the encoded upserts.
func newResponse(typeURL, nonce string, upserts []*entry, removes []string) *response {
	return &response{
		msg:     &discoveryv3.DeltaDiscoveryResponse{TypeUrl: typeURL, Nonce: nonce, RemovedResources: removes},
		upserts: upserts,
	}
}

// ProtoReflect assembles the full message (once).
func (r *response) ProtoReflect() protoreflect.Message {
	r.once.Do(func() {
		if len(r.upserts) == 0 {
			return
		}
		n := 0
		for _, e := range r.upserts {
			n += len(e.enc)
		}
		raw := make([]byte, 0, n)
		for _, e := range r.upserts {
			raw = append(raw, e.enc...)
		}
		r.msg.ProtoReflect().SetUnknown(raw)
	})
	return r.msg.ProtoReflect()
}

// segmentSize is the size of the pooled buffers a response is written
// into: large enough that an HTTP/2 frame (16 KiB) spans at most two.
const segmentSize = 32 << 10

// buffers is the encoded response — the header fields, then each
// resource's shared encoding (protobuf fields may come in any order, and a
// repeated field's elements may follow other fields) — copied into pooled
// buffers that gRPC returns to the pool once written. No per-stream
// garbage: the alternative, handing gRPC each small encoding as is, makes
// its frame writer allocate for every frame.
func (r *response) buffers() (mem.BufferSlice, error) {
	head, err := proto.Marshal(r.msg)
	if err != nil {
		return nil, err
	}
	remaining := len(head)
	for _, e := range r.upserts {
		remaining += len(e.enc)
	}
	pool := mem.DefaultBufferPool()
	out := make(mem.BufferSlice, 0, remaining/segmentSize+1)
	var cur *[]byte
	off := 0
	put := func(p []byte) {
		for len(p) > 0 {
			if cur == nil {
				cur, off = pool.Get(min(segmentSize, remaining)), 0
			}
			n := copy((*cur)[off:], p)
			off, p, remaining = off+n, p[n:], remaining-n
			if off == len(*cur) {
				out = append(out, mem.NewBuffer(cur, pool))
				cur = nil
			}
		}
	}
	put(head)
	for _, e := range r.upserts {
		put(e.enc)
	}
	return out, nil
}
