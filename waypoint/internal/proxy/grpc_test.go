package proxy

import (
	"context"
	"io"
	"maps"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	discoveryv1 "github.com/amesh-dev/amesh/api/discovery/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
)

func grpcBackend(t *testing.T, name string) http.Handler {
	gs := grpc.NewServer()
	hs := health.NewServer()
	hs.SetServingStatus(name, healthpb.HealthCheckResponse_SERVING)
	healthpb.RegisterHealthServer(gs, hs)
	t.Cleanup(gs.Stop)
	return gs // grpc.Server serves HTTP/2 requests from net/http (h2c here)
}

func grpcClient(t *testing.T, url string) healthpb.HealthClient {
	addr := strings.TrimPrefix(url, "http://")
	cc, err := grpc.NewClient("passthrough:///"+addr, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(func(ctx context.Context, a string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "tcp", a)
		}))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return healthpb.NewHealthClient(cc)
}

// TestGRPCThroughHBONE: GRPCRoute method matching with header modifiers,
// fault injection with a gRPC status, and local replies as gRPC errors,
// with a real gRPC client and server and HBONE on both sides.
func TestGRPCThroughHBONE(t *testing.T) {
	e := newEnv(t)
	e.service("ratings", 9090, "grpc", backend(t, grpcBackend(t, "ratings")))
	e.service("ratings-v2", 9090, "grpc", backend(t, grpcBackend(t, "ratings-v2")))
	e.waypoint(&discoveryv1.WaypointService{Service: key("ratings"), GrpcRoutes: []*discoveryv1.GRPCRoute{{Namespace: "default", Name: "g",
		Rules: []*discoveryv1.GRPCRouteRule{
			{Matches: []*discoveryv1.GRPCRouteMatch{{Method: &discoveryv1.GRPCMethodMatch{Service: "grpc.health.v1.Health", Method: "Check"},
				Headers: []*discoveryv1.HeaderMatch{{Name: "x-version", Value: "2"}}}},
				Filters: []*discoveryv1.HTTPFilter{{Kind: &discoveryv1.HTTPFilter_ResponseHeaderModifier{ResponseHeaderModifier: &discoveryv1.HeaderModifier{
					Set: []*discoveryv1.Header{{Name: "x-served-by", Value: "v2"}}}}}},
				Backends: []*discoveryv1.BackendRef{{Service: key("ratings-v2"), Port: 9090, Weight: 1}}},
			{Matches: []*discoveryv1.GRPCRouteMatch{{Method: &discoveryv1.GRPCMethodMatch{Service: "grpc.health.v1.Health", Method: "Check"}}},
				Backends: []*discoveryv1.BackendRef{{Service: key("ratings"), Port: 9090, Weight: 1}}},
		}}}})
	hc := grpcClient(t, e.front("ratings", 9090, true))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	if r, err := hc.Check(ctx, &healthpb.HealthCheckRequest{Service: "ratings"}); err != nil || r.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("v1: %v %v", r, err)
	}
	// Routed to v2 by header; v2 does not know "ratings" → NotFound from v2.
	var hdr metadata.MD
	_, err := hc.Check(metadata.AppendToOutgoingContext(ctx, "x-version", "2"), &healthpb.HealthCheckRequest{Service: "ratings"}, grpc.Header(&hdr))
	if status.Code(err) != codes.NotFound || strings.Join(hdr.Get("x-served-by"), "") != "v2" {
		t.Fatalf("v2 route: %v, headers %v", err, hdr)
	}
	if r, err := hc.Check(metadata.AppendToOutgoingContext(ctx, "x-version", "2"), &healthpb.HealthCheckRequest{Service: "ratings-v2"}); err != nil || r.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("v2: %v %v", r, err)
	}
	// No rule for List: a local 404 is UNIMPLEMENTED.
	if _, err := hc.List(ctx, &healthpb.HealthListRequest{}); status.Code(err) != codes.Unimplemented {
		t.Fatalf("unrouted: %v", err)
	}

	// Fault abort with a gRPC status, then rate limiting → UNAVAILABLE.
	e.waypoint(&discoveryv1.WaypointService{Service: key("ratings"), TrafficPolicy: &discoveryv1.TrafficPolicy{
		Fault: &discoveryv1.FaultInjection{Abort: &discoveryv1.FaultAbort{Percent: 100, GrpcStatus: uint32(codes.ResourceExhausted)}}}})
	if _, err := hc.Check(ctx, &healthpb.HealthCheckRequest{Service: "ratings"}); status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("fault: %v", err)
	}
	e.waypoint(&discoveryv1.WaypointService{Service: key("ratings"), TrafficPolicy: &discoveryv1.TrafficPolicy{
		LocalRateLimit: &discoveryv1.LocalRateLimit{MaxTokens: 2, TokensPerFill: 1, FillInterval: durationpb.New(time.Hour)}}})
	codesSeen := map[codes.Code]int{}
	for range 5 {
		_, err := hc.Check(ctx, &healthpb.HealthCheckRequest{Service: "ratings"})
		codesSeen[status.Code(err)]++
	}
	if codesSeen[codes.OK] != 2 || codesSeen[codes.Unavailable] != 3 {
		t.Fatalf("rate limit on gRPC: %v", codesSeen)
	}
	if !hasFlag(t, e, "RL") || !hasFlag(t, e, "FI") {
		t.Fatal("RL/FI response flags not recorded")
	}
}

// grpcRecord is what a recording gRPC backend saw.
type grpcRecord struct {
	service string // the HealthCheckRequest's service field (the body)
	md      metadata.MD
}

// recordingGRPC is a health server that records each Check it serves.
func recordingGRPC(t *testing.T, name string, seen chan<- grpcRecord) http.Handler {
	gs := grpc.NewServer(grpc.UnaryInterceptor(func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		md, _ := metadata.FromIncomingContext(ctx)
		if r, ok := req.(*healthpb.HealthCheckRequest); ok {
			seen <- grpcRecord{service: r.GetService(), md: md}
		}
		return h(ctx, req)
	}))
	hs := health.NewServer()
	hs.SetServingStatus(name, healthpb.HealthCheckResponse_SERVING)
	healthpb.RegisterHealthServer(gs, hs)
	t.Cleanup(gs.Stop)
	return gs
}

// TestGRPCRouteFilters: a GRPCRoute's RequestHeaderModifier,
// ResponseHeaderModifier and RequestMirror work on gRPC (HTTP/2 requests
// whose body length is unknown): the mirror gets the whole request message
// and the modified headers, and never changes the response.
func TestGRPCRouteFilters(t *testing.T) {
	e := newEnv(t)
	mainSeen, shadowSeen := make(chan grpcRecord, 100), make(chan grpcRecord, 100)
	e.service("ratings", 9090, "grpc", backend(t, recordingGRPC(t, "ratings", mainSeen)))
	// The shadow does not know "ratings": it answers NotFound, which must
	// not reach the client.
	e.service("ratings-shadow", 9090, "grpc", backend(t, recordingGRPC(t, "other", shadowSeen)))
	e.waypoint(&discoveryv1.WaypointService{Service: key("ratings"), GrpcRoutes: []*discoveryv1.GRPCRoute{{Namespace: "default", Name: "g",
		Rules: []*discoveryv1.GRPCRouteRule{{
			Matches: []*discoveryv1.GRPCRouteMatch{{Method: &discoveryv1.GRPCMethodMatch{Service: "grpc.health.v1.Health"}}},
			Filters: []*discoveryv1.HTTPFilter{
				{Kind: &discoveryv1.HTTPFilter_RequestHeaderModifier{RequestHeaderModifier: &discoveryv1.HeaderModifier{
					Set: []*discoveryv1.Header{{Name: "x-set", Value: "set"}}, Add: []*discoveryv1.Header{{Name: "x-add", Value: "added"}},
					Remove: []string{"x-secret"}}}},
				{Kind: &discoveryv1.HTTPFilter_ResponseHeaderModifier{ResponseHeaderModifier: &discoveryv1.HeaderModifier{
					Set: []*discoveryv1.Header{{Name: "x-served-by", Value: "waypoint"}}}}},
				{Kind: &discoveryv1.HTTPFilter_RequestMirror{RequestMirror: &discoveryv1.RequestMirror{
					Backend: &discoveryv1.BackendRef{Service: key("ratings-shadow"), Port: 9090}, Percent: 100}}},
			},
			Backends: []*discoveryv1.BackendRef{{Service: key("ratings"), Port: 9090, Weight: 1}},
		}}}}})
	hc := grpcClient(t, e.front("ratings", 9090, true))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	const n = 5
	for i := range n {
		var hdr metadata.MD
		octx := metadata.AppendToOutgoingContext(ctx, "x-secret", "s3cret", "x-set", "client", "x-add", "client")
		r, err := hc.Check(octx, &healthpb.HealthCheckRequest{Service: "ratings"}, grpc.Header(&hdr))
		if err != nil || r.GetStatus() != healthpb.HealthCheckResponse_SERVING {
			t.Fatalf("call %d: %v %v (the mirror must not change the response)", i, r, err)
		}
		if got := strings.Join(hdr.Get("x-served-by"), ","); got != "waypoint" {
			t.Fatalf("response header x-served-by %q", got)
		}
	}
	e.proxy.WaitMirrors()
	check := func(who string, rec grpcRecord) {
		t.Helper()
		if rec.service != "ratings" {
			t.Errorf("%s got request message for %q", who, rec.service)
		}
		if got := rec.md.Get("x-set"); len(got) != 1 || got[0] != "set" {
			t.Errorf("%s x-set %v", who, got)
		}
		if got := rec.md.Get("x-add"); len(got) != 2 || got[0] != "client" || got[1] != "added" {
			t.Errorf("%s x-add %v", who, got)
		}
		if got := rec.md.Get("x-secret"); len(got) != 0 {
			t.Errorf("%s x-secret %v not removed", who, got)
		}
	}
	for i := range n {
		select {
		case rec := <-mainSeen:
			check("backend", rec)
		default:
			t.Fatalf("backend saw %d calls, want %d", i, n)
		}
		select {
		case rec := <-shadowSeen:
			check("mirror", rec)
		default:
			t.Fatalf("mirror saw %d calls, want %d", i, n)
		}
	}
}

// TestGRPCStatusLabelBounded: the grpc_response_status label takes one of
// the 17 gRPC codes or "unknown", whatever an upstream writes in its
// grpc-status (the label set must stay bounded).
func TestGRPCStatusLabelBounded(t *testing.T) {
	e := newEnv(t)
	e.service("g", 9090, "grpc", backend(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/grpc")
		w.Header().Set("Trailer", "Grpc-Status")
		w.WriteHeader(200)
		w.Header().Set("Grpc-Status", strings.TrimPrefix(r.URL.Path, "/"))
	})))
	e.waypoint(&discoveryv1.WaypointService{Service: key("g")})
	url := e.front("g", 9090, true)
	var p http.Protocols
	p.SetUnencryptedHTTP2(true)
	c := &http.Client{Transport: &http.Transport{Protocols: &p}}
	for _, st := range []string{"0", "16", "17", "007", "-1", "banana", "99999999999999999999"} {
		req, _ := http.NewRequest("POST", url+"/"+st, strings.NewReader(""))
		req.Header.Set("Content-Type", "application/grpc")
		resp, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	mfs, err := e.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]bool{}
	for _, mf := range mfs {
		if mf.GetName() != "istio_requests_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "grpc_response_status" {
					got[l.GetValue()] = true
				}
			}
		}
	}
	want := map[string]bool{"0": true, "16": true, "unknown": true}
	if !maps.Equal(got, want) {
		t.Fatalf("grpc_response_status values %v, want %v", got, want)
	}
}
