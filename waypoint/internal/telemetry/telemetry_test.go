package telemetry

import (
	"context"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	coltracepb "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	"go.uber.org/zap"
	"google.golang.org/grpc"
)

func TestRequestMetrics(t *testing.T) {
	reg := prometheus.NewRegistry()
	m := NewMetrics(reg)
	ok := &Labels{SourceWorkload: "web", DestinationService: "reviews.default.svc.cluster.local", ResponseCode: "200", ResponseFlags: "-", RequestProtocol: "http"}
	bad := *ok
	bad.ResponseCode, bad.ResponseFlags = "503", "UO"
	m.Request(ok, 3, 100, 200)
	m.Request(ok, 5, 100, 200)
	m.Request(&bad, 1, 10, 20)
	if n := testutil.ToFloat64(m.requests.WithLabelValues(ok.values()...)); n != 2 {
		t.Fatalf("200 series = %v", n)
	}
	if n := testutil.ToFloat64(m.requests.WithLabelValues(bad.values()...)); n != 1 {
		t.Fatalf("503 series = %v", n)
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	names := map[string]bool{}
	for _, mf := range mfs {
		names[mf.GetName()] = true
		if mf.GetName() != "istio_requests_total" {
			continue
		}
		for _, mm := range mf.GetMetric() {
			got := map[string]string{}
			for _, l := range mm.GetLabel() {
				got[l.GetName()] = l.GetValue()
			}
			if got["reporter"] != "waypoint" || got["source_workload"] != "web" || got["destination_workload"] != "unknown" {
				t.Errorf("labels %v", got)
			}
		}
	}
	for _, n := range []string{"istio_requests_total", "istio_request_duration_milliseconds", "istio_request_bytes", "istio_response_bytes"} {
		if !names[n] {
			t.Errorf("%s not exported", n)
		}
	}
}

func TestTracerPropagation(t *testing.T) {
	tr, err := NewTracer(context.Background(), TracingConfig{SampleRatio: 0, ServiceName: "t"})
	if err != nil {
		t.Fatal(err)
	}
	in := http.Header{}
	in.Set("Traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
	in.Set("Tracestate", "congo=t61rcWkgMzE")
	ctx, span := tr.Start(context.Background(), "x", in)
	out := http.Header{"Traceparent": {"stale"}, "X-B3-Spanid": {"stale"}}
	tr.Inject(ctx, out)
	span.End()
	tp := out.Get("Traceparent")
	if !strings.HasPrefix(tp, "00-0af7651916cd43dd8448eb211c80319c-") || strings.Contains(tp, "b7ad6b7169203331") || !strings.HasSuffix(tp, "-01") {
		t.Fatalf("traceparent %q: want same trace, new parent, sampled kept", tp)
	}
	if out.Get("Tracestate") != "congo=t61rcWkgMzE" || out.Get("X-B3-Traceid") != "0af7651916cd43dd8448eb211c80319c" || out.Get("X-B3-Spanid") == "stale" {
		t.Fatalf("headers %v", out)
	}
	if err := tr.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
}

type collector struct {
	coltracepb.UnimplementedTraceServiceServer
	got chan *coltracepb.ExportTraceServiceRequest
}

func (c *collector) Export(_ context.Context, r *coltracepb.ExportTraceServiceRequest) (*coltracepb.ExportTraceServiceResponse, error) {
	c.got <- r
	return &coltracepb.ExportTraceServiceResponse{}, nil
}

// TestOTLPExport sends spans to a real OTLP/gRPC collector endpoint.
func TestOTLPExport(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	g := grpc.NewServer()
	col := &collector{got: make(chan *coltracepb.ExportTraceServiceRequest, 10)}
	coltracepb.RegisterTraceServiceServer(g, col)
	go func() { _ = g.Serve(ln) }()
	defer g.Stop()
	tr, err := NewTracer(context.Background(), TracingConfig{OTLPEndpoint: ln.Addr().String(), Insecure: true, SampleRatio: 1, ServiceName: "waypoint.default"})
	if err != nil {
		t.Fatal(err)
	}
	_, span := tr.Start(context.Background(), "waypoint GET", http.Header{})
	End(span, 200, "-", time.Now())
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := tr.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	select {
	case r := <-col.got:
		rs := r.GetResourceSpans()
		if len(rs) != 1 || len(rs[0].GetScopeSpans()) != 1 || rs[0].GetScopeSpans()[0].GetSpans()[0].GetName() != "waypoint GET" {
			t.Fatalf("exported %v", r)
		}
		found := false
		for _, a := range rs[0].GetResource().GetAttributes() {
			if a.GetKey() == "service.name" && a.GetValue().GetStringValue() == "waypoint.default" {
				found = true
			}
		}
		if !found {
			t.Fatalf("service.name missing: %v", rs[0].GetResource())
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no span exported")
	}
}

// TestCarrierCanonicalNames: the allocation-free names are exactly what
// http.CanonicalHeaderKey makes of the propagators' header names, and
// Get/Set behave like propagation.HeaderCarrier.
func TestCarrierCanonicalNames(t *testing.T) {
	for _, k := range []string{"traceparent", "tracestate", "baggage", "b3", "x-b3-traceid", "x-b3-spanid",
		"x-b3-parentspanid", "x-b3-sampled", "x-b3-flags", "x-other", "X-Mixed-case"} {
		if got, want := canonical(k), http.CanonicalHeaderKey(k); got != want {
			t.Errorf("canonical(%q) = %q, want %q", k, got, want)
		}
		h := http.Header{}
		carrier(h).Set(k, "v")
		if h.Get(k) != "v" || carrier(h).Get(k) != "v" || len(h) != 1 {
			t.Errorf("%q: %v", k, h)
		}
	}
	if testing.AllocsPerRun(100, func() {
		h := http.Header{"Traceparent": {"x"}}
		_ = carrier(h).Get("traceparent")
		_ = carrier(h).Get("x-b3-traceid")
	}) > 1 {
		t.Error("carrier lookups allocate")
	}
}

// TestAccessLogBuffered: entries are held until the flush interval or stop,
// not written one by one, and stop writes them all.
func TestAccessLogBuffered(t *testing.T) {
	var mu sync.Mutex
	var buf strings.Builder
	writes := 0
	w := writerFunc(func(p []byte) (int, error) {
		mu.Lock()
		defer mu.Unlock()
		writes++
		return buf.Write(p)
	})
	log, stop := NewAccessLog(w)
	for i := range 100 {
		log.Info("request", zap.Int("i", i))
	}
	mu.Lock()
	if writes != 0 {
		t.Errorf("%d writes before the flush", writes)
	}
	mu.Unlock()
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	if n := strings.Count(buf.String(), `"msg":"request"`); n != 100 || writes > 2 {
		t.Fatalf("%d entries in %d writes", n, writes)
	}
	if !strings.Contains(buf.String(), `"logger":"access"`) {
		t.Fatalf("entry %q", strings.SplitN(buf.String(), "\n", 2)[0])
	}
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }
